"""`rl3d train`: many Hi-GRPO / GRPO steps in one resident process (the same stages, the same files)."""
from __future__ import annotations

import time
import tomllib
from pathlib import Path

import click

from rl3d.cli.common import common_options, handle_errors, pop_common_options, report
from rl3d.cli.update_options import parse_dynamic_sampling, update_options
from rl3d.formats.errors import InputError

EXAMPLES = """Examples (from the repository root):

\b
  rl3d train --prompts synth --out runs/train --steps 10 --prompts-per-step 64 -G 8
  rl3d train --prompts prompts.jsonl --policy models/shapellm-omni --out runs/omni --steps 100 \\
      --rewards paper --lr 1e-6 --save-every 10 --eval-every 10 --eval-bench synth-reasoning
  rl3d train --config run.toml --out runs/a            # any option, by its name, in a TOML file
  rl3d train --prompts synth --out runs/b --stage reward='my_scorer {samples} {renders} {out}'
\b
Rerun the same command to resume (from the newest checkpoint; steps after it are replayed from
their recorded tables). Slurm: a USR1 signal (sbatch signal=B:USR1@120) checkpoints and exits 0 before the time limit.
Several GPUs (same options): accelerate launch -m rl3d.cli.main train ...
"""


def _load_toml(ctx, param, value):
    """--config FILE.toml: its keys (option names, - or _) become the defaults the flags override."""
    if value is None:
        return None
    try:
        data = tomllib.loads(Path(value).read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{value}: {e}") from None
    known = {p.name for p in ctx.command.params}
    defaults = {}
    for key, v in data.items():
        name = key.replace("-", "_")
        name = {"group_size": "group_size", "lambda": "lam", "policy": "policy_dir", "stage": "stages"}.get(name, name)
        if name not in known or name == "config":
            raise click.BadParameter(f"{value}: unknown setting {key!r} (use the long option names of rl3d train)")
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


@click.command("train", epilog=EXAMPLES,
               short_help="Many Hi-GRPO / GRPO steps in one resident process, writing every step's stage files.")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None, is_eager=True,
              expose_value=True, callback=_load_toml,
              help="A TOML file of settings (keys are this command's long option names); flags override it.")
@click.option("--prompts", required=True,
              help="Prompt file or table (.txt/.jsonl/.csv/.parquet, a synth objects dir), consumed in batches of "
                   "--prompts-per-step and reshuffled by --seed each epoch; or `synth` for fresh shape-world "
                   "prompts every step.")
@click.option("--policy", "policy_dir", default=None, show_default="the embedded default policy",
              help="Initial policy dir (also the KL reference unless --ref).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run dir: RUN/step-NNNNNN/{prompts,gen,renders,rewards,update}, RUN/checkpoints, RUN/train.json.")
@click.option("--steps", default=10, show_default=True, type=int, help="Steps (iterations) of the run in all.")
@click.option("--prompts-per-step", default=64, show_default=True, type=int,
              help="Prompts a step (all of them if the file has fewer).")
@click.option("--mode", type=click.Choice(["hi-grpo", "flat"]), default="hi-grpo", show_default=True,
              help="hi-grpo: two levels and the back-flow; flat: one level, GRPO.")
@click.option("--group-size", "-G", default=8, show_default=True, type=int, help="Samples per prompt (and level).")
@click.option("--views", default=6, show_default=True, type=int, help="Rendered views per mesh.")
@click.option("--resolution", default=512, show_default=True, type=int, help="Render size in pixels.")
@click.option("--supersample", default=2, show_default=True, type=int, help="Render anti-aliasing: K x K rays a pixel.")
@click.option("--meshes/--no-meshes", default=True, show_default=True,
              help="Write each step's GLBs and render them. --no-meshes: neither (as rl3d gen --no-meshes), for "
                   "rewards that read the voxel grid only (geometry, spec); refused with a view-scoring term.")
@click.option("--sheet/--no-sheet", default=True, show_default=True,
              help="Render each mesh's contact sheet (sheet.png) for people, as rl3d render does; --no-sheet saves "
                   "about a third of render's PNG writing.")
@click.option("--gen-batch-size", default=None, type=int, show_default="256 on CUDA, 64 on CPU",
              help="Sequences sampled together (as rl3d gen --batch-size; does not change the samples).")
@click.option("--render-backend", type=click.Choice(["auto", "open3d", "torch"]), default="auto", show_default=True,
              help="Ray caster: auto = torch on CUDA, open3d on CPU.")
@click.option("--rewards", default=None, show_default="default (hi-grpo) or flat",
              help="Reward preset name (default, paper, flat, paper-flat) or a reward TOML.")
@click.option("--sampling", "sampling_preset", type=click.Choice(["policy", "default", "shapellm"]), default="policy",
              show_default=True, help="Sampling preset (as rl3d gen).")
@click.option("--temperature", default=None, type=float, help="Sampling temperature (as rl3d gen).")
@click.option("--top-p", default=None, type=float, help="Nucleus cut (as rl3d gen).")
@click.option("--top-k", default=None, type=int, help="Top-k cut (as rl3d gen).")
@click.option("--max-reasoning-tokens", default=None, type=int, help="Reasoning budget per level (as rl3d gen).")
@update_options
@click.option("--ref", "ref_dir", default=None, show_default="--policy", help="Reference policy dir for the KL term.")
@click.option("--save-every", default=10, show_default=True, type=int,
              help="Checkpoint (weights, optimizer, RNG, data position) every K steps, at the last step and on "
                   "SIGTERM / SIGUSR1.")
