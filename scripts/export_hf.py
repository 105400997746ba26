"""Export a trained model to Hugging Face formats (the code is minigpt4/export/; also `python -m minigpt4.export`
and, installed, `adavib-export`).

    python scripts/export_hf.py --cfg-path CONFIG [--options ...] --ckpt trainable.safetensors --out DIR
    python scripts/export_hf.py --check DIR
"""

from __future__ import annotations

import sys

from minigpt4.export.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
