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
  rl3d gen --prompts runs/demo/prompts --policy models/shapellm-omni --sampling shapellm --out runs/omni/gen
"""


@click.command("gen", epilog=EXAMPLES, short_help="Sample rollouts of a policy into a samples table + GLB meshes.")
@click.option("--prompts", required=True, type=click.Path(path_type=Path),
              help="Prompt file (.txt/.jsonl/.json/.csv/.parquet), a saved Hugging Face dataset folder, or a "
                   "synth objects table dir (its category and spec columns are carried to the samples).")
@click.option("--policy", "policy_dir", default=None, type=click.Path(path_type=Path),
              show_default="the embedded default policy", help="Policy checkpoint dir.")
@click.option("--mode", type=click.Choice(["hi-grpo", "flat"]), default="hi-grpo", show_default=True,
              help="hi-grpo: coarse plan + mesh, then fine detail + mesh per trajectory; flat: one level.")
@click.option("--group-size", "-G", default=8, show_default=True, type=int, help="Samples per prompt (and level).")
@click.option("--sampling", "sampling_preset", type=click.Choice(["policy", "default", "shapellm"]), default="policy",
              show_default=True,
              help="Sampling preset: policy = the policy's rl3d_policy.json \"sampling\" (else default); default = "
                   "temperature 1, top-p 0.95, no top-k; shapellm = ShapeLLM-Omni's (temperature 0.7, top-p 0.7, "
                   "top-k 8192). --temperature/--top-p/--top-k/--max-reasoning-tokens override it.")
@click.option("--temperature", default=None, show_default="1.0, or the preset's", type=float,
              help="Sampling temperature (log-probs are of the tempered, masked distribution).")
@click.option("--top-p", default=None, show_default="0.95, or the preset's", type=float,
              help="Nucleus cut, a probability mass (1 = off).")
@click.option("--top-k", default=None, show_default="0, or the preset's", type=int,
              help="Top-k cut, in tokens (0 = off). ShapeLLM-Omni samples with --temperature 0.7 --top-p 0.7 "
                   "--top-k 8192 (--sampling shapellm).")
@click.option("--max-reasoning-tokens", default=None, show_default="128", type=int,
              help="Reasoning budget per level, in tokens; at the budget <mesh-start> is forced.")
@click.option("--batch-size", default=None, type=int, show_default="256 on CUDA, 64 on CPU",
              help="Sequences sampled together (does not change the samples).")
@click.option("--sampler", type=click.Choice(["auto", "plain", "static"]), default="auto", show_default=True,
              help="Sampling engine (same samples up to float noise): static = fixed-shape steps replayed as a "
                   "CUDA graph on GPUs (docs/performance.md); plain = the step-by-step loop; auto = static on "
                   "CUDA, plain on CPU.")
@click.option("--device", default=None, show_default="cuda if available, else cpu", help="torch device.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
              show_default="bfloat16 on CUDA, float32 on CPU", help="Model dtype.")
@click.option("--texture-hook", default=None, metavar="HOOK",
              help="Paint each mesh with an external texturing stage: a command template with {glb} "
                   "{occupancy} {prompt_file} {reasoning_file} {sample_id} {out}, or module:function "
                   "(docs/doctor.md). Results in _textured/; failures are row texture statuses.")
@click.option("--texture-timeout", default=600.0, show_default=True, type=float,
              help="Seconds a texture hook may take per mesh.")
@click.option("--meshes/--no-meshes", default=True, show_default=True,
              help="Write OUT/_meshes/<sample_id>.glb per decodable sample. --no-meshes: the samples table only "
                   "(reward terms on the voxel grid decode the tokens; render and CLIP-family terms need the GLBs).")
@stage_options
@handle_errors
def command(prompts, policy_dir, mode, group_size, sampling_preset, temperature, top_p, top_k, max_reasoning_tokens,
            batch_size, sampler, device, dtype, texture_hook, texture_timeout, meshes, **kw):
    """Sample G rollouts per prompt: reasoning text, then exactly the codec's mesh tokens (512 with
    the shipped codec), per level.

    Writes OUT/part-*.parquet (a samples table: input ids, spans, per-token log-probs, reasoning,
    mesh tokens, status) and OUT/_meshes/<sample_id>.glb. Resumable and shardable (--shard I/N splits
    by prompt_id); samples depend only on --seed and the row keys, not on sharding or batch size.
    """
    from rl3d.stages.gen import run_gen

    started = time.time()
    opts = pop_stage_options(kw)
    overrides = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                 "max_reasoning_tokens": max_reasoning_tokens}
    summary = run_gen(prompts, opts, policy_dir=policy_dir, mode=mode, group_size=group_size, sampling=None,
                      batch_size=batch_size, device=device, dtype=dtype, sampling_preset=sampling_preset,
                      sampling_overrides=overrides, texture_hook=texture_hook, texture_timeout=texture_timeout,
                      sampler=sampler, meshes=meshes)
    report(summary, opts, stage="gen", started=started)
