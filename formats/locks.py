"""One writer per output: an exclusive lock on a file inside the output dir.

`writer_lock(out, name)` takes an exclusive, non-blocking `flock` on `OUT/_shards/.NAME.lock` and
writes the holder (host, pid, start time, command line) into it. A second writer of the same
output (the same shard of it) gets an InputError naming the holder instead of mixing its files
with the first one's. The kernel drops a flock when its process dies (kill -9 included), so the
file a killed run leaves behind is a stale lock: the next run takes it over and rewrites the
holder. On release the file is removed while still locked; a writer that locked the removed file
meanwhile sees that the path no longer names its file and tries again on the new one.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rl3d.formats.errors import InputError

LOCKS = "_shards"  # beside the completion markers: one folder of bookkeeping per output


def lock_path(out: str | os.PathLike, name: str) -> Path:
    return Path(out) / LOCKS / f".{name}.lock"


def holder_of(path: Path) -> str:
    """"host H, pid P, since T" of a lock file's writer (what it recorded), or "unknown"."""
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "unknown holder"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["started"])) if "started" in h else "?"
    return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, since {when}"


@contextmanager
def writer_lock(out: str | os.PathLike, name: str, what: str = "output"):
    """Hold the one-writer lock of `out` (its part `name`, e.g. a shard tag) for the block."""
    path = lock_path(out, name)
    Path(out).mkdir(parents=True, exist_ok=True)  # an error names --out itself (a file where it goes)
    path.parent.mkdir(exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise InputError(f"{out}: another rl3d run is writing this {what} ({holder_of(path)}; lock file "
                             f"{path}); wait for it to end or use another --out") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it on release between our open and our lock: lock the new one
    try:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield path
    finally:
        try:
            path.unlink(missing_ok=True)  # still locked: no one else owns this file now
        finally:
            os.close(fd)
