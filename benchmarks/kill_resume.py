"""Kill -9 every stage at random points and inside its write windows, rerun it, and check the result
against an uninterrupted run.

For each stage: two uninterrupted reference runs (what differs between them is the stage's own
non-determinism, excluded from the comparison and listed), then TRIALS trials that start the
stage, SIGKILL its process group at a seeded random point, rerun the same command to completion
and compare the output with the reference. Kill points alternate between a uniform delay over
the reference's duration and the first sight of a write window (a temp file, a completion marker,
a renamed checkpoint) found by polling the output directory.

Checked after each rerun: the same rows (by key; data columns equal, timing columns and volatile
metadata ignored), no duplicate keys, every Parquet part readable and every GLB / PNG loadable,
no torn visible output (an unreadable file, or a leftover temp under a name a reader lists),
`_manifest.json` complete with every marker, and every other file (weights, optimizer state,
media) equal to the reference's bytes. Leftover temps under hidden names (`.tmp-*`, `.NAME.tmp-*`),
which rl3d's readers skip, are counted apart as stale hidden temps: not a failure, but a rerun of
the shard should have swept its own (formats/shards.py, sweep_stale_temps).

    python benchmarks/kill_resume.py                        # every stage, 20 trials each
    python benchmarks/kill_resume.py --trials 3 --stages synth,render --work /tmp/kr --verbose
    python benchmarks/kill_resume.py --stages sft --trials 4 --windows 'out/.final.tmp-*/*'   # one window

One line per stage, then a verdict; a JSON with every trial lands in WORK/results-STAGES.json.
Write windows are tried in the order each stage lists them (the riskiest first).
Runs the CLI as `python -m rl3d.cli.main` with the interpreter running this script.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outputs_fingerprint import VOLATILE_FILES, VOLATILE_KEYS, fingerprint  # noqa: E402  (same folder)

STAGE_ORDER = ("synth", "gen", "render", "reward", "rl-step", "eval", "sft")
MEDIA_COLUMNS = ("mesh_path", "image_path", "sheet_path", "depth_path", "normal_path")
# row keys by table shape, first match wins; a table with none of them is keyed by its whole row
KEYS = (("sample_id", "view"), ("sample_id",), ("step", "name"), ("policy", "metric", "category"),
        ("policy", "name", "category"), ("prompt_id",))
# names that mark a file or directory as a writer's temporary (formats/shards.py, policy, sft)
TEMP_PATTERNS = ("*.tmp-*", ".tmp-*", "*.rl-tmp", "*.tmp")
POLL_S = 0.001


# ---- what a run left behind --------------------------------------------------------------------

@dataclass
class Snapshot:
    """Everything comparable about one output tree."""
    rows: dict[str, list[tuple]] = field(default_factory=dict)      # table -> [(key, data)]
    blobs: dict[str, str] = field(default_factory=dict)             # relative path -> content hash
    torn: list[str] = field(default_factory=list)                   # torn visible output: unreadable, or a visible leftover
    stale: list[str] = field(default_factory=list)                  # stale hidden temps (dot-files no reader lists)
    manifests: list[str] = field(default_factory=list)              # manifest inconsistencies


def is_temp(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in TEMP_PATTERNS)


def snapshot(root: Path) -> Snapshot:
    """Walk an output tree: tables row by row, stage dirs' manifests, media loaded, other files hashed."""
    snap = Snapshot()
    root = Path(root)
    if not root.exists():
        snap.torn.append(f"{root.name}: missing")
        return snap
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        rel_d = d.relative_to(root)
        if d.name == "tensorboard":  # event files carry wall times; not part of the contract
            dirnames[:] = []
            continue
        for name in list(dirnames):
            if is_temp(name):
                dirnames.remove(name)
                _leftover(snap, d / name, rel_d / name)
        if (d / "_manifest.json").exists():
            _check_manifest(snap, d, rel_d)
        for name in sorted(filenames):
            path, rel = d / name, (rel_d / name).as_posix()
            if rel == "log.txt":  # the harness's own log of the runs
                continue
            if is_temp(name):
                _leftover(snap, path, Path(rel))
            elif name.endswith(".parquet"):
                _table(snap, path, rel, root)
            elif name.endswith(".jsonl"):
                _jsonl(snap, path, rel)
            elif d.name == "_shards" or name == "_manifest.json":
                continue  # checked by _check_manifest; they hold wall times
            elif name.endswith((".glb", ".png")):
                _media(snap, path, rel)
            elif name.endswith(".pt") and name not in VOLATILE_FILES:
                snap.blobs[rel] = _state_fingerprint(path)
                if snap.blobs[rel].startswith("unloadable"):
                    snap.torn.append(f"{rel}: {snap.blobs[rel]}")
            else:
                snap.blobs[rel] = fingerprint(path, str(root))
    return snap


