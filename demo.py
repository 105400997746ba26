#!/usr/bin/env python
"""`python demo.py ...` in a checkout: runs minigpt4/cli/demo.py, where the code is (installed: `adavib-demo`).

Edit minigpt4/cli/demo.py. `import demo` returns that module itself, so tests and tools see one module.
"""
import sys

from minigpt4.cli import demo as _command

if __name__ == "__main__":
    sys.exit(_command.main())
else:
    sys.modules[__name__] = _command
