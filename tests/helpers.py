"""What several test files share, in one module (pytest puts tests/ on the path: pyproject's
`pythonpath`), so a test imports its builders from here and never from another test file: tiny
random-init models saved with the real classes and file layouts (an rl3d policy, a ShapeLLM-Omni
replica with its VQ-VAE, CLIP, HPS and Qwen2.5-VL judges), a scripted OpenAI-compatible endpoint,
hand-made tables and an rl-step batch. Heavy libraries are imported inside the builders, so a test
that needs only a table or a PNG does not load torch and transformers."""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


# ---- the tiny rl3d policy: random Qwen2, word tokenizer, a 2-pattern codec -------------------

WORDS = "a the red blue green box chair table leg legs seat back round tall short wide plan part top".split()
SPECIALS = ["<|pad|>", "<|endoftext|>", "[UNK]", "<|user|>", "<|assistant|>", "<mesh-start>", "<mesh-end>"]


def tiny_codec():
    import numpy as np

    from rl3d.formats.codec import VoxelCodec

    g = np.zeros((2, 32, 32, 32), np.uint8)
    g[0, 4:12, 0:8, 4:20] = 3
    g[1, 10:30, 0:5, 2:6] = 5
    return VoxelCodec.build(g, n_patterns=2)  # 1 + 2 * 16 = 33 mesh tokens


def tiny_tokenizer(codec):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rl3d.formats.codec import mesh_token_text

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tk.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   unk_token="[UNK]")
    fast.add_tokens([AddedToken(mesh_token_text(i), special=True) for i in range(codec.vocab_size)],
                    special_tokens=True)
    return fast


def make_tiny_policy(out: Path, seed: int = 0, step: int = 3, mode: str | None = None, tied: bool = False) -> Path:
    """Random-init Qwen2 (hidden 32, 2 layers) + word tokenizer + tiny codec, saved by save_policy.
    `mode` ("hi-grpo" / "flat") is recorded in rl3d_policy.json when given; `tied`: the output head
    shares the input embedding (as the shipped policy does)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rl3d.stages.policy.checkpoint import save_policy

    codec = tiny_codec()
    tok = tiny_tokenizer(codec)
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, vocab_size=len(tok) + 3, max_position_embeddings=2048,
                      tie_word_embeddings=tied, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # make text tokens and <mesh-start> likely enough to see short plans
        model.lm_head.weight.mul_(8.0)
    return save_policy(out, model, tok, codec, step=step, base="random-init",
                           extra={"mode": mode} if mode else None)


# ---- a ShapeLLM-Omni-class replica: tiny Qwen2.5-VL, mesh tokens after its specials, 64^3 VQ-VAE

# ChatML as Qwen2.5-VL's tokenizer writes it for text-only turns (default system prompt included)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>"]
TEXT = ["a red chair with four legs", "a tall blue table", "Please generate a 3D mesh based on the prompt "
        "I provided:", "First plan the object at a high level: its sub-category, its key parts, their layout",
        "Here is the high-level plan: Now expand the parts into precise detail", "You are a helpful assistant."]


def qwen_like_tokenizer(n_mesh: int | None, skip: tuple[int, ...] = (), with_end: bool = True):
    """A small byte-level BPE with Qwen's chat specials and chat template; then, like ShapeLLM-Omni,
    <mesh0>..<mesh{n-1}>, <mesh-start>, <mesh-end> added after the specials (codes first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rl3d.formats.codec import MESH_END, MESH_START, mesh_token_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 4, trainers.BpeTrainer(vocab_size=360, special_tokens=QWEN_SPECIALS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      chat_template=QWEN_CHAT_TEMPLATE)
    if n_mesh is not None:
        names = [mesh_token_text(i) for i in range(n_mesh) if i not in skip] + [MESH_START]
        wrapped.add_tokens(names + ([MESH_END] if with_end else []))
    return wrapped


def save_codec(out: Path):
    """The 16-code block replica of the VQ-VAE (published key names, channels 2), saved as a checkpoint dir."""
    from rl3d.stages.codecs.vqvae64 import VQVAE64Codec, make_block_replica

    codec = VQVAE64Codec(make_block_replica())
    codec.save(out)
    return VQVAE64Codec.load(out)


def save_replica(out: Path, codec_dir: Path, tok, seed: int = 0) -> Path:
    """Tiny random Qwen2.5-VL + tokenizer + rl3d_policy.json naming the class and the codec by path."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from rl3d.stages.codecs.vqvae64 import VQVAE64Codec
    from rl3d.stages.policy.checkpoint import POLICY_META

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok) + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=4096,
                         rope_parameters=rope, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0]))
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    with torch.no_grad():  # text and <mesh-start> likely enough for short plans
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    codec = VQVAE64Codec.load(codec_dir)
    meta = {"model_class": "Qwen2_5_VLForConditionalGeneration", "codec": str(codec_dir),
            "codec_hash": codec.content_hash(), "chat_template": True, "sampling": "shapellm", "step": 0,
            "base": "random-init Qwen2.5-VL"}
    (out / POLICY_META).write_text(json.dumps(meta))
    return out


# ---- reward-model replicas: CLIP (rl3d's scorer and a plain CLIPModel), HPS, a Qwen2.5-VL judge

TINY_HPS_ARCH = "rl3d-tiny-hps"
TINY_HPS_CONFIG = {"embed_dim": 16,
                   "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def build_tiny_clip(d: Path, prompts=("a red chair", "a blue table")) -> Path:
    """A CLIPModel dir (config, safetensors, tokenizer, image processor) as rl3d train-scorer saves one."""
    from rl3d.stages.train_scorer import init_scorer, save_scorer

    model, tok, proc = init_scorer(list(prompts), seed=0, hidden=32, layers=1, heads=2, image_size=32, patch=8,
                                   projection=16)
    save_scorer(d, model, tok, proc, {})
    return d


def register_tiny_open_clip(d: Path) -> str:
    """Register the tiny open_clip model config under TINY_HPS_ARCH (this process only)."""
    import open_clip

    f = Path(d) / f"{TINY_HPS_ARCH}.json"
    f.write_text(json.dumps(TINY_HPS_CONFIG))
    open_clip.add_model_config(f)
    return TINY_HPS_ARCH


def build_tiny_hps(d: Path) -> Path:
    """A tiny open_clip model saved as a plain state dict under `state_dict`, the published HPS
    file's layout; returns the checkpoint path."""
    import open_clip
    import torch

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    register_tiny_open_clip(d)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_HPS_ARCH, pretrained=None)
    f = d / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, f)
    return f


