"""`rl3d sft`: supervised warm start of a policy on synth objects, in exactly the sequence format
gen produces (docs/internals.md "Policy sequences"):

    flat:     build_prompt(p, "single")          | detail | <mesh-start> tokens(grid)          <mesh-end> eos
    hi-grpo:  build_prompt(p, "coarse")          | plan   | <mesh-start> tokens(coarsen(grid)) <mesh-end> eos
              build_prompt(p, "fine", plan=plan) | detail | <mesh-start> tokens(grid)          <mesh-end> eos
    both:     the three sequences above (a policy usable by gen in either mode)

The loss is next-token cross-entropy on completion tokens only (prompt positions are -100).
Training runs under accelerate (CPU, one GPU, `accelerate launch` for several), checkpoints
every --save-every steps into OUT/checkpoints/step-NNNNNN/ (a policy dir written by save_policy,
plus trainer_state.pt: optimizer, scheduler, RNG and the data cursor) and resumes from the latest
one. The data order is a pure function of (seed, step), so a resumed run replays the uninterrupted
one exactly on CPU.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import (GenerationConfig, Qwen2Config, Qwen2ForCausalLM,
                          get_cosine_schedule_with_warmup)
from transformers.utils import logging as hf_logging

from rl3d.formats import tables
from rl3d.formats.codec import majority_colour
from rl3d.formats.errors import InputError
from rl3d.formats.model_dirs import from_local_dir
from rl3d.formats.shards import atomic_path, atomic_write_json, pid_alive
from rl3d.stages.contract import Progress, process_pool
from rl3d.formats.codecs import load_codec
from rl3d.stages.policy.checkpoint import (POLICY_META, carried_meta, freeze_vision, load_trainer_state,
                                           model_class_for, prompt_format_for, read_policy_meta, restore_rng,
                                           rng_state, save_policy)
from rl3d.stages.policy.sequence import DEFAULT_FORMAT, MODE_LEVELS, PromptFormat, build_prompt, mesh_block
from rl3d.stages.policy.tokenizer import (SpecialIds, add_mesh_tokens, build_tokenizer, load_tokenizer,
                                          mesh_token_offset, special_ids)

MODES = tuple(MODE_LEVELS)  # hi-grpo, flat, both
EVAL_SPLITS = ("eval", "val", "valid", "validation")
STATE_FILE = "trainer_state.pt"
ENCODE_CHUNK = 1024  # grids per codec call while preparing data

_COMMON = dict(max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
               attention_dropout=0.0, hidden_act="silu", initializer_range=0.02, use_cache=True)
# Named Qwen2ForCausalLM shapes for training from scratch. "default" is the shipped policy
# (~9.9M parameters with the shipped codec's 20465 mesh tokens: ~20 MB as bfloat16 safetensors).
CONFIGS = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64),
    "default": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=704),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1408),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048),
}


@dataclass
class SFTOptions:
    data: Path
    out: Path
    init: Path | None = None
    config: str | None = None
    mode: str = "hi-grpo"
    codec: Path | None = None
    text_vocab: int = 1024
    batch_size: int = 16
    grad_accum: int = 1
    steps: int | None = None
    epochs: float | None = None
    lr: float = 3e-4
    warmup: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_every: int | None = None
    eval_rows: int = 512
    eval_fraction: float = 0.02
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10
    save_dtype: str = "float32"
    seed: int = 0
    overwrite: bool = False
    quiet: bool = False

    def trajectory_key(self) -> dict:
        """The options that decide the training trajectory: a resume must match them."""
        d = asdict(self)
        for k in ("out", "eval_every", "save_every", "keep_checkpoints", "log_every", "save_dtype", "overwrite",
                  "quiet", "eval_rows"):
            d.pop(k)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


# ---- data --------------------------------------------------------------------------------------

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


def collate(packed: Packed, idx, pad_id: int):
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


# ---- model -------------------------------------------------------------------------------------

def build_model(config_name: str, vocab_size: int, tokenizer):
    if config_name not in CONFIGS:
        raise InputError(f"--config: unknown config {config_name!r} (choose from {', '.join(CONFIGS)})")
    cfg = Qwen2Config(vocab_size=vocab_size, **_COMMON, **CONFIGS[config_name],
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(cfg)


def load_init(path: Path, n_mesh: int):
    """(model float32, tokenizer) from a policy / causal-LM dir; mesh tokens added when missing."""
    if not (Path(path) / "config.json").is_file():
        raise InputError(f"{path}: not a model directory (no config.json)")
    tok = load_tokenizer(path)
    model = from_local_dir(model_class_for(path), path, "causal LM", dtype="float32")
    try:
        add_mesh_tokens(tok, n_mesh)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
    if len(tok) > model.get_input_embeddings().weight.shape[0]:  # (a VLM resizes its text embeddings)
        model.resize_token_embeddings(len(tok))
    return model, tok


def policy_codec(opts: SFTOptions):
    path = opts.codec
    if path is None and opts.init is not None and (Path(opts.init) / POLICY_META).is_file():
        meta = json.loads((Path(opts.init) / POLICY_META).read_text())
        if meta.get("codec") not in (None, "default"):
            path = Path(opts.init) / meta["codec"]
    try:
        return load_codec(path)  # the block codec, or a 64^3 VQ-VAE checkpoint (formats/codecs.py)
    except InputError as e:
        raise InputError(f"--codec: {e}") from None


def set_special_ids(model, tokenizer) -> None:
    """Pad/eos ids on the model and a sane generation config (sampling as in docs/hi_grpo.md)."""
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = None
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        do_sample=True, temperature=0.7, top_p=0.7, max_length=model.config.get_text_config().max_position_embeddings)


def mesh_id_table(special: SpecialIds, device) -> torch.Tensor:
    """bool[V]: which vocabulary ids are mesh tokens (from the tokenizer's table, contiguous or not)."""
    is_mesh = torch.zeros(special.vocab_size, dtype=torch.bool)
    is_mesh[special.mesh_ids] = True
    return is_mesh.to(device)


def completion_loss(model, batch, is_mesh: torch.Tensor):
    """(sum of token NLL over completion tokens, per-kind sums for metrics) of one micro-batch;
    is_mesh from mesh_id_table."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                          reduction="none").view_as(target)
    with torch.no_grad():
        valid = target != -100
        mesh = valid & is_mesh[target.clamp(min=0)]
        correct = (logits.argmax(-1) == target) & mesh
        stats = torch.stack([nll[valid].sum(), valid.sum(), nll[mesh].sum(), mesh.sum(), correct.sum()]).double()
    return nll.sum(), stats


# ---- checkpoints -------------------------------------------------------------------------------

def latest_checkpoint(out: Path) -> Path | None:
    # step-N.tmp is a save a kill interrupted: never resume from it
    ckpts = sorted(p for p in (out / "checkpoints").glob("step-*")
                   if not p.name.endswith(".tmp") and (p / STATE_FILE).is_file())
    return ckpts[-1] if ckpts else None


def save_checkpoint(out: Path, step: int, model, tokenizer, codec, optimizer, scheduler, keep: int,
                    base: str | None, meta: dict, last_eval: dict | None = None) -> Path:
    """OUT/checkpoints/step-NNNNNN: a policy dir (written by save_policy, so load_policy and gen
    read it too) plus trainer_state.pt, the optimizer, scheduler, RNG, data cursor and the last eval
    numbers (a resumed run exports them in final/ as an uninterrupted one does)."""
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(tmp, model, tokenizer, codec, step=step, base=base, codec_ref=None, extra=meta)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "last_eval": {k: float(v) for k, v in (last_eval or {}).items()}}
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # atomic: a checkpoint dir with trainer_state.pt is complete
    for old in sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def policy_meta(mode: str, tokenizer, codec, dtype: str) -> dict:
    """What sft records in rl3d_policy.json besides save_policy's own keys."""
    return {"mode": mode, "levels": list(MODE_LEVELS[mode]), "mesh_token_offset": mesh_token_offset(tokenizer),
            "mesh_vocab_size": codec.vocab_size, "mesh_seq_len": codec.seq_len, "dtype": dtype}


def export_policy(out: Path, model, tokenizer, codec, step: int, mode: str, save_dtype: str, base: str | None,
                  extra: dict) -> Path:
    """OUT/final: a self-contained policy dir (weights, tokenizer, generation config, a copy of the
    codec, rl3d_policy.json) written by save_policy, the format load_policy reads."""
    m = copy.deepcopy(model).to(getattr(torch, save_dtype))  # loaders cast to their compute dtype
    meta = {**policy_meta(mode, tokenizer, codec, save_dtype), **extra}
    remove_stale_exports(out)
    return save_policy(out / "final", m, tokenizer, codec, step=step, base=base, codec_ref=None, extra=meta)


def remove_stale_exports(out: Path) -> list[Path]:
    """Remove `.final.tmp-PID/` dirs that a killed export left (save_policy's temp dir): one sft
    process writes final/, so a temp of a process no longer alive on this host is stale."""
    stale = [d for d in out.glob(".final.tmp-*")
             if d.name.rpartition("-")[2].isdigit() and not pid_alive(int(d.name.rpartition("-")[2]))]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


# ---- metrics -----------------------------------------------------------------------------------

class Metrics:
    """metrics.jsonl (appended as we go), metrics.parquet (long: step, name, value) and TensorBoard
    when installed. Only the main process writes."""

    def __init__(self, out: Path, enabled: bool, resume_step: int):
        self.out, self.enabled = out, enabled
        self.jsonl = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.jsonl.is_file():  # drop what an interrupted run logged after its last checkpoint
            keep = [ln for ln in self.jsonl.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.jsonl.write_text("".join(ln + "\n" for ln in keep))
        try:  # optional, kept lazy: TensorBoard is not a dependency of rl3d
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)
        except Exception:  # tensorboard not installed: jsonl + parquet only
            self.tb = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def write_parquet(self, config: dict) -> None:
        if not self.enabled or not self.jsonl.is_file():
            return
        steps, names, values = [], [], []
        for ln in self.jsonl.read_text().splitlines():
            rec = json.loads(ln)
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    steps.append(rec["step"]), names.append(k), values.append(float(v))
        t = pa.table({"step": pa.array(steps, pa.int64()), "name": pa.array(names, pa.string()),
                      "value": pa.array(values, pa.float64())})
        t = tables.with_metadata(t, "metrics", config)
        with atomic_path(self.out / "metrics.parquet") as tmp:
            pq.write_table(t, tmp)
        if self.tb is not None:
            self.tb.flush()


# ---- the stage ---------------------------------------------------------------------------------

def run_sft(opts: SFTOptions, progress: Progress | None = None) -> dict:
    """Train; return a summary dict. See the module docstring."""
    hf_logging.disable_progress_bar()  # save_pretrained's shard bar would interleave with ours
    progress = progress or Progress(opts.quiet)
    t0 = time.time()
    _check_options(opts)
    out = Path(opts.out)
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    main = acc.is_main_process
    if opts.overwrite and main:
        _clear_outputs(out)
    acc.wait_for_everyone()
    key = opts.trajectory_key()
    finished = _finished_run(out, key)
    if finished is not None:
        progress.log(f"sft: {out}/final already complete, skipping")
        return finished

    # data and model
    codec = policy_codec(opts)
    rows = read_sft_rows(opts.data, opts.mode)
    set_seed(opts.seed)
    resume = latest_checkpoint(out)
    model, tokenizer = initial_model(opts, rows, codec, resume)
    freeze_vision(model)  # a vision-language policy trains its text side only
    set_special_ids(model, tokenizer)
    special = special_ids(tokenizer, codec)
    prompt_meta = inherited_prompt_meta(opts, resume)
    fmt = prompt_format_for(prompt_meta, tokenizer)
    with _timed(progress, "sft: preparing sequences"):
        train, evals, excluded, too_long = build_datasets(rows, opts, tokenizer, special, codec,
                                                          model.config.get_text_config().max_position_embeddings, fmt)

    # schedule, optimizer, resume
    per_step = opts.batch_size * opts.grad_accum * acc.num_processes
    total = opts.steps if opts.steps is not None else max(1, math.ceil((opts.epochs or 1.0) * len(train) / per_step))
    eval_every = opts.eval_every or max(1, total // 10)
    save_every = opts.save_every or max(1, total // 5)
    optimizer = build_optimizer(model, opts)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(opts.warmup * total)), total)
    start, last_eval = 0, {}
    if resume is not None:
        start, last_eval = restore_trainer_state(resume, optimizer, scheduler)
        progress.log(f"sft: resuming from {resume} (step {start})")
    model, optimizer = acc.prepare(model, optimizer)  # the scheduler is stepped by hand, once per step
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "sft_config.json", key)
    metrics = Metrics(out, main, start)
    n_params = sum(p.numel() for p in acc.unwrap_model(model).parameters())
    if start == 0:
        progress.log(f"sft: {n_params / 1e6:.2f}M parameters, {len(train)} train / {len(evals)} eval sequences, "
                     f"{total} steps of {per_step} sequences")
    is_mesh = mesh_id_table(special, acc.device)
    pad_id = tokenizer.pad_token_id
    base = str(opts.init) if opts.init else None

    # the training loop
    model.train()
    window = np.zeros(5)  # loss sums since the last log line (see completion_loss)
    t_log, tokens_log = time.time(), 0
    for step in progress.track(range(start, total), total=total - start, desc="sft"):
        batches = step_batches(train, step, per_step, opts, acc, pad_id)
        n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for i, b in enumerate(batches):  # gradient accumulation: sync only on the last micro-batch
            b = {k: v.to(acc.device) for k, v in b.items()}
            ctx = acc.no_sync(model) if i < len(batches) - 1 else contextlib.nullcontext()
            with ctx:
                loss_sum, stats = completion_loss(model, b, is_mesh)
                acc.backward(loss_sum / n_tok)
            window += stats.cpu().numpy()
            tokens_log += int(b["attention_mask"].sum())
        grad_norm = acc.clip_grad_norm_(model.parameters(), opts.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % opts.log_every == 0 or done == total:
            seconds = max(time.time() - t_log, 1e-9)
            metrics.log(done, train_record(window, scheduler, grad_norm, tokens_log * acc.num_processes / seconds,
                                           done * per_step / len(train)))
            window[:] = 0
            t_log, tokens_log = time.time(), 0
        if (done % eval_every == 0 or done == total) and len(evals):
            last_eval = evaluate(model, evals, acc, opts.batch_size, pad_id, is_mesh)
            metrics.log(done, last_eval)
            progress.log(f"sft: step {done}/{total} eval_loss {last_eval['eval_loss']:.4f} "
                         f"mesh_acc {last_eval['eval_mesh_acc']:.3f}")
        if done % save_every == 0 or done == total:
            acc.wait_for_everyone()
            if main:
                save_checkpoint(out, done, acc.unwrap_model(model), tokenizer, codec, optimizer, scheduler,
                                opts.keep_checkpoints, base,
                                {**prompt_meta, **policy_meta(opts.mode, tokenizer, codec, "float32")}, last_eval)
                metrics.write_parquet(key)
            acc.wait_for_everyone()

    # the final policy
    if main:
        extra = {**prompt_meta, "sft": key, "params": n_params, "train_sequences": len(train), "eval": last_eval}
        export_policy(out, acc.unwrap_model(model), tokenizer, codec, total, opts.mode, opts.save_dtype, base, extra)
        metrics.write_parquet(key)
    acc.wait_for_everyone()
    return {"stage": "sft", "out": str(out), "final": str(out / "final"), "steps": total, "resumed_from": start,
            "train_sequences": len(train), "eval_sequences": len(evals), "excluded_rows": excluded,
            "too_long": too_long, "params": n_params, "train_loss": _last_train_loss(out / "metrics.jsonl"),
            **last_eval, "seconds": round(time.time() - t0, 3), "skipped": False}


# ---- the steps of run_sft ------------------------------------------------------------------------

def _clear_outputs(out: Path) -> None:
    """--overwrite: remove what an earlier run wrote into OUT (nothing else)."""
    for name in ("checkpoints", "final", "tensorboard", "metrics.jsonl", "metrics.parquet", "sft_config.json"):
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _finished_run(out: Path, key: dict) -> dict | None:
    """The skip summary when OUT holds a finished run of these options; None when there is work to
    do. A run with other trajectory options in OUT is an input error."""
    cfg_file = out / "sft_config.json"
    if not cfg_file.is_file():
        return None
    before = json.loads(cfg_file.read_text())
    diff = sorted(k for k in set(before) | set(key) if before.get(k) != key.get(k))
    if diff:
        raise InputError(f"{cfg_file}: this run differs from the one in {out} in {', '.join(diff)} "
                         f"(use --overwrite to start over, or another --out)")
    done = out / "final" / POLICY_META
    if not done.is_file():
        return None
    meta = json.loads(done.read_text())
    return {"stage": "sft", "out": str(out), "final": str(out / "final"), "steps": meta["step"], "skipped": True}


def initial_model(opts: SFTOptions, rows: dict, codec, resume: Path | None):
    """(model, tokenizer): the latest checkpoint of this run, else --init, else a fresh --config
    model with a tokenizer trained on the table's texts."""
    if resume is not None:
        tokenizer = load_tokenizer(resume)
        return from_local_dir(model_class_for(resume), resume, "causal LM", dtype="float32"), tokenizer
    if opts.init is not None:
        return load_init(Path(opts.init), codec.vocab_size)
    texts = [t for c in ("prompt", "plan", "detail") if c in rows for t in rows[c]]
    tokenizer = build_tokenizer(texts, codec, opts.text_vocab)
    return build_model(opts.config, len(tokenizer), tokenizer), tokenizer


def inherited_prompt_meta(opts: SFTOptions, resume: Path | None) -> dict:
    """The prompt / sampling fields of the run's checkpoint or --init's rl3d_policy.json (e.g. a
    ShapeLLM-Omni policy's chat template), kept in every checkpoint sft writes."""
    src = resume if resume is not None else (Path(opts.init) if opts.init is not None else None)
    if src is None or not (src / POLICY_META).is_file():
        return {}
    return carried_meta(read_policy_meta(src))


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


def build_optimizer(model, opts: SFTOptions) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases); frozen parameters
    (a vision tower) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr, betas=(0.9, 0.95))


