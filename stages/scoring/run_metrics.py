"""Run-level metrics of rl-step and train (a Parquet of step, name, value per update): appended once a
step, read for curves."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rl3d.formats import shards as shards_io
from rl3d.formats.errors import InputError


def write_tensorboard(logdir: str | Path, step: int, metrics: dict) -> None:
    """One step's numeric metrics as TensorBoard scalars (tag = metric name), beside metrics.parquet,
    for users who watch runs there. Needs the tensorboard package (rl3d[tensorboard])."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # lazy: an optional dependency
    except ImportError:
        raise InputError("--tensorboard needs the tensorboard package: pip install 'rl3d[tensorboard]'") from None
    with SummaryWriter(log_dir=str(logdir)) as writer:
        for name, value in sorted(metrics.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(name, float(value), global_step=int(step))


def read_run_metrics(path: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """A run-level metrics Parquet (columns step, name, value), or a dir holding one -> name -> (steps, values)."""
    p = Path(path)
    # hidden .tmp-* files are writes a kill interrupted
    files = sorted(f for f in p.glob("*.parquet") if not f.name.startswith(".")) if p.is_dir() else [p]
    if not files or not files[0].exists():
        raise InputError(f"--run {path}: no run metrics Parquet (columns step, name, value)")
    out: dict[str, list[tuple[float, float]]] = {}
    for f in files:
        t = pq.read_table(f)
        for c in ("step", "name", "value"):
            if c not in t.column_names:
                raise InputError(f"{f}: missing column {c!r} for run metrics (step, name, value)")
        for s, n, v in zip(*(t.column(c).to_pylist() for c in ("step", "name", "value"))):
            if v is not None:
                out.setdefault(n, []).append((float(s), float(v)))
    return {n: ([s for s, _ in sorted(v)], [x for _, x in sorted(v)]) for n, v in out.items()}


def append_run_metrics(path: Path, rows: pa.Table) -> None:
    """Append a step's metric rows to the run-level Parquet (rewritten atomically); a rerun of the
    same step replaces that step's rows instead of duplicating them."""
    step = rows.column("step")[0].as_py()
    # one rl-step writes a run's metrics at a time: a temp file beside it is a killed earlier write
    for stale in path.parent.glob(f".tmp-*-{path.name}"):
        stale.unlink(missing_ok=True)
    if path.exists():
        old = pq.read_table(path)
        old = old.filter(pc.not_equal(old.column("step"), step))
        rows = pa.concat_tables([old.select(rows.column_names).cast(rows.schema), rows])
    with shards_io.atomic_path(path) as tmp:
        pq.write_table(rows, tmp)
