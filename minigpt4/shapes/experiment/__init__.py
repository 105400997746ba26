"""The shapes-world AdaVIB experiment of scripts/shapes_experiment.py and scripts/partner_readout.py (see
minigpt4/shapes)."""
