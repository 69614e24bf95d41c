"""`rl3d doctor` on tiny replicas: a good setup passes; each broken thing gets its own PROBLEM line
saying what is wrong and how to fix it; exit 0 / 3 / 2."""
import json
import shutil
import socket
import sys

import pytest
from click.testing import CliRunner

from helpers import (SPECIALS, TINY_HPS_ARCH, WORDS, build_tiny_clip, build_tiny_hps, build_tiny_qwen_vl,
                     chat_server, make_tiny_policy, open_clip_missing, tiny_tokenizer)

from rl3d.cli.main import main

CONFIG = """
name = "doctor-test"
[[levels.coarse]]
name = "clip_score"
backend = "clip"
options = {{ model = "{clip}" }}
{hps_terms}
[[levels.fine]]
name = "appearance"
backend = "vlm"
aggregate = "none"
options = {{ rubric = "appearance", model = "{judge}" }}
[[levels.fine]]
name = "unified"
backend = "vlm"
options = {{ rubric = "alignment", endpoint = "{endpoint}", model_name = "judge", api_key_env = "RL3D_TEST_KEY" }}
[[levels.single]]
name = "stability"
backend = "geometry"
aggregate = "none"
"""
HPS_TERMS = """
[[levels.coarse]]
name = "hps"
backend = "hps"
options = {{ checkpoint = "{hps}", arch = "{arch}" }}
[[levels.fine]]
name = "hps"
backend = "hps"
options = {{ checkpoint = "{hps}", arch = "{arch}" }}
"""
# Without a usable open_clip the good setup leaves HPS out (its absence is checked on its own below).
NO_OPEN_CLIP = open_clip_missing()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("doctor")
    return {"policy": make_tiny_policy(d / "policy"), "clip": build_tiny_clip(d / "clip"),
            "hps": None if NO_OPEN_CLIP else build_tiny_hps(d / "hps"), "judge": build_tiny_qwen_vl(d / "judge"),
            "root": d}


def write_config(path, models, endpoint, with_hps=None, **over):
    with_hps = not NO_OPEN_CLIP if with_hps is None else with_hps
    vals = dict(clip=models["clip"], hps=models["hps"], arch=TINY_HPS_ARCH, judge=models["judge"], endpoint=endpoint)
    vals.update(over)
    vals["hps_terms"] = HPS_TERMS.format(**vals) if with_hps else ""
    path.write_text(CONFIG.format(**vals))
    return path


def doctor(*args):
    res = CliRunner().invoke(main, ["doctor", *map(str, args)], catch_exceptions=False)
    return res.exit_code, res.stdout


