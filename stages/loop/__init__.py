"""What `rl3d train` keeps between steps besides the models: the prompt feed, the run's settings
record, checkpoints and resume, and stages swapped for a user's command."""
