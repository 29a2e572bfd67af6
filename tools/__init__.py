"""Command-line tools around the trainer (Cloud TPU job submission)."""
