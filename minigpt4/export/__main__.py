"""`python -m minigpt4.export ...`: see minigpt4/export/cli.py."""
import sys

from minigpt4.export.cli import main

sys.exit(main())
