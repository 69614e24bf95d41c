"""The `rl3d` command group. Subcommands live one per module in rl3d.cli and load lazily,
so `rl3d --help` stays fast and a command's heavy imports (torch) happen only when it runs."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os

import click

from rl3d.cli import __version__
from rl3d.cli.groups import SuggestingGroup
from rl3d.formats.model_dirs import TRUST_REMOTE_CODE_ENV, set_remote_code

# command name -> module in rl3d.cli exposing `command`
COMMANDS = {
    "synth": "synth",
    "codec": "codec",
    "render": "render",
    "gen": "gen",
    "sft": "sft",
    "reward": "reward",
    "train-scorer": "train_scorer",
    "rl-step": "rl_step",
    "train": "train",
    "eval": "eval",
    "learning-summary": "learning_summary",
    "status": "status",
    "doctor": "doctor",
}


class LazyGroup(SuggestingGroup):
    def list_commands(self, ctx):
        return [n for n, m in COMMANDS.items() if importlib.util.find_spec(f"rl3d.cli.{m}") is not None]

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"rl3d.cli.{COMMANDS[name]}").command


EXAMPLES = """Examples (one step of the loop; `rl3d CMD --help` describes every option of CMD):

\b
  rl3d synth --n 64 --seed 1 --split train --out runs/demo/prompts
  rl3d gen --prompts runs/demo/prompts --out runs/demo/step-000001/gen
  rl3d render --samples runs/demo/step-000001/gen --out runs/demo/step-000001/renders
"""


@click.group(cls=LazyGroup, epilog=EXAMPLES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rl3d")
@click.option("--trust-remote-code", is_flag=True,
              help="Let transformers import Python files shipped inside model directories (config.json "
                   "auto_map). Off by default: a checkpoint is data, and loading it never runs its code. "
                   f"Only this flag turns it on ({TRUST_REMOTE_CODE_ENV}=1 alone is ignored).")
def main(trust_remote_code):
    """rl3d: reinforcement learning (Hi-GRPO) of autoregressive text-to-3D models.

    Stages exchange Parquet tables and GLB files on disk:
    synth -> gen -> render -> reward -> rl-step, and eval for benchmarks.
    """
    # offline by design: never let a library reach a model hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # an environment variable, so worker processes inherit it; an inherited one without the flag is cleared
    if (warning := set_remote_code(trust_remote_code)) is not None:
        click.echo(warning, err=True)
    logging.basicConfig(level=logging.WARNING, format="[rl3d] %(message)s")


if __name__ == "__main__":
    main()
