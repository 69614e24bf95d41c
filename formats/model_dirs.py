"""Local model directories: load transformers objects from disk without running code shipped in them.

A checkpoint directory can carry Python files (config.json `auto_map`) that transformers imports when
trust_remote_code is on. rl3d pins it off and never asks on stdin; `rl3d --trust-remote-code COMMAND`
turns it on by setting RL3D_TRUST_REMOTE_CODE=1, so processes started by `accelerate launch` or a
Slurm array inherit the choice.
"""
from __future__ import annotations

import os
from pathlib import Path

from rl3d.formats.errors import InputError, first_line

TRUST_REMOTE_CODE_ENV = "RL3D_TRUST_REMOTE_CODE"


def remote_code_allowed() -> bool:
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "") == "1"


def from_local_dir(cls, path: str | os.PathLike, what: str, **kwargs):
    """`cls.from_pretrained(path)` for a local directory only, with trust_remote_code pinned.

    Any loading failure becomes a one-line InputError naming the directory and `what` it should hold.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p}: not found (rl3d loads models from local directories only)")
    try:
        return cls.from_pretrained(str(p), local_files_only=True, trust_remote_code=remote_code_allowed(), **kwargs)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{p}: cannot load the {what} ({type(e).__name__}: {first_line(e)})") from None
