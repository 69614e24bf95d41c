"""Parquet table contracts shared by every stage.

Each table kind has a name, a version and a set of required columns with their Arrow types.
Extra columns are allowed (reward tables grow one column per term). Readers validate and
fail with one line naming the file and the missing or mistyped column.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rl3d.formats.errors import InputError
from rl3d.formats.shards import check_complete

META_TABLE = b"rl3d.table"
META_VERSION = b"rl3d.version"
META_CONFIG = b"rl3d.config"  # JSON of the config that produced the table
META_POLICY = b"rl3d.policy"  # policy id (path, hash, step) where one was involved
META_TABLE_ID = b"rl3d.table_id"  # this table's identity: its kind, the config and policy that made it
META_MADE_FROM = b"rl3d.made_from"  # JSON {role: table_id} of the input tables it was made for

_str, _i32, _i64, _f32, _f64 = pa.string(), pa.int32(), pa.int64(), pa.float32(), pa.float64()

# Required columns per table kind. Types are checked when the column is present.
SCHEMAS: dict[str, tuple[int, dict[str, pa.DataType]]] = {
    "prompts": (1, {"prompt_id": _str, "prompt": _str, "category": _str}),
    # procedural objects from `rl3d synth`: ground truth for sft, spec checks and eval
    "objects": (1, {
        "sample_id": _str, "prompt_id": _str, "prompt": _str, "category": _str,
        "family": _str, "split": _str, "spec": _str, "plan": _str, "detail": _str,
        "voxels": pa.binary(), "mesh_tokens": pa.list_(_i32), "mesh_path": _str,
        "status": _str, "message": _str,
    }),
    # rollouts from `rl3d gen`: one row per (prompt_id, sample_index, level)
    "samples": (1, {
        "sample_id": _str, "prompt_id": _str, "sample_index": _i32, "level": _str,
        "prompt": _str, "input_ids": pa.list_(_i32), "prompt_len": _i32,
        "reasoning_start": _i32, "reasoning_end": _i32, "mesh_start": _i32, "mesh_end": _i32,
        "logprobs": pa.list_(_f32), "reasoning": _str, "mesh_tokens": pa.list_(_i32),
        "status": _str, "message": _str, "mesh_path": _str, "policy_id": _str,
        "policy_step": _i64, "seed": _i64,
    }),
    # one row per (sample_id, view) from `rl3d render`
    "renders": (1, {
        "sample_id": _str, "view": _i32, "azimuth": _f32, "elevation": _f32,
        "image_path": _str, "status": _str, "message": _str,
    }),
    # one row per sample from `rl3d reward`; plus <term>, <term>_raw, <term>_status ... columns
    "rewards": (1, {
        "sample_id": _str, "prompt_id": _str, "sample_index": _i32, "level": _str,
        "total": _f64, "status": _str, "message": _str,
    }),
    # per-sample advantages written by `rl3d rl-step` for audit
    "advantages": (1, {
        "sample_id": _str, "prompt_id": _str, "sample_index": _i32, "level": _str,
        "reward": _f64, "advantage": _f64, "kept": pa.bool_(),
    }),
    # one row per (step or policy, metric)
    "metrics": (1, {"name": _str, "value": _f64}),
}

# media paths inside tables are stored relative to the stage's output directory
MEDIA_COLUMNS = ("mesh_path", "textured_path", "image_path", "sheet_path", "depth_path", "normal_path")


def table_id(kind: str, config: dict, policy: str | None = None, made_from: dict | None = None) -> str:
    """A table's identity: every shard of one run shares it, a table of another run (another seed,
    policy, input or option) gets another. Stages record the ids of their inputs (made_from), and
    the id hashes them: renders of other samples at the same path get another id."""
    text = json.dumps([kind, config, policy] + ([made_from] if made_from else []), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def content_hash(table: pa.Table) -> str:
    """A hash of a table's rows (column names and values): an input's content, not its path."""
    h = hashlib.sha256(json.dumps(table.column_names).encode())
    for row in table.to_pylist():
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def schema_metadata(kind: str, config: dict | None = None, policy: str | None = None,
                    made_from: dict[str, str] | None = None) -> dict[bytes, bytes]:
    version, _ = SCHEMAS[kind]
    meta = {META_TABLE: kind.encode(), META_VERSION: str(version).encode()}
    if config is not None:
        meta[META_CONFIG] = json.dumps(config, sort_keys=True, default=str).encode()
        meta[META_TABLE_ID] = table_id(kind, config, policy, made_from).encode()
    if policy is not None:
        meta[META_POLICY] = policy.encode()
    if made_from:
        meta[META_MADE_FROM] = json.dumps(made_from, sort_keys=True).encode()
    return meta


def with_metadata(table: pa.Table, kind: str, config: dict | None = None, policy: str | None = None,
                  made_from: dict[str, str] | None = None) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta.update(schema_metadata(kind, config, policy, made_from))
    return table.replace_schema_metadata(meta)


@dataclass(frozen=True)
class Provenance:
    """What a table on disk says about itself: its id, the policy, and the inputs it was made for."""

    path: str
    kind: str | None
    table_id: str | None
    policy: str | None
    made_from: dict


def provenance(path: str | os.PathLike) -> Provenance:
    """Read from the schemas of every part (cheap: no rows); parts of different runs are an error."""
    ids, first = set(), None
    for f in list_parts(path):
        try:
            meta = pq.read_schema(f).metadata or {}
        except Exception as e:
            raise InputError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        ids.add(meta.get(META_TABLE_ID, b"").decode())
        first = first if first is not None else meta
    if len(ids) > 1:
        raise InputError(f"{path}: its parts come from different runs (table ids {', '.join(sorted(ids))})")
    kind, policy = first.get(META_TABLE), first.get(META_POLICY)
    return Provenance(str(path), kind.decode() if kind else None, ids.pop() or None,
                      policy.decode() if policy else None, json.loads(first.get(META_MADE_FROM, b"{}")))


def require_made_for(table: Provenance, role: str, source: Provenance, allow_unverified: bool = False) -> str | None:
    """`table` must record `source` as the `role` input it was made from (e.g. rewards made from these
    samples): a join of tables of different runs is refused with one line naming both.

    Tables without rl3d metadata (written by another tool, or rewritten by pandas or duckdb, which
    drop it) cannot prove anything: the join is refused unless `allow_unverified` (the commands'
    --allow-unverified), and then the returned warning says so. Every table rl3d writes carries
    its provenance."""
    if table.kind is None or source.kind is None:
        other = table if table.kind is None else source
        if not allow_unverified:
            raise InputError(f"{other.path}: carries no rl3d provenance (written or rewritten by another tool): "
                             f"cannot check that {table.path} was made from {source.path}; pass "
                             f"--allow-unverified to join it anyway")
        return (f"{other.path} was not written by rl3d: cannot check that {table.path} was made from "
                f"{source.path}")
    if source.table_id is None:
        raise InputError(f"{source.path}: records no table id (written by an older rl3d); regenerate it")
    made = table.made_from.get(role)
    if made is None:
        raise InputError(f"{table.path}: records no {role} table it was made from (written by an older rl3d); "
                         f"regenerate it from {source.path}")
    if made != source.table_id:
        raise InputError(f"{table.path} was made from another {role} table ({made}) than {source.path} "
                         f"({source.table_id}): tables of different runs do not join")
    return None


def same_policy(policy_a: str | None, policy_b: str | None) -> bool:
    """Policy ids ("<dir>@<weights hash>#step<N>") name the same weights: the directory may move."""
    if not policy_a or not policy_b:
        return False
    return policy_a.split("@", 1)[-1] == policy_b.split("@", 1)[-1]


def validate(table: pa.Table, kind: str, source: str) -> pa.Table:
    """Check required columns and their types; raise InputError naming the file and column."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown table kind {kind!r}")
    _, cols = SCHEMAS[kind]
    for name, typ in cols.items():
        if name not in table.column_names:
            raise InputError(f"{source}: missing column {name!r} for a {kind} table")
        got = table.schema.field(name).type
        if not _compatible(got, typ):
            raise InputError(f"{source}: column {name!r} has type {got}, expected {typ}")
    return table


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    if got == want:
        return True
    if pa.types.is_null(got):  # an all-null column written by pandas/pyarrow is fine
        return True
    if pa.types.is_integer(want) and pa.types.is_integer(got):
        return True
    if pa.types.is_floating(want) and (pa.types.is_floating(got) or pa.types.is_integer(got)):
        return True
    if pa.types.is_string(want) and (pa.types.is_large_string(got) or pa.types.is_string(got)):
        return True
    if pa.types.is_binary(want) and pa.types.is_large_binary(got):
        return True
    if pa.types.is_list(want) and (pa.types.is_list(got) or pa.types.is_large_list(got)):
        return _compatible(got.value_type, want.value_type)
    return False