def _leftover(snap: Snapshot, path: Path, rel: Path) -> None:
    """A temp a kill left. Under a visible name (sft's `step-N.tmp/`) a reader listing the folder
    takes it for output: torn. Under a hidden name it is a stale temp: rl3d's readers skip dot-files
    (parts are `part-*`, media and table folders are listed without them)."""
    hidden = path.name.startswith(".")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    (snap.stale if hidden else snap.torn).append(f"{rel.as_posix()} ({size} bytes{'' if hidden else ', visible'})")


def _check_manifest(snap: Snapshot, d: Path, rel: Path) -> None:
    try:
        m = json.loads((d / "_manifest.json").read_text())
    except ValueError:
        snap.manifests.append(f"{rel}/_manifest.json: not JSON")
        return
    n = int(m.get("num_shards", 0))
    markers = {int(p.name.split("-of-")[0]) for p in (d / "_shards").glob("*-of-*.json")
               if p.name.endswith(f"-of-{n:05d}.json")}
    if markers != set(range(n)):
        snap.manifests.append(f"{rel}: markers {sorted(markers)} of {n} shards")
    if m.get("complete") is not True or sorted(m.get("completed_shards", [])) != list(range(n)):
        snap.manifests.append(f"{rel}/_manifest.json: complete={m.get('complete')} "
                              f"completed_shards={m.get('completed_shards')} of {n}")


def _key_columns(names: list[str]) -> tuple[str, ...] | None:
    for key in KEYS:
        if all(k in names for k in key):
            return key
    return None


def _plain(v):
    """Hashable, comparable form of a cell (lists, bytes, dicts, NaN)."""
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, (list, tuple)):
        return tuple(_plain(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _plain(x)) for k, x in v.items()))
    return v


def _table(snap: Snapshot, path: Path, rel: str, root: Path) -> None:
    try:
        t = pq.read_table(path)
    except Exception as e:
        snap.torn.append(f"{rel}: unreadable Parquet ({type(e).__name__})")
        return
    if "name" in t.column_names and "value" in t.column_names:  # long metric rows: drop timings
        t = t.filter([not VOLATILE_KEYS.search(n) for n in t.column("name").to_pylist()])
    cols = [c for c in t.column_names if not VOLATILE_KEYS.search(c)]
    key = _key_columns(cols)
    rows = []
    for r in t.select(cols).to_pylist():
        data = tuple((c, _plain(r[c])) for c in cols)
        rows.append((tuple(_plain(r[k]) for k in key) if key else data, data))
        for c in MEDIA_COLUMNS:  # media named by the table must exist and load
            if r.get(c) and not (path.parent / r[c]).exists():
                snap.torn.append(f"{rel}: {c} {r[c]} missing")
    # one table per directory of parts: part files of a stage are one table
    name = str(Path(rel).parent / "*.parquet") if Path(rel).name.startswith("part-") else rel
    snap.rows.setdefault(name, []).extend(rows)


def _jsonl(snap: Snapshot, path: Path, rel: str) -> None:
    """Metric logs ({"step": N, name: value, ...}) as (step, name) rows; other records keyed like tables."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            snap.torn.append(f"{rel}: line {i + 1} is not JSON")
            continue
        if "step" in rec:
            rows += [((rec["step"], k), (("value", _plain(v)),)) for k, v in sorted(rec.items())
                     if k != "step" and not VOLATILE_KEYS.search(k)]
            continue
        data = tuple((k, _plain(v)) for k, v in sorted(rec.items()) if not VOLATILE_KEYS.search(k))
        key = _key_columns(list(rec))
        rows.append((tuple(_plain(rec[k]) for k in key) if key else data, data))
    snap.rows[rel] = rows


def _state_fingerprint(path: Path) -> str:
    """A torch state file by content: pickling the same values can give other bytes (a restored
    RNG state's containers), which is not a difference in what was saved."""
    import torch

    def canon(x):
        if isinstance(x, torch.Tensor):
            return ["tensor", str(x.dtype), list(x.shape), hashlib.sha256(x.contiguous().view(-1).view(torch.uint8)
                                                                           .numpy().tobytes()).hexdigest()]
        if isinstance(x, dict):
            return [[str(k), canon(v)] for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))]
        if isinstance(x, (list, tuple)):
            return [canon(v) for v in x]
        return x

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        return f"unloadable ({type(e).__name__})"
    return hashlib.sha256(json.dumps(canon(state), default=str).encode()).hexdigest()[:16]


