"""The command line as a new user meets it: --help of every command (examples, every option
described, defaults written one way, no flag that does not exist) and the one --json summary shape."""
from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from rl3d.cli.main import main

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"stage", "out", "skipped", "seconds"}
# a long option, or a one-letter short one, standing alone (not the tail of "log-probs" or "<mesh-start>")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*[a-z0-9]|-[A-Za-z])(?![\w-])")
# `rl3d CMD [SUB] ...` (also `python -m rl3d.cli.main CMD`): the flags after it are CMD's
INVOCATION = re.compile(r"(?:-m[ \t]+)?rl3d(?:\.cli\.main)?((?:[ \t]+[a-z][a-z-]*)+)((?:\\\n|[^\n`#])*)")


def all_commands() -> dict[str, click.Command]:
    """'synth', 'codec build', ...: every command and subcommand of `rl3d`."""
    ctx = click.Context(main)
    found: dict[str, click.Command] = {}

    def walk(path: str, cmd: click.Command) -> None:
        found[path] = cmd
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                walk(f"{path} {name}", cmd.get_command(ctx, name))

    for name in main.list_commands(ctx):
        walk(name, main.get_command(ctx, name))
    return found


COMMANDS = all_commands()
LEAVES = {p: c for p, c in COMMANDS.items() if not isinstance(c, click.Group)}


def option_names(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}


def options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and p.name != "help"]


def invoked_command(words: str) -> tuple[str | None, str]:
    """('codec build', rest) from ' codec build --n 3 ...': the longest known command path."""
    parts = words.split()
    for k in range(len(parts), 0, -1):
        if " ".join(parts[:k]) in COMMANDS:
            return " ".join(parts[:k]), " ".join(parts[k:])
    return None, words


def unknown_flags(text: str, own: click.Command | None) -> list[str]:
    """Flags in text that the command they are given to lacks: `rl3d CMD ...` invocations are
    checked against CMD, every other flag against `own` (None: only invocations are checked)."""
    bad = []

    def check(m: re.Match) -> str:
        path, extra = invoked_command(m.group(1))
        if path is not None:
            names = option_names(COMMANDS[path])
            bad.extend(f"`rl3d {path}` has no {f}" for f in FLAG.findall(f"{extra} {m.group(2)}") if f not in names)
        return " "

    rest = INVOCATION.sub(check, text)
    if own is not None:
        names = option_names(own) | option_names(main)
        bad += [f"no option {f}" for f in FLAG.findall(rest) if f not in names]
    return bad


def help_texts(cmd: click.Command) -> str:
    parts = [cmd.help or "", cmd.epilog or ""]
    for o in options(cmd):
        parts += [o.help or "", o.show_default if isinstance(o.show_default, str) else ""]
    return "\n".join(parts)


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_help_has_examples_and_describes_every_option(path):
    res = CliRunner().invoke(main, [*path.split(), "--help"])
    assert res.exit_code == 0, res.output
    assert "Examples" in res.output
    cmd = COMMANDS[path]
    for o in options(cmd):
        assert o.help and o.help.strip(), f"rl3d {path} {o.opts[0]}: no description"


@pytest.mark.parametrize("path", sorted(LEAVES))
def test_defaults_written_one_way(path):
    """Every default shows as click's trailing [default: ...]: never typed into the help text, and
    never missing for an option whose default is a value."""
    for o in options(LEAVES[path]):
        assert not re.search(r"default\s*:", o.help or "", re.I), f"rl3d {path} {o.opts[0]}: default in the text"
        if not o.required and not o.is_flag and not o.multiple and o.default is not None:
            assert o.show_default, f"rl3d {path} {o.opts[0]}: default {o.default!r} not shown"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_flag_named_in_help_exists(path):
    assert unknown_flags(help_texts(COMMANDS[path]), COMMANDS[path]) == []


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_help_cites_only_pages_in_the_repository(path):
    text = help_texts(COMMANDS[path])
    assert not re.search(r"[A-Z][A-Z-]+\.md", text), "a design note outside the repository"
    assert [d for d in re.findall(r"docs/[\w/.-]+\.md", text) if not (REPO / d).is_file()] == []


def test_rl3d_help():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "Examples" in res.output
    assert all(f" {name} " in res.output for name in main.list_commands(click.Context(main)))
    assert unknown_flags(help_texts(main), main) == []


def test_flag_check_catches_a_missing_flag():
    gen = COMMANDS["gen"]
    assert unknown_flags("ShapeLLM-Omni: -T 0.7 --top-p 0.7, <mesh-start>, log-probs", gen) == ["no option -T"]
    assert unknown_flags("`rl3d codec build --n 3 --bogus`", gen) == ["`rl3d codec build` has no --bogus"]
    assert unknown_flags("accelerate launch -m rl3d.cli.main sft --steps 2 \\\n  --group-size 2", None) == \
        ["`rl3d sft` has no --group-size"]


