"""Local model directories: load transformers objects from disk without running code shipped in them.

A checkpoint directory can carry Python files (config.json `auto_map`) that transformers imports when
trust_remote_code is on. rl3d pins it off and never asks on stdin; `rl3d --trust-remote-code COMMAND`
turns it on by setting RL3D_TRUST_REMOTE_CODE=1, so the worker processes it starts inherit the choice.
The variable alone turns nothing on: a command without the flag clears an inherited one (with a
warning), so the opt-in is always on the command line (`accelerate launch -m rl3d.cli.main
--trust-remote-code ...` passes it to every process).
"""
from __future__ import annotations

import os
from pathlib import Path

from rl3d.formats.errors import InputError, first_line
from rl3d.formats.reads import require_regular

TRUST_REMOTE_CODE_ENV = "RL3D_TRUST_REMOTE_CODE"


def remote_code_allowed() -> bool:
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "") == "1"


def set_remote_code(flag: bool) -> str | None:
    """The command line's choice, for this process and its children: `--trust-remote-code` turns it
    on; without the flag it is off, also when the variable was inherited (a shell profile, a parent's
    environment). Returns the warning to print when an inherited variable was ignored."""
    inherited = os.environ.get(TRUST_REMOTE_CODE_ENV)
    if flag:
        os.environ[TRUST_REMOTE_CODE_ENV] = "1"
        return None
    os.environ.pop(TRUST_REMOTE_CODE_ENV, None)
    if inherited == "1":
        return (f"[rl3d] WARNING: {TRUST_REMOTE_CODE_ENV}=1 in the environment is ignored: remote code stays off "
                f"unless the command line says `rl3d --trust-remote-code`")
    return None


def from_local_dir(cls, path: str | os.PathLike, what: str, **kwargs):
    """`cls.from_pretrained(path)` for a local directory only, with trust_remote_code pinned.

    Any loading failure becomes a one-line InputError naming the directory and `what` it should hold.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p}: not found (rl3d loads models from local directories only)")
    for f in (sorted(p.iterdir()) if p.is_dir() else []):  # a weight file linked to a device would hang the load
        if not f.is_dir():
            require_regular(f, f"file of the {what}")
    try:
        return cls.from_pretrained(str(p), local_files_only=True, trust_remote_code=remote_code_allowed(), **kwargs)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{p}: cannot load the {what} ({type(e).__name__}: {first_line(e)})") from None
