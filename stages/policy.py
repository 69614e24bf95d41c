"""The policy: loading a causal LM checkpoint, its tokenizer and codec, and the sequence format
shared by gen, sft, rl-step and eval (prompt templates, constrained decoding, log-probs).

Sequence of one level (see docs/internals.md):
    prompt | reasoning text | <mesh-start> | M mesh tokens | <mesh-end> | eos
"""
from __future__ import annotations

LEVELS = ("coarse", "fine", "single")

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


def build_prompt(prompt: str, level: str, plan: str | None = None) -> str:
    """The text the policy is conditioned on for one level (before the reasoning span)."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}")
    instruction = INSTRUCTIONS[level]
    if level == "fine":
        if plan is None:
            raise ValueError("the fine level needs the coarse plan")
        instruction = instruction.format(plan=plan.strip())
    return f"{USER}{REQUEST.format(prompt=prompt.strip())}\n{instruction}{ASSISTANT}"
