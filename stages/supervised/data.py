"""sft's training data: an objects table -> mesh targets per level -> tokenised sequences in exactly
gen's layout (prompt | reasoning | sequence.mesh_block), packed ragged, split into train and eval, and
the data order of each optimizer step (a pure function of seed and step: what makes resume exact)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from rl3d.formats import tables
from rl3d.formats.codec import majority_colour
from rl3d.formats.errors import InputError
from rl3d.stages.contract import process_pool
from rl3d.stages.policy.sequence import DEFAULT_FORMAT, MODE_LEVELS, PromptFormat, build_prompt, mesh_block
from rl3d.stages.policy.tokenizer import SpecialIds
from rl3d.stages.supervised.options import SFTOptions

EVAL_SPLITS = ("eval", "val", "valid", "validation")
ENCODE_CHUNK = 1024  # grids per codec call while preparing data


@dataclass
class Packed:
    """Tokenised sequences, ragged: sequence i is ids[offsets[i]:offsets[i+1]], its completion
    starts at prompt_lens[i]."""
    ids: np.ndarray
    offsets: np.ndarray
    prompt_lens: np.ndarray
    levels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_lens)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, idx: np.ndarray) -> "Packed":
        lens = self.lengths[idx]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        ids = np.concatenate([self.ids[self.offsets[i]:self.offsets[i + 1]] for i in idx]) if len(idx) else \
            np.zeros(0, np.int32)
        return Packed(ids, offsets, self.prompt_lens[idx], [self.levels[i] for i in idx] if self.levels else [])


def required_columns(mode: str) -> tuple[str, ...]:
    return ("prompt", "detail") + (("plan",) if mode != "flat" else ())


def read_sft_rows(path, mode: str) -> dict:
    """Columns of an objects table (or any table with prompt, plan, detail and voxels or
    mesh_tokens) as Python lists / a pyarrow voxels column; rows with status != ok dropped."""
    want = required_columns(mode)
    parts = []
    for f in tables.list_parts(path):
        try:
            names = pq.read_schema(f).names
        except Exception as e:
            raise InputError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        for c in want:
            if c not in names:
                raise InputError(f"{f}: missing column {c!r} (sft --mode {mode} needs {', '.join(want)} "
                                 f"and voxels or mesh_tokens)")
        if "voxels" not in names and "mesh_tokens" not in names:
            raise InputError(f"{f}: missing column 'voxels' (or 'mesh_tokens'): no mesh targets")
        cols = [c for c in (*want, "plan", "voxels", "mesh_tokens", "split", "status", "prompt_id") if c in names]
        parts.append(pq.read_table(f, columns=list(dict.fromkeys(cols))))
    table = pa.concat_tables(parts, promote_options="default")
    if "status" in table.column_names:
        table = table.filter(pc.equal(table.column("status"), "ok"))
    if table.num_rows == 0:
        raise InputError(f"{path}: no usable rows (status ok) for sft")
    rows = {c: table.column(c).to_pylist() for c in table.column_names if c not in ("voxels", "mesh_tokens")}
    for c in want:
        bad = [i for i, v in enumerate(rows[c]) if not isinstance(v, str)]
        if bad:
            raise InputError(f"{path}: row {bad[0]}: column {c!r} is empty (null)")
    rows["voxels"] = table.column("voxels") if "voxels" in table.column_names else None
    rows["mesh_tokens"] = table.column("mesh_tokens") if "mesh_tokens" in table.column_names else None
    rows["n"] = table.num_rows
    rows["source"] = str(path)
    return rows


def _grids(rows: dict, idx: np.ndarray, codec) -> np.ndarray:
    """uint8[len(idx), 32, 32, 32]: the voxels column, else the decoded mesh tokens."""
    r = codec.resolution
    if rows["voxels"] is not None:
        col = rows["voxels"].take(idx).to_pylist()
        bad = [i for i, v in zip(idx, col) if v is None or len(v) != r ** 3]
        if bad:
            raise InputError(f"{rows['source']}: row {bad[0]}: voxels blob is not {r}^3 bytes")
        return np.frombuffer(b"".join(col), np.uint8).reshape(len(idx), r, r, r)
    return codec.decode_batch(_listed_tokens(rows, idx, codec))


def _listed_tokens(rows: dict, idx: np.ndarray, codec) -> np.ndarray:
    """int32[len(idx), seq_len] from the mesh_tokens list column, checked against the codec."""
    col = rows["mesh_tokens"].take(idx)
    if hasattr(col, "combine_chunks"):  # ChunkedArray -> Array
        col = col.combine_chunks()
    lens = np.asarray(col.value_lengths().fill_null(0))
    bad = np.flatnonzero(lens != codec.seq_len)
    if len(bad):
        raise InputError(f"{rows['source']}: row {idx[bad[0]]}: mesh_tokens has {lens[bad[0]]} tokens, "
                         f"expected {codec.seq_len}")
    tok = np.asarray(col.flatten()).reshape(len(idx), codec.seq_len)
    out = (tok < 0) | (tok >= codec.vocab_size)
    if out.any():
        row = idx[np.flatnonzero(out.any(1))[0]]
        raise InputError(f"{rows['source']}: row {row}: mesh_tokens outside the codec's [0, {codec.vocab_size})")
    return tok.astype(np.int32)


def coarsen_grids(grids: np.ndarray, factor: int = 2) -> np.ndarray:
    """Batched formats.voxels.coarsen_grid (same result, one bincount for the whole batch):
    each factor^3 cell becomes solid in its majority colour (lowest id on ties) when at least
    half of it is occupied."""
    b, r = grids.shape[:2]
    n = r // factor
    cells = grids.reshape(b, n, factor, n, factor, n, factor).transpose(0, 1, 3, 5, 2, 4, 6).reshape(-1, factor ** 3)
    occupied = (cells > 0).sum(-1) * 2 >= factor ** 3
    small = np.where(occupied, majority_colour(cells), 0).astype(np.uint8).reshape(b, n, n, n)
    return small.repeat(factor, 1).repeat(factor, 2).repeat(factor, 3)


def _encode_chunk(codec, grids: np.ndarray | None, exact: np.ndarray | None, levels: tuple[str, ...]) -> dict:
    """level -> tokens for one chunk: exact tokens from the grids (or given), coarse from coarsened grids."""
    if exact is None:
        exact = codec.encode_batch(grids)
    out = {lv: exact for lv in levels if lv != "coarse"}
    if "coarse" in levels:
        out["coarse"] = codec.encode_batch(coarsen_grids(grids))
    return out


def mesh_targets(rows: dict, codec, levels: tuple[str, ...], workers: int | None = None) -> dict[str, np.ndarray]:
    """level -> int32[n, seq_len] codec tokens: the exact grid for fine/single, its coarsened grid
    for coarse. Voxels are re-encoded with the policy's codec (the table may predate a codebook);
    a table without voxels uses its mesh_tokens (and decodes them for the coarse level).
    Large tables are encoded in a process pool (the codec's matching is single-threaded numpy)."""
    n = rows["n"]
    chunks = [np.arange(s, min(n, s + ENCODE_CHUNK)) for s in range(0, n, ENCODE_CHUNK)]
    need_grid = rows["voxels"] is not None or "coarse" in levels

    def args(idx):
        exact = None if rows["voxels"] is not None else _listed_tokens(rows, idx, codec)
        return codec, (_grids(rows, idx, codec) if need_grid else None), exact, levels

    workers = workers if workers is not None else min(8, os.cpu_count() or 1, len(chunks))
    out = {lv: np.zeros((n, codec.seq_len), np.int32) for lv in levels}
    if workers <= 1 or len(chunks) < 4:
        results = (_encode_chunk(*args(idx)) for idx in chunks)
        pool = None
    else:
        pool = process_pool(workers, start=None)
        results = pool.map(_encode_chunk, *zip(*(args(idx) for idx in chunks)))
    try:
        for idx, res in zip(chunks, results):
            for lv in levels:
                out[lv][idx] = res[lv]
    finally:
        if pool is not None:
            pool.shutdown()
    return out


def level_texts(rows: dict, level: str, fmt: PromptFormat = DEFAULT_FORMAT) -> tuple[list[str], list[str]]:
    """(prompt texts, reasoning texts) of every row at one level."""
    if level == "coarse":
        return [build_prompt(p, "coarse", fmt=fmt) for p in rows["prompt"]], [s.strip() for s in rows["plan"]]
    if level == "fine":
        return ([build_prompt(p, "fine", plan=s, fmt=fmt) for p, s in zip(rows["prompt"], rows["plan"])],
                [d.strip() for d in rows["detail"]])
    return [build_prompt(p, "single", fmt=fmt) for p in rows["prompt"]], [d.strip() for d in rows["detail"]]


def tokenize_sequences(tokenizer, special: SpecialIds, prompts: list[str], reasonings: list[str],
                       mesh: np.ndarray) -> Packed:
    """The layout of sequence.py (prompt | reasoning | sequence.mesh_block), batched: prompt and
    reasoning are tokenised separately with two batched calls, as gen sees them (prompt given,
    reasoning sampled); mesh holds codec ids, mapped through the tokenizer's mesh-id table."""
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(reasonings, add_special_tokens=False)["input_ids"]
    tail = mesh_block(special, mesh)
    p_len = np.fromiter((len(x) for x in p_ids), np.int64, len(p_ids))
    r_len = np.fromiter((len(x) for x in r_ids), np.int64, len(r_ids))
    lens = p_len + r_len + tail.shape[1]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ids = np.empty(offsets[-1], np.int32)
    # scatter the three pieces with flat index arithmetic (no per-token Python)
    flat_p = np.fromiter((t for x in p_ids for t in x), np.int32, int(p_len.sum()))
    flat_r = np.fromiter((t for x in r_ids for t in x), np.int32, int(r_len.sum()))
    ids[_segment_positions(offsets[:-1], p_len)] = flat_p
    ids[_segment_positions(offsets[:-1] + p_len, r_len)] = flat_r
    ids[_segment_positions(offsets[:-1] + p_len + r_len, np.full(len(lens), tail.shape[1]))] = tail.ravel()
    return Packed(ids, offsets, p_len.astype(np.int32))


def _segment_positions(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated aranges start_i .. start_i + len_i - 1."""
    total = int(lens.sum())
    seg_start = np.repeat(np.cumsum(lens) - lens, lens)
    return np.repeat(starts, lens) + (np.arange(total) - seg_start)


def collate_packed(packed: Packed, idx, pad_id: int):
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding)."""
    idx = np.asarray(idx)
    lens = packed.lengths[idx]
    width = int(lens.max())
    pos = np.arange(width)[None, :]
    valid = pos < lens[:, None]
    src = np.where(valid, packed.offsets[idx][:, None] + pos, 0)
    ids = np.where(valid, packed.ids[src], pad_id).astype(np.int64)
    labels = np.where(valid & (pos >= packed.prompt_lens[idx][:, None]), ids, -100)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(valid.astype(np.int64)),
            "labels": torch.from_numpy(labels)}


def split_objects(rows: dict, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(train object indices, eval object indices, excluded count). An eval split in the table wins;
    otherwise a seeded held-out fraction. Other splits (e.g. test) are kept out of both."""
    n = rows["n"]
    split = rows.get("split")
    if split is not None:
        split = np.array([s or "train" for s in split])
        is_eval = np.isin(split, EVAL_SPLITS)
        is_train = split == "train"
        if is_eval.any():
            return np.flatnonzero(is_train), np.flatnonzero(is_eval), int(n - is_train.sum() - is_eval.sum())
        train = np.flatnonzero(is_train)
        excluded = n - len(train)
    else:
        train, excluded = np.arange(n), 0
    n_eval = int(round(eval_fraction * len(train))) if len(train) > 1 else 0
    n_eval = min(max(n_eval, 1 if eval_fraction > 0 and len(train) > 1 else 0), len(train) - 1)
    perm = np.random.default_rng([seed, 7]).permutation(len(train))
    return np.sort(train[perm[n_eval:]]), np.sort(train[perm[:n_eval]]), int(excluded)


def build_dataset(rows: dict, objects: np.ndarray, mode: str, tokenizer, special: SpecialIds, mesh: dict,
                  fmt: PromptFormat = DEFAULT_FORMAT) -> Packed:
    """All sequences of the given objects, level by level, concatenated."""
    if len(objects) == 0:
        return Packed(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32))
    parts = []
    for lv in MODE_LEVELS[mode]:
        sub = {k: [rows[k][i] for i in objects] for k in ("prompt", "plan", "detail") if k in rows}
        prompts, reasonings = level_texts(sub, lv, fmt)
        pk = tokenize_sequences(tokenizer, special, prompts, reasonings, mesh[lv][objects])
        pk.levels = [lv] * len(pk)
        parts.append(pk)
    lens = np.concatenate([p.lengths for p in parts])
    return Packed(np.concatenate([p.ids for p in parts]), np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                  np.concatenate([p.prompt_lens for p in parts]), [lv for p in parts for lv in p.levels])


def build_datasets(rows: dict, opts: SFTOptions, tokenizer, special: SpecialIds, codec,
                   max_len: int, fmt: PromptFormat = DEFAULT_FORMAT) -> tuple[Packed, Packed, int, int]:
    """(train, eval sequences, excluded rows, sequences too long for the model): the split, the mesh
    targets, the sequences of every level; eval capped at --eval-rows by a seeded choice."""
    train_obj, eval_obj, excluded = split_objects(rows, opts.eval_fraction, opts.seed)
    mesh = mesh_targets(rows, codec, MODE_LEVELS[opts.mode])
    train = build_dataset(rows, train_obj, opts.mode, tokenizer, special, mesh, fmt)
    evals = build_dataset(rows, eval_obj, opts.mode, tokenizer, special, mesh, fmt)
    too_long = int((train.lengths > max_len).sum() + (evals.lengths > max_len).sum())
    train = train.subset(np.flatnonzero(train.lengths <= max_len))
    evals = evals.subset(np.flatnonzero(evals.lengths <= max_len))
    if len(evals) > opts.eval_rows:
        evals = evals.subset(np.sort(np.random.default_rng([opts.seed, 11]).permutation(len(evals))[:opts.eval_rows]))
    if len(train) == 0:
        raise InputError(f"{opts.data}: no training sequences fit the model's {max_len} positions")
    return train, evals, excluded, too_long


def step_indices(step: int, n: int, global_batch: int, seed: int) -> np.ndarray:
    """Sequence indices of one optimizer step: an endless stream of per-epoch seeded permutations.
    A pure function of (seed, step) - this is the data cursor that makes resume exact."""
    start = step * global_batch
    pos = np.arange(start, start + global_batch)
    epochs = pos // n
    out = np.empty(global_batch, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        sel = epochs == e
        out[sel] = perm[pos[sel] % n]
    return out
