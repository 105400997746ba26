"""The hostile-input corpus, one module an area (each a table of `Case` rows with the acts they run); the runner is
tests/test_hostile_inputs.py and what the areas share is tests/_hostile.py."""
from __future__ import annotations

from hostile.captions import CAPTION_CASES
from hostile.checkpoints import CHECKPOINT_CASES
from hostile.configs import CONFIG_CASES
from hostile.evaluation import EVALUATION_CASES
from hostile.exports import EXPORT_CASES, EXPORT_VALUES
from hostile.images import IMAGE_CASES
from hostile.json_files import EXPECTED_VALUES as JSON_VALUES
from hostile.json_files import JSON_CASES
from hostile.outputs import OUTPUT_CASES
from hostile.tokenizers import TOKENIZER_CASES

CORPUS = (IMAGE_CASES + JSON_CASES + CONFIG_CASES + CHECKPOINT_CASES + OUTPUT_CASES + CAPTION_CASES + TOKENIZER_CASES
          + EVALUATION_CASES + EXPORT_CASES)
EXPECTED_VALUES = {**JSON_VALUES, **EXPORT_VALUES}  # what the Holds rows return, where not True

__all__ = ["CORPUS", "EXPECTED_VALUES"]
