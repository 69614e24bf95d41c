"""The codecs that run above the on-disk layer, and `load_codec`, which loads whichever codec a path
names. formats/codecs.py decides which codec that is (its table of formats); a format that decodes
through a torch network (`network = True`) has its codec class here, stages/codecs/<kind>.py as
`CODEC`, imported on first use so that torch loads only where such a codec is named.
"""
from __future__ import annotations

import importlib
import os

from rl3d.formats.codecs import Codec, codec_format


def codec_class(path: str | os.PathLike | None) -> type[Codec]:
    """The class of the codec `path` names (None = the shipped block codec)."""
    fmt = codec_format(path)
    return importlib.import_module(f"{__name__}.{fmt.kind}").CODEC if fmt.network else fmt


def load_codec(path: str | os.PathLike | None, device: str | None = None) -> Codec:
    """The codec at `path` (None = the shipped block codec); InputError naming the path when it is
    missing or unreadable. `device`: where a network codec runs (the block codec is numpy)."""
    return codec_class(path).open(path, device=device)
