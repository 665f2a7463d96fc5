"""Training loop, loss, optimizer, metrics. `python -m omnitune.train ...` runs the trainer."""
