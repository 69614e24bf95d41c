"""The RL library behind `rl3d rl-step`: advantages (advantages.py), the loss (loss.py), the
optimizer steps over minibatches and micro-batches (update.py) and the bookkeeping of a
multi-process launch (processes.py)."""
