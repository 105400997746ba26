"""The shapes world, its drawings, its training examples and the world-folder check (see minigpt4/shapes)."""
