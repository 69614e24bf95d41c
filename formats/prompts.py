"""Prompt files: .txt (one per line), .jsonl, .json (an array of objects, or {"prompts": [...]}),
.csv, .parquet, a directory of Parquet parts, or a Hugging Face `datasets` folder written by
`Dataset.save_to_disk` (its Arrow files), each with a `prompt` column and optional `prompt_id`,
`category` (and any extra columns such as `spec` or `task_type`, kept as strings).
prompt_id defaults to a stable hash of the text."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rl3d.formats.errors import InputError
from rl3d.formats.reads import read_capped
from rl3d.formats.shards import check_id
from rl3d.formats.tables import list_parts


def prompt_hash(text: str) -> str:
    return "p" + hashlib.sha1(text.strip().encode()).hexdigest()[:12]


def read_prompts(path: str | os.PathLike) -> pa.Table:
    """-> a prompts table (prompt_id, prompt, category + extra string columns), in file order."""
    p = Path(path)
    if p.is_dir() and ((p / HF_STATE).is_file() or (p / HF_DICT).is_file()):
        return _to_table(_rows_hf_dataset(p), str(p))
    if p.is_dir() or any(ch in str(path) for ch in "*?["):
        rows = []
        for f in list_parts(p):
            rows += _rows_parquet(f)
        return _to_table(rows, str(path))
    if not p.exists():
        raise InputError(f"{p}: prompt file not found")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        rows = [{"prompt": line.strip()} for line in _read_text(p).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    elif suffix == ".jsonl":
        rows = []
        for n, line in enumerate(_read_text(p).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{p}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{p}:{n}: expected a JSON object per line")
            rows.append(obj)
    elif suffix == ".json":
        rows = _rows_json(p)
    elif suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(_read_text(p), newline="")))
    elif suffix == ".parquet":
        rows = _rows_parquet(p)
    else:
        raise InputError(f"{p}: unknown prompt file type {suffix!r} (use .txt, .jsonl, .json, .csv or .parquet, "
                         f"or a folder of Parquet parts or of a saved Hugging Face dataset)")
    return _to_table(rows, str(p))


HF_STATE, HF_DICT = "state.json", "dataset_dict.json"  # Dataset.save_to_disk / DatasetDict.save_to_disk


def _rows_json(p: Path) -> list[dict]:
    """A JSON array of objects (the layout of the Hi-GRPO authors' training prompts: prompt,
    task_type, category), or an object whose "prompts" key holds one."""
    try:
        data = json.loads(_read_text(p))
    except json.JSONDecodeError as e:
        raise InputError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        data = data["prompts"]
    if not isinstance(data, list):
        raise InputError(f"{p}: expected a JSON array of objects (or {{\"prompts\": [...]}}), got a "
                         f"{type(data).__name__}")
    for n, r in enumerate(data, 1):
        if not isinstance(r, dict):
            raise InputError(f"{p}: row {n}: expected a JSON object, got {json.dumps(r)[:40]}")
    return data


def _rows_hf_dataset(d: Path) -> list[dict]:
    """The rows of a `datasets` folder written by save_to_disk: state.json lists its Arrow files
    (IPC streams). A DatasetDict folder holds one such folder per split: name the split."""
    if not (d / HF_STATE).is_file():
        try:
            splits = json.loads((d / HF_DICT).read_text()).get("splits") or []
        except (json.JSONDecodeError, AttributeError, OSError):
            splits = []
        raise InputError(f"{d}: a dataset with splits ({', '.join(map(str, splits)) or 'none listed'}): "
                         f"give the folder of one split, e.g. {d / str(splits[0] if splits else 'train')}")
    try:
        state = json.loads((d / HF_STATE).read_text())
        files = [f["filename"] for f in state["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{d / HF_STATE}: not a datasets state file ({type(e).__name__}: {e})") from None
    rows: list[dict] = []
    for name in files:
        f = d / name
        if Path(name).name != name or not f.is_file():  # a listed file outside the folder is not read
            raise InputError(f"{d / HF_STATE}: data file {name!r} is not a file in {d}")
        try:
            with pa.memory_map(str(f)) as src:
                rows += pa.ipc.open_stream(src).read_all().to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{f}: not a readable Arrow stream ({type(e).__name__})") from None
    return rows


def _read_text(p: Path) -> str:
    """A text prompt file as UTF-8; a binary or otherwise encoded file is one line naming where."""
    data = read_capped(p, what="prompt file")  # a device or a huge file: one line, not all of memory
    if b"\0" in data:
        at = data.index(b"\0")
        raise InputError(f"{p}:{_line_of(data, at)}: NUL byte at offset {at} (a binary file, not prompt text)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}:{_line_of(data, e.start)}: not UTF-8 text (byte {data[e.start]:#04x} "
                         f"at offset {e.start})") from None


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _rows_parquet(f: Path) -> list[dict]:
    try:
        return pq.read_table(f).to_pylist()
    except Exception as e:
        raise InputError(f"{f}: not a readable Parquet file ({type(e).__name__})") from None


def _to_table(rows: list[dict], source: str) -> pa.Table:
    out, seen = [], {}
    for n, r in enumerate(rows, 1):
        text = r.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{source}: row {n}: missing or empty 'prompt'")
        pid = str(r.get("prompt_id") or prompt_hash(text))
        if (why := check_id(pid, "prompt_id")) is not None:  # ids become file names under --out
            raise InputError(f"{source}: row {n}: {why}")
        if pid in seen:
            if seen[pid] == text.strip():
                continue  # the same prompt twice: one group
            raise InputError(f"{source}: row {n}: prompt_id {pid!r} reused for a different prompt")
        seen[pid] = text.strip()
        # extra columns travel as strings (e.g. a synth `spec` JSON); binary and list columns
        # (voxels, tokens of an objects table) are not prompt metadata and are dropped
        row = {k: (v if isinstance(v, str) or v is None else json.dumps(v) if isinstance(v, dict) else str(v))
               for k, v in r.items()
               if k not in ("prompt", "prompt_id", "category") and not isinstance(v, (bytes, list))}
        row.update(prompt_id=pid, prompt=text.strip(), category=(r.get("category") or None))
        out.append(row)
    if not out:
        raise InputError(f"{source}: no prompts")
    cols = ["prompt_id", "prompt", "category"] + sorted({k for r in out for k in r} - {"prompt_id", "prompt", "category"})
    return pa.table({c: pa.array([r.get(c) for r in out], pa.string()) for c in cols})