def _media(snap: Snapshot, path: Path, rel: str) -> None:
    try:
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                im.load()
        else:
            import trimesh

            trimesh.load(path, file_type="glb", force="mesh")
    except Exception as e:
        snap.torn.append(f"{rel}: not loadable ({type(e).__name__})")
        return
    snap.blobs[rel] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---- comparison ----------------------------------------------------------------------------------

@dataclass
class Diff:
    lost: int = 0          # reference keys missing after the rerun
    doubled: int = 0       # extra copies of a key
    changed: int = 0       # same key, different data, or a file missing or with other bytes
    torn: int = 0          # torn visible output: a real failure
    stale: int = 0         # stale hidden temps left after the rerun: not a failure
    manifests: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not (self.lost or self.doubled or self.changed or self.torn or self.manifests)


def nondeterministic(a: Snapshot, b: Snapshot) -> dict:
    """What differs between two uninterrupted runs: excluded from comparisons."""
    blobs = sorted(k for k in set(a.blobs) | set(b.blobs) if a.blobs.get(k) != b.blobs.get(k))
    columns: dict[str, list[str]] = {}
    for name in set(a.rows) & set(b.rows):
        bmap = dict(b.rows[name])
        cols = set()
        for key, data in a.rows[name]:
            if key in bmap and bmap[key] != data:
                cols |= {c for (c, v), (_, w) in zip(data, bmap[key]) if v != w}
        if cols:
            columns[name] = sorted(cols)
    return {"files": blobs, "columns": columns}


def _strip(data: tuple, drop: list[str]) -> tuple:
    return tuple((c, v) for c, v in data if c not in drop)


def compare(ref: Snapshot, got: Snapshot, nondet: dict) -> Diff:
    d = Diff(torn=len(got.torn), stale=len(got.stale), manifests=len(got.manifests))
    d.notes += [f"torn: {x}" for x in got.torn] + [f"manifest: {x}" for x in got.manifests]
    d.notes += [f"stale hidden temp: {x}" for x in got.stale]
    for name in sorted(set(ref.rows) | set(got.rows)):
        drop = nondet["columns"].get(name, [])
        want = {k: _strip(v, drop) for k, v in ref.rows.get(name, [])}
        ref_n = Counter(k for k, _ in ref.rows.get(name, []))  # a key the reference repeats may repeat
        have = Counter(k for k, _ in got.rows.get(name, []))
        lost = [k for k in want if k not in have]
        extra = sum(max(0, n - ref_n[k]) for k, n in have.items())
        changed = sum(1 for k, v in got.rows.get(name, []) if k in want and _strip(v, drop) != want[k])
        d.lost, d.doubled, d.changed = d.lost + len(lost), d.doubled + extra, d.changed + changed
        if lost:
            d.notes.append(f"{name}: {len(lost)} row(s) lost, e.g. key {lost[0]}")
        if extra:
            d.notes.append(f"{name}: {extra} extra row(s)")
        if changed:
            d.notes.append(f"{name}: {changed} row(s) differ from the reference")
    for rel in sorted(set(ref.blobs) | set(got.blobs)):
        if rel in nondet["files"]:
            continue
        if rel not in got.blobs:  # a missing file is a changed output, not a lost row
            d.changed += 1
            d.notes.append(f"{rel}: missing")
        elif rel not in ref.blobs:
            d.changed += 1
            d.notes.append(f"{rel}: not in the reference")
        elif ref.blobs[rel] != got.blobs[rel]:
            d.changed += 1
            d.notes.append(f"{rel}: content differs from the reference")
    return d


# ---- the stages ----------------------------------------------------------------------------------

def default_policy() -> str:
    from rl3d.stages.policy import default_policy_dir

    return str(default_policy_dir())


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]                       # inputs (see INPUTS) this stage reads
    args: Callable[[dict, Path], list[str]]      # (input paths, trial dir) -> CLI args; output in trial/out
    windows: tuple[str, ...]                     # fnmatch patterns (relative to the trial dir) of write windows


