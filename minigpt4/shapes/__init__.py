"""The shapes world: a procedural, CPU-scale object-hallucination testbed, and its AdaVIB experiment.

Two sub-packages on two floors (the layers contract in pyproject.toml):
  world/       the world (scenes.py: classes, scenes, captions, POPE questions, the file writer; drawings.py), its
               training examples (qa.py: ShapesQADataset, built by the dataset registry as `shapes_qa`) and the
               world-folder check (folder.py). It sits below datasets/, whose registry builds its QA dataset.
  experiment/  the experiment of scripts/shapes_experiment.py: its plan (plan.py), running the steps (running.py),
               the report (report.py) and the visual-token readout of scripts/partner_readout.py (readout.py). It
               reads evaluation results with eval/ and sits above it, beside benchmarking/.
"""
