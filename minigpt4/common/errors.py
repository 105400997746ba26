"""The exceptions whose message is the whole story for a user (a bad file, key or image, named in the
message). Entry points print them as one line and exit 2 instead of showing a traceback.

The error types of the wings are defined here, on the ground floor, so that anything may raise or catch them
without importing the code that raises them: `CheckpointError` (raised by models/checkpoints.py and the
runner's checkpoints) and `BadImageError` (common/images.py). Those modules re-export them under their old
names. `ConfigError`, `DataFileError` and `NotRegularFileError` live with the common helpers that raise them.
"""
from __future__ import annotations

import os

from minigpt4.common.config import ConfigError
from minigpt4.common.files import NotRegularFileError
from minigpt4.common.jsonfiles import DataFileError


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the module it is loaded into."""


class BadImageError(Exception):
    """An image that cannot be used; `path` names it (a file path, or a shard/key for in-memory bytes)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


USER_FACING_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, BadImageError,
                                                         DataFileError, NotRegularFileError)
