"""Bounded reads of user files: a device, a FIFO or a huge file is one line naming it, never a
read that grows without end (a prompt file linked to /dev/zero) or blocks for good (a FIFO)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from rl3d.formats.errors import InputError

MAX_TEXT_BYTES = 256 * 2**20  # a prompt file (.txt/.jsonl/.csv): millions of prompts fit
MAX_LINE_BYTES = 2**20        # one line of it


def require_regular(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` (symlinks followed) is a regular file; a device, FIFO, socket or folder is refused."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise InputError(f"{p}: {what} not found") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a device, FIFO or socket"
        raise InputError(f"{p}: {what} is {kind}, not a regular file")
    return p


def read_capped(path: str | os.PathLike, what: str = "file", limit: int | None = None,
                max_line: int | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (MAX_TEXT_BYTES), with no line longer
    than `max_line` (MAX_LINE_BYTES)."""
    limit = MAX_TEXT_BYTES if limit is None else limit
    max_line = MAX_LINE_BYTES if max_line is None else max_line
    p = require_regular(path, what)
    with open(p, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{p}: {what} larger than {limit // 2**20} MiB (split it, or use a Parquet table)")
    if len(data) > max_line:
        for n, line in enumerate(data.split(b"\n"), 1):
            if len(line) > max_line:
                raise InputError(f"{p}:{n}: line longer than {max_line // 2**10} KiB")
    return data
