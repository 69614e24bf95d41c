"""`rl3d train --profile-step K`: where step K's time goes, for people reading a slow run.

Writes RUN/profile/step-NNNNNN.txt (Python functions by cumulative time, then by their own time)
and .pstats (the same profile, for pstats or snakeviz). Which threads it sees depends on Python:
up to 3.11 cProfile follows the main thread only; from 3.12 it is built on sys.monitoring and counts
every thread of the process (gen's mesh writers, the CLIP term's image readers, the overlapped
sampler), each call's wall time included, so a second can be counted on several threads and time
spent waiting for the GIL shows in whatever function waited. On a GPU a thread waits where it reads
a result back (`.item()`, `.cpu()`, `.tolist()`, synchronize), so a function's cumulative time
includes the device work queued before it. Worker processes (the render and reward pools) show only
as waits for their results.
torch's own profiler is left to the kernel-level benchmarks (bench_sampler, bench_rl_step --profile):
aggregating its events took ~90 s for one CPU step of the tiny test policy.
"""
from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
from pathlib import Path

from rl3d.formats.shards import atomic_path

ROWS = {"cumulative": 60, "tottime": 30}  # lines of each table


@contextlib.contextmanager
def profiled(run_dir: Path, step: int):
    py = cProfile.Profile()
    py.enable()
    try:
        yield
    finally:
        py.disable()
    out = Path(run_dir) / "profile"
    text = io.StringIO()
    for key, rows in ROWS.items():
        text.write(f"# rl3d train: step {step}, Python functions by {key} seconds (the threads this Python's "
                   f"cProfile sees: see stages/loop/profile.py)\n")
        pstats.Stats(py, stream=text).sort_stats(key).print_stats(rows)
    with atomic_path(out / f"step-{step:06d}.txt") as tmp:
        Path(tmp).write_text(text.getvalue())
    with atomic_path(out / f"step-{step:06d}.pstats") as tmp:
        py.dump_stats(str(tmp))
