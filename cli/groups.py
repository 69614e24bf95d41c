"""A click group that answers a mistyped subcommand with the closest one (`rl3d rlstep` ->
"Did you mean 'rl-step'?"), for `rl3d` itself and its command groups (codec, learning-summary)."""
from __future__ import annotations

import difflib

import click


class SuggestingGroup(click.Group):
    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            path = " ".join(["rl3d", *ctx.command_path.split()[1:]])  # the program's name, however it was started
            ctx.fail(f"No such command '{name}'.{hint} '{path} --help' lists the commands.")
        return super().resolve_command(ctx, args)
