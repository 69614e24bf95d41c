"""The policy's sequence layout, the one definition gen, sft, rl-step and eval share
(docs/internals.md "Policy sequences"):

    prompt | reasoning text | <mesh-start> | M mesh tokens | <mesh-end> | eos

Here: the levels and which levels each mode has, the prompt templates, the span arithmetic of
a sequence, the position kinds of a completion and the batch layout for log-prob recomputation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

LEVELS = ("coarse", "fine", "single")
# mode -> its levels, in sampling order (the fine prompt carries the coarse plan)
MODE_LEVELS = {"hi-grpo": ("coarse", "fine"), "flat": ("single",), "both": ("coarse", "fine", "single")}

REQUEST = "Please generate a 3D mesh based on the prompt I provided: {prompt}"

# The instruction texts, in one place; gen records them in its output metadata.
INSTRUCTIONS = {
    "coarse": ("First plan the object at a high level: its sub-category, its key parts, their layout and "
               "proportions, and what any ambiguous words mean. Then generate the coarse mesh."),
    "fine": ("Here is the high-level plan: {plan}\nNow expand the parts into precise detail: part appearance, "
             "counts, symmetry, colours and style. Then generate the refined mesh."),
    "single": "Briefly describe the object, then generate the mesh.",
}

USER, ASSISTANT = "<|user|>", "<|assistant|>"


@dataclass(frozen=True)
class PromptFormat:
    """How a policy is prompted (rl3d_policy.json: request_template, chat_template, system_prompt).
    The default is rl3d's own layout: <|user|>request\ninstruction<|assistant|>. With a chat
    tokenizer (ShapeLLM-Omni / Qwen2.5-VL), the user turn request\ninstruction goes through the
    tokenizer's chat template with the generation prompt, as the authors' inference does."""
    request: str = REQUEST
    chat_tokenizer: object = None
    system_prompt: str | None = None

    def wrap(self, user_text: str) -> str:
        if self.chat_tokenizer is None:
            return f"{USER}{user_text}{ASSISTANT}"
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        messages.append({"role": "user", "content": user_text})
        return self.chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def describe(self) -> dict:
        """What gen records in its output config."""
        return {"request": self.request, "chat_template": self.chat_tokenizer is not None,
                "system_prompt": self.system_prompt}


DEFAULT_FORMAT = PromptFormat()


def build_prompt(prompt: str, level: str, plan: str | None = None, fmt: PromptFormat = DEFAULT_FORMAT) -> str:
    """The text the policy is conditioned on for one level (before the reasoning span)."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}")
    instruction = INSTRUCTIONS[level]
    if level == "fine":
        if plan is None:
            raise ValueError("the fine level needs the coarse plan")
        instruction = instruction.format(plan=plan.strip())
    return fmt.wrap(f"{fmt.request.replace('{prompt}', prompt.strip())}\n{instruction}")


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt or reasoning text (no BOS/EOS added: the templates carry the roles)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """encode_text of each text, in one call (a fast tokenizer encodes the batch in Rust, in parallel)."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []


# ---- the layout of one sequence ----------------------------------------------------------------

def mesh_block(special: SpecialIds, mesh_tokens) -> np.ndarray:
    """int64[n, M + 3]: <mesh-start>, the vocabulary ids of each row's M codec tokens (through the
    tokenizer's mesh-id table, so the ids need not be contiguous), <mesh-end>, eos."""
    codes = torch.as_tensor(np.asarray(mesh_tokens), dtype=torch.long)
    ids = special.mesh_ids[codes].numpy()
    n = ids.shape[0]
    return np.concatenate([np.full((n, 1), special.mesh_start), ids,
                           np.full((n, 1), special.mesh_end), np.full((n, 1), special.eos)], axis=1)


def sequence_spans(prompt_len: int, n_reasoning: int, n_mesh: int) -> dict:
    """The samples-table span boundaries of prompt | reasoning | <mesh-start> mesh <mesh-end> eos."""
    reasoning_end = prompt_len + n_reasoning
    return {"prompt_len": prompt_len, "reasoning_start": prompt_len, "reasoning_end": reasoning_end,
            "mesh_start": reasoning_end + 1, "mesh_end": reasoning_end + 1 + n_mesh}


def build_sequence(tokenizer, special: SpecialIds, prompt_text: str, reasoning: str, mesh_tokens) -> dict:
    """One level's full sequence (e.g. an SFT target) in the samples-table layout:
    input_ids and the span boundaries prompt_len, reasoning_end, mesh_start, mesh_end."""
    p = encode_text(tokenizer, prompt_text)
    r = encode_text(tokenizer, reasoning) if reasoning else []
    tail = mesh_block(special, np.asarray(mesh_tokens)[None])[0].tolist()
    return {"input_ids": p + r + tail, **sequence_spans(len(p), len(r), len(tail) - 3), "reasoning_truncated": False}


# ---- position kinds: what a completion position may emit -----------------------------------------

KIND_REASONING = 0   # text tokens or <mesh-start>
KIND_FORCE_START = 1  # reasoning budget spent: <mesh-start> forced
KIND_MESH = 2        # mesh tokens only
KIND_FORCE_END = 3   # <mesh-end> forced
KIND_FORCE_EOS = 4   # eos forced
KIND_PAD = 5         # padding / finished rows (log-prob 0, not in the mask)
NUM_KINDS = 6


