"""The stages (one Job per command) and the libraries they share (policy, rl, raycast, rewards, ...)."""
import os

# OpenMP threads that wait by sleeping, not spinning: torch runs here beside rl3d's own worker
# processes (render, reward, mesh writers) and beside other jobs on shared nodes, and spinning
# threads of an oversubscribed process made a small matmul 30-100x slower on 2 busy cores.
# Read when torch loads its OpenMP runtime, so it is set before any stage imports torch; a user's
# own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