# inputs shared by the stages, built once per work dir by uninterrupted runs
INPUTS: dict[str, tuple[tuple[str, ...], Callable[[dict, Path], list[str]]]] = {
    "prompts": ((), lambda i, o: ["synth", "--n", "1", "--seed", "7", "--split", "train", "--no-meshes", "--out", str(o)]),
    "objects": ((), lambda i, o: ["synth", "--n", "6", "--seed", "3", "--out", str(o)]),
    "gen": (("prompts",), lambda i, o: ["gen", "--prompts", i["prompts"], "-G", "2", "--seed", "1", "--out", str(o)]),
    "renders": (("gen",), lambda i, o: ["render", "--samples", i["gen"], "--views", "2", "--resolution", "48",
                                        "--out", str(o)]),
    "rewards": (("gen", "renders"), lambda i, o: ["reward", "--samples", i["gen"], "--renders", i["renders"],
                                                  "--config", "default", "--out", str(o)]),
}

SHARD_WINDOWS = ("out/_shards/*.json", "*.part-*.tmp-*", "out/._manifest.json.tmp-*")
STAGES = {s.name: s for s in (
    Stage("synth", (), lambda i, t: ["synth", "--n", "6", "--seed", "3", "--out", str(t / "out")],
          ("out/_meshes/.tmp-*",) + SHARD_WINDOWS),
    Stage("gen", ("prompts",), lambda i, t: INPUTS["gen"][1](i, t / "out"), ("out/_meshes/.tmp-*",) + SHARD_WINDOWS),
    Stage("render", ("objects",), lambda i, t: ["render", "--samples", i["objects"], "--views", "2",
                                                "--resolution", "48", "--out", str(t / "out")],
          ("out/_images/*/.tmp-*",) + SHARD_WINDOWS),
    Stage("reward", ("gen", "renders"), lambda i, t: INPUTS["rewards"][1](i, t / "out"), SHARD_WINDOWS),
    Stage("rl-step", ("gen", "rewards"),
          lambda i, t: ["rl-step", "--policy", default_policy(), "--samples", i["gen"], "--rewards", i["rewards"],
                        "--out", str(t / "out"), "--minibatch", "4", "--lr", "1e-4", "--seed", "0",
                        "--run-metrics", str(t / "metrics.parquet")],
          ("out/rl_step.json", ".out.rl-tmp/*", ".tmp-*-metrics.parquet")),
    Stage("eval", (), lambda i, t: ["eval", "--bench", "synth-reasoning", "--limit", "1", "--samples-per-prompt", "1",
                                    "--views", "2", "--resolution", "48", "--policy", default_policy(),
                                    "--grid-prompts", "1", "--out", str(t / "out")],
          ("out/*/gen/_meshes/.tmp-*", "out/*/_shards/*.json", "out/*/.tmp-*", "out/*.part-*.tmp-*",
           "out/metrics/*.parquet")),
    Stage("sft", ("objects",), lambda i, t: ["sft", "--data", i["objects"], "--config", "tiny", "--steps", "4",
                                            "--batch-size", "4", "--save-every", "1", "--eval-every", "2",
                                            "--log-every", "1", "--seed", "0", "--out", str(t / "out")],
          ("out/checkpoints/*.tmp/trainer_state.pt", "out/checkpoints/*.tmp/*", "out/.final.tmp-*/*",
           "out/final/*")),
)}


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rl3d.cli.main", *args, "--quiet"]


def run_to_end(args: list[str], log: Path) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "ab") as fh:
        rc = subprocess.run(cli(args), stdout=fh, stderr=fh).returncode
    return rc, time.time() - t0


def build_inputs(names: set[str], work: Path) -> dict:
    """Uninterrupted runs of the inputs the chosen stages read (and what those read), once."""
    paths: dict[str, str] = {}

    def build(name: str) -> None:
        if name in paths:
            return
        deps, args = INPUTS[name]
        for d in deps:
            build(d)
        out = work / "inputs" / name
        if not (out / "_manifest.json").exists() or json.loads((out / "_manifest.json").read_text()).get("complete") is not True:
            rc, _ = run_to_end(args(paths, out), work / "inputs.log")
            if rc != 0:
                raise SystemExit(f"building input {name} failed (exit {rc}); see {work / 'inputs.log'}")
        paths[name] = str(out)

    for n in sorted(names):
        build(n)
    return paths