def test_docs_invoke_only_existing_flags():
    docs = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    bad = [f"{p.relative_to(REPO)}: {b}" for p in docs for b in unknown_flags(p.read_text(), None)]
    assert bad == []


# ---- the one summary shape -------------------------------------------------------------------

def run_json(*args: str) -> dict:
    res = CliRunner().invoke(main, [*args, "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert SUMMARY_KEYS <= set(summary), summary
    assert isinstance(summary["seconds"], float | int) and isinstance(summary["skipped"], bool)
    return summary


def test_table_stage_summaries(tmp_path):
    objs, renders = tmp_path / "objs", tmp_path / "renders"
    s = run_json("synth", "--n", "2", "--out", str(objs))
    assert (s["stage"], s["out"], s["skipped"], s["rows"]) == ("synth", str(objs), False, 2)
    s = run_json("synth", "--n", "2", "--out", str(objs))  # complete: skipped, same shape
    assert (s["stage"], s["skipped"]) == ("synth", True)
    s = run_json("render", "--samples", str(objs), "--views", "1", "--resolution", "32", "--workers", "1",
                 "--out", str(renders))
    assert (s["stage"], s["out"], s["skipped"], s["rows"]) == ("render", str(renders), False, 2)


def test_summary_line_on_stderr(tmp_path):
    res = CliRunner().invoke(main, ["synth", "--n", "1", "--no-meshes", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0 and res.stdout == ""
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("stage=synth ") and " skipped=False " in line and f"out={tmp_path / 'o'}" in line
    res = CliRunner().invoke(main, ["synth", "--n", "1", "--no-meshes", "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 0 and res.output == ""


def test_codec_summaries(tmp_path):
    s = run_json("codec", "stats", "--n", "2")
    assert (s["stage"], s["out"], s["skipped"], s["objects"]) == ("codec-stats", None, False, 2)
    assert 0 < s["voxel_iou"] <= 1
    out = tmp_path / "cb"
    out.mkdir()
    (out / "codec.json").write_text("{}")  # written last by a build: the directory holds a codebook
    s = run_json("codec", "build", "--n", "2", "--out", str(out))
    assert (s["stage"], s["out"], s["skipped"]) == ("codec-build", str(out), True)
    assert (out / "codec.json").read_text() == "{}"


def test_checkpoint_stage_summaries_when_complete(tmp_path):
    """train-scorer and rl-step skip an --out that is already complete, with the same shape."""
    scorer = tmp_path / "scorer"
    scorer.mkdir()
    (scorer / "scorer.json").write_text("{}")
    s = run_json("train-scorer", "--objects", str(tmp_path), "--renders", str(tmp_path), "--out", str(scorer))
    assert (s["stage"], s["out"], s["skipped"]) == ("train-scorer", str(scorer), True)
    step = tmp_path / "step"
    step.mkdir()
    (step / "rl_step.json").write_text("{}")
    inputs = tmp_path / "inputs"  # apart from --out: an --out inside an input is refused
    inputs.mkdir()
    s = run_json("rl-step", "--policy", str(inputs), "--samples", str(inputs), "--rewards", str(inputs),
                 "--out", str(step))
    assert (s["stage"], s["out"], s["skipped"]) == ("rl-step", str(step), True)


# commands that only read outputs and report on them: no seed, nothing to overwrite
REPORTERS = ("status", "learning-summary", "doctor")


def test_every_command_takes_the_common_options():
    for path, cmd in LEAVES.items():
        if path.split()[0] in REPORTERS:
            continue
        names = option_names(cmd)
        assert {"--seed", "--quiet", "--json"} <= names, path
        assert "--overwrite" in names or path in ("codec stats", "codec hash"), path  # they write nothing


@pytest.mark.parametrize("argv, suggestion", [(["rlstep"], "rl-step"), (["evl"], "eval"),
                                              (["codec", "biuld"], "build"),
                                              (["learning-summary", "heldot", "x"], "heldout")])
def test_mistyped_command_gets_did_you_mean(argv, suggestion):
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 2
    assert f"No such command '{argv[-2] if len(argv) == 3 else argv[-1]}'" in r.output
    assert f"Did you mean '{suggestion}'?" in r.output


def test_unlike_command_gets_no_guess():
    r = CliRunner().invoke(main, ["xyzzy"])
    assert r.exit_code == 2 and "No such command 'xyzzy'" in r.output and "Did you mean" not in r.output
    assert "rl3d --help" in r.output
