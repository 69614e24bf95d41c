"""Fingerprint every stage's output on a fixed seed, to prove a refactor changed no behaviour.

Runs synth -> gen -> render -> reward -> rl-step -> eval on the shipped default (small sizes,
CPU, a few minutes) into OUT, then prints one line per output file: its path and a hash of its
content. Parquet files hash their rows and their schema metadata with run-specific values
(absolute paths, wall times) masked; JSON files likewise; everything else hashes its bytes.

    python benchmarks/outputs_fingerprint.py OUT > before.txt   # on the old tree
    python benchmarks/outputs_fingerprint.py OUT2 > after.txt   # on the new tree
    diff before.txt after.txt                                   # empty: byte-identical behaviour
    python benchmarks/outputs_fingerprint.py --hash-only OUT    # hash an existing OUT again

Masked as run-specific: keys and metric names that are times or versions, config hashes (the
config holds absolute paths), and rl-step's rng_state.pt (numpy's global RNG is never seeded by
rl-step, so its saved state differs from run to run).
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

# values that legitimately differ between two runs of the same thing
VOLATILE_KEYS = re.compile(r"(time|seconds|elapsed|started|finished|created|duration|_s$|per_s|host|pid|version|"
                           r"config_hash)", re.I)
VOLATILE_FILES = ("rng_state.pt",)
# table ids name the run that made a table (its config holds absolute paths): left out, so outputs
# compare with those of rl3d before it recorded provenance
PROVENANCE_KEYS = (b"rl3d.table_id", b"rl3d.made_from")


REPO = str(Path(__file__).resolve().parents[1])  # policy ids hold the shipped policy's absolute path


def mask(value, root: str):
    if isinstance(value, dict):
        return {k: ("<volatile>" if VOLATILE_KEYS.search(k) else mask(v, root)) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [mask(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<OUT>").replace(REPO, "<REPO>")
    return value


def json_fingerprint(text: str, root: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return hashlib.sha256(text.replace(root, "<OUT>").replace(REPO, "<REPO>").encode()).hexdigest()[:16]
    return hashlib.sha256(json.dumps(mask(data, root), sort_keys=True).encode()).hexdigest()[:16]


def parquet_fingerprint(path: Path, root: str) -> str:
    table = pq.read_table(path)
    h = hashlib.sha256()
    if "name" in table.column_names and "value" in table.column_names:  # metric rows: mask timings
        keep = [not VOLATILE_KEYS.search(n) for n in table.column("name").to_pylist()]
        table = table.filter(keep)
    for name in table.column_names:
        if VOLATILE_KEYS.search(name):
            continue
        h.update(name.encode())
        h.update(json.dumps(mask(table.column(name).to_pylist(), root), default=str).encode())
    for key, value in sorted((table.schema.metadata or {}).items()):
        if key in PROVENANCE_KEYS:
            continue
        h.update(key)
        h.update(json_fingerprint(value.decode(errors="replace"), root).encode())
    return h.hexdigest()[:16]


def fingerprint(path: Path, root: str) -> str:
    if path.name in VOLATILE_FILES:
        return "<volatile>"
    if path.suffix == ".parquet":
        return parquet_fingerprint(path, root)
    if path.suffix in (".json", ".jsonl"):
        return json_fingerprint(path.read_text(), root)
    if path.suffix in (".md", ".html"):
        text = re.sub(r"\d+(\.\d+)? ?s\b", "<t>", path.read_text().replace(root, "<OUT>"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run(*args: str) -> None:
    subprocess.run(["rl3d", *args, "--quiet"], check=True)


def print_hashes(out: Path) -> None:
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"{path.relative_to(out)}  {fingerprint(path, str(out))}")


def main(out: Path) -> None:
    out = out.resolve()
    run("synth", "--n", "4", "--seed", "7", "--split", "train", "--out", str(out / "prompts"))
    run("gen", "--prompts", str(out / "prompts"), "--out", str(out / "gen"), "--group-size", "2",
        "--mode", "hi-grpo", "--seed", "1")
    # --supersample 1: the renders of rl3d before anti-aliasing (the default is 2)
    run("render", "--samples", str(out / "gen"), "--out", str(out / "renders"), "--views", "2",
        "--resolution", "64", "--supersample", "1")
    run("reward", "--samples", str(out / "gen"), "--renders", str(out / "renders"), "--config", "default",
        "--out", str(out / "rewards"))
    from rl3d.stages.policy import default_policy_dir
    run("rl-step", "--policy", str(default_policy_dir()), "--samples", str(out / "gen"), "--rewards",
        str(out / "rewards"), "--out", str(out / "policy"), "--lr", "1e-4", "--seed", "0",
        "--run-metrics", str(out / "metrics.parquet"))
    run("eval", "--bench", "synth-reasoning", "--limit", "1", "--samples-per-prompt", "1", "--views", "2",
        "--resolution", "64", "--supersample", "1", "--policy", str(out / "policy"), "--out", str(out / "eval"),
        "--grid-prompts", "2")
    print_hashes(out)


if __name__ == "__main__":
    if sys.argv[1] == "--hash-only":
        print_hashes(Path(sys.argv[2]).resolve())
    else:
        main(Path(sys.argv[1]))
