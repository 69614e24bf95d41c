"""The stage contract (docs/internals.md, "The stage contract"), in one place, so every command gets it for free.

A stage is a Job: built from its inputs and options (validated at construction, before any output
is touched), it knows its `config()`, whether an output is `done(out)`, and how to `produce(shard,
progress) -> (pa.Table, stats)` one shard. `Job.run(opts)` drives it through `run_stage`, which
handles skip-if-complete, --overwrite, the atomic part write, the completion marker, the manifest,
the table metadata and the summary that the CLI prints (or emits as --json). The click commands
and `rl3d train` drive the same Job objects; the loop hands a Job its resident models (a loaded
policy, a worker pool) instead of paths to load them from.

A command whose output is one directory made whole (a codebook, a trained model, a checkpoint) is a
`DirJob` driven by `run_dir_stage`: the same skip-if-done on the same config, --overwrite and summary,
with the directory renamed into place instead of a part and a marker per shard.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import pyarrow as pa

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.formats.errors import InputError, RowsFailed
from rl3d.formats.locks import writer_lock
from rl3d.formats.shards import Shard

T = TypeVar("T")
log = logging.getLogger("rl3d")


@dataclass
class StageOptions:
    out: Path
    shard: Shard = field(default_factory=lambda: Shard(0, 1))
    overwrite: bool = False
    seed: int = 0
    quiet: bool = False
    json: bool = False
    # False: an output whose every row failed is an error (the CLI's default, exit 3); library callers
    # such as eval keep such an output and report it
    allow_failures: bool = True


PLAIN_EVERY_S = 10.0


def usable_cores() -> int:
    """Cores this process may use (its CPU affinity where the OS tells, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plain_line(desc: str, done: int, total: int | None, elapsed: float) -> str:
    """"gen 12/64 (19%) 31s elapsed, ETA 2m14s" - the ETA from the mean pace so far."""
    if not total:
        return f"{desc} {done} ({elapsed:.0f}s elapsed)"
    eta = elapsed / done * (total - done) if done else 0.0
    return f"{desc} {done}/{total} ({100 * done / total:.0f}%) {duration(elapsed)} elapsed, ETA {duration(eta)}"


def duration(seconds: float) -> str:
    """"45s", "2m14s", "1h05m"."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Rich progress bar on a terminal, plain log lines otherwise, nothing with --quiet."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._said: tuple[str, float, float] | None = None  # last log line, when said, when last repeated
        self._tracking = 0
        self._beat: threading.Thread | None = None

    def track(self, items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
        if self.quiet:
            yield from items
            return
        self._tracking += 1  # the bar or its own lines show the progress: no keep-alive lines meanwhile
        try:
            yield from self._track(items, total, desc)
        finally:
            self._tracking -= 1
            if self._said:
                self._said = (self._said[0], self._said[1], time.time())

    def _track(self, items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
        if self.tty:
            from rich.progress import track

            yield from track(items, total=total, description=desc, console=_stderr_console(), transient=True)
            return
        total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        t0 = last = time.time()
        for i, x in enumerate(items, 1):
            yield x
            now = time.time()
            # in a pipe (a log file, Slurm): a line every PLAIN_EVERY_S seconds and at the end, with an ETA
            if now - last >= PLAIN_EVERY_S or i == total:
                last = now
                print(f"[rl3d] {plain_line(desc, i, total, now - t0)}", file=sys.stderr, flush=True)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"[rl3d] {msg}", file=sys.stderr, flush=True)
            now = time.time()
            self._said = (msg, now, now)
            if self._beat is None:  # a step that reports nothing of its own never goes silent
                self._beat = threading.Thread(target=_keep_alive, args=(weakref.ref(self),), daemon=True)
                self._beat.start()


def _keep_alive(ref) -> None:
    """While its Progress lives: when PLAIN_EVERY_S seconds pass after its last line, repeat that line
    with the time since ("rl-step: reference log-probs of 48 samples (still working, 20s)")."""
    while True:
        time.sleep(1.0)
        p = ref()
        if p is None:
            return
        said, now = p._said, time.time()
        if said and not p._tracking and now - said[2] >= PLAIN_EVERY_S:
            p._said = (said[0], said[1], now)
            print(f"[rl3d] {said[0]} (still working, {duration(now - said[1])})", file=sys.stderr, flush=True)
        del p


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


class Job:
    """One stage's work under the contract. Subclasses set `stage` (the command's name) and `kind`
    (the table kind it writes), and implement config() and produce(); `policy` and made_from()
    are the provenance the output records."""

    stage: str = ""
    kind: str = ""
    policy: str | None = None

    def config(self) -> dict:
        raise NotImplementedError

    def made_from(self) -> dict[str, str | None] | None:
        return None

    def produce(self, shard: Shard, progress: "Progress") -> tuple[pa.Table, dict]:
        raise NotImplementedError

    def done(self, out: str | os.PathLike, shard: Shard = Shard(0, 1)) -> bool:
        """Whether `out` holds this job's finished shard (same config), so a run would skip it."""
        return shards_io.is_complete(Path(out), self.config(), shard)

    def run(self, opts: StageOptions) -> dict:
        return run_stage(self.stage, self.kind, opts, self.config(), self.produce, self.policy, self.made_from())