# ---- one trial -------------------------------------------------------------------------------------

@dataclass
class Trial:
    stage: str
    index: int
    kill: str              # "delay 1.234s" or "window PATTERN"
    landed: bool           # the process was alive when SIGKILL went out
    killed_at: float       # seconds after start
    seen: str              # the file whose appearance triggered the kill ("" for delays)
    rerun_rc: int
    identical: bool
    lost: int
    doubled: int
    changed: int
    torn: int
    stale: int
    manifests: int
    notes: list[str]


def _first_match(trial_dir: Path, pattern: str) -> str:
    head, _, tail = pattern.rpartition("/")
    if not any(c in head for c in "*?["):  # a fixed folder: list it alone (fast polls catch short windows)
        try:
            names = os.listdir(trial_dir / head)
        except FileNotFoundError:
            return ""
        hit = next((n for n in names if fnmatch.fnmatch(n, tail)), "")
        return f"{head}/{hit}".lstrip("/") if hit else ""
    for dirpath, dirnames, filenames in os.walk(trial_dir):
        rel_d = Path(dirpath).relative_to(trial_dir)
        for name in dirnames + filenames:
            rel = (rel_d / name).as_posix()
            if fnmatch.fnmatch(rel, pattern):
                return rel
    return ""


def kill_once(args: list[str], trial_dir: Path, delay: float | None, pattern: str | None,
              log: Path) -> tuple[bool, float, str]:
    """Start the command; SIGKILL its process group after `delay` or when `pattern` first matches.
    Returns (landed, seconds after start, matched path)."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cli(args), stdout=fh, stderr=fh, start_new_session=True)
    t0 = time.time()
    seen = ""
    try:
        while proc.poll() is None:
            if delay is not None and time.time() - t0 >= delay:
                break
            if pattern is not None:
                seen = _first_match(trial_dir, pattern)
                if seen:
                    break
                time.sleep(POLL_S)
            else:
                time.sleep(min(0.01, max(0.0, delay - (time.time() - t0))))
        landed = proc.poll() is None
        at = time.time() - t0
        if landed:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        try:  # spawned workers of the group too, if any outlived the leader
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return landed, at, seen


def run_trial(stage: Stage, index: int, inputs: dict, trial_dir: Path, ref: Snapshot, nondet: dict,
              ref_seconds: float, rng: random.Random) -> Trial:
    shutil.rmtree(trial_dir, ignore_errors=True)
    trial_dir.mkdir(parents=True)
    args = stage.args(inputs, trial_dir)
    log = trial_dir / "log.txt"
    if index % 2 == 0 or not stage.windows:
        delay, pattern = rng.uniform(0.0, ref_seconds), None
        kill = f"delay {delay:.3f}s"
    else:
        delay, pattern = None, stage.windows[(index // 2) % len(stage.windows)]
        kill = f"window {pattern}"
    landed, at, seen = kill_once(args, trial_dir, delay, pattern, log)
    rc, _ = run_to_end(args, log)
    got = snapshot(trial_dir)
    d = compare(ref, got, nondet)
    if rc != 0:
        d.notes.insert(0, f"rerun exited {rc}: " + _last_line(log))
    return Trial(stage.name, index, kill, landed, round(at, 3), seen, rc, d.identical and rc == 0, d.lost,
                 d.doubled, d.changed, d.torn, d.stale, d.manifests, d.notes)


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# ---- a stage, all stages -------------------------------------------------------------------------

@dataclass
class StageResult:
    stage: str
    ref_seconds: float
    nondeterministic: dict
    trials: list[Trial]

    def counts(self) -> dict:
        t = self.trials
        return {"trials": len(t), "landed": sum(x.landed for x in t), "identical": sum(x.identical for x in t),
                "lost": sum(x.lost for x in t), "doubled": sum(x.doubled for x in t),
                "changed": sum(x.changed for x in t), "torn": sum(x.torn for x in t),
                "stale": sum(x.stale for x in t), "manifests": sum(x.manifests for x in t),
                "rerun_failed": sum(x.rerun_rc != 0 for x in t)}


def run_stage(stage: Stage | str, trials: int, work: Path, seed: int = 0, inputs: dict | None = None,
              on_trial: Callable[[Trial], None] | None = None, calibrate: bool = True) -> StageResult:
    """Reference run(s), then `trials` kill-rerun-compare trials. `calibrate`: a second reference
    run finds what the stage itself does not reproduce (skip it only for stages known deterministic)."""
    stage = STAGES[stage] if isinstance(stage, str) else stage
    name = stage.name
    inputs = inputs if inputs is not None else build_inputs(set(stage.needs), work)
    base = work / name.replace("-", "_")
    refs, seconds = [], []
    for tag in ("ref-a", "ref-b") if calibrate else ("ref-a",):
        d = base / tag
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        rc, secs = run_to_end(stage.args(inputs, d), d / "log.txt")
        if rc != 0:
            raise SystemExit(f"{name}: the uninterrupted run failed (exit {rc}): {_last_line(d / 'log.txt')}")
        refs.append(snapshot(d))
        seconds.append(secs)
    nondet = nondeterministic(refs[0], refs[-1])
    rng = random.Random(f"{seed}-{name}")
    out = []
    for i in range(trials):
        t = run_trial(stage, i, inputs, base / f"trial-{i:03d}", refs[0], nondet, min(seconds), rng)
        out.append(t)
        if on_trial:
            on_trial(t)
    return StageResult(name, round(min(seconds), 2), nondet, out)


def stage_line(r: StageResult) -> str:
    c = r.counts()
    return (f"{r.stage:8s} trials {c['trials']:3d}  kills landed {c['landed']:3d}  resumed identical "
            f"{c['identical']:3d}  rows lost {c['lost']:3d}  rows doubled {c['doubled']:3d}  torn visible "
            f"{c['torn']:3d}  bad manifests {c['manifests']:3d}  changed {c['changed']:3d}  stale hidden temps "
            f"{c['stale']:3d}  rerun failed {c['rerun_failed']:2d}  (ref {r.ref_seconds:.1f}s)")


def verdict(results: list[StageResult]) -> tuple[bool, str]:
    tot = Counter()
    for r in results:
        tot.update(r.counts())
    ok = tot["identical"] == tot["trials"]
    return ok, (f"verdict: {'PASS' if ok else 'FAIL'}: {tot['identical']}/{tot['trials']} resumed identical over "
                f"{len(results)} stage(s), {tot['landed']} kills landed, {tot['lost']} rows lost, "
                f"{tot['doubled']} doubled, {tot['torn']} torn visible files, {tot['manifests']} bad manifests, "
                f"{tot['stale']} stale hidden temps (not a failure)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="kills per stage (default 20)")
    ap.add_argument("--stages", default=",".join(STAGE_ORDER), help="comma-separated subset of " + ",".join(STAGE_ORDER))
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    ap.add_argument("--work", type=Path, default=None, help="work dir (default: a temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--verbose", action="store_true", help="one line per trial, and what differed")
    ap.add_argument("--windows", default=None, help="comma-separated write-window patterns (relative to a trial "
                    "dir) replacing the stages' own, e.g. 'out/.final.tmp-*/*' for sft's export")
    ap.add_argument("--single-reference", action="store_true", help="one uninterrupted reference run, not two "
                    "(for stages known deterministic: nothing is excluded from the comparison)")
    a = ap.parse_args(argv)
    names = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGE_ORDER)}")
    work = (a.work or Path(tempfile.mkdtemp(prefix="rl3d-kill-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)

    def show(t: Trial) -> None:
        if a.verbose or not t.identical:
            state = "identical" if t.identical else "DIFFERS"
            print(f"  {t.stage} trial {t.index}: {t.kill}, {'killed' if t.landed else 'finished first'} at "
                  f"{t.killed_at:.2f}s{' on ' + t.seen if t.seen else ''}: {state}", flush=True)
            for n in t.notes if not t.identical else []:
                print(f"      {n}", flush=True)

    results = []
    for name in names:
        stage = STAGES[name]
        if a.windows:
            stage = replace(stage, windows=tuple(w.strip() for w in a.windows.split(",") if w.strip()))
        r = run_stage(stage, a.trials, work, a.seed, on_trial=show, calibrate=not a.single_reference)
        results.append(r)
        print(stage_line(r), flush=True)
        if r.nondeterministic["files"] or r.nondeterministic["columns"]:
            print(f"  {name}: not compared (differ between two uninterrupted runs): {r.nondeterministic}", flush=True)
    ok, line = verdict(results)
    print(line, flush=True)
    results_file = work / f"results-{'_'.join(names)}.json"
    results_file.write_text(json.dumps([{**asdict(r), "counts": r.counts()} for r in results], indent=1))
    if a.work is None and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"details: {results_file}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