def open_clip_missing() -> str:
    """Why open_clip cannot be used here ("" when it can): not installed, or installed with a
    torchvision build that does not match torch (its import then fails with a RuntimeError)."""
    try:
        import open_clip  # noqa: F401
    except Exception as e:
        return f"open_clip_torch is not importable here ({type(e).__name__}: {str(e)[:120]})"
    return ""


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level alphabet, so every character has a token in the tiny vocab
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tiny_clip(d: Path, seed: int = 0) -> Path:
    """A random-init CLIPModel (32-px images, 16-d projection) + character tokenizer + processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(vocab), max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(d)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(d)
    return d


def write_pngs(d: Path, n: int, seed: int = 0, size: int = 40, tint=(1.0, 1.0, 1.0)) -> list[str]:
    import numpy as np
    from PIL import Image

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = (rng.random((size, size, 3)) * 255 * np.array(tint)).astype("uint8")
        p = d / f"img-{i:03d}.png"
        Image.fromarray(a).save(p)
        out.append(str(p))
    return out


JUDGE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
JUDGE_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_qwen_vl(d):
    """A 0.3 M-parameter random Qwen2.5-VL with a character-level tokenizer and Qwen's special tokens."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = {t: i for i, t in enumerate(JUDGE_SPECIALS)}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(JUDGE_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(d)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(d)
    (d / "chat_template.json").write_text(json.dumps({"chat_template": JUDGE_CHAT_TEMPLATE}))
    ids = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
               vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
                         bos_token_id=0, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                           window_size=56),
        bos_token_id=0, eos_token_id=2, pad_token_id=0, **ids)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(d)
    return d


# ---- a scripted OpenAI-compatible endpoint on 127.0.0.1 --------------------------------------