class DirJob(Job):
    """A command whose output is one directory made whole (a codebook, a scorer, a policy checkpoint)
    rather than table shards: codec build and convert, train-scorer, sft, rl-step. `marker` is the
    file inside it written last (its presence: complete), `what` names the output in messages, and
    `build(into, opts, progress)` writes it and returns the summary's own fields. `run_dir_stage`
    drives it: skip-if-done on the same config, --overwrite, the atomic rename, the summary.

    in_place False: `build` writes into a fresh temp dir beside --out, renamed onto it at the end, so a
    killed run leaves no --out (and a non-empty --out that is not complete is refused without
    --overwrite). True: `build` writes into --out itself, each file atomically, and honours
    opts.overwrite: a resumable run (sft's checkpoints) or one file among the user's (codec convert)."""

    marker: str = ""
    what: str = "output"
    in_place: bool = False
    how_only: tuple[str, ...] = ()  # config keys that change how the output is made, not what it is
    takes_empty_out = True  # an existing empty --out is taken as absent (False: refused like a non-empty one)

    def done(self, out: str | os.PathLike, shard: Shard = Shard(0, 1)) -> bool:
        return (Path(out) / self.marker).is_file()

    def recorded_config(self, out: Path) -> dict | None:
        """The config the complete output in `out` was made with (None: it records none, taken as is)."""
        return None

    def check_done_config(self, out: Path) -> None:
        """Refuse a complete output made with other settings: a changed setting never skips silently."""
        recorded = self.recorded_config(out)
        if isinstance(recorded, dict):
            shards_io.check_same_config(out / self.marker, recorded, self.config(), self.how_only)

    def skip(self, out: Path, progress: "Progress") -> dict:
        """The skip summary's own fields (and any bookkeeping a kill after the rename left undone)."""
        return {}

    def build(self, into: Path, opts: StageOptions, progress: "Progress") -> dict:
        raise NotImplementedError

    def writes_output(self) -> bool:
        """False in the processes of a multi-process launch that compute but do not write."""
        return True

    def temp_dir(self, out: Path) -> Path:
        """Where `build` writes before the rename: hidden, beside --out (readers and status know the name)."""
        return out.with_name(f".{out.name}.{self.stage}.tmp")

    def after(self, out: Path, fields: dict) -> dict:
        """What follows the output landing whole, e.g. an append to a file outside it (after the rename, so
        a kill before it leaves no output and nothing appended); returns the summary's fields."""
        return fields

    def run(self, opts: StageOptions) -> dict:
        return run_dir_stage(self, opts)


