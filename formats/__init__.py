"""On-disk contracts of rl3d: tables, shards, GLB, prompts, voxels, codecs, model directories."""
__version__ = "0.1.0"