class FakeChatServer:
    """behave(request_number, body) -> (status, reply_text_or_error_body, delay_s). GET /v1/models
    lists `served` (what `rl3d doctor` asks an endpoint)."""

    def __init__(self, behave, served=("judge",)):
        self.behave, self.lock, self.served = behave, threading.Lock(), list(served)
        self.count = self.active = self.max_active = 0
        self.bodies, self.headers = [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                ok = self.path.rstrip("/") == "/v1/models"
                payload = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in server.served]}
                                     if ok else {"error": {"message": "not found"}}).encode()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = server.count
                    server.count += 1
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                    server.bodies.append(body)
                    # header names are case-insensitive: record them in one spelling
                    server.headers.append({k.title(): v for k, v in self.headers.items()})
                try:
                    status, text, delay = server.behave(n, body)
                    time.sleep(delay)
                    if status == 200:
                        payload = json.dumps({"id": f"c{n}", "object": "chat.completion", "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}]}).encode()
                    else:
                        payload = json.dumps({"error": {"message": text}}).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass
                finally:
                    with server.lock:
                        server.active -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@contextmanager
def chat_server(behave, served=("judge",)):
    srv = FakeChatServer(behave, served)
    t = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        t.join(timeout=5)


# ---- hand-made tables and an rl-step batch ---------------------------------------------------

def samples_table(rows):
    """A samples table (gen's schema) of hand-made rows: their ids, level, prompt, mesh tokens and
    status; every other column a fixed placeholder."""
    import pyarrow as pa

    from rl3d.formats import tables

    n = len(rows)
    cols = {k: [r[k] for r in rows] for k in ("sample_id", "prompt_id", "sample_index", "level", "prompt",
                                              "mesh_tokens", "status", "message")}
    cols.update({"input_ids": [[1, 2]] * n, "prompt_len": [1] * n, "reasoning_start": [1] * n,
                 "reasoning_end": [1] * n, "mesh_start": [1] * n, "mesh_end": [1] * n, "logprobs": [[0.0]] * n,
                 "reasoning": [""] * n, "mesh_path": [""] * n, "policy_id": ["p"] * n, "policy_step": [0] * n,
                 "seed": [0] * n})
    types = dict(tables.SCHEMAS["samples"][1])
    return pa.table({k: pa.array(v, types[k]) for k, v in cols.items()})


RL_PROMPTS = [{"prompt_id": "p-chair", "prompt": "a red chair", "category": "c"},
           {"prompt_id": "p-table", "prompt": "a tall blue table", "category": "c"}]


def rl_batch(root, tied=False):
    """(root, policy dir, rows): a tiny policy, a hi-grpo samples table from it under root/gen and a
    rewards table under root/rewards scoring each sample by the fraction of non-empty mesh blocks
    (any deterministic function with spread will do), both with the provenance gen and reward record."""
    import numpy as np
    import pyarrow as pa

    from rl3d.formats import shards, tables
    from rl3d.stages import gen
    from rl3d.stages.policy.checkpoint import load_policy

    policy = make_tiny_policy(root / "policy", tied=tied)
    loaded = load_policy(policy, device="cpu", dtype="float32")
    rows = gen.generate(loaded, RL_PROMPTS, "hi-grpo", group_size=3, seed=3,
                        sampling=gen.Sampling(max_reasoning_tokens=6), batch_size=8)
    samples = pa.Table.from_pylist(rows)
    # provenance as gen and reward record it: rl-step checks both before it joins them
    gen_config = {"prompts": "PROMPTS", "seed": 3}
    shards.write_part(tables.with_metadata(samples, "samples", gen_config, loaded.policy_id), root / "gen",
                      shards.Shard(0, 1))
    rewards = [{"sample_id": r["sample_id"], "prompt_id": r["prompt_id"], "sample_index": r["sample_index"],
                "level": r["level"], "total": float(np.mean(np.asarray(r["mesh_tokens"]) != 0)) + 0.1 * r["sample_index"],
                "status": "ok", "message": ""} for r in rows]
    t = pa.Table.from_pylist(rewards).cast(pa.schema([("sample_id", pa.string()), ("prompt_id", pa.string()),
                                                      ("sample_index", pa.int32()), ("level", pa.string()),
                                                      ("total", pa.float64()), ("status", pa.string()),
                                                      ("message", pa.string())]))
    made_from = {"samples": tables.table_id("samples", gen_config, loaded.policy_id)}
    shards.write_part(tables.with_metadata(t, "rewards", {"reward": "mesh fill"}, loaded.policy_id, made_from),
                      root / "rewards", shards.Shard(0, 1))
    return root, policy, rows


def run_step(root, policy, out, allow_off_policy=False, **kw):
    """One rl-step of `policy` on rl_batch's tables into `out` (run metrics beside it, m.parquet)."""
    from rl3d.stages.rl.rl_config import RLConfig
    from rl3d.stages.rl_step import run_rl_step

    cfg = RLConfig(**{"lr": 1e-3, "micro_batch": 4, **kw})
    return run_rl_step(policy, root / "gen", root / "rewards", out, cfg, run_metrics=str(out.parent / "m.parquet"),
                       allow_off_policy=allow_off_policy)


def step_metrics(out):
    """name -> value of an rl-step output's metrics table."""
    from rl3d.formats import tables

    t = tables.read_table(out / "metrics", "metrics").to_pylist()
    return {r["name"]: r["value"] for r in t}


# ---- voxel shapes --------------------------------------------------------------------------

def random_shapes(n: int, seed: int = 0):
    """uint8[n, 32, 32, 32]: boxes and vertical cylinders in random palette colours (stand-in for synth objects)."""
    import numpy as np

    from rl3d.formats.voxels import NUM_COLORS

    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(32)] * 3, indexing="ij")
    grids = np.zeros((n, 32, 32, 32), np.uint8)
    for g in grids:
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5:
                lo = rng.integers(0, 20, 3)
                hi = lo + rng.integers(3, 13, 3)
                m = (x >= lo[0]) & (x < hi[0]) & (y >= lo[1]) & (y < hi[1]) & (z >= lo[2]) & (z < hi[2])
            else:
                cx, cz = rng.integers(8, 24, 2)
                r, y0, h = rng.integers(3, 9), rng.integers(0, 15), rng.integers(4, 17)
                m = ((x - cx) ** 2 + (z - cz) ** 2 <= r * r) & (y >= y0) & (y < y0 + h)
            g[m] = rng.integers(1, NUM_COLORS + 1)
    return grids