def read_json_record(path: Path, what: str = "record") -> dict:
    """A JSON object a DirJob wrote into its output (its marker); unreadable: an input error naming it."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise InputError(f"{path}: not a readable {what}; use --overwrite") from None
    return record if isinstance(record, dict) else {}


def run_dir_stage(job: DirJob, opts: StageOptions) -> dict:
    """Run a DirJob under the contract; return its summary (stage, out, skipped, seconds, its fields)."""
    progress = Progress(opts.quiet)
    out = Path(opts.out)
    t0 = time.time()
    summary = {"stage": job.stage, "out": str(out)}
    if not opts.overwrite and job.done(out):
        job.check_done_config(out)
        progress.log(f"{job.stage}: {out} already holds {job.what}, skipping (use --overwrite to redo)")
        return {**summary, "skipped": True, **job.skip(out, progress), "seconds": round(time.time() - t0, 2)}
    if job.in_place:
        fields = job.build(out, opts, progress)
    else:
        empty = job.takes_empty_out and out.is_dir() and not any(out.iterdir())
        if not opts.overwrite and out.exists() and not empty:
            # before any work, not after it
            raise InputError(f"{out}: exists and is not {job.what}; use --overwrite")
        fields = _build_and_rename(job, out, opts, progress)
    fields = job.after(out, fields)
    return {**summary, "skipped": False, **fields, "seconds": round(time.time() - t0, 2)}


def _build_and_rename(job: DirJob, out: Path, opts: StageOptions, progress: "Progress") -> dict:
    """`build` into `temp_dir(out)` beside --out, then the rename: the old output is removed only once
    the new one is whole, and a failed build leaves no temp dir (a killed one is swept by the rerun)."""
    if not job.writes_output():
        return job.build(None, opts, progress)
    tmp = job.temp_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fields = job.build(tmp, opts, progress)
        if not (tmp / job.marker).is_file():
            raise RuntimeError(f"{job.stage}: the build wrote no {job.marker}")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return fields


def run_stage(stage: str, kind: str, opts: StageOptions, config: dict,
              produce: Callable[[Shard, Progress], tuple[pa.Table, dict]],
              policy: str | None = None, made_from: dict[str, str | None] | None = None) -> dict:
    """Run one shard of a stage under the contract; return a summary dict. `made_from` names the
    input tables ({role: table id}) the output is made for; later stages check it before a join."""
    # every temp file this shard's process (and its workers) writes names the shard, so a rerun of the
    # shard can sweep what a killed run of it left (shards.sweep_stale_temps), and nothing else
    # one writer per output shard (formats/locks.py), and no bookkeeping or media folder leading outside it
    shards_io.check_out_folders(opts.out)
    with shards_io.writing_shard(opts.shard), writer_lock(opts.out, opts.shard.tag, f"{stage} output"):
        return _run_shard(stage, kind, opts, config, produce, policy, made_from)


def _run_shard(stage: str, kind: str, opts: StageOptions, config: dict,
               produce: Callable[[Shard, Progress], tuple[pa.Table, dict]],
               policy: str | None, made_from: dict[str, str | None] | None) -> dict:
    progress = Progress(opts.quiet)
    out = Path(opts.out)
    t0 = time.time()
    if not shards_io.begin(out, stage, config, opts.shard, opts.overwrite):
        progress.log(f"{stage}: shard {opts.shard.index}/{opts.shard.count} already complete in {out}, skipping")
        return {"stage": stage, "out": str(out), "shard": opts.shard.tag, "skipped": True}
    if opts.overwrite and shards_io.holds_media(out):
        # media files are written in place: the old output stops being complete before the first one is
        shards_io.replace(out, stage, config, opts.shard)
    table, stats = produce(opts.shard, progress)
    failed = failed_rows(table)
    if failed is not None:
        stats = {"failed_rows": failed, **stats}
        if failed and failed == table.num_rows and not opts.allow_failures:
            raise RowsFailed(all_failed_line(stage, table))
    table = tables.with_metadata(table, kind, config, policy, {k: v for k, v in (made_from or {}).items() if v})
    tables.validate(table, kind, f"{stage} output")
    if opts.overwrite:
        shards_io.replace(out, stage, config, opts.shard)
    part = shards_io.write_part(table, out, opts.shard)
    stats = {"rows": table.num_rows, "seconds": round(time.time() - t0, 3), **stats}
    shards_io.finish(out, stage, config, opts.shard, stats)
    return {"stage": stage, "out": str(out), "part": str(part), "shard": opts.shard.tag, "skipped": False, **stats}


@contextmanager
def timed(stats: dict, key: str):
    t0 = time.time()
    yield
    stats[key] = round(stats.get(key, 0.0) + time.time() - t0, 4)


# row statuses of a usable row: "partial" is a reward row whose optional terms failed but has a total
USABLE_STATUSES = ("ok", "partial")


def failed_rows(table: pa.Table) -> int | None:
    """Rows whose status is not usable (None for a table without a status column)."""
    if "status" not in table.column_names:
        return None
    return sum(1 for s in table.column("status").to_pylist() if s not in USABLE_STATUSES)


def all_failed_line(stage: str, table: pa.Table) -> str:
    """One line: the count, the statuses, and the first row's message."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(status_counts(table).items()))
    first = table.slice(0, 1).to_pylist()[0]
    why = str(first.get("message") or "").splitlines()[0:1]
    return (f"{stage}: all {table.num_rows} rows failed ({counts}); row 0 {first.get('sample_id', '')}: "
            f"{why[0][:200] if why else first.get('status')} (the shard is not marked complete; --allow-failures keeps such rows)")


def status_counts(table: pa.Table) -> dict:
    """{'ok': n, 'error': m, ...} from a table's status column."""
    out: dict[str, int] = {}
    for s in table.column("status").to_pylist() if "status" in table.column_names else []:
        out[s] = out.get(s, 0) + 1
    return out


PARENT_WATCH_S = 0.5


def exit_with_parent(parent: int) -> None:
    """Pool worker initializer: the worker exits as soon as `parent` (the stage's process) is gone.
    A SIGKILLed stage (Slurm preemption, the OOM killer) otherwise leaves its idle workers blocked
    for good on the call queue. A daemon thread polls the parent pid (a reparented worker sees
    another one); Linux's PR_SET_PDEATHSIG is not used because it fires when the thread that
    started the worker ends, which in a pool need not be the parent's end.

    The worker ignores SIGINT, SIGTERM and SIGUSR1: they reach a whole process group (Ctrl-C,
    `timeout`, Slurm's scancel and --signal without B:), and a worker that died of one would break
    its pool under the parent, which handles the signal (rl3d train checkpoints and stops)."""
    import signal
    import threading

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_WATCH_S)
        os._exit(1)

    threading.Thread(target=watch, name="rl3d-exit-with-parent", daemon=True).start()


def process_pool(workers: int, start: str | None = "spawn"):
    """A ProcessPoolExecutor of `workers` processes (started by `start`, None: the platform's
    default) whose workers exit when this process dies, whatever kills it."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=mp.get_context(start) if start else None,
                               initializer=exit_with_parent, initargs=(os.getpid(),))
