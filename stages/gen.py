"""`rl3d gen`: rollouts of the policy, flat (one level) or Hi-GRPO (coarse plan + mesh, then fine
detail + mesh), written as a samples table plus one GLB per decodable sample.

The sampler is a batched loop over a KV cache: left-padded prompts with explicit position ids, a
per-row state machine (reasoning -> mesh -> done) held in tensors, the constraint masking of
stages.policy (the same function the log-prob recomputation uses), temperature, top-k and top-p.
Randomness is counter-based: row r's draw at step t is a hash of (row seed, t), where the row seed
comes from (--seed, prompt_id, sample_index, level). Samples therefore do not depend on batch
composition, so sharding or a different --batch-size gives the same rollouts.
"""
from __future__ import annotations

import hashlib
import inspect
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.stages import policy as pol
from rl3d.stages.contract import Progress, StageOptions, run_stage

MODES = {"flat": ("single",), "hi-grpo": ("coarse", "fine")}


@dataclass(frozen=True)
class Sampling:
    """Sampling settings. Defaults suit the small embedded policy: plain temperature-1 sampling with
    a light nucleus cut (top_p 0.95) that drops the noisy tail (stray blocks) while keeping groups
    diverse. The paper's setting for ShapeLLM-Omni is temperature 0.7, top_p 0.7, top_k 8192.
    Stored log-probs are of the temperature-scaled masked distribution (top-k/top-p only shape
    sampling, as in verl/TRL)."""
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0  # 0 = no top-k cut
    max_reasoning_tokens: int = 128

    def check(self) -> "Sampling":
        if not self.temperature > 0:
            raise InputError(f"--temperature {self.temperature}: must be > 0")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0 or self.max_reasoning_tokens < 0:
            raise InputError("--top-k and --max-reasoning-tokens must be >= 0")
        return self


# ---- counter-based randomness ----------------------------------------------------------------

_M32 = 0xFFFFFFFF


def row_seed(seed: int, prompt_id: str, sample_index: int, level: str) -> int:
    """32-bit seed of one sampled sequence, independent of batch and shard."""
    key = f"{int(seed)}\0{prompt_id}\0{int(sample_index)}\0{level}".encode()
    return int.from_bytes(hashlib.sha1(key).digest()[:4], "little")


def _pcg(x: torch.Tensor) -> torch.Tensor:
    """PCG hash of 32-bit values held in int64 (products stay below 2^63, no overflow)."""
    x = (x * 747796405 + 2891336453) & _M32
    w = (((x >> ((x >> 28) + 4)) ^ x) * 277803737) & _M32
    return ((w >> 22) ^ w) & _M32


def uniform_draws(seeds: torch.Tensor, step: int, attempt: int = 0) -> torch.Tensor:
    """float64[B] in (0, 1): the draw of each row at one step (and rejection attempt)."""
    h = _pcg(seeds ^ _pcg(torch.full_like(seeds, step) ^ _pcg(torch.full_like(seeds, attempt))))
    h2 = _pcg(h ^ 0x9E3779B9)
    return ((h << 21 | (h2 >> 11)).double() + 0.5) / float(1 << 53)


_BLOCK = 128  # vocabulary block of the two-level inverse CDF