@dataclass
class SpecialIds:
    """The vocabulary ids the layout and its constraints need, found in a tokenizer by
    tokenizer.special_ids (re-exported there)."""
    mesh_ids: torch.Tensor      # int64[K] vocabulary ids of <mesh0>.. in codec order
    mesh_start: int
    mesh_end: int
    eos: int
    pad: int
    text_ids: torch.Tensor      # int64[n] ids a reasoning position may emit besides <mesh-start>
    vocab_size: int             # logits width
    _bias: dict = field(default_factory=dict, repr=False)

    @property
    def k(self) -> int:
        return int(self.mesh_ids.numel())

    def kind_bias(self, device, dtype=torch.float32) -> torch.Tensor:
        """float[NUM_KINDS, V]: 0 where a kind may emit a token, -inf elsewhere (cached per device)."""
        key = (str(device), dtype)
        if key not in self._bias:
            self._bias[key] = allowed_mask(self).to(device).float().log().to(dtype)  # True -> 0, False -> -inf
        return self._bias[key]

    def kind_columns(self, kind: int, device) -> tuple[slice | torch.Tensor, torch.Tensor]:
        """The vocabulary ids a kind may emit, as a slice when they are one run of ids (mesh tokens
        usually are) else an int64 index, and int64[V]: each id's column among them (-1: forbidden).
        Log-probs need the head's rows for these ids only (cached per device)."""
        key = ("columns", kind, str(device))
        if key not in self._bias:
            allowed = allowed_mask(self)[kind]
            ids = allowed.nonzero().squeeze(1)
            position = torch.cumsum(allowed.long(), 0) - 1
            position[~allowed] = -1
            contiguous = ids.numel() > 0 and int(ids[-1] - ids[0]) + 1 == ids.numel()
            cols = slice(int(ids[0]), int(ids[-1]) + 1) if contiguous else ids.to(device)
            self._bias[key] = (cols, position.to(device))
        return self._bias[key]

    def codec_lookup(self) -> torch.Tensor:
        """int64[V]: vocabulary id -> codec id (or -1 for non-mesh ids)."""
        lut = torch.full((self.vocab_size,), -1, dtype=torch.long)
        lut[self.mesh_ids] = torch.arange(self.k)
        return lut


def allowed_mask(special: SpecialIds) -> torch.Tensor:
    """bool[NUM_KINDS, V]: which tokens each position kind may emit. The only definition of the
    constraints, used by the sampler and by log-prob recomputation alike."""
    m = torch.zeros(NUM_KINDS, special.vocab_size, dtype=torch.bool)
    m[KIND_REASONING, special.text_ids] = True
    m[KIND_REASONING, special.mesh_start] = True
    m[KIND_FORCE_START, special.mesh_start] = True
    m[KIND_MESH, special.mesh_ids] = True
    m[KIND_FORCE_END, special.mesh_end] = True
    m[KIND_FORCE_EOS, special.eos] = True
    m[KIND_PAD] = True  # ignored positions: anything (their log-prob is zeroed)
    return m


def completion_kinds(prompt_lens: torch.Tensor, reasoning_end: torch.Tensor, mesh_end: torch.Tensor,
                     lengths: torch.Tensor, truncated: torch.Tensor, width: int) -> torch.Tensor:
    """int64[B, width]: the kind of completion position j (absolute index prompt_len + j) of each row,
    from the samples-table spans. `truncated`: the reasoning hit its budget, so <mesh-start> was forced."""
    p = prompt_lens[:, None] + torch.arange(width, device=prompt_lens.device)[None]
    re, me = reasoning_end[:, None], mesh_end[:, None]
    start_kind = torch.where(truncated[:, None], KIND_FORCE_START, KIND_REASONING)
    k = torch.full_like(p, KIND_PAD)
    k = torch.where(p < re, KIND_REASONING, k)
    k = torch.where(p == re, start_kind, k)
    k = torch.where((p > re) & (p < me), KIND_MESH, k)
    k = torch.where(p == me, KIND_FORCE_END, k)
    k = torch.where(p == me + 1, KIND_FORCE_EOS, k)
    return torch.where(p < lengths[:, None], k, KIND_PAD)


def collate(rows: list[dict], special: SpecialIds, device=None, right_padded: bool = False) -> dict:
    """Samples-table rows -> a batch for completion_logprobs: prompts left-padded so every completion
    starts at the same column (the sampler's layout), completions right-padded. `right_padded`: every
    sequence starts at column 0 and only its end is padded; a causal model then needs no padding mask
    (no token attends to the pads after it), so attention can take its fused causal kernel (flash)
    instead of a masked one, and the batch is at most as wide (its longest sequence).
    Each row needs input_ids, prompt_len, reasoning_end, mesh_end and reasoning_truncated."""
    n = len(rows)
    plen = torch.tensor([int(r["prompt_len"]) for r in rows])
    lens = torch.tensor([len(r["input_ids"]) for r in rows])
    P, T = int(plen.max()), int((lens - plen).max())
    width = int(lens.max()) if right_padded else P + T
    ids = torch.full((n, width), special.pad, dtype=torch.long)
    att = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):  # per row, not per token: a copy of each sequence
        seq = torch.as_tensor(r["input_ids"], dtype=torch.long)
        s = 0 if right_padded else P - int(plen[i])
        ids[i, s:s + len(seq)] = seq
        att[i, s:s + len(seq)] = 1
    kinds = completion_kinds(plen, torch.tensor([int(r["reasoning_end"]) for r in rows]),
                             torch.tensor([int(r["mesh_end"]) for r in rows]), lens,
                             torch.tensor([bool(r["reasoning_truncated"]) for r in rows]), T)
    out = {"input_ids": ids, "attention_mask": att, "prompt_lens": plen, "kinds": kinds}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out

