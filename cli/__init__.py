"""rl3d command-line interface (click wiring only)."""
from rl3d.formats import __version__  # noqa: F401  (one version, defined where every layer can read it)
