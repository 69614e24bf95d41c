"""`rl3d doctor`: check a policy, a reward config and a texturing hook before a run (headers only)."""
from __future__ import annotations

import json as jsonlib
import sys

import click

from rl3d.cli.common import handle_errors
from rl3d.stages.doctor import run_doctor


@click.command("doctor")
@click.option("--policy", default=None, type=click.Path(path_type=str),
              help="Policy dir a run will use (rl3d_policy.json, config.json, weights, tokenizer, codec).")
@click.option("--rewards", default=None, metavar="CONFIG",
              help="Reward config file or preset name, as given to rl3d reward --config.")
@click.option("--texture-hook", default=None, metavar="HOOK",
              help="Texturing hook: a command template naming {out} (and any of {glb}, {occupancy}, "
                   "{prompt_file}, {reasoning_file}, {sample_id}) or module:function.")
@click.option("--timeout", default=5.0, show_default=True, type=float,
              help="Seconds to wait for each reward endpoint's model list.")
@click.option("--json", "json_out", is_flag=True, help="Print one JSON object per check on stdout.")
@handle_errors
def command(policy, rewards, texture_hook, timeout, json_out):
    """Check what a run will use before it spends GPU time: every model dir exists and loads as the
    expected transformers class, weights files are whole (safetensors headers, never the weights),
    the policy's codec and tokenizer agree on the mesh tokens, every reward backend has its model,
    checkpoint, package, endpoint and API key, and the texturing hook's program exists. One line
    per check: ok, or PROBLEM with how to fix it. Environment variables named in the reward config
    as ${VAR} are read as a run would read them.

    Exit code 0 when every check is ok, 3 when a problem was found, 2 on bad input.

    \b
    Examples:
      rl3d doctor --policy runs/demo/step-000003/policy --rewards default
      RL3D_HPS_CHECKPOINT=models/HPS_v2.1_compressed.pt RL3D_JUDGE_ENDPOINT=http://localhost:8090/v1 \\
        RL3D_QWEN_MODEL_DIR=models/Qwen2.5-VL-7B-Instruct rl3d doctor --policy models/ShapeLLM-Omni --rewards paper
      rl3d doctor --texture-hook 'python paint.py {glb} {prompt_file} {out}' --json
    """
    checks = run_doctor(policy, rewards, texture_hook, timeout)
    for c in checks:
        click.echo(jsonlib.dumps(c.as_dict(), sort_keys=True) if json_out else c.line())
    problems = sum(not c.ok for c in checks)
    click.echo(f"doctor: {len(checks)} checks, {problems} problem(s)", err=True)
    sys.exit(3 if problems else 0)