@click.option("--time-limit", default=0.0, show_default=True, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Stop at the first stage boundary this long after the start: checkpoint and exit 0, as on "
                   "SIGTERM (0 = none). Leave room for one stage and a checkpoint in a job's wall time.")
@click.option("--keep-checkpoints", default=2, show_default=True, type=int,
              help="Newest checkpoints kept (0 = all); those of --eval-every steps are always kept.")
@click.option("--overlap", type=click.IntRange(0, 1), default=0, show_default=True,
              help="1: sample step t+1 while step t is rendered, scored and trained on; its one-version-old "
                   "samples are corrected by truncated importance sampling (--old-logprobs recompute, --tis-cap 2 "
                   "unless given).")
@click.option("--stage", "stages", multiple=True, metavar="STAGE=COMMAND",
              help="Swap render or reward for your command over the same files, e.g. "
                   "reward='my_scorer {samples} {renders} {out}' (placeholders: "
                   "samples, renders, prompts, out, step, run). Run without a shell; its output is checked.")
@click.option("--eval-every", default=0, show_default=True, type=int,
              help="Held-out scoring of the checkpoint every K steps with rl3d eval, in a child process "
                   "beside training (RUN/eval/step-NNNNNN).")
@click.option("--eval-bench", default=None, help="Benchmark for --eval-every (synth-reasoning, text-reasoning, FILE).")
@click.option("--eval-limit", default=None, type=int, help="Prompts per category for --eval-every.")
@click.option("--tensorboard", type=click.Path(file_okay=False), default=None,
              help="Write each step's metrics and phase seconds as TensorBoard scalars into this log dir.")
@click.option("--profile-step", default=0, show_default=True, type=int, metavar="K",
              help="Profile step K with cProfile: RUN/profile/step-K.txt (Python functions by cumulative and own "
                   "time) and .pstats (0 = none).")
@click.option("--allow-changes", is_flag=True,
              help="Resume with settings other than RUN/train.json's (recorded there as a change).")
@click.option("--device", default=None, show_default="cuda if available, else cpu", help="torch device.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16"]),
              show_default="bfloat16 on CUDA, float32 on CPU",
              help="Sampling dtype (training keeps float32 weights; --bf16-weights keeps the trained weights in "
                   "bf16 and, with bfloat16 here, trains in bf16 on a CPU too).")
@click.option("--lora-rank", type=int, default=0, show_default=True, help="LoRA rank: train an adapter on the initial policy (checkpoints hold the adapter, and a merged policy at held-out eval steps and the last step).")
@common_options(seed_help="Random seed: prompt order, sampling (step s samples with seed + s), minibatch order.",
                overwrite_help="Start the run over: the old run folder is set aside beside it and removed once "
                               "the new run has finished (one process only).")
@handle_errors
def command(config, prompts, policy_dir, out, sampling_preset, temperature, top_p, top_k, max_reasoning_tokens,
            dynamic_sampling, ref_dir, stages, device, dtype, lora_rank, save_every, keep_checkpoints, overlap,
            eval_every, eval_bench, eval_limit, tensorboard, profile_step, time_limit, allow_changes, steps,
            prompts_per_step, mode, group_size, views, resolution, supersample, meshes, sheet, gen_batch_size,
            render_backend, rewards, **kw):
    """Run N iterations of sample -> render -> score -> update in one process, with the policy,
    reference, optimizer, codec, renderer and reward models loaded once.

    Every step writes the same stage folders the single commands write (inspect any with pandas or
    duckdb, rerun one with its command); see docs/train.md.
    """
    started = time.time()
    from rl3d.stages.contract import Progress
    from rl3d.stages.rl.rl_config import RLConfig
    from rl3d.stages.train import TrainJob, TrainOptions

    opts = pop_common_options(kw, out=out)
    ds, min_std = parse_dynamic_sampling(dynamic_sampling)
    rl = RLConfig(dynamic_sampling=ds, min_std=min_std, seed=opts.seed, **kw)
    if isinstance(stages, dict):  # from --config: a table {stage = "command"}
        stage_specs = stages
    else:
        stage_specs = list(stages)
    overrides = {k: v for k, v in {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                                   "max_reasoning_tokens": max_reasoning_tokens}.items() if v is not None}
    if sampling_preset == "policy":
        sampling_preset = None
    options = TrainOptions(
        prompts=str(prompts), out=Path(out), policy=policy_dir, steps=steps, prompts_per_step=prompts_per_step,
        mode=mode, group_size=group_size, views=views, resolution=resolution, supersample=supersample, meshes=meshes,
        sheet=sheet, gen_batch_size=gen_batch_size,
        render_backend=render_backend, rewards=rewards, seed=opts.seed, sampling_preset=sampling_preset,
        sampling_overrides=overrides, rl=rl, lora_rank=lora_rank, ref=ref_dir, save_every=save_every,
        keep_checkpoints=keep_checkpoints, overlap=overlap, stages=stage_specs, eval_every=eval_every,
        eval_bench=eval_bench, eval_limit=eval_limit, tensorboard=tensorboard, profile_step=profile_step,
        time_limit=time_limit, device=device, dtype=dtype,
        allow_changes=allow_changes, quiet=opts.quiet, overwrite=opts.overwrite)
    if config is not None and not Path(config).is_file():
        raise InputError(f"{config}: no such settings file")
    summary = TrainJob(options).run(Progress(opts.quiet))
    report(summary, opts, stage="train", started=started,
           line_keys=("step", "steps_run", "steps_replayed", "seconds_per_step", "stopped", "checkpoint"))
