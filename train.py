#!/usr/bin/env python
"""`python train.py ...` in a checkout: runs minigpt4/cli/train.py, where the code is (installed: `adavib-train`).

Edit minigpt4/cli/train.py. `import train` returns that module itself, so tests and tools see one module.
"""
import sys

from minigpt4.cli import train as _command

if __name__ == "__main__":
    sys.exit(_command.main())
else:
    sys.modules[__name__] = _command
