"""rl3d sft: sequence layout, completion-only labels, loss goes down, exact resume, exported policy."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from rl3d.cli.main import main
from rl3d.formats.codec import VoxelCodec
from rl3d.formats.voxels import PALETTE_NAMES, coarsen_grid, to_bytes
from rl3d.stages.supervised import data as sft_data
from rl3d.stages.policy.checkpoint import load_policy
from rl3d.stages.policy.sequence import build_prompt, build_sequence
from rl3d.stages.policy.tokenizer import build_tokenizer, mesh_token_offset, special_ids


def _grids(n, seed=0):
    rng = np.random.default_rng(seed)
    grids, rows = np.zeros((n, 32, 32, 32), np.uint8), []
    for i in range(n):
        w, h, d = rng.integers(3, 30, 3)
        c = int(rng.integers(1, 17))
        grids[i, :w, :h, :d] = c
        name = PALETTE_NAMES[c - 1]
        rows.append({"sample_id": f"syn-{i:06d}", "prompt_id": f"syn-{i:06d}", "prompt": f"a {name} box",
                     "plan": f"A box {w} wide, {h} tall and {d} deep.", "detail": f"One plain {name} block.",
                     "split": "eval" if i >= n - 2 else "train", "status": "ok"})
    return grids, rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftdata")
    grids, rows = _grids(14)
    codec = VoxelCodec.build(grids, 4)  # K = 65 mesh tokens: a small, fast vocabulary
    codec.save(d / "codec")
    for r, g in zip(rows, grids):
        r["voxels"] = to_bytes(g)
        r["mesh_tokens"] = codec.encode(g).tolist()
    rows[3]["status"] = "spec_error"  # failing rows are not trained on
    pq.write_table(pa.Table.from_pylist(rows), d / "objects.parquet")
    return {"dir": d, "table": d / "objects.parquet", "codec": d / "codec", "grids": grids, "rows": rows,
            "codec_obj": codec}


def _sft(data, out, *extra):
    args = ["sft", "--data", str(data["table"]), "--codec", str(data["codec"]), "--config", "tiny", "--out", str(out),
            "--batch-size", "2", "--lr", "3e-3", "--seed", "3", "--log-every", "1", "--eval-every", "100",
            "--quiet", "--json", *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sftrun") / "run"
    summary = _sft(data, out, "--steps", "6", "--save-every", "3")
    return out, summary


def test_sequences_match_the_policy_layout_and_labels_are_completion_only(data):
    codec, rows = data["codec_obj"], data["rows"][:3]
    tok = build_tokenizer([r["plan"] for r in rows], codec, 300)
    sp = special_ids(tok, codec)
    mesh = sft_data.mesh_targets({"n": 3, "voxels": pa.array([r["voxels"] for r in rows]), "mesh_tokens": None,
                             "source": "t"}, codec, ("coarse", "fine"))
    assert (mesh["coarse"][1] == codec.encode(coarsen_grid(data["grids"][1]))).all()
    assert (mesh["fine"][1] == codec.encode(data["grids"][1])).all()
    cols = {k: [r[k] for r in rows] for k in ("prompt", "plan", "detail")}
    for level in ("coarse", "fine", "single"):
        prompts, reasonings = sft_data.level_texts(cols, level)
        packed = sft_data.tokenize_sequences(tok, sp, prompts, reasonings, mesh["coarse" if level == "coarse" else "fine"])
        for i in range(3):
            want = build_sequence(tok, sp, prompts[i], reasonings[i],
                                  mesh["coarse" if level == "coarse" else "fine"][i])
            got = packed.ids[packed.offsets[i]:packed.offsets[i + 1]].tolist()
            assert got == want["input_ids"] and packed.prompt_lens[i] == want["prompt_len"]
    assert prompts[0] == build_prompt(rows[0]["prompt"], "single") and reasonings[0] == rows[0]["detail"]
    batch = sft_data.collate_packed(packed, [0, 2], tok.pad_token_id)
    lab, ids, mask = batch["labels"].numpy(), batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    for b, i in enumerate([0, 2]):
        n, p = packed.lengths[i], packed.prompt_lens[i]
        assert (lab[b, :p] == -100).all() and (lab[b, p:n] == ids[b, p:n]).all() and (lab[b, n:] == -100).all()
        assert mask[b, :n].all() and not mask[b, n:].any() and ids[b, n - 1] == tok.eos_token_id


def test_table_without_voxels_uses_mesh_tokens_and_decodes_for_coarse(data):
    codec, rows = data["codec_obj"], data["rows"][:2]
    toks = pa.array([r["mesh_tokens"] for r in rows], pa.list_(pa.int32()))
    mesh = sft_data.mesh_targets({"n": 2, "voxels": None, "mesh_tokens": toks, "source": "t"}, codec, ("coarse", "fine"))
    assert (mesh["fine"][0] == np.asarray(rows[0]["mesh_tokens"])).all()
    decoded = codec.decode(np.asarray(rows[0]["mesh_tokens"]))
    assert (mesh["coarse"][0] == codec.encode(coarsen_grid(decoded))).all()


def test_training_lowers_loss_and_exports_a_complete_policy(run, data):
    out, summary = run
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    assert summary["train_sequences"] == 2 * 11 and summary["eval_sequences"] == 2 * 2  # eval split, bad row out
    assert "eval_loss" in recs[-1] and np.isfinite(recs[-1]["eval_loss"])
    assert pq.read_table(out / "metrics.parquet").schema.metadata[b"rl3d.table"] == b"metrics"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = out / "final"
    meta = json.loads((final / "rl3d_policy.json").read_text())
    codec = data["codec_obj"]
    assert meta["step"] == 6 and meta["mode"] == "hi-grpo" and meta["model_class"] == "Qwen2ForCausalLM"
    assert meta["codec"] == "codec" and meta["codec_hash"] == codec.content_hash()
    assert VoxelCodec.load(final / meta["codec"]).content_hash() == codec.content_hash()
    model = AutoModelForCausalLM.from_pretrained(str(final))
    tok = AutoTokenizer.from_pretrained(str(final))
    assert model.config.pad_token_id == tok.pad_token_id and model.generation_config.eos_token_id == tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == mesh_token_offset(tok) + codec.vocab_size
    assert (final / "model.safetensors").is_file() and sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["step-000003", "step-000006"]

    pol = load_policy(final, device="cpu")
    assert pol.step == 6 and pol.special.k == codec.vocab_size


def test_resume_reproduces_the_uninterrupted_run(run, data, tmp_path):
    import shutil

    from safetensors.torch import load_file

    out, _ = run
    other = tmp_path / "run"
    _sft(data, other, "--steps", "6", "--save-every", "3")
    # simulate a run killed after its step-3 checkpoint (and after logging step 4)
    shutil.rmtree(other / "checkpoints" / "step-000006")
    shutil.rmtree(other / "final")
    summary = _sft(data, other, "--steps", "6", "--save-every", "3")
    assert summary["resumed_from"] == 3
    a, b = load_file(out / "final" / "model.safetensors"), load_file(other / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(x) for x in (other / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    # done: a rerun is skipped; a different recipe in the same dir is refused
    assert _sft(data, other, "--steps", "6", "--save-every", "3")["skipped"] is True
    res = CliRunner().invoke(main, ["sft", "--data", str(data["table"]), "--codec", str(data["codec"]), "--config",
                                    "tiny", "--out", str(other), "--steps", "6", "--lr", "1e-4", "--seed", "3",
                                    "--batch-size", "2"])
    assert res.exit_code == 2 and "lr" in res.stderr and "--overwrite" in res.stderr


def test_missing_column_exits_2_naming_file_and_column(data, tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a box"], "detail": ["x"], "voxels": [data["rows"][0]["voxels"]]}), bad)
    res = CliRunner().invoke(main, ["sft", "--data", str(bad), "--config", "tiny", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "'plan'" in lines[0]
    res = CliRunner().invoke(main, ["sft", "--data", str(bad), "--config", "huge", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "huge" in res.stderr


def test_process_pool_encoding_matches_serial(data, monkeypatch):
    rows = data["rows"]
    tbl = {"n": len(rows), "voxels": pa.array([r["voxels"] for r in rows]), "mesh_tokens": None, "source": "t"}
    serial = sft_data.mesh_targets(tbl, data["codec_obj"], ("coarse", "fine"), workers=1)
    monkeypatch.setattr(sft_data, "ENCODE_CHUNK", 3)
    pooled = sft_data.mesh_targets(tbl, data["codec_obj"], ("coarse", "fine"), workers=2)
    assert all((serial[k] == pooled[k]).all() for k in serial)


def test_resume_never_picks_a_checkpoint_a_kill_left_half_written(tmp_path):
    from rl3d.stages.supervised.checkpoints import STATE_FILE, latest_checkpoint

    for name in ("step-000001", "step-000002.tmp"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / STATE_FILE).write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "step-000001"


def _dead_pid() -> int:
    from rl3d.formats.shards import pid_alive

    return next(p for p in range(4_194_000, 4_000_000, -1) if not pid_alive(p))


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_killed_after_the_last_checkpoint_keeps_the_eval_numbers(run, data, tmp_path):
    """Killed while writing final/ (the last checkpoint already saved): the rerun runs no step and
    exports the same final/ as the uninterrupted run, eval numbers included, and removes the temp
    dir the killed export left."""
    import shutil

    out, _ = run
    other = tmp_path / "run"
    shutil.copytree(out, other)
    shutil.rmtree(other / "final")
    stale = other / f".final.tmp-{_dead_pid()}"
    (stale / "codec").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    summary = _sft(data, other, "--steps", "6", "--save-every", "3")
    assert summary["resumed_from"] == 6
    meta = json.loads((other / "final" / "rl3d_policy.json").read_text())
    assert set(meta["eval"]) == {"eval_loss", "eval_mesh_loss", "eval_mesh_acc"}
    assert summary["eval_loss"] == meta["eval"]["eval_loss"]
    assert _files(other / "final") == _files(out / "final")
    assert not stale.exists()


def test_resumed_run_saves_the_same_tokenizer_files(run, data, tmp_path):
    """A tokenizer loaded back from a checkpoint saves no loader keywords (is_local,
    local_files_only): the resumed run's checkpoints and final/ equal the uninterrupted run's."""
    import shutil

    out, _ = run
    other = tmp_path / "run"
    shutil.copytree(out, other)
    shutil.rmtree(other / "checkpoints" / "step-000006")
    shutil.rmtree(other / "final")
    assert _sft(data, other, "--steps", "6", "--save-every", "3")["resumed_from"] == 3
    for d in ("final", "checkpoints/step-000006"):
        cfg = json.loads((other / d / "tokenizer_config.json").read_text())
        assert not {"is_local", "local_files_only"} & set(cfg), d
        got, want = _files(other / d), _files(out / d)
        assert got.keys() == want.keys()
        assert [k for k in want if k != "trainer_state.pt" and got[k] != want[k]] == [], d


def test_strip_loader_keys_keeps_what_the_tokenizer_is(tmp_path):
    from rl3d.stages.policy import default_policy_dir
    from rl3d.stages.policy.tokenizer import load_tokenizer, strip_loader_keys

    tok = load_tokenizer(default_policy_dir())
    assert strip_loader_keys(tok) == ["is_local", "local_files_only"]
    tok.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    shipped = json.loads((default_policy_dir() / "tokenizer_config.json").read_text())
    assert saved == shipped
