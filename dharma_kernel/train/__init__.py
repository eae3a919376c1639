"""Training: the loop, AdamW and its schedules, memory options and estimates, checkpoints of runs."""
