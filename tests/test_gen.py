"""`rl3d gen`: constrained sampling, stored log-probs, seeds, sharding, resume, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from helpers import make_tiny_policy

from rl3d.cli.main import main
from rl3d.formats import tables
from rl3d.stages import gen
from rl3d.stages.policy.checkpoint import load_policy
from rl3d.stages.policy.sampler import Sampling, completion_logprobs, sample_tokens, uniform_draws
from rl3d.stages.policy.sequence import INSTRUCTIONS, build_prompt, collate, encode_text

PROMPTS = [{"prompt_id": "p-chair", "prompt": "a red chair", "category": "furniture", "spec": '{"legs": 4}'},
           {"prompt_id": "p-table", "prompt": "a tall blue table", "category": "furniture", "spec": '{"legs": 1}'},
           {"prompt_id": "p-box", "prompt": "a green box", "category": "box", "spec": "{}"}]
SAMPLING = Sampling(max_reasoning_tokens=12)
torch.set_num_threads(1)  # tiny models: intra-op threads only add contention on a shared machine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_policy(tmp_path_factory.mktemp("pol") / "policy")


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_policy(tiny, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return f


@pytest.fixture(scope="module")
def hi_rows(loaded):
    return gen.generate(loaded, PROMPTS[:2], "hi-grpo", group_size=2, seed=7, sampling=SAMPLING, batch_size=8)


def test_spans_and_exactly_m_mesh_tokens(loaded, hi_rows):
    sp, M = loaded.special, loaded.codec.seq_len
    assert [r["sample_id"] for r in hi_rows] == [f"{p}-{k}-{lv}" for lv in ("coarse", "fine")
                                                 for p in ("p-chair", "p-table") for k in range(2)]
    text = set(sp.text_ids.tolist())
    truncated = []
    for r in hi_rows:
        ids = r["input_ids"]
        assert r["reasoning_start"] == r["prompt_len"] and r["mesh_start"] == r["reasoning_end"] + 1
        assert r["mesh_end"] - r["mesh_start"] == M and len(r["mesh_tokens"]) == M
        assert set(ids[r["prompt_len"]:r["reasoning_end"]]) <= text
        assert ids[r["reasoning_end"]] == sp.mesh_start
        assert np.array_equal(sp.mesh_ids[torch.as_tensor(r["mesh_tokens"], dtype=torch.long)].numpy(),
                              ids[r["mesh_start"]:r["mesh_end"]])
        assert ids[r["mesh_end"]:] == [sp.mesh_end, sp.eos]
        assert r["mesh_tokens"].min() >= 0 and r["mesh_tokens"].max() < loaded.codec.vocab_size
        assert len(r["logprobs"]) == len(ids) - r["prompt_len"] and r["logprobs"].dtype == np.float32
        n = r["reasoning_end"] - r["prompt_len"]
        sampled = np.delete(r["logprobs"][:-2], [n] if r["reasoning_truncated"] else [])
        assert (r["logprobs"][-2:] == 0).all() and (sampled < 0).all()
        assert r["reasoning_truncated"] == (n == SAMPLING.max_reasoning_tokens)
        truncated.append(r["reasoning_truncated"])
        assert r["status"] == "ok" and r["mesh_path"] is None
    assert any(truncated) and not all(truncated)  # both ends of reasoning occur: budget and <mesh-start>
    # the fine prompt carries the coarse plan of the same trajectory
    coarse = {(r["prompt_id"], r["sample_index"]): r for r in hi_rows if r["level"] == "coarse"}
    for r in hi_rows:
        if r["level"] == "fine":
            plan = coarse[(r["prompt_id"], r["sample_index"])]["reasoning"]
            prompt = build_prompt(r["prompt"], "fine", plan=plan)
            assert r["input_ids"][:r["prompt_len"]] == encode_text(loaded.tokenizer, prompt)


def test_stored_logprobs_equal_recomputed(loaded, hi_rows):
    b = collate(hi_rows, loaded.special)
    with torch.no_grad():
        lp, mask = completion_logprobs(loaded.model, b["input_ids"], b["attention_mask"], b["prompt_lens"],
                                           b["kinds"], loaded.special, SAMPLING.temperature)
    for i, r in enumerate(hi_rows):
        n = len(r["logprobs"])
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert np.abs(lp[i, :n].numpy() - r["logprobs"]).max() < 1e-4
        if r["reasoning_truncated"]:
            assert r["logprobs"][r["reasoning_end"] - r["prompt_len"]] == 0  # forced <mesh-start>


def test_seeds_reproduce_and_batching_does_not_matter(loaded, hi_rows):
    again = gen.generate(loaded, PROMPTS[1:2], "hi-grpo", group_size=2, seed=7, sampling=SAMPLING, batch_size=3)
    want = [r for r in hi_rows if r["prompt_id"] == "p-table"]
    for a, b in zip(again, want):
        assert a["sample_id"] == b["sample_id"] and a["input_ids"] == b["input_ids"]
        assert np.abs(a["logprobs"] - b["logprobs"]).max() < 1e-4
    other = gen.generate(loaded, PROMPTS[1:2], "flat", group_size=2, seed=8, sampling=SAMPLING, batch_size=8)
    assert other[0]["mesh_tokens"].tolist() != want[0]["mesh_tokens"].tolist()
    assert other[0]["mesh_tokens"].tolist() != other[1]["mesh_tokens"].tolist()  # a group is diverse


def test_top_k_top_p_restrict_the_support():
    masked = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * 200] * 400))
    seeds = torch.arange(400)
    tok, lp = sample_tokens(masked, seeds, 0)
    assert set(tok.tolist()) == {0, 1, 2, 3}
    assert torch.allclose(lp, masked.gather(1, tok[:, None])[:, 0], atol=1e-6)
    tok, _ = sample_tokens(masked, seeds, 0, top_p=0.7)  # nucleus {0, 1}
    assert set(tok.tolist()) == {0, 1} and 0.55 < (tok == 0).float().mean() < 0.7
    tok, _ = sample_tokens(masked, seeds, 0, top_k=1)
    assert set(tok.tolist()) == {0}
    u = uniform_draws(seeds, 3)
    assert (u > 0).all() and (u < 1).all() and abs(float(u.mean()) - 0.5) < 0.05


def _read(out: Path):
    t = tables.read_table(out, "samples")
    return {r["sample_id"]: r for r in t.to_pylist()}, t


def test_cli_flat_and_hi_grpo_tables(tiny, prompts_file, tmp_path):
    r = CliRunner().invoke(main, ["gen", "--prompts", str(prompts_file), "--policy", str(tiny), "--mode", "flat",
                                  "-G", "2", "--max-reasoning-tokens", "4", "--out", str(tmp_path / "flat"),
                                  "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["rows"] == 6 and summary["ok"] + summary["decode_error"] == 6
    rows, t = _read(tmp_path / "flat")
    assert {x["level"] for x in rows.values()} == {"single"}
    assert rows["p-chair-1-single"]["category"] == "furniture" and rows["p-chair-1-single"]["spec"] == '{"legs": 4}'
    ok = [x for x in rows.values() if x["status"] == "ok"]
    assert ok and all(Path(x["mesh_path"]).is_file() for x in ok)
    assert tables.table_policy(tmp_path / "flat").endswith("#step3")
    cfg = tables.table_config(tmp_path / "flat")
    assert cfg["instructions"] == {"single": INSTRUCTIONS["single"]} and cfg["sampling"]["max_reasoning_tokens"] == 4
    # hi-grpo: shard 0/2 + 1/2 == unsharded; a group never straddles shards
    args = ["gen", "--prompts", str(prompts_file), "--policy", str(tiny), "-G", "2", "--max-reasoning-tokens", "4",
            "--quiet", "--seed", "3"]
    assert CliRunner().invoke(main, args + ["--out", str(tmp_path / "all")]).exit_code == 0
    for i in range(2):
        r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "sh"), "--shard", f"{i}/2"])
        assert r.exit_code == 0, r.output
    full, t = _read(tmp_path / "all")
    assert len(full) == 12 and tables.table_config(tmp_path / "all")["instructions"].keys() == {"coarse", "fine"}
    shards = [pq.read_table(f).column("prompt_id").to_pylist() for f in sorted((tmp_path / "sh").glob("part-*"))]
    assert not set(shards[0]) & set(shards[1])
    union, _ = _read(tmp_path / "sh")
    assert union.keys() == full.keys()
    for k in full:
        assert union[k]["input_ids"] == full[k]["input_ids"]
        assert np.allclose(union[k]["logprobs"], full[k]["logprobs"], atol=1e-4)


def test_killed_gen_resumes_without_duplicates(tiny, prompts_file, tmp_path):
    out = tmp_path / "g"
    args = ["gen", "--prompts", str(prompts_file), "--policy", str(tiny), "--mode", "flat", "-G", "1",
            "--max-reasoning-tokens", "2", "--out", str(out), "--quiet", "--json"]
    assert CliRunner().invoke(main, args).exit_code == 0
    first, _ = _read(out)
    (out / "_shards" / "00000-of-00001.json").unlink()  # as if killed before the marker landed
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] is False
    again, t = _read(out)
    assert t.num_rows == 3 and again.keys() == first.keys()
    assert len(list(out.glob("part-*.parquet"))) == 1
    r = CliRunner().invoke(main, args)  # complete now: skipped
    assert json.loads(r.stdout)["skipped"] is True


def test_gen_reads_and_hashes_the_policy_once(tiny, prompts_file, tmp_path, monkeypatch):
    """The id (a hash of every weight byte, up to 1 GiB) and the tokenizer come from one read of the
    dir: the prompt-length guard and the model load use the same objects, and a finished run loads
    no model."""
    from rl3d.stages.policy import checkpoint

    calls = {"hash": 0, "tokenizer": 0, "model": 0}

    def counted(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(checkpoint, "weights_hash", counted("hash", checkpoint.weights_hash))
    monkeypatch.setattr(checkpoint, "load_tokenizer", counted("tokenizer", checkpoint.load_tokenizer))
    monkeypatch.setattr(checkpoint, "model_vocab_size", counted("model", checkpoint.model_vocab_size))
    args = ["gen", "--prompts", str(prompts_file), "--policy", str(tiny), "--mode", "flat", "-G", "1",
            "--max-reasoning-tokens", "2", "--out", str(tmp_path / "g"), "--quiet", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert calls == {"hash": 1, "tokenizer": 1, "model": 1}
    assert tables.table_policy(tmp_path / "g").endswith("#step3")
    r = CliRunner().invoke(main, args)  # done: the dir is read once more, the model never loads
    assert json.loads(r.stdout)["skipped"] is True and calls == {"hash": 2, "tokenizer": 2, "model": 1}


def test_no_meshes_writes_the_same_rows_without_glbs(tiny, prompts_file, tmp_path):
    args = ["gen", "--prompts", str(prompts_file), "--policy", str(tiny), "--mode", "flat", "-G", "2",
            "--max-reasoning-tokens", "2", "--seed", "5", "--quiet"]
    assert CliRunner().invoke(main, args + ["--out", str(tmp_path / "with")]).exit_code == 0
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "without"), "--no-meshes"])
    assert r.exit_code == 0, r.output
    with_meshes, _ = _read(tmp_path / "with")
    without, _ = _read(tmp_path / "without")
    assert with_meshes.keys() == without.keys()
    for k, row in without.items():
        assert row["input_ids"] == with_meshes[k]["input_ids"] and row["status"] == with_meshes[k]["status"]
        assert row["mesh_path"] is None
    assert any(x["mesh_path"] for x in with_meshes.values()) and not (tmp_path / "without/_meshes").exists()
    assert tables.table_config(tmp_path / "without")["meshes"] is False
    assert "meshes" not in tables.table_config(tmp_path / "with")  # the default's config is unchanged
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "x"), "--no-meshes", "--texture-hook", "cmd:true"])
    assert r.exit_code == 2 and "--no-meshes" in r.output


def test_mesh_writer_finishes_every_write_and_raises_a_failed_one(tmp_path, monkeypatch):
    grid = np.zeros((32, 32, 32), np.uint8)
    grid[:4, :4, :4] = 3
    (tmp_path / "_meshes").mkdir()
    with gen.MeshWriter(tmp_path, workers=2) as write:
        paths = [write(grid, f"s{i}") for i in range(6)]
    assert paths == [f"_meshes/s{i}.glb" for i in range(6)]
    assert all((tmp_path / p).stat().st_size > 0 for p in paths)
    with gen.MeshWriter(None) as write:
        assert write(grid, "s0") is None

    def broken(mesh, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gen, "write_glb", broken)
    with pytest.raises(OSError, match="No space left"):
        with gen.MeshWriter(tmp_path, workers=2) as write:
            write(grid, "t0")


def test_empty_grid_is_kept_as_decode_error(loaded, tmp_path, monkeypatch):
    monkeypatch.setattr(loaded.codec, "decode_batch", lambda t: np.zeros((len(t), 32, 32, 32), np.uint8))
    rows = gen.generate(loaded, PROMPTS[:1], "flat", group_size=1, seed=0, sampling=Sampling(max_reasoning_tokens=1),
                        out_dir=tmp_path)
    assert rows[0]["status"] == "decode_error" and "empty" in rows[0]["message"] and rows[0]["mesh_path"] is None
    assert len(rows[0]["mesh_tokens"]) == 512
    tables.validate(gen.samples_table(rows), "samples", "test")


def test_cli_errors(tmp_path, prompts_file):
    r = CliRunner().invoke(main, ["gen", "--prompts", str(prompts_file), "--policy", str(tmp_path / "missing"),
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    lines = [x for x in r.output.strip().splitlines() if x]
    assert len(lines) == 1 and "not found" in lines[0] and "missing" in lines[0]
    r = CliRunner().invoke(main, ["gen", "--prompts", str(tmp_path / "nope.txt"), "--policy", str(tmp_path),
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not found" in r.output


def test_corrupt_weights_are_a_clear_error(tiny, tmp_path):
    """NaN weights (e.g. a diverged update) must not turn into silently garbled samples."""
    policy = load_policy(tiny, device="cpu", dtype="float32")
    with torch.no_grad():
        policy.model.get_output_embeddings().weight.fill_(float("nan"))
    from rl3d.formats.errors import InputError

    with pytest.raises(InputError, match="non-finite log-probs"):
        gen.generate(policy, PROMPTS[:1], "flat", group_size=2, seed=1, sampling=SAMPLING, batch_size=4)


def test_progress_inside_a_batch_counts_sequences_and_tokens(loaded, capsys, monkeypatch):
    """A CPU batch can take minutes: gen reports during a batch (tokens sampled, tokens per second),
    after each batch (sequences done of all levels' total, sequences per second), and at the end of
    each level; the same rows as a silent run; nothing with --quiet."""
    from rl3d.stages.contract import Progress

    monkeypatch.setattr(gen, "PLAIN_EVERY_S", 0.0)  # a line at every report point
    rows = gen.generate(loaded, PROMPTS[:2], "hi-grpo", group_size=2, seed=7, sampling=SAMPLING, batch_size=8,
                        progress=Progress(quiet=False))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[rl3d] gen ")]
    first = lines[0]  # after the first sampled token of the first batch, before any sequence is done
    assert first.startswith("[rl3d] gen coarse: 0/8 sequences (0%), 4 tokens; 0.00 seq/s, ")
    assert "tok/s" in first and "ETA" not in first
    tokens = [int(ln.split("sequences (")[1].split("), ")[1].split(" tokens")[0].replace(",", "")) for ln in lines]
    assert tokens == sorted(tokens)  # cumulative
    done = [ln for ln in lines if " 4/8 sequences" in ln]
    assert done and done[0].startswith("[rl3d] gen coarse: 4/8 sequences (50%)") and "ETA" in done[0]
    assert lines[-1].startswith("[rl3d] gen fine: 8/8 sequences (100%)")
    # every sampled token counted: prompt tokens excluded, forced <mesh-end>/eos not sampled
    assert tokens[-1] == sum(len(r["logprobs"]) - 2 for r in rows)
    assert [r["input_ids"] for r in rows] == [r["input_ids"] for r in gen.generate(
        loaded, PROMPTS[:2], "hi-grpo", group_size=2, seed=7, sampling=SAMPLING, batch_size=8)]
    assert capsys.readouterr().err == ""  # without a progress: quiet
