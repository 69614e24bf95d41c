"""Shared builders for the eval tests (tiny random CLIP model, fake policy outputs).
Loaded by path from test_metrics.py / test_eval.py / test_report.py (pytest runs in importlib mode)."""
from __future__ import annotations

import json
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level alphabet, so every character has a token in the tiny vocab
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tiny_clip(d: Path, seed: int = 0) -> Path:
    """A random-init CLIPModel (32-px images, 16-d projection) + character tokenizer + processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(vocab), max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(d)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(d)
    return d


def write_pngs(d: Path, n: int, seed: int = 0, size: int = 40, tint=(1.0, 1.0, 1.0)) -> list[str]:
    import numpy as np
    from PIL import Image

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = (rng.random((size, size, 3)) * 255 * np.array(tint)).astype("uint8")
        p = d / f"img-{i:03d}.png"
        Image.fromarray(a).save(p)
        out.append(str(p))
    return out


def make_tiny_policy(out: Path, seed: int = 0, step: int = 0, mode: str | None = None) -> Path:
    """The policy tests' tiny random Qwen2 + word tokenizer + 2-pattern codec (one builder for all
    tests), saved with rl3d's save_policy so gen/eval load it through the production path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("policy_tests", Path(__file__).with_name("test_policy.py"))
    policy_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(policy_tests)
    return policy_tests.make_tiny_policy(out, seed=seed, step=step, mode=mode)
