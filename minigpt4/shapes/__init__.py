"""The shapes world: a procedural, CPU-scale object-hallucination testbed, and its AdaVIB experiment.

Two sub-packages on two floors (the layers contract in pyproject.toml):
  world/       the world (scenes.py: classes, scenes, captions, POPE questions, the file writer; drawings.py), its
               training examples (qa.py: ShapesQADataset, built by the dataset registry as `shapes_qa`) and the
               world-folder check (folder.py). It sits below datasets/, whose registry builds its QA dataset.
  experiment/  scripts/shapes_experiment.py's plan (plan.py), the running of its steps (running.py) and its report
               (report.py); the visual-token readout of scripts/partner_readout.py (readout.py); the base model's
               training of scripts/train_shapes_base.py (base_model.py). It reads results with eval/ and trains
               with models/ and runners/, so it sits above them, beside benchmarking/.
"""
