"""`rl3d status`: which shards of a stage (or of every stage under a run dir) are done or missing,
and the Slurm `--array=` expression that resubmits exactly the missing ones."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from rl3d.formats import shards as shards_io
from rl3d.formats.errors import InputError

CHECKPOINT_DONE = "rl_step.json"  # written last into an rl-step checkpoint dir
SEARCH_DEPTH = 4                  # run/step-N/gen is two levels down; eval/<policy>/gen three


@dataclass
class StageStatus:
    path: str
    stage: str
    num_shards: int
    done: list[int]
    missing: list[int]
    started: list[int] = field(default_factory=list)  # missing shards that left a temp part (running or killed)

    @property
    def complete(self) -> bool:
        return not self.missing

    def array(self) -> str:
        return array_expression(self.missing)


def array_expression(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (Slurm's --array syntax)."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def stage_status(out: Path) -> StageStatus:
    """Status of one stage output dir (it has a _manifest.json)."""
    m = shards_io.read_manifest(out)
    if m is None:
        raise InputError(f"{out}: no {shards_io.MANIFEST} (not an rl3d stage output)")
    n = int(m["num_shards"])
    done = sorted(shards_io.completed_shards(out, n))
    missing = [i for i in range(n) if i not in done]
    started = [i for i in missing if any(out.glob(f".{shards_io.part_path(out, shards_io.Shard(i, n)).name}.tmp-*"))]
    return StageStatus(str(out), str(m.get("stage", "?")), n, done, missing, started)


def checkpoint_status(out: Path) -> StageStatus:
    """An rl-step checkpoint dir counts as one shard: done once rl_step.json is in it."""
    done = (out / CHECKPOINT_DONE).is_file()
    started = (out.parent / f".{out.name}.rl-tmp").exists()
    return StageStatus(str(out), "rl-step", 1, [0] if done else [], [] if done else [0], [0] if started and not done else [])


def run_status(path: str | Path) -> list[StageStatus]:
    """Every stage output and rl-step checkpoint at or under `path`, in path order."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    found = []
    for d in sorted(_dirs(root, SEARCH_DEPTH)):
        if (d / shards_io.MANIFEST).is_file():
            found.append(stage_status(d))
        elif (d / CHECKPOINT_DONE).is_file() or (d.parent / f".{d.name}.rl-tmp").exists():
            found.append(checkpoint_status(d))
    for tmp in sorted(root.glob("**/.*.rl-tmp")):  # an rl-step killed before its first rename
        final = tmp.with_name(tmp.name[1:].removesuffix(".rl-tmp"))
        if not final.exists():
            found.append(checkpoint_status(final))
    if not found:
        raise InputError(f"{root}: no rl3d stage outputs or checkpoints found (looked {SEARCH_DEPTH} levels down)")
    return found


def _dirs(root: Path, depth: int):
    yield root
    if depth == 0:
        return
    for child in root.iterdir():
        # media and marker folders hold no stage outputs
        if child.is_dir() and not child.name.startswith((".", "_")) and child.name not in ("meshes", "images"):
            yield from _dirs(child, depth - 1)


def status_line(s: StageStatus) -> str:
    head = f"{s.path}  {s.stage}  {len(s.done)}/{s.num_shards} shards done"
    if s.complete:
        return head
    tail = f"; missing {array_expression(s.missing)}"
    if s.started:
        tail += f" (started, running or killed: {array_expression(s.started)})"
    if s.stage != "rl-step":
        tail += f"; resubmit with --array={s.array()}"
    return head + tail


def as_dict(s: StageStatus) -> dict:
    return {**asdict(s), "complete": s.complete, "array": s.array()}
