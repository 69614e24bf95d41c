"""The texturing hook: a user's command (e.g. a TRELLIS stage-2 install) that paints a sample's
coarse mesh and returns a textured GLB. Without a hook, meshes stay untextured and renders shaded.

A hook is named in one of two forms:

  a command template   'python paint.py --occ {occupancy} --mesh {glb} --prompt {prompt_file} --out {out}'
  a Python entry point 'my_package.paint:texture'

Call contract (one call per sample, in a fresh process, so a crash or a hang never takes rl3d
down and a timeout can kill it):
  inputs   {glb}            the coarse GLB (rl3d's mesh, glTF Y-up, metres)
           {occupancy}      the occupancy grid as a .npy file (bool/uint8, grid[x, y, z], Y-up;
                            "" when the caller has no grid for the sample)
           {prompt_file}    a UTF-8 text file holding the prompt
           {reasoning_file} a UTF-8 text file holding the policy's reasoning ("" when none)
           {sample_id}      the sample's id (text)
  output   {out}            the textured GLB the hook must write (a path that does not exist yet)
A command template is split like a shell line (shlex) but never run through a shell: each
placeholder becomes exactly one argument, so prompts cannot inject commands. An entry point is
called as function(glb=, occupancy=, prompt=, reasoning=, out=, sample_id=) with the texts
themselves (not files) and paths as str; it writes `out` and its return value is ignored.

Success: exit code 0 and `out` is a readable GLB with triangles. Anything else - non-zero exit,
timeout, no output, an unreadable output - is a per-row texture status with a message
(TEXTURE_STATUSES), never an exception.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rl3d.formats import shards as shards_io
from rl3d.formats.errors import InputError
from rl3d.formats.glb import read_glb

PLACEHOLDERS = ("glb", "occupancy", "prompt_file", "reasoning_file", "sample_id", "out")
TEXTURE_STATUSES = ("ok", "no_mesh", "hook_failed", "hook_timeout", "bad_output")
TEXTURED_DIR = "_textured"  # underscore: dataset readers skip it, like _meshes
_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_STDERR_TAIL = 300

# Runs an entry point in a child process: its own interpreter, so a timeout can kill it. The
# arguments come on stdin (a long reasoning text would not fit in one argv entry).
_ENTRY_RUNNER = """
import importlib, json, sys
a = json.loads(sys.stdin.read())
mod, fn = a.pop("entry").split(":")
getattr(importlib.import_module(mod), fn)(**a)
"""


@dataclass(frozen=True)
class TextureHook:
    spec: str                       # as the user wrote it
    kind: str                       # "command" | "entry_point"
    argv: tuple[str, ...] = ()      # the command template, split (kind "command")

    def describe(self) -> str:
        return f"{self.kind} {self.spec!r}"


def parse_hook(spec: str) -> TextureHook:
    """A hook spec -> TextureHook; InputError (exit 2) for an empty spec, unknown placeholders or
    a command without {out}."""
    spec = (spec or "").strip()
    if not spec:
        raise InputError("--texture-hook is empty: give a command template or module:function")
    if _ENTRY_POINT.match(spec):
        return TextureHook(spec, "entry_point")
    try:
        argv = tuple(shlex.split(spec))
    except ValueError as e:
        raise InputError(f"--texture-hook {spec!r}: cannot split the command ({e})") from None
    names = set(_PLACEHOLDER.findall(spec))
    unknown = names - set(PLACEHOLDERS)
    if unknown:
        raise InputError(f"--texture-hook {spec!r}: unknown placeholder(s) {{{'}, {'.join(sorted(unknown))}}} "
                         f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
    if "out" not in names:
        raise InputError(f"--texture-hook {spec!r}: the command must name {{out}}, the textured GLB it writes")
    return TextureHook(spec, "command", argv)


def hook_program(hook: TextureHook) -> str | None:
    """The executable a command hook runs (None for entry points), for `rl3d doctor`."""
    return hook.argv[0] if hook.kind == "command" and hook.argv else None


def _argv(hook: TextureHook, values: dict[str, str]) -> tuple[list[str], str | None]:
    """(argv, stdin text or None) of one call."""
    if hook.kind == "command":
        return [_PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), a) for a in hook.argv], None
    texts = {"glb": values["glb"], "occupancy": values["occupancy"], "out": values["out"],
             "sample_id": values["sample_id"], "prompt": Path(values["prompt_file"]).read_text(encoding="utf-8"),
             "reasoning": Path(values["reasoning_file"]).read_text(encoding="utf-8")}
    return [sys.executable, "-c", _ENTRY_RUNNER], json.dumps({"entry": hook.spec, **texts})


def _tail(text: str) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= _STDERR_TAIL else "..." + flat[-_STDERR_TAIL:]


def run_hook(hook: TextureHook, glb: Path, out: Path, prompt: str, reasoning: str, sample_id: str,
             timeout: float, grid: np.ndarray | None = None) -> tuple[str, str]:
    """Texture one mesh into `out`; (status, message). Never raises for a failing hook."""
    with tempfile.TemporaryDirectory(prefix="rl3d-texture-") as tmp:
        t = Path(tmp)
        (t / "prompt.txt").write_text(prompt or "", encoding="utf-8")
        (t / "reasoning.txt").write_text(reasoning or "", encoding="utf-8")
        occ = ""
        if grid is not None:
            occ = str(t / "occupancy.npy")
            np.save(occ, np.asarray(grid))
        partial = t / "out.glb"  # written here, moved to `out` only once it reads back
        values = {"glb": str(glb), "occupancy": occ, "prompt_file": str(t / "prompt.txt"),
                  "reasoning_file": str(t / "reasoning.txt"), "sample_id": sample_id, "out": str(partial)}
        argv, stdin = _argv(hook, values)
        try:
            proc = subprocess.run(argv, input=stdin if stdin is not None else "", capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return "hook_timeout", f"texture hook ran past {timeout:g} s and was stopped"
        except OSError as e:  # e.g. the program does not exist or is not executable
            return "hook_failed", f"texture hook could not start: {e}"
        if proc.returncode != 0:
            return "hook_failed", f"texture hook exited with code {proc.returncode}: {_tail(proc.stderr)}"
        if not partial.is_file():
            return "bad_output", "texture hook exited 0 but wrote no GLB at its {out} path"
        try:
            read_glb(partial)
        except ValueError as e:
            return "bad_output", f"texture hook output: {e}"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(partial, out)
        return "ok", ""


def texture_meshes(rows: list[dict], hook: TextureHook | str | None, out_dir: str | os.PathLike,
                   timeout: float = 600.0, grids: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Run the hook on each row's mesh; returns new rows with texture_status, texture_message and
    textured_path (relative to out_dir, like mesh_path; None unless the hook succeeded).

    A row needs sample_id, prompt and mesh_path (relative to out_dir); reasoning is optional.
    `grids` (sample_id -> occupancy grid) fills {occupancy}. With no hook, rows come back
    unchanged: meshes stay untextured. The row's own status is left as it is: a failed texture
    keeps the coarse mesh usable, and texture_status says what happened.
    """
    if hook is None:
        return [dict(r) for r in rows]
    hook = parse_hook(hook) if isinstance(hook, str) else hook
    if timeout <= 0:
        raise InputError(f"texture hook timeout must be > 0 seconds, got {timeout}")
    out_dir = Path(out_dir)
    result = []
    for r in rows:
        r = dict(r, textured_path=None)
        mesh_rel = r.get("mesh_path")
        if not mesh_rel or not (out_dir / mesh_rel).is_file():
            r["texture_status"], r["texture_message"] = "no_mesh", "no coarse mesh to texture"
            result.append(r)
            continue
        rel = f"{TEXTURED_DIR}/{r['sample_id']}.glb"
        t0 = time.time()
        status, message = run_hook(hook, out_dir / mesh_rel, shards_io.inside(out_dir, rel), r.get("prompt", ""),
                                   r.get("reasoning") or "", r["sample_id"], timeout,
                                   (grids or {}).get(r["sample_id"]))
        r["texture_status"], r["texture_message"] = status, message
        r["texture_seconds"] = round(time.time() - t0, 3)
        if status == "ok":
            r["textured_path"] = rel
        result.append(r)
    return result
