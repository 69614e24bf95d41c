"""Texturing: an optional user hook that turns a coarse, untextured sample mesh into a textured GLB."""
from rl3d.stages.texturing.hook import TextureHook, parse_hook, texture_meshes  # noqa: F401
