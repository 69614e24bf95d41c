"""The stages (one Job per command) and the libraries they share (policy, rl, raycast, rewards, ...)."""
