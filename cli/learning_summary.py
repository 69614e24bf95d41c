"""`rl3d learning-summary`: summarise a learning run (held-out rewards, curves, paired changes)."""
from __future__ import annotations

from pathlib import Path

import click

from rl3d.cli.common import handle_errors
from rl3d.cli.groups import SuggestingGroup

RUN = click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))


@click.group("learning-summary", cls=SuggestingGroup)
def command():
    """Summarise a learning run (examples/learning_run.sh): held-out reward per step, learning
    curves, paired per-prompt changes, which reward terms drive the advantages, before/after renders.

    A run folder holds metrics.parquet (rl-step's run metrics file) and eval/step-NNNNNN/seed-S/{renders,rewards}
    (held-out generations scored by `rl3d reward`).

    \b
    Examples:
      rl3d learning-summary heldout runs/lr1e-4
      rl3d learning-summary plot --out curves.png "lr 1e-4=runs/lr1e-4" "lr 3e-4=runs/lr3e-4"
      rl3d learning-summary compare runs/lr1e-4 0 10
      rl3d learning-summary samples runs/lr1e-4 0 10 --out before_after.png
      rl3d learning-summary drivers runs/lr1e-4/step-000001/rewards
    """


@command.command("heldout", short_help="Held-out reward per step -> RUN/heldout_rewards.json.")
@RUN
@handle_errors
def heldout_command(run):
    """Held-out reward per evaluated step, per level and reward term (mean over sampling seeds).

    Writes RUN/heldout_rewards.json (also the `_seed_std` spread of each column) and prints the table.
    `total_*` is the mean over scored samples, `failed_*` the share of samples without a reward
    (empty meshes). A seed whose scoring is unfinished is left out.

    \b
    Examples:
      rl3d learning-summary heldout runs/lr1e-4
    """
    from rl3d.stages.learning_summary import heldout

    for line in heldout(run):
        click.echo(line)


@command.command("plot", short_help="Learning curves of one or more runs (PNG).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG file to write (four charts: training R_low, held-out reward, held-out CLIP, log10 KL).")
@click.argument("runs", nargs=-1, required=True, metavar="LABEL=DIR...")
@handle_errors
def plot_command(out, runs):
    """Learning curves of one or more runs, one line per run (LABEL=DIR; DIR holds metrics.parquet
    and heldout_rewards.json from `rl3d learning-summary heldout`).

    \b
    Examples:
      rl3d learning-summary plot --out curves.png "lr 1e-4=runs/lr1e-4" "lr 3e-4=runs/lr3e-4"
    """
    from rl3d.stages.learning_summary import plot

    click.echo(plot(out, list(runs)))


@command.command("drivers", short_help="Which reward terms the advantages follow.")
@click.argument("reward_dirs", nargs=-1, required=True, metavar="REWARDS_DIR...",
                type=click.Path(exists=True, file_okay=False))
@handle_errors
def drivers_command(reward_dirs):
    """Which reward terms the advantages follow: each term's mean share of the within-group
    variance of its level's total (shares of a level sum to 1), over the given rewards tables.

    \b
    Examples:
      rl3d learning-summary drivers runs/lr1e-4/step-000001/rewards runs/lr1e-4/step-000002/rewards
    """
    from rl3d.stages.learning_summary import drivers

    for line in drivers(list(reward_dirs)):
        click.echo(line)


@command.command("compare", short_help="Paired per-prompt change between two steps.")
@RUN
@click.argument("step_a", type=int)
@click.argument("step_b", type=int)
@handle_errors
def compare_command(run, step_a, step_b):
    """Change of the held-out total from STEP_A to STEP_B, paired by prompt, with a 95% bootstrap
    interval over prompts, per level.

    \b
    Examples:
      rl3d learning-summary compare runs/lr1e-4 0 10
    """
    from rl3d.stages.learning_summary import compare

    for line in compare(run, step_a, step_b):
        click.echo(line)


@command.command("samples", short_help="Renders before and after (PNG).")
@RUN
@click.argument("step_a", type=int)
@click.argument("step_b", type=int)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG file to write.")
@handle_errors
def samples_command(run, step_a, step_b, out):
    """One image of renders before (STEP_A, left) and after (STEP_B, right): view 0 of the first
    sampling seed's fine samples for the prompts whose mean total rose most, changed least and fell most.

    \b
    Examples:
      rl3d learning-summary samples runs/lr1e-4 0 10 --out before_after.png
    """
    from rl3d.stages.learning_summary import samples

    click.echo(samples(run, step_a, step_b, out))


@command.command("ablations", short_help="Tables, curves and renders of one ablation experiment.")
@click.argument("exp_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="EXP_DIR")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for <name>.md, <name>_learning.png, <name>_curves.png, <name>_renders.png and "
                   "<name>.json, <name> being EXP_DIR's folder name.")
@handle_errors
def ablations_command(exp_dir, out):
    """Summarise one experiment of examples/ablations/ (an EXP_DIR with experiment.json, arms/ and
    baseline/): the findings the experiment script declares (`finding` in examples/ablations/common.sh),
    each judged arm against arm paired by held-out prompt, with its verdict (reproduced, reversed, not
    reproduced, not separated: then the seeds or prompts that would separate the arms); one figure of
    learning curves per arm (held-out all attributes right, spec accuracy, CLIP, and the training KL;
    mean and seed band); per arm and benchmark, each metric's mean over seeds with a 95% t-interval,
    the paired per-prompt change from the starting policy, the headline metric per category, wall
    time and machine, the commands; training curves and a render grid of the start and each arm.
    Refuses runs of another experiment, starting policy or held-out prompt set, and arms whose
    held-out samples do not pair (exit 2).

    \b
    Examples:
      rl3d learning-summary ablations runs/ablations/paradigm --out docs/results
    """
    from rl3d.stages.learning_summary import ablations

    for line in ablations(exp_dir, out):
        click.echo(line)


@command.command("spread", short_help="Within-group reward spread: where GRPO's signal is.")
@click.argument("reward_dirs", nargs=-1, required=True, metavar="REWARDS_DIR...",
                type=click.Path(exists=True, file_okay=False))
@handle_errors
def spread_command(reward_dirs):
    """How much the G samples of a (prompt, level) group disagree, over the given rewards tables:
    the within-group std of the total and of each term, the share of groups whose samples differ in
    "all spec checks passed", and per spec attribute kind the share of checks that differ within a
    group or that every sample fails (a consistent mistake gives GRPO nothing to learn from).

    \b
    Examples:
      rl3d learning-summary spread runs/learn/step-000001/rewards runs/learn/step-000002/rewards
    """
    from rl3d.stages.learning_summary import spread

    for line in spread(list(reward_dirs)):
        click.echo(line)


@command.command("nucleus", short_help="Share of sampled tokens that top-p sampling could not vary.")
@click.argument("gen_dirs", nargs=-1, required=True, metavar="GEN_DIR...",
                type=click.Path(exists=True, file_okay=False))
@handle_errors
def nucleus_command(gen_dirs):
    """Per level and span (reasoning, mesh): the share of sampled tokens whose probability was at
    least the samples' top_p (there top-p keeps a single token, so all G samples agree), and the
    mean negative log-prob (the entropy estimate rl-step reports).

    \b
    Examples:
      rl3d learning-summary nucleus runs/learn/step-000001/gen
    """
    from rl3d.stages.learning_summary import nucleus

    for line in nucleus(list(gen_dirs)):
        click.echo(line)