def problems(out):
    return [ln for ln in out.splitlines() if ln.startswith("PROBLEM")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_good_setup_passes(models, tmp_path, monkeypatch):
    monkeypatch.setenv("RL3D_TEST_KEY", "secret")
    hook = tmp_path / "paint.py"
    hook.write_text("pass")
    with chat_server(lambda n, b: (200, "ok", 0)) as srv:
        cfg = write_config(tmp_path / "r.toml", models, srv.url + "/v1")
        code, out = doctor("--policy", models["policy"], "--rewards", cfg,
                           "--texture-hook", f"{sys.executable} {hook} {{glb}} {{out}}")
    assert code == 0, out
    assert problems(out) == []
    lines = out.splitlines()
    mesh = next(ln for ln in lines if "policy mesh tokens" in ln)
    assert "codec has 33 tokens" in mesh and "(contiguous)" in mesh and "<mesh0>..<mesh32> = ids" in mesh
    for what in ("policy model:", "policy model weights:", "policy codec:", "policy embeddings:",
                 "reward coarse.clip_score (clip):", "reward fine.appearance (vlm):",
                 "reward fine.unified (vlm):", "reward single.stability (geometry):", "texture hook:"):
        assert any(ln.startswith("ok") and what in ln for ln in lines), what
    if not NO_OPEN_CLIP:
        assert any(ln.startswith("ok       reward coarse.hps (hps): ") for ln in lines)
        assert any("reward fine.hps" in ln and "same backend and options as coarse.hps" in ln for ln in lines)
    assert "serves 'judge'" in out

    code, js = doctor("--policy", models["policy"], "--json")
    assert code == 0 and all(json.loads(ln)["ok"] for ln in js.splitlines())


def test_broken_policy_pieces(models, tmp_path):
    code, out = doctor("--policy", tmp_path / "nope")
    assert code == 3 and problems(out) == [f"PROBLEM  policy: {tmp_path / 'nope'} does not exist -> fix: pass --policy "
                                           "the dir written by rl3d sft / rl-step, or a converted checkpoint "
                                           "(docs/checkpoints.md)"]

    # a tokenizer without mesh tokens
    from tokenizers import AddedToken, Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bare = tmp_path / "bare"
    shutil.copytree(models["policy"], bare)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / f).unlink(missing_ok=True)
    tk = Tokenizer(tok_models.WordLevel({t: i for i, t in enumerate(SPECIALS[:3] + WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS[:3]])
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>",
                            unk_token="[UNK]").save_pretrained(bare)
    code, out = doctor("--policy", bare)
    assert code == 3
    [line] = problems(out)
    assert line.startswith("PROBLEM  policy mesh tokens: codec has 33 tokens; missing <mesh-start>, <mesh-end>, "
                           "<mesh0>..<mesh32> (33 of 33)") and "add_mesh_tokens(tokenizer, 33)" in line

    # a codec whose vocabulary differs from the tokenizer's mesh tokens
    import numpy as np
    from rl3d.formats.codec import VoxelCodec

    other = tmp_path / "other"
    shutil.copytree(models["policy"], other)
    g = np.zeros((1, 32, 32, 32), np.uint8)
    g[0, 4:12, 0:8, 4:20] = 3
    shutil.rmtree(other / "codec")
    VoxelCodec.build(g, n_patterns=1).save(other / "codec")  # K = 17, the tokenizer has 33
    meta = json.loads((other / "rl3d_policy.json").read_text())
    meta.pop("codec_hash")
    (other / "rl3d_policy.json").write_text(json.dumps(meta))
    code, out = doctor("--policy", other)
    assert code == 3
    [line] = problems(out)
    assert "policy mesh tokens: codec has 17 tokens" in line and "also has <mesh17>" in line
    assert "built for a larger codec" in line

    # truncated weights
    cut = tmp_path / "cut"
    shutil.copytree(models["policy"], cut)
    w = cut / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    code, out = doctor("--policy", cut)
    assert code == 3
    [line] = problems(out)
    assert line.startswith(f"PROBLEM  policy model weights: {w}: the header describes") and "truncated" in line
    assert "copy or download the file again" in line


def test_broken_rewards(models, tmp_path, monkeypatch):
    monkeypatch.delenv("RL3D_TEST_KEY", raising=False)
    down = f"http://127.0.0.1:{free_port()}/v1"
    cfg = write_config(tmp_path / "r.toml", models, down, with_hps=True, hps=tmp_path / "no_hps.pt")
    code, out = doctor("--rewards", cfg)
    assert code == 3
    p = [ln for ln in problems(out) if "(hps) package:" not in ln]   # open_clip's own line, if missing here
    assert len(p) == 3, out   # the hps file (said once; the fine term points back to it), the key
    assert p[0].startswith(f"PROBLEM  reward coarse.hps (hps): HPS checkpoint {tmp_path / 'no_hps.pt'} does not exist")
    assert "reward fine.hps (hps): same backend and options as coarse.hps (see above)" in p[1]
    assert p[2] == ("PROBLEM  reward fine.unified (vlm): api_key_env names RL3D_TEST_KEY, which is unset "
                    "-> fix: export RL3D_TEST_KEY=<your key>")
    if NO_OPEN_CLIP:
        assert "PROBLEM  reward coarse.hps (hps) package: open_clip is" in out and "pip install 'rl3d[hps]'" in out

    monkeypatch.setenv("RL3D_TEST_KEY", "k")
    code, out = doctor("--rewards", cfg, "--timeout", "1")
    [line] = [ln for ln in problems(out) if "unified" in ln]
    assert f"GET {down}/models: unreachable" in line and "start the server" in line

    with chat_server(lambda n, b: (200, "ok", 0), served=("other",)) as srv:
        code, out = doctor("--rewards", write_config(tmp_path / "r2.toml", models, srv.url + "/v1"))
    [line] = [ln for ln in problems(out) if "unified" in ln]
    assert "serves other, not 'judge'" in line


def test_paper_preset_without_env_says_what_to_export(monkeypatch):
    for v in ("RL3D_HPS_CHECKPOINT", "RL3D_JUDGE_MODEL_DIR", "RL3D_JUDGE_ENDPOINT", "RL3D_QWEN_MODEL_DIR",
              "RL3D_QWEN_ENDPOINT"):
        monkeypatch.delenv(v, raising=False)
    code, out = doctor("--rewards", "paper")
    assert code == 3
    p = problems(out)
    assert any("coarse.hps" in ln and "RL3D_HPS_CHECKPOINT is unset" in ln and "export RL3D_HPS_CHECKPOINT=..." in ln
               for ln in p)
    judge = next(ln for ln in p if "coarse.unified_alignment" in ln)
    assert "neither model nor endpoint" in judge
    assert "export RL3D_JUDGE_MODEL_DIR=... or export RL3D_JUDGE_ENDPOINT=..." in judge


def test_wrong_model_class_and_missing_dir(models, tmp_path):
    cfg = tmp_path / "r.toml"
    cfg.write_text(f"""
[[levels.coarse]]
name = "clip_score"
backend = "clip"
options = {{ model = "{models['judge']}" }}
[[levels.fine]]
name = "judge"
backend = "vlm"
options = {{ rubric = "alignment", model = "{tmp_path / 'gone'}" }}
""")
    code, out = doctor("--rewards", cfg)
    p = problems(out)
    assert code == 3 and len(p) == 2
    assert "model_type 'qwen2_5_vl' (Qwen2_5_VLConfig) cannot be loaded as CLIPModel" in p[0]
    assert f"{tmp_path / 'gone'} does not exist" in p[1] and "Qwen2.5-VL" in p[1]


def test_texture_hook_checks():
    code, out = doctor("--texture-hook", "/no/such/painter {glb} {out}")
    assert code == 3 and "program '/no/such/painter' not found" in out
    code, out = doctor("--texture-hook", "painter {glb}")
    assert code == 3 and "must name {out}" in out
    code, out = doctor("--texture-hook", "no_such_module_xyz:paint")
    assert code == 3 and "module 'no_such_module_xyz' is not importable" in out
    code, out = doctor("--texture-hook", "json:dumps")
    assert code == 0 and out.startswith("ok       texture hook: entry point json:dumps")


def test_bad_input_exits_2():
    res = CliRunner().invoke(main, ["doctor"])
    assert res.exit_code == 2 and "nothing to check" in res.stderr
    res = CliRunner().invoke(main, ["doctor", "--rewards", "default", "--timeout", "0"])
    assert res.exit_code == 2 and "--timeout" in res.stderr


def test_policy_with_the_64_vqvae_codec(models, tmp_path):
    """A policy whose codec is a 64^3 VQ-VAE dir: checked from the checkpoint's header (K = its codebook)."""
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from rl3d.stages.codecs.vqvae64 import VQVAE64Codec, make_block_replica

    vq = tmp_path / "vq"
    shutil.copytree(models["policy"], vq)
    shutil.rmtree(vq / "codec")
    VQVAE64Codec(make_block_replica()).save(vq / "codec")          # codebook of 16
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (vq / f).unlink(missing_ok=True)
    tiny_tokenizer(SimpleNamespace(vocab_size=16)).save_pretrained(vq)
    meta = json.loads((vq / "rl3d_policy.json").read_text())
    meta.pop("codec_hash")
    (vq / "rl3d_policy.json").write_text(json.dumps(meta))
    code, out = doctor("--policy", vq)
    assert code == 0, out
    assert "ok       policy codec: " in out and "64^3 VQ-VAE, channels [2, 2, 2], codebook 16x32" in out
    assert "codec has 16 tokens; <mesh0>..<mesh15> = ids" in out

    ckpt = vq / "codec" / "3DVQVAE.safetensors"
    state = load_file(ckpt)
    state.pop(sorted(state)[0])
    save_file(state, ckpt)
    code, out = doctor("--policy", vq)
    assert code == 3
    [line] = problems(out)
    assert line.startswith("PROBLEM  policy codec: ") and "missing 1 key(s)" in line


# ---- the paper's model class: what doctor names before gen would fail -------------------------------

def test_missing_policy_metadata_is_one_problem_with_the_class_to_write(models):
    """A Qwen2.5-VL checkpoint without rl3d_policy.json: one PROBLEM (not also 'cannot be loaded as
    AutoModelForCausalLM'); the fix names the class config.json's architectures gives and the doc."""
    code, out = doctor("--policy", models["judge"])
    assert code == 3
    [line] = problems(out)
    assert line.startswith(f"PROBLEM  policy metadata: {models['judge'] / 'rl3d_policy.json'} is missing")
    assert '"model_class": "Qwen2_5_VLForConditionalGeneration"' in line and "(docs/checkpoints.md)" in line
    assert "ok       policy model: " in out and "Qwen2_5_VLForConditionalGeneration" in out


def test_auto_map_of_a_known_model_type_is_named(models, tmp_path):
    d = tmp_path / "mapped"
    shutil.copytree(models["policy"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MyCausalLM", "AutoConfig": "modeling_mine.MyConfig"}
    (d / "config.json").write_text(json.dumps(cfg))
    code, out = doctor("--policy", d)
    assert code == 0, out
    line = next(ln for ln in out.splitlines() if "policy model code:" in ln)
    assert line == ("ok       policy model code: config.json auto_map (AutoConfig, AutoModelForCausalLM) is ignored: "
                    "rl3d loads transformers' own Qwen2ForCausalLM for model_type 'qwen2', not the dir's code "
                    "(which runs only with rl3d --trust-remote-code)")
    code, out = doctor("--policy", models["policy"])
    assert "policy model code" not in out  # nothing to say without an auto_map


def test_unknown_model_type_names_trust_remote_code(models, tmp_path):
    d = tmp_path / "unknown"
    shutil.copytree(models["policy"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="shapellm_omni_x", auto_map={"AutoConfig": "configuration_x.XConfig"})
    (d / "config.json").write_text(json.dumps(cfg))
    code, out = doctor("--policy", d)
    assert code == 3
    line = next(ln for ln in problems(out) if "policy model:" in ln)
    assert f"{d}/config.json: model_type 'shapellm_omni_x' is not a model type of the installed transformers" in line
    assert "the dir ships its own code for it (config.json auto_map)" in line
    assert "rl3d --trust-remote-code doctor" in line and "upgrade transformers" in line


def _vqvae_policy(models, tmp_path):
    """The tiny policy with a 64^3 VQ-VAE replica (codebook 16) as its codec, referenced by path."""
    from types import SimpleNamespace

    from rl3d.stages.codecs.vqvae64 import VQVAE64Codec, make_block_replica

    d = tmp_path / "vl"
    shutil.copytree(models["policy"], d)
    shutil.rmtree(d / "codec")
    codec = VQVAE64Codec(make_block_replica())
    codec.save(tmp_path / "vqvae")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    tiny_tokenizer(SimpleNamespace(vocab_size=16)).save_pretrained(d)
    meta = json.loads((d / "rl3d_policy.json").read_text())
    meta.update(codec=str(tmp_path / "vqvae"), codec_hash=codec.content_hash())
    (d / "rl3d_policy.json").write_text(json.dumps(meta))
    return d, meta, codec.content_hash()


def test_vqvae_codec_hash_is_checked(models, tmp_path):
    d, meta, right = _vqvae_policy(models, tmp_path)
    code, out = doctor("--policy", d)
    assert code == 0, out
    assert f"codebook 16x32, hash {right}" in out and "hash not checked" not in out
    meta["codec_hash"] = "0123456789abcdef"
    (d / "rl3d_policy.json").write_text(json.dumps(meta))
    code, out = doctor("--policy", d)
    assert code == 3
    [line] = problems(out)
    assert line.startswith("PROBLEM  policy codec: ") and f"has hash {right} but rl3d_policy.json records " \
                                                         "codec_hash 0123456789abcdef" in line
    assert f"rl3d codec hash {tmp_path / 'vqvae' / '3DVQVAE.safetensors'}" in line
    # the hash `rl3d codec hash` prints is the one doctor and gen compare
    r = CliRunner().invoke(main, ["codec", "hash", str(tmp_path / "vqvae"), "--quiet"])
    assert r.exit_code == 0 and r.stdout.strip() == right


def test_unconverted_vqvae_gets_the_convert_command(models, tmp_path):
    d, meta, _ = _vqvae_policy(models, tmp_path)
    raw = tmp_path / "published"
    raw.mkdir()
    (raw / "3DVQVAE.bin").write_bytes(b"a torch pickle")
    for ref in (raw, raw / "3DVQVAE.bin"):  # the dir holding it, or the file itself
        meta["codec"] = str(ref)
        (d / "rl3d_policy.json").write_text(json.dumps(meta))
        code, out = doctor("--policy", d)
        assert code == 3
        [line] = problems(out)
        assert f"{raw / '3DVQVAE.bin'} is the published VQ-VAE pickle, not converted to safetensors" in line
        assert f"fix: rl3d codec convert {raw / '3DVQVAE.bin'} {raw}, then set \"codec\"" in line
        assert "rl3d codec build" not in line


def test_codec_hash_of_the_shipped_codebook():
    from importlib.resources import files

    from rl3d.formats.codec import VoxelCodec

    r = CliRunner().invoke(main, ["codec", "hash", str(files("rl3d.assets") / "codec"), "--json"])
    assert r.exit_code == 0
    summary = json.loads(r.stdout)
    assert summary["content_hash"] == VoxelCodec.load(None).content_hash() and summary["kind"] == "voxel"
