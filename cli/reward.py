"""`rl3d reward`: score samples per level with the terms of a reward config."""
from __future__ import annotations

import time
from pathlib import Path

import click

from rl3d.cli.common import handle_errors, pop_stage_options, report, stage_options

EXAMPLES = """Examples:

\b
  rl3d reward --samples runs/demo/step-000001/gen --renders runs/demo/step-000001/renders \\
      --config default --out runs/demo/step-000001/rewards
  rl3d reward --samples runs/demo/prompts --renders runs/demo/prompt_renders --config flat \\
      --out runs/demo/prompt_rewards   # reference scores of the synth objects themselves
"""


@click.command("reward", epilog=EXAMPLES)
@click.option("--samples", required=True, type=click.Path(path_type=Path),
              help="Samples from `rl3d gen` (or a synth objects table for reference scoring): file, dir or glob.")
@click.option("--renders", default=None, type=click.Path(path_type=Path),
              help="Renders table from `rl3d render` (joined on sample_id). Needed by view-based terms "
                   "(clip, hps, vlm).", show_default="none: view-based terms get status missing_renders")
@click.option("--config", "config", default="default", show_default=True, metavar="FILE|PRESET",
              help="Reward config (TOML/YAML) or a preset name: default, flat, paper, paper-flat. "
                   "See docs/rewards.md.")
@click.option("--batch", default=64, show_default=True, type=int, help="Samples per backend call.")
@click.option("--allow-unverified", is_flag=True,
              help="Join --renders that carry no rl3d provenance (written or rewritten by another tool).")
@stage_options
@handle_errors
def command(samples, renders, config, batch, allow_unverified, **kw):
    """Score each sample with the terms its level lists in the config.

    Writes the rewards table: per term T the columns T (weighted), T_raw, T_views (per-view raw
    scores), T_status, T_message, T_details; per row total, status, message. A failed required
    term leaves total null; nothing is filled in with a default. The Hi-GRPO back-flow
    (R_high + lambda * R_low) is applied by rl-step, not here.
    """
    from rl3d.stages import reward

    started = time.time()
    opts = pop_stage_options(kw)
    report(reward.run(samples, renders, config, opts, batch=batch, allow_unverified=allow_unverified), opts,
           stage="reward", started=started)
