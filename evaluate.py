#!/usr/bin/env python
"""`python evaluate.py ...` in a checkout: runs minigpt4/cli/evaluate.py, where the code is (installed: `adavib-eval`).

Edit minigpt4/cli/evaluate.py. `import evaluate` returns that module itself, so tests and tools see one module.
"""
import sys

from minigpt4.cli import evaluate as _command

if __name__ == "__main__":
    sys.exit(_command.main())
else:
    sys.modules[__name__] = _command