def list_parts(path: str | os.PathLike) -> list[Path]:
    """A file, a directory of part files, or a glob -> the sorted list of Parquet files."""
    p = Path(path)
    if p.is_dir():
        check_complete(p)
        # pathlib's glob returns dot-files: a hidden `.tmp-*.parquet` is a write a kill interrupted
        files = sorted(p.glob("part-*.parquet")) or sorted(f for f in p.glob("*.parquet") if not f.name.startswith("."))
        if not files:
            raise InputError(f"{p}: no Parquet files in directory")
        return files
    if p.is_file():
        return [p]
    matches = sorted(Path(m) for m in glob.glob(str(path)))
    files = [m for m in matches if m.suffix == ".parquet"]
    if not files:
        raise InputError(f"{path}: no such file, directory or glob match")
    return files


def read_table(path: str | os.PathLike, kind: str, columns: list[str] | None = None) -> pa.Table:
    """Read and validate a table; media path columns are made absolute (see MEDIA_COLUMNS)."""
    parts = []
    for f in list_parts(path):
        try:
            t = pq.read_table(f, columns=columns)
        except Exception as e:  # corrupt or non-Parquet file
            raise InputError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        validate(t, kind, str(f)) if columns is None else None
        parts.append(absolute_media(t, f.parent))
    if len(parts) == 1:
        return parts[0]
    return pa.concat_tables(parts, promote_options="default")


