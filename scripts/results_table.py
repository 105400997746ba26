"""Collect evaluation results into one Markdown table (the code is minigpt4/eval/results_table.py).

    python scripts/results_table.py out/*/metrics.json [--out table.md]
"""

from __future__ import annotations

import sys

from minigpt4.eval.results_table import load_metrics, main, results_table  # noqa: E402,F401  (the script's API)

if __name__ == "__main__":
    sys.exit(main())
