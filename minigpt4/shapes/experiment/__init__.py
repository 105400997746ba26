"""The shapes-world experiment and base model behind scripts/shapes_experiment.py, partner_readout.py and
train_shapes_base.py (see minigpt4/shapes)."""
