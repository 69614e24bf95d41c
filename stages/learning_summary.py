"""Summarise a learning run (examples/learning_run.sh): held-out reward per evaluated step, per
level and per reward term, mean and spread over sampling seeds. `python -m rl3d.stages.learning_summary RUN`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from rl3d.formats import tables


def heldout_table(run: Path) -> list[dict]:
    rows = []
    for step_dir in sorted((run / "eval").glob("step-*")):
        per_seed: dict[str, list[float]] = {}
        for seed_dir in sorted(step_dir.glob("seed-*")):
            if not (seed_dir / "rewards" / "_manifest.json").exists():
                continue
            t = tables.read_table(seed_dir / "rewards", "rewards").to_pylist()
            for level in ("coarse", "fine"):
                vals = [r["total"] for r in t if r["level"] == level and r["total"] is not None]
                per_seed.setdefault(f"total_{level}", []).append(float(np.mean(vals)))
                for term in sorted({k[:-4] for k in t[0] if k.endswith("_raw")}):
                    v = [r[f"{term}_raw"] for r in t if r["level"] == level and r.get(f"{term}_raw") is not None]
                    if v:
                        per_seed.setdefault(f"{term}_{level}", []).append(float(np.mean(v)))
        if per_seed:
            row = {"step": int(step_dir.name.split("-")[1]), "seeds": len(per_seed["total_fine"])}
            for k, v in per_seed.items():
                row[k] = float(np.mean(v))
                row[k + "_seed_std"] = float(np.std(v))
            rows.append(row)
    return rows


def main(argv=None):
    run = Path((argv or sys.argv[1:])[0])
    rows = heldout_table(run)
    (run / "heldout_rewards.json").write_text(json.dumps(rows, indent=2))
    keys = [k for k in rows[0] if not k.endswith("_seed_std") and k not in ("step", "seeds")] if rows else []
    print("step  " + "  ".join(keys))
    for r in rows:
        print(f"{r['step']:>4}  " + "  ".join(f"{r[k]:.4f}" for k in keys))


if __name__ == "__main__":
    main()