def _inverse_cdf(w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Index i of each row with cumsum(w)[i-1] < target <= cumsum(w)[i], for non-negative weights
    w [B, V] and targets in (0, sum(w)]. Two levels (block sums, then one block) instead of a
    cumsum over the whole vocabulary, which is a slow sequential scan on CPU."""
    B, V = w.shape
    nb = V // _BLOCK  # callers pad the vocabulary to a multiple of _BLOCK
    wb = w.view(B, nb, _BLOCK)
    bcdf = wb.sum(-1).cumsum(-1)
    blk = torch.searchsorted(bcdf, target[:, None]).clamp(max=nb - 1)
    before = torch.where(blk > 0, bcdf.gather(1, (blk - 1).clamp(min=0)), 0.0)
    inner = wb.gather(1, blk[:, :, None].expand(-1, -1, _BLOCK))[:, 0].cumsum(-1)
    rest = torch.minimum(target[:, None] - before, inner[:, -1:])  # rounding: stay inside the block
    idx = torch.searchsorted(inner, rest).clamp(max=_BLOCK - 1)
    return (blk * _BLOCK + idx)[:, 0]


def sample_tokens(masked: torch.Tensor, seeds: torch.Tensor, step: int, top_k: int = 0, top_p: float = 1.0,
                  max_attempts: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(masked) (masked [B, V]: constrained, tempered logits),
    restricted to the top-k / top-p set, by inverse-CDF draws from counter-based uniforms.
    Returns (tokens, their log-probs under the full masked distribution).

    The cut is applied by rejection instead of a sort over the vocabulary (a sort per step dominated
    the CPU profile): draw from the full distribution, accept a token t when fewer than k tokens are
    more likely (top-k) and the mass of the tokens more likely than t is < top_p (top-p). Accepted
    draws are distributed exactly as the renormalised nucleus; tokens tied at the boundary are all in.
    The acceptance rate is >= top_p, so few attempts are needed; rows still rejected after
    `max_attempts` take their most likely token (part of every nucleus)."""
    B, V = masked.shape
    top = masked.max(-1, keepdim=True).values
    pad = -V % _BLOCK
    # unnormalised probabilities, padded to whole blocks; forbidden tokens are exactly 0
    w = torch.exp(torch.nn.functional.pad(masked, (0, pad), value=-float("inf")) - top)
    total = w.sum(-1)
    cut_k, cut_p = 0 < top_k < V, top_p < 1.0
    tok = torch.zeros(B, dtype=torch.long, device=masked.device)
    rows = torch.arange(B, device=masked.device)  # rows still drawing (all, then the rejected ones)
    for attempt in range(max_attempts if (cut_k or cut_p) else 1):
        wr, tr, sr = (w, total, seeds) if attempt == 0 else (w[rows], total[rows], seeds[rows])
        u = uniform_draws(sr, step, attempt).to(w.device, w.dtype)
        draw = _inverse_cdf(wr, u * tr)
        ok = torch.ones_like(draw, dtype=torch.bool)
        if cut_k or cut_p:
            below = wr <= wr.gather(1, draw[:, None])
            if cut_k:
                ok &= (V + pad - below.sum(1)) < top_k
            if cut_p:
                ok &= wr.masked_fill(below, 0.0).sum(1) < top_p * tr
        tok[rows[ok]] = draw[ok]
        rows = rows[~ok]
        if rows.numel() == 0:
            break
    if rows.numel():
        tok[rows] = w[rows].argmax(-1)
    logprob = masked.gather(1, tok[:, None])[:, 0] - top[:, 0] - total.log()
    return tok, logprob


# ---- the batched constrained sampler -----------------------------------------------------------

def _new_cache(model, max_len: int):
    """A preallocated KV cache (no per-step concatenation); DynamicCache where static is unsupported."""
    from transformers import DynamicCache, StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except Exception:
        return DynamicCache()


@torch.no_grad()
def sample_sequences(model, special: pol.SpecialIds, prompt_ids: list[list[int]], seeds: list[int],
                     seq_len: int, sampling: Sampling) -> list[dict]:
    """Sample completions for a batch of prompts (token id lists). Returns per row: `tokens` (the
    completion: reasoning, <mesh-start>, seq_len mesh ids, <mesh-end>, eos), `logprobs` (float32,
    same length), `n_reasoning`, `truncated` (the budget forced <mesh-start>)."""
    dev = next(model.parameters()).device
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    R = sampling.max_reasoning_tokens
    steps = R + 1 + seq_len  # sampled tokens at most; <mesh-end> and eos are appended (forced)
    ids = torch.full((B, P), special.pad, dtype=torch.long)
    att = torch.zeros((B, P + steps), dtype=torch.long)
    for i, p in enumerate(prompt_ids):  # left padding
        ids[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
        att[i, P - len(p):P] = 1
    ids, att = ids.to(dev), att.to(dev)
    pos = pol.position_ids_from_mask(att[:, :P])
    seeds_t = torch.as_tensor(seeds, dtype=torch.long, device=dev)
    ck = pol.cache_kwarg(model)
    cache = _new_cache(model, P + steps)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids, attention_mask=att[:, :P], position_ids=pos, use_cache=True, **{ck: cache}, **extra)
    logits = out.logits[:, -1]
    if getattr(out, ck, None) is not None:
        cache = getattr(out, ck)
    last = pos[:, -1].clone()

    REASON, MESH, DONE = 0, 1, 2
    state = torch.full((B,), REASON, dtype=torch.long, device=dev)
    n_reason = torch.zeros(B, dtype=torch.long, device=dev)
    n_mesh = torch.zeros(B, dtype=torch.long, device=dev)
    tokens = torch.full((B, steps), special.pad, dtype=torch.long, device=dev)
    logps = torch.zeros((B, steps), dtype=torch.float32, device=dev)
    for t in range(steps):
        kinds = torch.where(state == REASON,
                            torch.where(n_reason >= R, pol.KIND_FORCE_START, pol.KIND_REASONING),
                            torch.where(state == MESH, pol.KIND_MESH, pol.KIND_PAD))
        masked = pol.masked_logits(logits, kinds, special, sampling.temperature)
        active = state != DONE
        tok, lp = sample_tokens(masked, seeds_t, t, sampling.top_k, sampling.top_p)
        tok = torch.where(active, tok, special.pad)
        tokens[:, t] = tok
        logps[:, t] = torch.where(active, lp, 0.0)
        # state machine: reasoning until <mesh-start>, then exactly seq_len mesh tokens
        in_reason, in_mesh = state == REASON, state == MESH
        started = in_reason & (tok == special.mesh_start)
        n_reason += (in_reason & ~started).long()
        n_mesh += in_mesh.long()
        state = torch.where(started, MESH, state)
        state = torch.where(in_mesh & (n_mesh >= seq_len), DONE, state)
        if not bool((state != DONE).any()):
            break
        att[:, P + t] = active.long()
        last = last + 1
        out = model(input_ids=tok[:, None], attention_mask=att[:, :P + t + 1], position_ids=last[:, None],
                    use_cache=True, **{ck: cache})
        logits = out.logits[:, -1]
        if getattr(out, ck, None) is not None:
            cache = getattr(out, ck)

    n_reason, tokens, logps = n_reason.cpu(), tokens.cpu(), logps.cpu()
    if not torch.isfinite(logps).all() or bool((n_mesh < seq_len).any()):
        # only a broken checkpoint gets here (e.g. NaN weights): every masked position has a finite choice
        raise InputError("the policy produced non-finite log-probs or unfinished meshes; "
                         "its weights are likely corrupt (NaN/inf)")
    rows = []
    for i in range(B):  # per row (not per token): cut each completion and append the forced tail
        n = int(n_reason[i]) + 1 + seq_len
        rows.append({
            "tokens": tokens[i, :n].tolist() + [special.mesh_end, special.eos],
            "logprobs": np.concatenate([logps[i, :n].numpy(), np.zeros(2, np.float32)]),
            "n_reasoning": int(n_reason[i]),
            "truncated": bool(n_reason[i] >= R),
        })
    return rows


# ---- rollouts -> sample rows ---------------------------------------------------------------------

def generate(policy: pol.Policy, prompt_rows: list[dict], mode: str = "hi-grpo", group_size: int = 8,
             seed: int = 0, sampling: Sampling = Sampling(), batch_size: int = 64, out_dir: str | Path | None = None,
             progress: Progress | None = None) -> list[dict]:
    """Rollouts for prompt rows (dicts with prompt_id, prompt and optional category/spec): G samples
    per prompt and level, coarse before fine. With out_dir, decodable meshes are written to
    out_dir/meshes/<sample_id>.glb (mesh_path relative to out_dir); without, mesh_path stays None."""
    if mode not in MODES:
        raise InputError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if group_size < 1 or batch_size < 1:
        raise InputError("--group-size and --batch-size must be >= 1")
    sampling.check()
    progress = progress or Progress(quiet=True)
    jobs = [(r, k) for r in prompt_rows for k in range(group_size)]
    plans: dict[tuple[str, int], str] = {}
    rows: list[dict] = []
    for level in MODES[mode]:
        texts = [pol.build_prompt(r["prompt"], level, plan=plans.get((r["prompt_id"], k)))
                 for r, k in jobs]
        batches = range(0, len(jobs), batch_size)
        for s in progress.track(batches, total=len(batches), desc=f"gen {level}"):
            chunk = jobs[s:s + batch_size]
            level_rows = _sample_chunk(policy, chunk, texts[s:s + batch_size], level, seed, sampling, out_dir)
            for (r, k), row in zip(chunk, level_rows):
                plans[(r["prompt_id"], k)] = row["reasoning"]
            rows += level_rows
    return rows


def _sample_chunk(policy: pol.Policy, chunk, texts, level, seed, sampling: Sampling, out_dir) -> list[dict]:
    tok, special, codec = policy.tokenizer, policy.special, policy.codec
    prompt_ids = [pol.encode_text(tok, t) for t in texts]
    seeds = [row_seed(seed, r["prompt_id"], k, level) for r, k in chunk]
    done = sample_sequences(policy.model, special, prompt_ids, seeds, codec.seq_len, sampling)
    lut = special.codec_lookup()
    out = []
    reasoning_ids = [d["tokens"][:d["n_reasoning"]] for d in done]
    reasoning = tok.batch_decode(reasoning_ids, skip_special_tokens=True)
    mesh = np.stack([lut[torch.as_tensor(d["tokens"][d["n_reasoning"] + 1:d["n_reasoning"] + 1 + codec.seq_len])].numpy()
                     for d in done]).astype(np.int32)
    grids = codec.decode_batch(mesh)  # the sampler only emits mesh ids, so every sequence decodes to a grid
    for i, ((r, k), d) in enumerate(zip(chunk, done)):
        p = len(prompt_ids[i])
        re = p + d["n_reasoning"]
        sid = f"{r['prompt_id']}-{k}-{level}"
        status, message, mesh_path = "ok", "", None
        if not grids[i].any():
            status, message = "decode_error", "empty grid: every mesh token is the empty block"
        elif out_dir is not None:
            mesh_path = _write_mesh(grids[i], Path(out_dir), sid)
        row = {
            "sample_id": sid, "prompt_id": r["prompt_id"], "sample_index": k, "level": level,
            "prompt": r["prompt"], "input_ids": prompt_ids[i] + d["tokens"], "prompt_len": p,
            "reasoning_start": p, "reasoning_end": re, "mesh_start": re + 1, "mesh_end": re + 1 + codec.seq_len,
            "logprobs": d["logprobs"], "reasoning": reasoning[i], "mesh_tokens": mesh[i],
            "reasoning_truncated": d["truncated"], "status": status, "message": message, "mesh_path": mesh_path,
            "policy_id": policy.policy_id, "policy_step": policy.step, "seed": int(seed),
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
        }
        for extra in ("category", "spec"):
            if r.get(extra) is not None:
                row[extra] = r[extra]
        out.append(row)
    return out


def _write_mesh(grid: np.ndarray, out: Path, sample_id: str) -> str:
    from rl3d.formats.glb import write_glb
    from rl3d.formats.voxels import grid_to_mesh

    rel = f"meshes/{sample_id}.glb"
    write_glb(grid_to_mesh(grid), shards_io.inside(out, rel))
    return rel


# ---- the samples table -----------------------------------------------------------------------------

_EXTRA = {"reasoning_truncated": pa.bool_(), "temperature": pa.float64(), "top_p": pa.float64(),
          "top_k": pa.int32(), "category": pa.string(), "spec": pa.string()}


def samples_table(rows: list[dict], with_category: bool = False, with_spec: bool = False) -> pa.Table:
    _, cols = tables.SCHEMAS["samples"]
    fields = dict(cols)
    fields.update({k: v for k, v in _EXTRA.items() if k not in ("category", "spec")})
    if with_category or any("category" in r for r in rows):
        fields["category"] = pa.string()
    if with_spec or any("spec" in r for r in rows):
        fields["spec"] = pa.string()
    schema = pa.schema([pa.field(k, t) for k, t in fields.items()])
    data = {}
    for k, t in fields.items():
        vals = [r.get(k) for r in rows]
        if pa.types.is_list(t):
            vals = [np.asarray(v, dtype=t.value_type.to_pandas_dtype()) for v in vals]
        data[k] = pa.array(vals, type=t)
    return pa.table(data, schema=schema)


# ---- the stage -----------------------------------------------------------------------------------

def run_gen(prompts_path: str | Path, opts: StageOptions, policy_dir: str | Path | None = None,
            mode: str = "hi-grpo", group_size: int = 8, sampling: Sampling = Sampling(), batch_size: int = 64,
            device: str | None = None, dtype: str | None = None) -> dict:
    """Generate the shard's rollouts into opts.out (resumable, shardable by prompt_id)."""
    from rl3d.formats.prompts import read_prompts

    if mode not in MODES:
        raise InputError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if group_size < 1 or batch_size < 1:
        raise InputError("--group-size and --batch-size must be >= 1")
    sampling.check()
    prompts = read_prompts(prompts_path)
    path = Path(policy_dir).resolve() if policy_dir is not None else pol.default_policy_dir()
    meta = pol.read_policy_meta(path)
    policy_id = f"{path}@{pol.weights_hash(path)}#step{int(meta.get('step', 0))}"
    _, dt = pol.resolve_device_dtype(device, dtype)
    config = {
        "stage": "gen", "prompts": str(Path(prompts_path).resolve()), "policy_id": policy_id, "mode": mode,
        "levels": list(MODES[mode]), "group_size": group_size, "seed": opts.seed, "dtype": str(dt),
        "sampling": asdict(sampling), "codec_hash": meta.get("codec_hash"),
        "request": pol.REQUEST, "instructions": {lv: pol.INSTRUCTIONS[lv] for lv in MODES[mode]},
    }
    has_cat = "category" in prompts.column_names and prompts.column("category").null_count < prompts.num_rows
    has_spec = "spec" in prompts.column_names

    def produce(shard, progress):
        rows = [r for r in prompts.to_pylist() if shard.owns(r["prompt_id"])]
        stats: dict = {"prompts": len(rows), "batch_size": batch_size}
        if not rows:
            return samples_table([], has_cat, has_spec), stats
        t0 = time.time()
        policy = pol.load_policy(path, device, dtype)
        progress.log(f"gen: {len(rows)} prompts x {group_size} x {len(MODES[mode])} level(s) with {policy.policy_id}")
        out = generate(policy, rows, mode, group_size, opts.seed, sampling, batch_size, opts.out, progress)
        stats["seconds_generate"] = round(time.time() - t0, 3)
        stats["ok"] = sum(r["status"] == "ok" for r in out)
        stats["decode_error"] = sum(r["status"] == "decode_error" for r in out)
        stats["reasoning_truncated"] = sum(r["reasoning_truncated"] for r in out)
        stats["tokens"] = sum(len(r["input_ids"]) - r["prompt_len"] for r in out)
        return samples_table(out, has_cat, has_spec), stats

    return run_stage("gen", "samples", opts, config, produce, policy=policy_id)
