"""The exceptions whose message is the whole story for a user (a bad file, key or image, named in the
message). Entry points print them as one line and exit 2 instead of showing a traceback."""
from __future__ import annotations

from minigpt4.common.config import ConfigError
from minigpt4.common.files import NotRegularFileError
from minigpt4.common.jsonfiles import DataFileError
from minigpt4.datasets.images import BadImageError
from minigpt4.models.checkpoints import CheckpointError

USER_FACING_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, BadImageError,
                                                         DataFileError, NotRegularFileError)
