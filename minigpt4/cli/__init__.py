"""The command-line programs: `train`, `evaluate` and `demo` (installed as `adavib-train`, `adavib-eval` and
`adavib-demo`; in a checkout also `python train.py`, `python evaluate.py`, `python demo.py`). The other commands
live next to what they run: `adavib-export` (minigpt4/export/cli.py), `adavib-chair`, `adavib-pope`,
`adavib-paired`, `adavib-results` (minigpt4/eval/)."""
