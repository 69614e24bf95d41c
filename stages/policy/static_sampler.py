"""The constrained sampler as one fixed-shape decode step, replayed as a CUDA graph on GPUs.

sampler.sample_sequences runs a Python loop whose every token costs a few hundred kernel launches,
a host synchronisation (are all rows done?) and a data-dependent rejection loop: at a 0.5B policy the
GPU idles most of each step. Here one step (mask, sample, advance the row state machines, one decoder
forward over a static KV cache) touches only preallocated tensors of fixed shape and never reads a
value back to the host, so on CUDA it is captured once per batch and replayed: one launch per token.
The loop checks for finished rows every `sync_every` steps only.

Exactness: the draws are the same counter-based uniforms as the plain sampler and the top-k / top-p
cut accepts exactly the same tokens (a token is kept when its weight is at least the smallest kept
weight, computed once per step instead of per draw), and all 64 rejection attempts are evaluated at
once; so for equal logits the tokens and stored log-probs equal the plain path's.

The smallest kept weight comes from the NUCLEUS_CANDIDATES largest weights of a row (a top-k, not a
sort of the vocabulary, which cost most of a step at batch 1,024): a trained policy's nucleus holds
a few tokens. Rows whose cut does not close among them ("open" rows) are sorted whole, up to
`open_rows` of them a step; a step with more sets a flag, and the batch is sampled again with every
row sorted (same draws, same rows), so the result never depends on the shortcut.
On a GPU, logits differ from the plain path's by kernel choice (bf16 noise), as between any two
batch sizes.
"""
from __future__ import annotations

import inspect

import torch
from transformers import StaticCache

from rl3d.stages.policy.device import no_cudnn_attention
from rl3d.stages.policy.sampler import (MAX_ATTEMPTS, Sampling, block_weights, cache_kwarg, drawn_logprob,
                                        finish_rows, inverse_cdf, left_padded, masked_logits,
                                        position_ids_from_mask, uniform_draws)
from rl3d.stages.policy.sequence import KIND_FORCE_START, KIND_MESH, KIND_PAD, KIND_REASONING
from rl3d.stages.policy.tokenizer import SpecialIds

REASON, MESH, DONE = 0, 1, 2


NUCLEUS_CANDIDATES = 32  # largest weights per row from which the top-k / top-p threshold is read


def keep_threshold(w: torch.Tensor, total: torch.Tensor, top_k: int, top_p: float, vocab: int) -> torch.Tensor:
    """float[B]: the smallest weight the top-k / top-p cut keeps (0 = no cut), for weights w [B, V'],
    from a sort of the whole row.

    The plain sampler keeps a draw t when fewer than k tokens weigh more (top-k) and the tokens that
    weigh more hold < top_p of the mass (top-p). Both tests are monotone in w[t], so they reduce to
    w[t] >= a per-row threshold: the k-th largest weight, and the smallest sorted weight whose
    exclusive prefix mass is < top_p * total."""
    cut_k, cut_p = 0 < top_k < vocab, top_p < 1.0
    thr = torch.zeros_like(total)
    if not (cut_k or cut_p):
        return thr
    return _threshold_of_sorted(w.sort(dim=-1, descending=True).values, total, top_k, top_p, cut_k, cut_p)[0]


def _threshold_of_sorted(s: torch.Tensor, total: torch.Tensor, top_k: int, top_p: float, cut_k: bool,
                         cut_p: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold [B], closed [B]) from the n largest weights of each row, sorted descending.
    `closed`: the threshold read from them is the whole row's (a whole sorted row is always right,
    whatever `closed` says)."""
    n = s.shape[1]
    thr = torch.zeros_like(total)
    closed = torch.zeros_like(total, dtype=torch.bool)
    if cut_k and top_k <= n:
        thr = s[:, top_k - 1]
        closed = torch.ones_like(closed)  # a top-p cut cannot take the threshold below the k-th weight
    if cut_p:
        n_kept = ((s.cumsum(-1) - s) < top_p * total[:, None]).sum(-1)  # >= 1: the first prefix is 0
        thr = torch.maximum(thr, s.gather(1, (n_kept - 1)[:, None])[:, 0])
        # the nucleus ends inside the n weights; a top-k cut wider than n then keeps all of it (no bind)
        closed |= n_kept < n
    return thr, closed


def fast_keep_threshold(w: torch.Tensor, total: torch.Tensor, top_k: int, top_p: float, vocab: int,
                        open_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_threshold's float[B], overflow: 0-d bool) without a sort of every row: the threshold is
    read from each row's NUCLEUS_CANDIDATES largest weights where the cut closes among them, and up
    to `open_rows` other rows a step are sorted whole. `overflow` is True when more rows than that
    were open: the thresholds of the rest are then wrong and the caller must not keep the step."""
    cut_k, cut_p = 0 < top_k < vocab, top_p < 1.0
    B, n = w.shape[0], min(NUCLEUS_CANDIDATES, w.shape[1])
    if not (cut_k or cut_p):
        return torch.zeros_like(total), torch.zeros((), dtype=torch.bool, device=w.device)
    if open_rows >= B:
        return keep_threshold(w, total, top_k, top_p, vocab), torch.zeros((), dtype=torch.bool, device=w.device)
    thr, closed = _threshold_of_sorted(w.topk(n, dim=-1).values, total, top_k, top_p, cut_k, cut_p)
    is_open = ~closed
    if open_rows > 0:  # the open rows first (stable: a fixed shape, no data-dependent indexing)
        rows = torch.argsort(closed.to(torch.int8), stable=True)[:open_rows]
        whole = keep_threshold(w.index_select(0, rows), total.index_select(0, rows), top_k, top_p, vocab)
        thr = thr.index_copy(0, rows, torch.where(closed.index_select(0, rows), thr.index_select(0, rows), whole))
    return thr, is_open.sum() > open_rows


