"""Sharded, atomic, resumable stage outputs.

Layout of a stage output directory:
    part-00000-of-00004.parquet     one Parquet part per shard
    _shards/00000-of-00004.json     completion marker of a shard (written after its part)
    _manifest.json                  stage, config, config hash, shard count, completeness (written last)
    _meshes/ _images/ ...           media files, each written atomically; the leading underscore keeps
                                    them out of a dataset reader's view (pyarrow, pandas), so the dir
                                    reads as one Parquet dataset

A killed stage leaves either nothing or a whole part: files are written under a temporary
name, fsynced and renamed. Readers refuse a directory whose shards are not all complete.

Temporary names are hidden (a leading dot) and carry the writer: `.tmp-TAG-PID-NAME` for media,
`.NAME.tmp-TAG-PID` for parts, markers and the manifest, where TAG is the shard being written
(`00003-of-00008`, set by `writing_shard` for the stage's process and any worker it spawns) and PID
the writing process. A rerun of a shard removes what a killed run of that same shard left
(`sweep_stale_temps`): never another shard's temps, nor those of a process still alive here.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rl3d.formats import __version__
from rl3d.formats.errors import InputError

MANIFEST = "_manifest.json"
MARKERS = "_shards"
MESHES = "_meshes"  # GLBs of gen and synth
IMAGES = "_images"  # PNGs of render
# the shard a process writes for; an environment variable so spawned workers (render's pool) inherit it
WRITER_ENV = "RL3D_WRITING_SHARD"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InputError(f"--shard {self.index}/{self.count}: need 0 <= I < N")

    @property
    def tag(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"

    def owns(self, key: str) -> bool:
        """Deterministic assignment by a stable hash of the key (a prompt_id: groups never split)."""
        return self.count == 1 or stable_hash(key) % self.count == self.index


def parse_shard(text: str | None, env: dict | None = None) -> Shard:
    """`I/N`; without it, SLURM_ARRAY_TASK_ID with N from SLURM_ARRAY_TASK_COUNT; else 0/1."""
    env = os.environ if env is None else env
    if text:
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise InputError(f"--shard {text!r}: expected I/N, e.g. 0/8") from None
        return Shard(i, n)
    if "SLURM_ARRAY_TASK_ID" in env:
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise InputError("SLURM_ARRAY_TASK_ID is set but the shard count is not: pass --shard I/N")
        task, count, first = (_env_int(env, k, d) for k, d in (("SLURM_ARRAY_TASK_ID", None),
                                                               ("SLURM_ARRAY_TASK_COUNT", None),
                                                               ("SLURM_ARRAY_TASK_MIN", "0")))
        return Shard(task - first, count)
    return Shard(0, 1)


def _env_int(env, key: str, default: str | None) -> int:
    value = env.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{key}={value!r}: expected an integer (or pass --shard I/N)") from None


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_config(path: str | os.PathLike, recorded: dict, current: dict, ignore: tuple = ()) -> None:
    """Refuse to take the output recorded in `path` (made with `recorded`) for a run of `current`:
    a rerun with a changed setting would otherwise skip as "already complete". `ignore`: keys that
    do not change the result (how it is computed, not what)."""
    keys = sorted(k for k in set(recorded) | set(current)
                  if k not in ignore and config_hash({"v": recorded.get(k)}) != config_hash({"v": current.get(k)}))
    if keys:
        shown = ", ".join(f"{k} {recorded.get(k)!r} -> {current.get(k)!r}" for k in keys[:4])
        raise InputError(f"{path}: made with another config ({shown}{', ...' if len(keys) > 4 else ''}); "
                         f"use --overwrite or another --out")


# an id names media files (`_meshes/ID.glb`, its temp `.tmp-TAG-PID-ID.glb`): the file system's 255-byte
# name limit, less what the stages add around it; a prompt_id leaves room for a sample_id's `-I-LEVEL`
MAX_ID_BYTES = 200
ID_SUFFIX_ROOM = 24


def check_id(value: str, what: str = "id") -> str | None:
    """Why `value` cannot name a file inside an output dir (ids become media file names), or None."""
    if not value:
        return f"empty {what}"
    if "/" in value or "\\" in value or "\0" in value:
        return f"{what} {value!r} contains a path separator or NUL"
    if value.startswith(".") or any(ord(c) < 32 for c in value):
        return f"{what} {value!r} starts with a dot or holds a control character"
    limit = MAX_ID_BYTES - (ID_SUFFIX_ROOM if what == "prompt_id" else 0)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:  # found when the input is read, not by the first write after all the work
        return f"{what} {value[:40]!r}... is {size} bytes long, more than {limit} (ids name files)"
    return None


def inside(root: str | os.PathLike, rel: str | os.PathLike) -> Path:
    """root / rel, refusing any path that would land outside root (an id is never a way out of --out)."""
    root = Path(root)
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise InputError(f"{path}: refusing to write outside {root}")
    return path


def child(folder: Path, name: str) -> Path:
    """folder / name for a plain file name (no separator or NUL, not . or ..), which cannot lead
    out of folder: the many files of one folder checked once with inside() need no resolving each
    (resolving both paths took ~0.6 ms a file, 4 s of a default step's 7,168 PNGs). A link already
    at that name is replaced by the atomic write, not followed."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise InputError(f"{folder / name}: refusing to write outside {folder}")
    return folder / name


def part_path(out: Path, shard: Shard) -> Path:
    return inside(out, f"part-{shard.tag}.parquet")


def marker_path(out: Path, shard: Shard) -> Path:
    return inside(out, f"{MARKERS}/{shard.tag}.json")


def check_out_folders(out: str | os.PathLike) -> None:
    """Refuse an output dir whose bookkeeping or media folders (`_shards`, `_meshes`, `_images`, any
    `_NAME`) or files lead outside it (a symlink to another folder): every media file, marker and
    lock of a stage is written under them, so this runs before any of them is. Each write checks its
    own path with `inside` too."""
    out = Path(out)
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if entry.name.startswith("_"):
            inside(out, entry.name)


def holds_media(out: str | os.PathLike) -> bool:
    """Whether `out` holds media files of an earlier run (a non-empty underscore folder other than the
    markers): an --overwrite then invalidates the old output before writing the first new file."""
    out = Path(out)
    if not out.is_dir():
        return False
    return any(p.is_dir() and p.name.startswith("_") and p.name != MARKERS and any(p.iterdir())
               for p in out.iterdir())


_GLOB = re.compile(r"[*?\[]")


def _input_root(path: str | os.PathLike) -> Path:
    """The file or folder an input names (for a glob, the folder above its first wildcard)."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if _GLOB.search(part):
            return Path(*parts[:i]) if i else Path(".")
    return Path(path)


def check_out_apart(out: str | os.PathLike, inputs: dict) -> None:
    """Refuse an --out that is, contains or is inside one of the inputs ({option: path}; None values
    are skipped): --overwrite would replace the input, and a stage would read what it writes."""
    o = Path(out).resolve()
    for option, path in inputs.items():
        if path is None:
            continue
        p = _input_root(path).resolve()
        if o == p:
            how = "is"
        elif p.is_relative_to(o):
            how = "contains"
        elif o.is_relative_to(p):
            how = "is inside"
        else:
            continue
        raise InputError(f"--out {out}: {how} the input {option} {path}; write the output to another folder")


def _writer() -> str:
    """TAG-PID of the temp names this process writes (just PID outside a stage's shard)."""
    tag = os.environ.get(WRITER_ENV)
    return f"{tag}-{os.getpid()}" if tag else str(os.getpid())


@contextmanager
def writing_shard(shard: Shard):
    """Temp files written inside (by this process or workers it starts) name `shard`."""
    before = os.environ.get(WRITER_ENV)
    os.environ[WRITER_ENV] = shard.tag
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(WRITER_ENV, None)
        else:
            os.environ[WRITER_ENV] = before


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{_writer()}")


# errors of the disk rather than of one row: a stage fails its shard (exit 2, one line) instead of
# keeping a row with the error as its status, which a rerun would never repair
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def disk_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_ERRNOS


def naming(error: OSError, path: Path) -> OSError:
    """The OSError of a failed write, with the file it was writing: the CLI prints "PATH: No space
    left on device" and exits 2 (pyarrow's and a file object's write errors carry no file name)."""
    if error.filename is not None or error.errno is None:
        return error
    return OSError(error.errno, os.strerror(error.errno), str(path))


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: the old file stays as it was, the temp goes
        tmp.unlink(missing_ok=True)
        raise naming(e, final) from None
    os.replace(tmp, final)


def atomic_write_json(final: str | os.PathLike, obj) -> None:
    atomic_write_bytes(final, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


class atomic_path:
    """Context manager yielding a temp path to write to; renamed to `final` on success only.

    Keeps the final suffix so libraries that pick a format by extension (trimesh, PIL) work.
    """

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".tmp-{_writer()}-{self.final.name}")

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp, self.final)
            return False
        if self.tmp.exists():
            self.tmp.unlink()
        if isinstance(exc, OSError) and naming(exc, self.final) is not exc:
            raise naming(exc, self.final) from None
        return False


def write_part(table: pa.Table, out: Path, shard: Shard) -> Path:
    final = part_path(out, shard)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: no part (the shard stays unfinished, a rerun redoes it)
        tmp.unlink(missing_ok=True)
        raise naming(e, final) from None
    os.replace(tmp, final)
    return final


def read_manifest(out: Path) -> dict | None:
    p = Path(out) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        raise InputError(f"{p}: manifest is not valid JSON") from None


def completed_shards(out: Path, count: int) -> set[int]:
    d = Path(out) / MARKERS
    done = set()
    for i in range(count):
        if (d / f"{Shard(i, count).tag}.json").exists():
            done.add(i)
    return done


def missing_shards(out: Path) -> list[int]:
    """Shards the manifest records that have no completion marker yet ([] without a manifest)."""
    m = read_manifest(out)
    if m is None:
        return []
    n = int(m["num_shards"])
    return sorted(set(range(n)) - completed_shards(out, n))


def check_complete(out: Path) -> None:
    """Raise InputError unless every shard recorded by the manifest has its completion marker.

    A directory without a manifest (hand-made parts) is accepted as is.
    """
    missing = missing_shards(out)
    if missing:
        m = read_manifest(out)
        n = int(m["num_shards"])
        shown = ",".join(str(i) for i in missing[:20]) + ("..." if len(missing) > 20 else "")
        raise InputError(f"{out}: incomplete stage output: shards {shown} of {n} not finished "
                         f"(rerun `rl3d {m.get('stage', '<stage>')}` for them)")


def begin(out: Path, stage: str, config: dict, shard: Shard, overwrite: bool) -> bool:
    """Prepare `out` for one shard. Returns False when the shard is already complete (skip).

    Refuses to mix outputs of different configs or shard counts unless --overwrite. With --overwrite
    nothing is touched here: the old output stays valid until `replace` runs, after the stage has
    read its inputs and built its table, so bad input never damages a good output.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    h = config_hash(config)
    m = read_manifest(out)
    if m is not None and not overwrite:
        if m.get("config_hash") != h:
            raise InputError(f"{out}: holds output of a different config (hash {m.get('config_hash')} != {h}); "
                             f"use --overwrite or another --out")
        if int(m.get("num_shards", shard.count)) != shard.count:
            raise InputError(f"{out}: was written with {m['num_shards']} shards, not {shard.count}; "
                             f"use --overwrite or the same --shard count")
    sweep_stale_temps(out, shard)  # also when the shard is complete: a kill after its marker leaves temps
    if not overwrite and marker_path(out, shard).exists():
        # a kill between `finish`'s marker and its manifest refresh leaves a stale manifest: refresh it
        if m is not None and sorted(m.get("completed_shards", [])) != sorted(completed_shards(out, shard.count)):
            atomic_write_json(out / MANIFEST, _manifest(out, stage, config, h, shard.count))
        return False
    # leftovers of this shard's killed writer only: other shards may be writing beside it right now
    for tmp in out.glob(f".{part_path(out, shard).name}.tmp-*"):
        tmp.unlink(missing_ok=True)
    if not overwrite:
        atomic_write_json(out / MANIFEST, _manifest(out, stage, config, h, shard.count))
    return True


def is_complete(out: Path, config: dict, shard: Shard) -> bool:
    """Whether `out` holds `shard`'s finished output of `config` (its marker, under a manifest of
    the same config hash): what `begin` would skip."""
    m = read_manifest(out) if Path(out).is_dir() else None
    return (m is not None and m.get("config_hash") == config_hash(config)
            and int(m.get("num_shards", shard.count)) == shard.count and marker_path(Path(out), shard).exists())


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(out: Path, shard: Shard) -> list[Path]:
    """Remove the temp files a killed run of `shard` left in `out`; return them.

    A temp is removed only when its name carries this shard's tag (no other shard's process writes
    such names, and one shard runs once at a time: two runs of it would race on its part too) and
    its pid is no live process on this host (a second run of the shard started here by mistake
    keeps its files). Covered: media under the underscore folders (`_meshes/`, `_images/ID/`, ...),
    this shard's marker temp and, with one shard only, the manifest's temp (with several, any
    shard's process writes the manifest, possibly on another node)."""
    out = Path(out)
    media = re.compile(rf"^\.tmp-{re.escape(shard.tag)}-(\d+)-")
    json_tmp = re.compile(rf"\.tmp-{re.escape(shard.tag)}-(\d+)$")
    found = []
    for top in (p for p in out.iterdir() if p.is_dir() and p.name.startswith("_") and p.name != MARKERS):
        found += [(f, media.match(f.name)) for f in top.rglob(".tmp-*")]
    names = [marker_path(out, shard).name] + ([MANIFEST] if shard.count == 1 else [])
    for name in names:
        folder = out / MARKERS if name != MANIFEST else out
        found += [(f, json_tmp.search(f.name)) for f in folder.glob(f".{name}.tmp-*")]
    removed = []
    for f, m in found:
        if m and not pid_alive(int(m.group(1))) and f.is_file():
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def replace(out: Path, stage: str, config: dict, shard: Shard) -> None:
    """--overwrite, once the new part is ready: drop this shard's marker (and every old part and
    marker when the shard count changed), then record the new config, before the part is written."""
    out = Path(out)
    m = read_manifest(out)
    marker_path(out, shard).unlink(missing_ok=True)
    if m is not None and int(m.get("num_shards", shard.count)) != shard.count:
        # a different shard count invalidates every old part and marker
        for f in list(out.glob("part-*.parquet")) + list((out / MARKERS).glob("*.json")):
            f.unlink()
    atomic_write_json(out / MANIFEST, _manifest(out, stage, config, config_hash(config), shard.count))


def finish(out: Path, stage: str, config: dict, shard: Shard, stats: dict) -> None:
    """Mark a shard complete (after its part was written), then refresh the manifest."""
    atomic_write_json(marker_path(out, shard), {"shard": shard.index, "num_shards": shard.count,
                                                "finished_at": time.time(), **stats})
    atomic_write_json(Path(out) / MANIFEST, _manifest(out, stage, config, config_hash(config), shard.count))


def _manifest(out: Path, stage: str, config: dict, h: str, count: int) -> dict:

    done = completed_shards(out, count)
    return {"stage": stage, "rl3d_version": __version__, "config": config, "config_hash": h,
            "num_shards": count, "completed_shards": sorted(done), "complete": len(done) == count}
