"""The constrained sampler and log-prob recomputation, which share one masking of the logits
(sequence.allowed_mask through SpecialIds.kind_bias): gen samples with it, rl-step and eval
recompute the same log-probs with it.

The sampler is a batched loop over a KV cache: left-padded prompts with explicit position ids, a
per-row state machine (reasoning -> mesh -> done) held in tensors, the constraint masking,
temperature, top-k and top-p. Randomness is counter-based: row r's draw at step t is a hash of
(row seed, t), where the row seed comes from (--seed, prompt_id, sample_index, level). Samples
therefore do not depend on batch composition, so sharding or a different --batch-size gives the
same rollouts.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.checkpoint
from transformers import DynamicCache, StaticCache

from rl3d.formats.errors import InputError
from rl3d.stages.policy.attention import install_decode_attention, kv_limit
from rl3d.stages.policy.device import no_cudnn_attention
from rl3d.stages.policy.sequence import KIND_FORCE_START, KIND_MESH, KIND_PAD, KIND_REASONING
from rl3d.stages.policy.tokenizer import SpecialIds

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


# Named settings for `rl3d gen --sampling NAME` (and rl3d_policy.json "sampling": a name or a dict).
# "shapellm": the authors' inference defaults for ShapeLLM-Omni (temperature 0.7, top-p 0.7, top-k 8192).
SAMPLING_PRESETS = {
    "default": {},
    "shapellm": {"temperature": 0.7, "top_p": 0.7, "top_k": 8192},
}


def resolve_sampling(preset: str | None, policy_meta: dict | None = None, **overrides) -> Sampling:
    """Sampling from, in order of precedence: explicit overrides (None = not given), the named
    preset ("policy" or None = the policy's rl3d_policy.json "sampling", else the defaults)."""
    source = "--sampling"
    if preset in (None, "policy"):
        preset, source = (policy_meta or {}).get("sampling") or "default", "rl3d_policy.json sampling"
    if isinstance(preset, dict):
        base = dict(preset)
    elif preset in SAMPLING_PRESETS:
        base = dict(SAMPLING_PRESETS[preset])
    else:
        raise InputError(f"{source} {preset!r}: expected one of {', '.join(SAMPLING_PRESETS)} (or a dict)")
    unknown = set(base) - set(Sampling.__dataclass_fields__)
    if unknown:
        raise InputError(f"{source}: unknown sampling field(s) {', '.join(sorted(unknown))}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return Sampling(**base).check()


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


def uniform_draws(seeds: torch.Tensor, step: int | torch.Tensor, attempt: int | torch.Tensor = 0) -> torch.Tensor:
    """float64 in (0, 1): the draw of each row at one step (and rejection attempt). Counters are ints
    or int64 tensors that broadcast with `seeds` (a fixed-shape sampler draws every attempt at once)."""
    def counter(x):
        return x if isinstance(x, torch.Tensor) else torch.full_like(seeds, x)
    h = _pcg(seeds ^ _pcg(counter(step) ^ _pcg(counter(attempt))))
    h2 = _pcg(h ^ 0x9E3779B9)
    return ((h << 21 | (h2 >> 11)).double() + 0.5) / float(1 << 53)


_BLOCK = 128  # vocabulary block of the two-level inverse CDF


def inverse_cdf(w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Index i of each row with cumsum(w)[i-1] < target <= cumsum(w)[i], for non-negative weights
    w [B, V] and targets in (0, sum(w)], one per row ([B]) or several ([B, A]). Two levels (block sums,
    then one block) instead of a cumsum over the whole vocabulary, which is a slow sequential scan on CPU."""
    B, V = w.shape
    nb = V // _BLOCK  # callers pad the vocabulary to a multiple of _BLOCK
    one = target.dim() == 1
    target = target[:, None] if one else target  # [B, A]
    wb = w.view(B, nb, _BLOCK)
    bcdf = wb.sum(-1).cumsum(-1)
    blk = torch.searchsorted(bcdf, target).clamp(max=nb - 1)
    before = torch.where(blk > 0, bcdf.gather(1, (blk - 1).clamp(min=0)), 0.0)
    inner = wb.gather(1, blk[:, :, None].expand(-1, -1, _BLOCK)).cumsum(-1)  # [B, A, BLOCK]
    rest = torch.minimum(target - before, inner[..., -1])  # rounding: stay inside the block
    idx = torch.searchsorted(inner, rest[..., None]).clamp(max=_BLOCK - 1)[..., 0]
    out = blk * _BLOCK + idx
    return out[:, 0] if one else out


MAX_ATTEMPTS = 64  # rejection attempts of the top-k / top-p cut before a row takes its most likely token


def sample_tokens(masked: torch.Tensor, seeds: torch.Tensor, step: int, top_k: int = 0, top_p: float = 1.0,
                  max_attempts: int = MAX_ATTEMPTS) -> tuple[torch.Tensor, torch.Tensor]:
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
    top, w, total = block_weights(masked)
    pad = w.shape[1] - V
    cut_k, cut_p = 0 < top_k < V, top_p < 1.0
    tok = torch.zeros(B, dtype=torch.long, device=masked.device)
    rows = torch.arange(B, device=masked.device)  # rows still drawing (all, then the rejected ones)
    for attempt in range(max_attempts if (cut_k or cut_p) else 1):
        wr, tr, sr = (w, total, seeds) if attempt == 0 else (w[rows], total[rows], seeds[rows])
        u = uniform_draws(sr, step, attempt).to(w.device, w.dtype)
        draw = inverse_cdf(wr, u * tr)
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
    return tok, drawn_logprob(masked, tok, top, total)


def block_weights(masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row max [B, 1], unnormalised probabilities exp(masked - max) padded with zeros to whole
    blocks [B, V'], their row sums [B]) for masked logits [B, V]; forbidden tokens weigh exactly 0."""
    top = masked.max(-1, keepdim=True).values
    w = torch.exp(torch.nn.functional.pad(masked, (0, -masked.shape[1] % _BLOCK), value=-float("inf")) - top)
    return top, w, w.sum(-1)


def drawn_logprob(masked: torch.Tensor, tok: torch.Tensor, top: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Log-prob of each row's drawn token under the full masked distribution."""
    return masked.gather(1, tok[:, None])[:, 0] - top[:, 0] - total.log()


# ---- the batched constrained sampler -----------------------------------------------------------

def _new_cache(model, max_len: int):
    """A preallocated KV cache (no per-step concatenation); DynamicCache where static is unsupported."""
    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except Exception:
        return DynamicCache()


@torch.no_grad()
def sample_sequences(model, special: SpecialIds, prompt_ids: list[list[int]], seeds: list[int],
                     seq_len: int, sampling: Sampling, on_step=None) -> list[dict]:
    """Sample completions for a batch of prompts (token id lists). Returns per row: `tokens` (the
    completion: reasoning, <mesh-start>, seq_len mesh ids, <mesh-end>, eos), `logprobs` (float32,
    same length), `n_reasoning`, `truncated` (the budget forced <mesh-start>). `on_step(n)`, when
    given, is called after each step with the number of tokens it sampled (progress of a long batch)."""
    no_cudnn_attention()
    install_decode_attention()  # no copy of the KV cache per token (policy/attention.py)
    dev = next(model.parameters()).device
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    R = sampling.max_reasoning_tokens
    steps = R + 1 + seq_len  # sampled tokens at most; <mesh-end> and eos are appended (forced)
    ids, att = left_padded(prompt_ids, special.pad, steps, dev)
    pos = position_ids_from_mask(att[:, :P])
    seeds_t = torch.as_tensor(seeds, dtype=torch.long, device=dev)
    ck = cache_kwarg(model)
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
                            torch.where(n_reason >= R, KIND_FORCE_START, KIND_REASONING),
                            torch.where(state == MESH, KIND_MESH, KIND_PAD))
        masked = masked_logits(logits, kinds, special, sampling.temperature)
        active = state != DONE
        tok, lp = sample_tokens(masked, seeds_t, t, sampling.top_k, sampling.top_p)
        tok = torch.where(active, tok, special.pad)
        tokens[:, t] = tok
        logps[:, t] = torch.where(active, lp, 0.0)
        if on_step is not None:
            on_step(int(active.sum()))
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
        with kv_limit(P + t + 1):  # a static cache is read only as far as it is written
            out = model(input_ids=tok[:, None], attention_mask=att[:, :P + t + 1], position_ids=last[:, None],
                        use_cache=True, **{ck: cache})
        logits = out.logits[:, -1]
        if getattr(out, ck, None) is not None:
            cache = getattr(out, ck)

    return finish_rows(special, tokens, logps, n_reason, n_mesh, seq_len, R)


def finish_rows(special: SpecialIds, tokens: torch.Tensor, logps: torch.Tensor, n_reason: torch.Tensor,
                n_mesh: torch.Tensor, seq_len: int, max_reasoning: int) -> list[dict]:
    """The sampler's per-row output from its step buffers: each completion cut to its length with the
    forced tail (<mesh-end>, eos) appended."""
    n_reason, tokens, logps = n_reason.cpu(), tokens.cpu(), logps.cpu()
    if not torch.isfinite(logps).all() or bool((n_mesh < seq_len).any()):
        # only a broken checkpoint gets here (e.g. NaN weights): every masked position has a finite choice
        raise InputError("the policy produced non-finite log-probs or unfinished meshes; "
                         "its weights are likely corrupt (NaN/inf)")
    rows = []
    for i in range(tokens.shape[0]):  # per row (not per token): cut each completion and append the forced tail
        n = int(n_reason[i]) + 1 + seq_len
        rows.append({
            "tokens": tokens[i, :n].tolist() + [special.mesh_end, special.eos],
            "logprobs": np.concatenate([logps[i, :n].numpy(), np.zeros(2, np.float32)]),
            "n_reasoning": int(n_reason[i]),
            "truncated": bool(n_reason[i] >= max_reasoning),
        })
    return rows


def left_padded(prompt_ids: list[list[int]], pad: int, extra: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, P], attention mask [B, P + extra]) of left-padded prompts, P the longest; the mask's
    `extra` columns (room for the tokens still to come) start at 0."""
    B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
    ids = torch.full((B, P), pad, dtype=torch.long)
    att = torch.zeros((B, P + extra), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
        att[i, P - len(p):P] = 1
    return ids.to(device), att.to(device)


# ---- the one masking of the logits ---------------------------------------------------------------

def masked_logits(logits: torch.Tensor, kinds: torch.Tensor, special: SpecialIds, temperature: float) -> torch.Tensor:
    """(logits [..., V] in fp32 / T) with the tokens a position's kind forbids at -inf."""
    bias = special.kind_bias(logits.device)
    return (logits.float() / float(temperature)).add_(bias.index_select(0, kinds.reshape(-1)).view(*kinds.shape, -1))


def token_logprobs(logits: torch.Tensor, kinds: torch.Tensor, tokens: torch.Tensor, special: SpecialIds,
                   temperature: float) -> torch.Tensor:
    """float32 log-probs of `tokens` under log_softmax(masked logits / T); PAD positions -> 0.
    A forced position has a single allowed token, so its log-prob is exactly 0."""
    lp = torch.log_softmax(masked_logits(logits, kinds, special, temperature), dim=-1)
    out = lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(kinds == KIND_PAD, 0.0)



# ---- log-prob recomputation -------------------------------------------------------------------------

def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: positions count attended tokens only (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _uses_plain_head(model) -> bool:
    """True when logits == lm_head(last hidden state) (no soft-capping / scaling after the head)."""
    cfg = model.config.get_text_config()
    return (model.get_output_embeddings() is not None
            and not getattr(cfg, "final_logit_softcapping", None)
            and getattr(cfg, "logit_scale", None) in (None, 1.0))


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument of model.forward ('cache' in transformers >= 5.2x, else
    'past_key_values')."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class CompletionLogprobs(torch.nn.Module):
    """completion_logprobs as a module around the policy, so that a DDP / FSDP wrapper made by
    accelerate runs the whole computation in its forward: calling the decoder and head of a wrapped
    model directly would bypass the wrapper's gradient synchronisation."""

    def __init__(self, model, special: SpecialIds, temperature: float):
        super().__init__()
        self.model, self.special, self.temperature = model, special, float(temperature)
        # the decoder-layer classes FSDP's transformer-based auto-wrap looks for on the root module
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def tie_weights(self, *args, **kwargs):
        """Re-tie the policy's input and output embeddings. accelerate's FSDP2 preparation loads the
        sharded weights with load_state_dict(assign=True), which gives each parameter name its own
        tensor, and then calls tie_weights() on the wrapped module if it has one."""
        self.model.tie_weights()

    def forward(self, input_ids, attention_mask, prompt_lens, kinds):
        return completion_logprobs(self.model, input_ids, attention_mask, prompt_lens, kinds, self.special,
                                   self.temperature)


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor,
                        kinds: torch.Tensor, special: SpecialIds, temperature: float = 1.0,
                        chunk_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each row's completion, with the sampler's masking.

    input_ids/attention_mask [B, L] (any padding; a row's tokens are contiguous), prompt_lens [B],
    kinds [B, T] from completion_kinds/collate. Returns (float32 [B, T] log-probs, bool [B, T] mask of
    real completion tokens); padded positions are 0. logprobs[b, j] is the log-prob of token
    prompt_len_b + j of row b. Differentiable: the output head and log_softmax run in chunks (about
    `chunk_size` positions' full rows of logits) under activation checkpointing when grad is on, so
    only hidden states of the completion are kept, never [B, T, V] logits. A plain linear head
    computes each position's logits over the ids its kind allows only (kind_head_logprobs).
    """
    B, L = input_ids.shape
    T = kinds.shape[1]
    first = attention_mask.long().argmax(1)  # column of each row's first token
    # every row's tokens a prefix of it (collate(right_padded=True)): causal attention alone keeps the
    # pads after a row's tokens out of them, so no mask goes to the model and attention is its plain
    # causal kernel (flash on a GPU; a padding mask forces the memory-efficient one). The positions
    # count on through the pads: transformers reads a position that does not step by 1 as the start
    # of another packed sequence and would build a block mask after all.
    if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        attention_mask, pos = None, torch.arange(L, device=input_ids.device).expand(B, L)
    else:
        pos = position_ids_from_mask(attention_mask)
    cols = first[:, None] + prompt_lens[:, None].to(first.device) + torch.arange(T, device=first.device)[None]
    targets = input_ids.gather(1, cols.clamp(max=L - 1))
    pred_cols = (cols - 1).clamp(0, L - 1)  # the position whose output predicts each target
    head = model.get_output_embeddings() if _uses_plain_head(model) else None
    if type(head) is torch.nn.Linear:  # a plain head (not an adapter's): its rows per kind
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                     use_cache=False).last_hidden_state
        h = hidden.gather(1, pred_cols[..., None].expand(-1, -1, hidden.shape[-1]))
        lp = kind_head_logprobs(h, head, kinds, targets, special, temperature, budget=chunk_size * B * special.vocab_size)
        return lp, kinds != KIND_PAD
    if head is not None:
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                     use_cache=False).last_hidden_state
    else:  # heads with soft-capping: take the model's own logits for the completion positions
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False).logits
        head = torch.nn.Identity()
    h = hidden.gather(1, pred_cols[..., None].expand(-1, -1, hidden.shape[-1]))

    def chunk_lp(h_c, tok_c, kind_c):
        return token_logprobs(head(h_c), kind_c, tok_c, special, temperature)

    out = []
    for s in range(0, T, chunk_size):
        args = (h[:, s:s + chunk_size], targets[:, s:s + chunk_size], kinds[:, s:s + chunk_size])
        if torch.is_grad_enabled() and h.requires_grad:
            out.append(torch.utils.checkpoint.checkpoint(chunk_lp, *args, use_reentrant=False))
        else:
            out.append(chunk_lp(*args))
    lp = torch.cat(out, 1) if out else h.new_zeros((B, 0), dtype=torch.float32)
    return lp.float(), kinds != KIND_PAD


def kind_head_logprobs(h: torch.Tensor, head: torch.nn.Linear, kinds: torch.Tensor, targets: torch.Tensor,
                       special: SpecialIds, temperature: float, budget: int) -> torch.Tensor:
    """float32 [B, T] log-probs of `targets` from hidden states h [B, T, H], each position's kind
    computing logits over the ids it may emit only: a mesh position needs the head's mesh rows (8,192
    of ShapeLLM-Omni's 159,859; 512 of the shipped policy's 21,489), a forced position one row (its
    log-prob is exactly 0). The same values as log_softmax over the masked full row, whose forbidden
    logits add exp(-inf) = 0, without computing them. Rows go in chunks of about `budget` logits,
    recomputed in the backward pass when grad is on, so no [B, T, V] logits are ever held."""
    B, T, H = h.shape
    flat_h, flat_k, flat_t = h.reshape(B * T, H), kinds.reshape(-1), targets.reshape(-1)
    rows_of, values = [], []
    grad = torch.is_grad_enabled() and h.requires_grad
    for kind in torch.unique(flat_k).tolist():
        if kind == KIND_PAD:
            continue
        rows = (flat_k == kind).nonzero().squeeze(1)
        cols, position = special.kind_columns(kind, h.device)
        weight = head.weight[cols] if isinstance(cols, slice) else head.weight.index_select(0, cols)
        bias = None if head.bias is None else (head.bias[cols] if isinstance(cols, slice) else head.bias[cols])
        column = position[flat_t[rows]]
        step = max(1, budget // weight.shape[0])
        for s in range(0, rows.numel(), step):
            args = (flat_h.index_select(0, rows[s:s + step]), weight, bias, column[s:s + step])
            fn = _restricted_logprobs
            values.append(torch.utils.checkpoint.checkpoint(fn, *args, temperature, use_reentrant=False)
                          if grad else fn(*args, temperature))
            rows_of.append(rows[s:s + step])
    out = h.new_zeros(B * T, dtype=torch.float32)
    if values:
        out = out.index_put((torch.cat(rows_of),), torch.cat(values))
    return out.view(B, T)


def _restricted_logprobs(h: torch.Tensor, weight: torch.Tensor, bias, column: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """log_softmax over the given head rows at each target's column (-inf where it has none)."""
    logits = torch.nn.functional.linear(h, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, 1).gather(1, column.clamp(min=0)[:, None]).squeeze(1)
    return lp.masked_fill(column < 0, float("-inf"))
