"""The constrained sampler as one fixed-shape decode step, replayed as a CUDA graph on GPUs.

sampler.sample_sequences runs a Python loop whose every token costs a few hundred kernel launches,
a host synchronisation (are all rows done?) and a data-dependent rejection loop: at a 0.5B policy the
GPU idles most of each step. Here one step (mask, sample, advance the row state machines, one decoder
forward over a static KV cache) touches only preallocated tensors of fixed shape and never reads a
value back to the host, so on CUDA it is captured and replayed: one launch per token. It is captured
once per 128 positions of KV cache filled, each graph's attention reading only that far
(policy/attention.py). The loop checks for finished rows every `sync_every` steps only.

Exactness: the draws are the same counter-based uniforms as the plain sampler and the top-k / top-p
cut accepts exactly the same tokens (a token is kept when its weight is at least the smallest kept
weight, computed once per step from a sort instead of per draw), and all 64 rejection attempts are
evaluated at once; so for equal logits the tokens and stored log-probs equal the plain path's. (The
threshold read from each row's 32 largest weights, sorting only the rows whose nucleus is wider and
sampling a batch again when too many were, was tried and measured slower: docs/performance.md.)
On a GPU, logits differ from the plain path's by kernel choice (bf16 noise), as between any two
batch sizes.
"""
from __future__ import annotations

import inspect

import torch
from transformers import StaticCache

from rl3d.stages.policy.attention import install_decode_attention, kv_limit
from rl3d.stages.policy.device import no_cudnn_attention
from rl3d.stages.policy.sampler import (MAX_ATTEMPTS, Sampling, block_weights, cache_kwarg, drawn_logprob,
                                        finish_rows, inverse_cdf, left_padded, masked_logits,
                                        position_ids_from_mask, uniform_draws)
from rl3d.stages.policy.sequence import KIND_FORCE_START, KIND_MESH, KIND_PAD, KIND_REASONING
from rl3d.stages.policy.tokenizer import SpecialIds

REASON, MESH, DONE = 0, 1, 2


def keep_threshold(w: torch.Tensor, total: torch.Tensor, top_k: int, top_p: float, vocab: int) -> torch.Tensor:
    """float[B]: the smallest weight the top-k / top-p cut keeps (0 = no cut), for weights w [B, V'].

    The plain sampler keeps a draw t when fewer than k tokens weigh more (top-k) and the tokens that
    weigh more hold < top_p of the mass (top-p). Both tests are monotone in w[t], so they reduce to
    w[t] >= a per-row threshold: the k-th largest weight, and the smallest sorted weight whose
    exclusive prefix mass is < top_p * total."""
    cut_k, cut_p = 0 < top_k < vocab, top_p < 1.0
    thr = torch.zeros_like(total)
    if not (cut_k or cut_p):
        return thr
    s = w.sort(dim=-1, descending=True).values
    if cut_k:
        thr = s[:, top_k - 1]
    if cut_p:
        n_kept = ((s.cumsum(-1) - s) < top_p * total[:, None]).sum(-1)  # >= 1: the first prefix is 0
        thr = torch.maximum(thr, s.gather(1, (n_kept - 1)[:, None])[:, 0])
    return thr


def sample_tokens_fixed(masked: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor, top_k: int = 0,
                        top_p: float = 1.0, attempts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sampler.sample_tokens without host synchronisation or data-dependent shapes: every rejection
    attempt is drawn at once ([B, attempts]) and each row takes its first accepted draw (its most
    likely token when none is). `step` is a 0-d device tensor; `attempts` int64[A] on the device."""
    B, V = masked.shape
    top, w, total = block_weights(masked)
    thr = keep_threshold(w, total, top_k, top_p, V)
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
                 steps: int):
        dev = ids.device
        B, P = ids.shape
        self.model, self.special, self.sampling, self.seq_len, self.P = model, special, sampling, seq_len, P
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
        tok, lp = sample_tokens_fixed(masked, self.seeds, self.t, s.top_k, s.top_p, self.attempts)
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


def graph_of(step, pool=None) -> torch.cuda.CUDAGraph:
    """Capture `step` as a CUDA graph. Capturing needs one eager run on a side stream first (lazy
    initialisations, allocator warm-up); that run is a real step, so the caller counts it. Graphs
    replayed one after another may share a memory `pool` (another graph's pool())."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread of this process may use the GPU meanwhile (rl3d train --overlap 1
    # samples on a thread while the main one renders, scores and trains)
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        step()
    return graph


KV_BLOCK = 128  # decode attention reads the cache in blocks of this many positions: one graph each


def cache_read(P: int, t: int, total: int, block: int = KV_BLOCK) -> int:
    """Cache positions step t's attention reads: those written so far (the P prompt columns and t + 1
    tokens, the new one included), rounded up to a whole block."""
    return min(total, -(-(P + t + 1) // block) * block)


@torch.no_grad()
def sample_sequences_static(model, special: SpecialIds, prompt_ids: list[list[int]], seeds: list[int], seq_len: int,
                            sampling: Sampling, cuda_graph: bool | None = None, sync_every: int = 16,
                            on_step=None, kv_block: int = KV_BLOCK) -> list[dict]:
    """sampler.sample_sequences (same arguments, same rows) as fixed-shape steps; on CUDA (or with
    cuda_graph=True) the step is captured as a CUDA graph and replayed. `on_step(n)` is called at
    each check for finished rows with the token positions computed since the last call (every row
    computes every step here)."""
    no_cudnn_attention()
    install_decode_attention()  # no copy of the cache per token, and only its filled blocks read (policy/attention.py)
    dev = next(model.parameters()).device
    use_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
    steps = sampling.max_reasoning_tokens + 1 + seq_len
    ids, att = left_padded(prompt_ids, special.pad, steps, dev)
    loop = _DecodeLoop(model, special, ids, att, position_ids_from_mask(att[:, :ids.shape[1]]),
                       torch.as_tensor(seeds, dtype=torch.long, device=dev), seq_len, sampling, steps)
    # torch.compile of the step was tried and measured slower (docs/performance.md): its copies of the
    # mutated KV-cache buffers cost more than the fused kernels save
    P = ids.shape[1]
    graphs: dict[int, torch.cuda.CUDAGraph] = {}  # cache positions read -> the step captured for them
    rows, reported, t = len(prompt_ids), 0, 0
    while t < steps:
        read = cache_read(P, t, P + steps, kv_block)
        with kv_limit(read):
            if not use_graph:
                loop.step()
            elif read in graphs:
                graphs[read].replay()
            else:  # the capture's eager run is step t itself
                first = next(iter(graphs.values()), None)
                graphs[read] = graph_of(loop.step, pool=first.pool() if first is not None else None)
        t += 1
        if t % sync_every == 0:
            if on_step is not None:
                on_step(rows * (t - reported))
                reported = t
            if not loop.running():
                break
    return finish_rows(special, loop.tokens, loop.logps, loop.n_reason, loop.n_mesh, seq_len,
                       sampling.max_reasoning_tokens)
