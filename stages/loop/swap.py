"""A stage of `rl3d train` swapped for a user's command over the same files:
`--stage reward='my_scorer --samples {samples} --renders {renders} --out {out}'`.

The command runs as a subprocess (argv split like a shell would, never through a shell), and its
output must then pass what a resident stage's output would: the table kind's schema, exactly the
step's sample ids, and, where the table records its provenance, the step's samples as its input.
Once checked, the loop writes a marker (_swapped.json) so that a resume does not run it again."""
from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.formats.errors import InputError

SWAPPABLE = {"render": "renders", "reward": "rewards"}  # stage -> the table kind its output must be
MARKER = "_swapped.json"
PLACEHOLDERS = ("samples", "renders", "prompts", "out", "step", "run")


def parse_swaps(specs: list[str] | tuple[str, ...] | dict) -> dict[str, str]:
    """["reward=CMD", ...] -> {"reward": "CMD"}; refuses stages that cannot be swapped."""
    if isinstance(specs, dict):
        items = list(specs.items())
    else:
        items = []
        for spec in specs:
            name, sep, cmd = spec.partition("=")
            if not sep or not cmd.strip():
                raise InputError(f"--stage {spec!r}: expected STAGE='COMMAND {{samples}} ... {{out}}'")
            items.append((name.strip(), cmd))
    out = {}
    for name, cmd in items:
        if name not in SWAPPABLE:
            raise InputError(f"--stage {name}: only {', '.join(SWAPPABLE)} can be swapped for a command "
                             f"(gen and the update use the resident policy)")
        argv = shlex.split(cmd)
        if "{out}" not in cmd:
            raise InputError(f"--stage {name}: the command must name its output directory with {{out}}")
        for token in argv:
            try:
                token.format(**{k: "" for k in PLACEHOLDERS})
            except (KeyError, IndexError, ValueError) as e:
                raise InputError(f"--stage {name}: unknown placeholder in {token!r} ({e}); "
                                 f"use {', '.join('{' + p + '}' for p in PLACEHOLDERS)}") from None
        out[name] = cmd
    return out


def done(out: Path, inputs: dict[str, str]) -> bool:
    """Whether `out` holds a checked output of this stage made from these inputs."""
    marker = Path(out) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("inputs") == inputs
    except json.JSONDecodeError:
        return False


def run_swapped(stage: str, command: str, paths: dict[str, str], samples: Path, step: int) -> dict:
    """Run the user's command for `stage` of `step` and check its output; one-line InputError
    (exit 2) naming the step and stage when it fails or writes the wrong thing."""
    out = Path(paths["out"])
    where = f"step {step}, stage {stage}"
    argv = [t.format(**paths) for t in shlex.split(command)]
    t0 = time.time()
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise InputError(f"{where}: cannot run {argv[0]!r} ({e.strerror})") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        raise InputError(f"{where}: {argv[0]} exited {proc.returncode}" + (f": {last}" if last else ""))
    kind = SWAPPABLE[stage]
    check_output(out, kind, samples, where)
    inputs = {k: v for k, v in paths.items() if k != "out"}
    shards_io.atomic_write_json(out / MARKER, {"command": command, "argv": argv, "inputs": inputs,
                                               "seconds": round(time.time() - t0, 3)})
    return {"stage": stage, "out": str(out), "swapped": True, "seconds": round(time.time() - t0, 3)}


def check_output(out: Path, kind: str, samples: Path, where: str) -> None:
    """A swapped stage's output must read as a `kind` table covering exactly the step's samples."""
    if not out.is_dir() or not any(f for f in out.glob("*.parquet") if not f.name.startswith(".")):
        raise InputError(f"{where}: the command wrote no table into {out}")
    try:
        got = tables.read_table(out, kind)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    want = set(tables.read_table(samples, "samples", columns=["sample_id"]).column("sample_id").to_pylist())
    ids = got.column("sample_id").to_pylist()
    have = set(ids)
    if kind == "rewards" and len(ids) != len(have):
        raise InputError(f"{where}: {out} has duplicate sample ids")
    if have != want:
        extra, missing = sorted(have - want), sorted(want - have)
        what = f"sample {extra[0]!r} is not one of this step's" if extra else f"no row for sample {missing[0]!r}"
        raise InputError(f"{where}: {out}: {what} ({len(extra)} unknown, {len(missing)} missing): "
                         f"the output belongs to another run or is incomplete")
    made = tables.provenance(out)
    if made.kind is not None:  # an rl3d table (e.g. the command is an rl3d stage): its inputs are checked too
        tables.require_made_for(made, "samples", tables.provenance(samples))
