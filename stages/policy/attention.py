"""Attention of the sampler's decode step: one new token per row over a KV cache.

transformers' `sdpa` attention before 5.25 (5.17 on our GPU image) expands grouped key/value heads to one copy per
query head (`repeat_kv`) whenever a padding mask is given, which sampling always gives: a copy of
each layer's whole cache for every token sampled (57% of the shipped policy's decode step at batch
1,024 on an H100: two copies a layer), 7x the cache at ShapeLLM-Omni's 28 query / 4 key heads.
With one query token per row, the query heads of a group can stand in for query positions instead,
so the kernel reads each key/value head once and nothing is copied.

The static sampler's cache is also allocated to its full length and was read whole every step, the
positions not yet written included (masked). Under `kv_limit(n)` the decode attention reads only the
first n positions; the static sampler captures one CUDA graph per 128 positions of cache filled.

Both change no value: the masked positions left out had weight exactly 0, and each head attends the
same keys. Measured on one H100 (benchmarks/bench_sampler.py --baselines static-sdpa): the shipped
policy's sampler 2.0x faster at batch 512 and 2.3x at 1,024, the 16 rows checked token-identical
to the plain loop. Everything else (prefill, training, masks with per-head entries, dropout) goes
to transformers' own function unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

_KV_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("rl3d_kv_limit", default=None)
_sdpa = None  # transformers' own sdpa attention, which everything but the decode step goes to


@contextlib.contextmanager
def kv_limit(n: int | None):
    """Decode attention reads only the first n cache positions (those written so far and after).
    A context variable: the thread that samples under `rl3d train --overlap 1` sets its own."""
    token = _KV_LIMIT.set(n)
    try:
        yield
    finally:
        _KV_LIMIT.reset(token)


def decode_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float = 0.0,
                scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: query [B, H, q, D], key/value [B, Hkv, S, D];
    returns ([B, q, H, D], None)."""
    B, H, q_len, _ = query.shape
    Hkv = key.shape[1]
    if (q_len != 1 or dropout or H % Hkv or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")
            or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1))):
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                     **kwargs)
    limit = _KV_LIMIT.get()
    if limit is not None and limit < key.shape[2]:
        key, value = key[:, :, :limit], value[:, :, :limit]
        if attention_mask is not None:
            attention_mask = attention_mask[..., :limit]
    # the group's query heads as query positions: [B, H, 1, D] -> [B, Hkv, H / Hkv, D]; head h = g * (H / Hkv) + r,
    # as repeat_kv orders them. A mask [B, 1, 1, S] broadcasts over both.
    out = F.scaled_dot_product_attention(query.reshape(B, Hkv, H // Hkv, query.shape[-1]), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, 1, H, value.shape[-1]), None


def install_decode_attention() -> None:
    """Route transformers' `sdpa` attention through `decode_sdpa`, for this process. Process-wide
    for the reason no_cudnn_attention is (policy/device.py): the overlapped sampler runs on its own
    thread; what it changes is only the one-token step, and that by no value."""
    global _sdpa
    from transformers import AttentionInterface

    current = AttentionInterface._global_mapping.get("sdpa")
    if current is decode_sdpa:
        return
    if current is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as current
    _sdpa = current
    AttentionInterface.register("sdpa", decode_sdpa)