def restore_trainer_state(checkpoint: Path, optimizer, scheduler) -> tuple[int, dict]:
    """Optimizer, scheduler and RNG state of a checkpoint; returns its step (the data cursor) and
    the last eval numbers before it ({} from checkpoints written before they were kept)."""
    state = load_trainer_state(checkpoint / STATE_FILE)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    return int(state["step"]), dict(state.get("last_eval") or {})


def step_batches(train: Packed, step: int, per_step: int, opts: SFTOptions, acc, pad_id: int) -> list[dict]:
    """This process's micro-batches of one optimizer step (CPU tensors)."""
    idx = step_indices(step, len(train), per_step, opts.seed)
    mine = idx[acc.process_index::acc.num_processes]
    return [collate(train, mine[i:i + opts.batch_size], pad_id) for i in range(0, len(mine), opts.batch_size)]


def train_record(window: np.ndarray, scheduler, grad_norm, tokens_per_s: float, epoch: float) -> dict:
    """One metrics.jsonl record from the loss sums since the last one."""
    return {"loss": window[0] / max(window[1], 1), "mesh_loss": window[2] / max(window[3], 1),
            "mesh_acc": window[4] / max(window[3], 1), "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s, "epoch": epoch}


def evaluate(model, evals: Packed, acc, batch_size: int, pad_id: int, is_mesh: torch.Tensor) -> dict:
    """Loss, mesh loss and mesh-token accuracy on the eval sequences, over all processes."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=acc.device)
    mine = np.arange(acc.process_index, len(evals), acc.num_processes)
    with torch.no_grad():
        for s in range(0, len(mine), batch_size):
            batch = {k: v.to(acc.device) for k, v in collate(evals, mine[s:s + batch_size], pad_id).items()}
            sums += completion_loss(model, batch, is_mesh)[1]
    sums = acc.reduce(sums, "sum").cpu().numpy()
    model.train()
    return {"eval_loss": sums[0] / max(sums[1], 1), "eval_mesh_loss": sums[2] / max(sums[3], 1),
            "eval_mesh_acc": sums[4] / max(sums[3], 1)}


def _check_options(opts: SFTOptions) -> None:
    if opts.mode not in MODES:
        raise InputError(f"--mode: unknown mode {opts.mode!r} (choose from {', '.join(MODES)})")
    if (opts.init is None) == (opts.config is None):
        raise InputError("sft: give exactly one of --init DIR (fine-tune a checkpoint) or --config NAME (from scratch)")
    if opts.config is not None and opts.config not in CONFIGS:
        raise InputError(f"--config: unknown config {opts.config!r} (choose from {', '.join(CONFIGS)})")
    if opts.steps is not None and opts.epochs is not None:
        raise InputError("sft: give --steps or --epochs, not both")
    if opts.save_dtype not in ("float32", "bfloat16", "float16"):
        raise InputError(f"--save-dtype: unknown dtype {opts.save_dtype!r}")


def _last_train_loss(path: Path) -> float | None:
    if not path.is_file():
        return None
    losses = [json.loads(ln).get("loss") for ln in path.read_text().splitlines() if ln]
    losses = [x for x in losses if x is not None]
    return losses[-1] if losses else None


@contextlib.contextmanager
def _timed(progress: Progress, what: str):
    t = time.time()
    yield
    progress.log(f"{what}: {time.time() - t:.1f}s")
