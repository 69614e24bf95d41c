"""`rl3d gen`: sample rollouts of a policy (flat or Hi-GRPO) into a samples table + GLB meshes."""
from __future__ import annotations

import time
from pathlib import Path

import click

from rl3d.cli.common import handle_errors, pop_stage_options, report, stage_options

EXAMPLES = """Examples:

\b
  rl3d gen --prompts runs/demo/prompts --out runs/demo/step-000001/gen --group-size 8
  rl3d gen --prompts runs/demo/prompts --mode flat -G 4 --device cpu --out runs/flat/gen
  rl3d gen --prompts runs/demo/prompts --policy runs/demo/step-000001/policy \\
      --temperature 0.7 --top-p 0.7 --top-k 8192 --out runs/demo/step-000002/gen
"""


@click.command("gen", epilog=EXAMPLES, short_help="Sample rollouts of a policy into a samples table + GLB meshes.")
@click.option("--prompts", required=True, type=click.Path(path_type=Path),
              help="Prompt file (.txt/.jsonl/.csv/.parquet) or a synth objects table dir "
                   "(its category and spec columns are carried to the samples).")
@click.option("--policy", "policy_dir", default=None, type=click.Path(path_type=Path),
              show_default="the embedded default policy", help="Policy checkpoint dir.")
@click.option("--mode", type=click.Choice(["hi-grpo", "flat"]), default="hi-grpo", show_default=True,
              help="hi-grpo: coarse plan + mesh, then fine detail + mesh per trajectory; flat: one level.")
@click.option("--group-size", "-G", default=8, show_default=True, type=int, help="Samples per prompt (and level).")
@click.option("--temperature", default=1.0, show_default=True, type=float,
              help="Sampling temperature (log-probs are of the tempered, masked distribution).")
@click.option("--top-p", default=0.95, show_default=True, type=float, help="Nucleus cut, a probability mass (1 = off).")
@click.option("--top-k", default=0, show_default=True, type=int,
              help="Top-k cut, in tokens (0 = off). ShapeLLM-Omni samples with --temperature 0.7 --top-p 0.7 "
                   "--top-k 8192.")
@click.option("--max-reasoning-tokens", default=128, show_default=True, type=int,
              help="Reasoning budget per level, in tokens; at the budget <mesh-start> is forced.")
@click.option("--batch-size", default=64, show_default=True, type=int,
              help="Sequences sampled together (does not change the samples).")
@click.option("--device", default=None, show_default="cuda if available, else cpu", help="torch device.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
              show_default="bfloat16 on CUDA, float32 on CPU", help="Model dtype.")
@stage_options
@handle_errors
def command(prompts, policy_dir, mode, group_size, temperature, top_p, top_k, max_reasoning_tokens,
            batch_size, device, dtype, **kw):
    """Sample G rollouts per prompt: reasoning text, then exactly the codec's mesh tokens (512 with
    the shipped codec), per level.

    Writes OUT/part-*.parquet (a samples table: input ids, spans, per-token log-probs, reasoning,
    mesh tokens, status) and OUT/_meshes/<sample_id>.glb. Resumable and shardable (--shard I/N splits
    by prompt_id); samples depend only on --seed and the row keys, not on sharding or batch size.
    """
    from rl3d.stages.gen import Sampling, run_gen

    started = time.time()
    opts = pop_stage_options(kw)
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_reasoning_tokens=max_reasoning_tokens)
    summary = run_gen(prompts, opts, policy_dir=policy_dir, mode=mode, group_size=group_size, sampling=sampling,
                      batch_size=batch_size, device=device, dtype=dtype)
    report(summary, opts, stage="gen", started=started)
