"""What a policy's model can take: its vocabulary and its positions, read from config.json (no model
load), and the checks that turn an input beyond them into a one-line error naming the row.

A position past max_position_embeddings does not crash a rotary model: it silently conditions on
positions the model never saw, so a 23k-token prompt on a 2k-position policy must be refused here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rl3d.formats.errors import InputError
from rl3d.stages.policy.sequence import PromptFormat, build_prompt, encode_text

MESH_MARKERS = 3  # <mesh-start>, <mesh-end> and the end of the turn around the mesh block


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int | None
    max_positions: int | None


def model_limits(policy_dir: str | Path) -> ModelLimits:
    """From config.json (a VL model keeps them under text_config); None where a value is absent."""
    f = Path(policy_dir) / "config.json"
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{f}: not a readable model config ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{f}: expected a JSON object")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    pick = lambda k: text.get(k, cfg.get(k)) if isinstance(text.get(k, cfg.get(k)), int) else None  # noqa: E731
    return ModelLimits(pick("vocab_size"), pick("max_position_embeddings"))


def check_prompt_lengths(lengths: list[int], prompt_ids: list[str], completion: int, limits: ModelLimits,
                         source: str) -> None:
    """Each prompt's token count plus the longest completion must fit the model's positions."""
    if limits.max_positions is None:
        return
    for n, (pid, length) in enumerate(zip(prompt_ids, lengths), 1):
        if length + completion > limits.max_positions:
            raise InputError(f"{source}: row {n} (prompt_id {pid!r}): the prompt is {length} tokens; with up to "
                             f"{completion} generated tokens it needs {length + completion} positions, the policy "
                             f"has {limits.max_positions}")


def check_prompts_fit(policy_dir: str | Path, tokenizer, fmt: PromptFormat, mesh_tokens: int, prompt_rows: list[dict],
                      levels, max_reasoning: int, source: str) -> None:
    """gen's guard, before any output is touched: every prompt's longest level (the fine level carries
    the coarse plan, up to max_reasoning tokens) plus reasoning and `mesh_tokens` (the codec's
    sequence length) must fit the positions. `tokenizer` and `fmt`: the policy's, already loaded."""
    limits = model_limits(policy_dir)
    if limits.max_positions is None:
        return
    lengths = [max(len(encode_text(tokenizer, build_prompt(r["prompt"], lv, plan="", fmt=fmt)))
                   + (max_reasoning if lv == "fine" else 0)
                   for lv in levels) for r in prompt_rows]
    check_prompt_lengths(lengths, [r["prompt_id"] for r in prompt_rows], max_reasoning + mesh_tokens + MESH_MARKERS,
                         limits, source)
