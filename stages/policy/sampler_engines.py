"""The sampler engines, and the choice of engine (`rl3d gen --sampler`, `rl3d train --sampler`).

Both engines take the same arguments and return the same rows for the same seeds:
- plain (sampler.sample_sequences): a Python loop over a KV cache, rejection draws for the
  top-k / top-p cut; the cheaper one on a CPU.
- static (static_sampler.sample_sequences_static): one fixed-shape decode step, replayed as a CUDA
  graph on a GPU (one launch per token).
"""
from __future__ import annotations

import torch

from rl3d.stages.policy.sampler import sample_sequences
from rl3d.stages.policy.static_sampler import sample_sequences_static

SAMPLERS = ("auto", "plain", "static")


def choose_sampler(name: str, device: torch.device):
    """(engine name, sample function): auto = the fixed-shape sampler with CUDA graphs on a GPU, the
    plain loop elsewhere (on a CPU the per-token launch cost it removes is small, and the plain loop's
    rejection draws are cheaper there than the fixed-shape step's threshold)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r}: expected one of {', '.join(SAMPLERS)}")
    if name == "static" or (name == "auto" and torch.device(device).type == "cuda"):
        graph = torch.device(device).type == "cuda"
        return ("static+cuda-graph" if graph else "static"), sample_sequences_static
    return "plain", sample_sequences