def sample_tokens_fixed(masked: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor, top_k: int = 0,
                        top_p: float = 1.0, attempts: torch.Tensor | None = None, open_rows: int | None = None,
                        overflow: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sampler.sample_tokens without host synchronisation or data-dependent shapes: every rejection
    attempt is drawn at once ([B, attempts]) and each row takes its first accepted draw (its most
    likely token when none is). `step` is a 0-d device tensor; `attempts` int64[A] on the device.
    With `open_rows` the threshold comes from fast_keep_threshold and `overflow` (a 0-d bool on the
    device) is set when the step's draws cannot be kept; without, every row is sorted."""
    B, V = masked.shape
    top, w, total = block_weights(masked)
    if open_rows is None:
        thr = keep_threshold(w, total, top_k, top_p, V)
    else:
        thr, over = fast_keep_threshold(w, total, top_k, top_p, V, open_rows)
        overflow.logical_or_(over)
    if attempts is None or not (0 < top_k < V or top_p < 1.0):
        attempts = torch.zeros(1, dtype=torch.long, device=masked.device)
    u = uniform_draws(seeds[:, None], step, attempts[None, :]).to(w.dtype)  # [B, A]
    draws = inverse_cdf(w, u * total[:, None])
    ok = w.gather(1, draws) >= thr[:, None]
    first = ok.to(torch.int8).argmax(1, keepdim=True)  # the first accepted attempt (argmax: first maximum)
    tok = torch.where(ok.any(1), draws.gather(1, first)[:, 0], w.argmax(-1))
    return tok, drawn_logprob(masked, tok, top, total)


class _DecodeLoop:
    """The sampler's state as fixed tensors and the one step that advances it (see module doc)."""

    def __init__(self, model, special: SpecialIds, ids, att, pos, seeds, seq_len: int, sampling: Sampling,
                 steps: int, open_rows: int | None = None):
        dev = ids.device
        B, P = ids.shape
        self.model, self.special, self.sampling, self.seq_len, self.P = model, special, sampling, seq_len, P
        self.open_rows = open_rows
        self.overflow = torch.zeros((), dtype=torch.bool, device=dev)  # a step's threshold shortcut failed
        self.ck = cache_kwarg(model)
        self.cache = StaticCache(config=model.config, max_cache_len=P + steps)
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.att, self.seeds = att, seeds
        out = model(input_ids=ids, attention_mask=att[:, :P], position_ids=pos, use_cache=True,
                    **{self.ck: self.cache}, **self.keep_last)
        self.logits = out.logits[:, -1].float().clone()
        self.pos = pos[:, -1:].clone()
        self.t = torch.zeros((), dtype=torch.long, device=dev)
        self.att_col = torch.full((1,), P, dtype=torch.long, device=dev)  # advanced in the step, like t
        self.attempts = torch.arange(MAX_ATTEMPTS, device=dev)
        self.state = torch.full((B,), REASON, dtype=torch.long, device=dev)
        self.n_reason = torch.zeros(B, dtype=torch.long, device=dev)
        self.n_mesh = torch.zeros(B, dtype=torch.long, device=dev)
        self.tokens = torch.full((B, steps), special.pad, dtype=torch.long, device=dev)
        self.logps = torch.zeros((B, steps), dtype=torch.float32, device=dev)
        special.kind_bias(dev)  # built now: a host-to-device copy may not happen inside a graph capture

    def step(self) -> None:
        sp, s, R = self.special, self.sampling, self.sampling.max_reasoning_tokens
        state = self.state
        kinds = torch.where(state == REASON,
                            torch.where(self.n_reason >= R, KIND_FORCE_START, KIND_REASONING),
                            torch.where(state == MESH, KIND_MESH, KIND_PAD))
        masked = masked_logits(self.logits, kinds, sp, s.temperature)
        active = state != DONE
        tok, lp = sample_tokens_fixed(masked, self.seeds, self.t, s.top_k, s.top_p, self.attempts, self.open_rows,
                                      self.overflow)
        tok = torch.where(active, tok, sp.pad)
        col = self.t.view(1)
        self.tokens.index_copy_(1, col, tok[:, None])
        self.logps.index_copy_(1, col, torch.where(active, lp, 0.0)[:, None])
        # state machine: reasoning until <mesh-start>, then exactly seq_len mesh tokens
        in_reason, in_mesh = state == REASON, state == MESH
        started = in_reason & (tok == sp.mesh_start)
        self.n_reason.add_((in_reason & ~started).long())
        self.n_mesh.add_(in_mesh.long())
        new_state = torch.where(started, MESH, state)
        self.state.copy_(torch.where(in_mesh & (self.n_mesh >= self.seq_len), DONE, new_state))
        self.att.index_copy_(1, self.att_col, active.long()[:, None])
        self.att_col.add_(1)
        self.pos.add_(1)
        self.logits.copy_(self.next_logits(tok[:, None]))
        self.t.add_(1)

    def next_logits(self, tok: torch.Tensor) -> torch.Tensor:
        """Logits after one new token per row."""
        return self.model(input_ids=tok, attention_mask=self.att, position_ids=self.pos, use_cache=True,
                          **{self.ck: self.cache}, **self.keep_last).logits[:, -1]

    def running(self) -> bool:
        return bool((self.state != DONE).any())


def graph_of(step) -> torch.cuda.CUDAGraph:
    """Capture `step` as a CUDA graph. Capturing needs one eager run on a side stream first (lazy
    initialisations, allocator warm-up); that run is a real step, so the caller counts it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread of this process may use the GPU meanwhile (rl3d train --overlap 1
    # samples on a thread while the main one renders, scores and trains)
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        step()
    return graph


OPEN_ROWS_SHARE = 16  # rows a step may sort whole: 1 in this many (at least one)


@torch.no_grad()
def sample_sequences_static(model, special: SpecialIds, prompt_ids: list[list[int]], seeds: list[int], seq_len: int,
                            sampling: Sampling, cuda_graph: bool | None = None, sync_every: int = 16,
                            on_step=None, open_rows: int | None = None) -> list[dict]:
    """sampler.sample_sequences (same arguments, same rows) as fixed-shape steps; on CUDA (or with
    cuda_graph=True) the step is captured as a CUDA graph and replayed. `on_step(n)` is called at
    each check for finished rows with the token positions computed since the last call (every row
    computes every step here). `open_rows`: rows a step may sort whole (fast_keep_threshold;
    default 1 in OPEN_ROWS_SHARE); a batch that needs more is sampled again sorting every row."""
    B = len(prompt_ids)
    if open_rows is None:
        open_rows = max(1, B // OPEN_ROWS_SHARE)
    reported = 0

    def first_try(n):
        nonlocal reported
        reported += n
        on_step(n)

    def second_try(n):  # the first try's positions were reported already
        nonlocal reported
        skip = min(n, reported)
        reported -= skip
        if n > skip:
            on_step(n - skip)

    rows = _sample_static(model, special, prompt_ids, seeds, seq_len, sampling, cuda_graph, sync_every,
                          on_step and first_try, min(open_rows, B))
    if rows is None:  # a step had more open rows than that: the same draws with every row sorted
        rows = _sample_static(model, special, prompt_ids, seeds, seq_len, sampling, cuda_graph, sync_every,
                              on_step and second_try, B)
    return rows


@torch.no_grad()
def _sample_static(model, special, prompt_ids, seeds, seq_len, sampling, cuda_graph, sync_every, on_step,
                   open_rows: int) -> list[dict] | None:
    """The rows, or None when a step overflowed its open rows (checked after the first step, at each
    check for finished rows and at the end)."""
    no_cudnn_attention()
    dev = next(model.parameters()).device
    use_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
    steps = sampling.max_reasoning_tokens + 1 + seq_len
    ids, att = left_padded(prompt_ids, special.pad, steps, dev)
    loop = _DecodeLoop(model, special, ids, att, position_ids_from_mask(att[:, :ids.shape[1]]),
                       torch.as_tensor(seeds, dtype=torch.long, device=dev), seq_len, sampling, steps,
                       None if open_rows >= len(prompt_ids) else open_rows)
    # torch.compile of the step was tried and measured slower (docs/performance.md): its copies of the
    # mutated KV-cache buffers cost more than the fused kernels save
    run, t = loop.step, 0
    if use_graph:
        run, t = graph_of(loop.step).replay, 1
    rows, reported = len(prompt_ids), 0
    while t < steps:
        run()
        t += 1
        if t % sync_every == 0 or t == 2:
            if bool(loop.overflow):  # an untrained policy's flat rows show at once: little is sampled twice
                return None
            if t % sync_every:
                continue
            if on_step is not None:
                on_step(rows * (t - reported))
                reported = t
            if not loop.running():
                break
    if bool(loop.overflow):
        return None
    return finish_rows(special, loop.tokens, loop.logps, loop.n_reason, loop.n_mesh, seq_len,
                       sampling.max_reasoning_tokens)