def absolute_media(table: pa.Table, base: Path) -> pa.Table:
    """Relative media paths made absolute against `base` (the table's folder), resolved once: a
    path that climbs out with ".." is resolved whole, any other is joined to it (resolving every
    row cost ~0.1 ms each, ~1 s for a renders table of 6,144 views and their sheets)."""
    root = str(Path(base).resolve())

    def absolute(v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if os.path.isabs(v):
            return v
        if ".." in Path(v).parts:
            return str((Path(base) / v).resolve())
        return os.path.normpath(os.path.join(root, v))

    for name in MEDIA_COLUMNS:
        if name in table.column_names:
            vals = [absolute(v) for v in table.column(name).to_pylist()]
            table = table.set_column(table.column_names.index(name), name, pa.array(vals, pa.string()))
    return table


def _first_meta(path: str | os.PathLike) -> dict:
    f = list_parts(path)[0]
    try:
        return pq.read_schema(f).metadata or {}
    except Exception as e:  # corrupt or non-Parquet file
        raise InputError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def table_config(path: str | os.PathLike) -> dict:
    """The config JSON stored in the first part's schema metadata ({} if none)."""
    meta = _first_meta(path)
    return json.loads(meta.get(META_CONFIG, b"{}"))


def table_policy(path: str | os.PathLike) -> str | None:
    meta = _first_meta(path)
    v = meta.get(META_POLICY)
    return v.decode() if v else None


def require_unique(table: pa.Table, keys: tuple[str, ...], source: str) -> None:
    """Refuse a table whose key repeats: a join on it would silently keep the last row."""
    seen: dict[tuple, int] = {}
    cols = [table.column(k).to_pylist() for k in keys]
    for n, key in enumerate(zip(*cols), 1):
        if key in seen:
            what = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key))
            raise InputError(f"{source}: row {n}: duplicate key {what} (first at row {seen[key]})")
        seen[key] = n


def require_rows(table: pa.Table, source: str, kind: str) -> None:
    """Refuse an input table with no rows (a stage would write an empty output and call it done)."""
    if table.num_rows == 0:
        raise InputError(f"{source}: the {kind} table has no rows")
