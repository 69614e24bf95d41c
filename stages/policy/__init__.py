"""The policy library: what gen, sft, rl-step and eval share about the text-to-mesh LM.

    checkpoint.py  load_policy / save_policy (the one writer of a policy dir), rl3d_policy.json,
                   the policy id, default_policy_dir
    sequence.py    the sequence layout and its spans, levels and modes, prompt templates,
                   position kinds and the constraint table, collate
    sampler.py     the constrained sampler and log-prob recomputation (one masking of the logits)
    static_sampler.py  the same sampler as one fixed-shape step (a CUDA graph on GPUs)
    sampler_engines.py the choice between the two (rl3d gen --sampler)
    tokenizer.py   load_tokenizer, the default policy's BPE, mesh tokens, SpecialIds
    device.py      device and dtype selection (also used by render and the reward backends)
"""


def __getattr__(name: str):
    """`from rl3d.stages.policy import default_policy_dir` (the scripts' entry point), loaded on first
    use: render and the reward backends import device.py and must not load transformers with it."""
    if name == "default_policy_dir":
        from rl3d.stages.policy.checkpoint import default_policy_dir
        return default_policy_dir
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
