"""rl3d command-line interface (click wiring only)."""
__version__ = "0.1.0"
