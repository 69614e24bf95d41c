"""`rl3d train-scorer`: the default alignment scorer, a small transformers CLIPModel trained
contrastively on (synth render, caption) pairs and shipped in rl3d.assets/scorer.

Data: an objects table from `rl3d synth` (prompt, split) and its renders from `rl3d render`.
Each step takes a batch of distinct train objects, one random view each and one random phrasing
of its caption (augmentation); the loss is CLIP's symmetric cross-entropy, with objects that
share a caption counted as positives of each other. Evaluation: top-1 retrieval among 16
candidate captions on the eval split's renders.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.stages.contract import DirJob, Progress, StageOptions, read_json_record
from rl3d.stages.policy.device import pick_device
from rl3d.stages.scoring.clip_scorer import ImageProcessor, load_rgb, pooled

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
IMAGE_SIZE = 128
MAX_TEXT_TOKENS = 64
PHRASINGS = ("{p}", "a {p}", "a 3d model of {p}", "a voxel model of {p}", "a render of {p}",
             "{p}, 3d render", "3d object: {p}", "a small {p}")


# ---- tokenizer, processor and model ---------------------------------------------------------

def build_tokenizer(texts: list[str], vocab_size: int = 2048):
    """A CLIP-style byte-level BPE (end-of-word suffix </w>, lowercase) trained on `texts`,
    wrapped as transformers' CLIPTokenizer."""
    proto = CLIPTokenizer()  # the CLIP normaliser and pre-tokeniser, to train with the same split
    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOS))
    bpe.normalizer = proto.backend_tokenizer.normalizer
    bpe.pre_tokenizer = proto.backend_tokenizer.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    vocab = dict(bpe.get_vocab())
    for c in sorted(alphabet):  # every byte may end a word, as in CLIP's own vocabulary
        vocab.setdefault(c + "</w>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_TOKENS)


def build_image_processor(size: int = IMAGE_SIZE):
    return ImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def scorer_config(vocab_size: int, bos_id: int, eos_id: int, image_size: int = IMAGE_SIZE, hidden: int = 192,
                  layers: int = 4, heads: int = 4, patch: int = 16, projection: int = 128):
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=MAX_TEXT_TOKENS, projection_dim=projection,
                bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    vision = dict(image_size=image_size, patch_size=patch, hidden_size=hidden, intermediate_size=4 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, projection_dim=projection)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def init_scorer(texts: list[str], seed: int = 0, **size):
    """(random-init CLIPModel, tokenizer, image processor) sized for the default scorer."""
    tok = build_tokenizer(texts)
    torch.manual_seed(seed)
    cfg = scorer_config(len(tok), tok.bos_token_id, tok.eos_token_id, **size)
    return CLIPModel(cfg), tok, build_image_processor(cfg.vision_config.image_size)


def save_scorer(out: Path, model, tok, proc, info: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    proc.save_pretrained(str(out))
    (out / "scorer.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return out


# ---- data -----------------------------------------------------------------------------------

def phrasings(prompt: str) -> list[str]:
    p = prompt.strip().rstrip(".")
    bare = p[2:] if p.lower().startswith("a ") else p[3:] if p.lower().startswith("an ") else p
    return [p] + [t.format(p=bare) for t in PHRASINGS[1:]]


def load_pairs(objects, renders) -> tuple[list[dict], list[dict]]:
    """(train, eval) objects, each {prompt, views: [image paths]}; only ok objects with ok renders."""
    obj = tables.read_table(objects, "objects")
    rows = {c: obj.column(c).to_pylist() for c in ("sample_id", "prompt", "split", "status")}
    ren = tables.read_table(renders, "renders")
    views: dict[str, list[tuple[int, str]]] = {}
    for sid, v, p, st in zip(*(ren.column(c).to_pylist() for c in ("sample_id", "view", "image_path", "status"))):
        if st == "ok" and p:
            views.setdefault(sid, []).append((v, p))
    train, evals = [], []
    for sid, prompt, split, st in zip(rows["sample_id"], rows["prompt"], rows["split"], rows["status"]):
        if st != "ok" or sid not in views:
            continue
        rec = {"sample_id": sid, "prompt": prompt, "views": [p for _, p in sorted(views[sid])]}
        (evals if split == "eval" else train).append(rec)
    if not train:
        raise InputError(f"{objects}: no train-split objects with ok renders in {renders}")
    if not evals:  # no eval split: hold out every 10th object
        evals, train = train[::10], [r for i, r in enumerate(train) if i % 10]
    return train, evals


def pixel_tensor(proc, paths: list[str], batch: int = 256):
    """All images through the scorer's own processor once, kept as float16 [N, 3, S, S]."""
    out = []
    for s in range(0, len(paths), batch):
        px = proc(images=[load_rgb(p) for p in paths[s:s + batch]], return_tensors="pt")["pixel_values"]
        out.append(px.to(torch.float16))
    return torch.cat(out)


# ---- training and evaluation ----------------------------------------------------------------

def contrastive_loss(img, txt, logit_scale, same_caption):
    """Symmetric CLIP loss; rows sharing a caption are all positives (uniform soft targets)."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = same_caption.float() / same_caption.float().sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def retrieval_accuracy(model, tok, pixels, view_owner: np.ndarray, prompts: list[str], candidates: int = 16,
                       seed: int = 0, device: str = "cpu") -> float:
    """Top-1 accuracy of picking an eval view's caption among `candidates` captions (the true one
    plus distinct others drawn from the eval set)."""
    uniq = sorted(set(prompts))
    if len(uniq) < candidates:
        candidates = len(uniq)
    index = {p: i for i, p in enumerate(uniq)}
    model.eval()
    with torch.inference_mode():
        t = []
        for s in range(0, len(uniq), 256):
            enc = tok(uniq[s:s + 256], padding=True, truncation=True, return_tensors="pt").to(device)
            t.append(F.normalize(pooled(model.get_text_features(**enc)).float(), dim=-1))
        txt = torch.cat(t)
        im = []
        for s in range(0, len(pixels), 256):
            px = pixels[s:s + 256].to(device=device, dtype=torch.float32)
            im.append(F.normalize(pooled(model.get_image_features(pixel_values=px)).float(), dim=-1))
        sims = (torch.cat(im) @ txt.T).cpu().numpy()
    rng = np.random.default_rng(seed)
    hits = 0
    for v, obj in enumerate(view_owner):
        true = index[prompts[obj]]
        others = rng.choice(np.delete(np.arange(len(uniq)), true), candidates - 1, replace=False)
        cand = np.concatenate([[true], others])
        hits += int(cand[sims[v, cand].argmax()] == true)
    model.train()
    return hits / max(len(view_owner), 1)


def train(objects, renders, out: Path, steps: int = 3000, batch_size: int = 256, lr: float = 5e-4,
          seed: int = 0, device: str = "auto", log=print, record: dict | None = None) -> dict:
    """Train a scorer and save it into `out` (scorer.json last, with `record` in it); its summary fields."""
    device = pick_device(device)
    rng = random.Random(seed)
    train_rows, eval_rows = load_pairs(objects, renders)
    texts = [ph for r in train_rows for ph in phrasings(r["prompt"])]
    model, tok, proc = init_scorer(texts, seed)
    model.to(device).train()
    t0 = time.time()
    train_views = [p for r in train_rows for p in r["views"]]
    train_owner = np.repeat(np.arange(len(train_rows)), [len(r["views"]) for r in train_rows])
    starts = np.concatenate([[0], np.cumsum([len(r["views"]) for r in train_rows])])
    pixels = pixel_tensor(proc, train_views).to(device)
    eval_views = [p for r in eval_rows for p in r["views"]]
    eval_owner = np.repeat(np.arange(len(eval_rows)), [len(r["views"]) for r in eval_rows])
    eval_pixels = pixel_tensor(proc, eval_views)
    log(f"train-scorer: {len(train_rows)} train objects ({len(train_views)} views), {len(eval_rows)} eval objects, "
        f"images loaded in {time.time() - t0:.1f}s on {device}")

    caption_ids = {p: i for i, p in enumerate(sorted({r["prompt"] for r in train_rows}))}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    use_amp = device.startswith("cuda")
    bs = min(batch_size, len(train_rows))
    t1, losses = time.time(), []
    for step in range(steps):
        objs = rng.sample(range(len(train_rows)), bs)
        view_idx = [starts[o] + rng.randrange(len(train_rows[o]["views"])) for o in objs]
        caps = [rng.choice(phrasings(train_rows[o]["prompt"])) for o in objs]
        ids = torch.tensor([caption_ids[train_rows[o]["prompt"]] for o in objs], device=device)
        enc = tok(caps, padding=True, truncation=True, return_tensors="pt").to(device)
        px = pixels[torch.tensor(view_idx, device=device)].float()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            img = pooled(model.get_image_features(pixel_values=px))
            txt = pooled(model.get_text_features(**enc))
        loss = contrastive_loss(img.float(), txt.float(), model.logit_scale, ids[:, None] == ids[None, :])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"train-scorer: step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f} "
                f"({time.time() - t1:.0f}s)")
    acc = retrieval_accuracy(model, tok, eval_pixels, eval_owner, [r["prompt"] for r in eval_rows],
                             seed=seed, device=device)
    train_acc = retrieval_accuracy(model, tok, pixels[: len(eval_pixels)].cpu(), train_owner[: len(eval_pixels)],
                                   [r["prompt"] for r in train_rows], seed=seed, device=device)
    info = {"steps": steps, "batch_size": bs, "lr": lr, "seed": seed, "device": device,
            "train_objects": len(train_rows), "train_views": len(train_views), "eval_objects": len(eval_rows),
            "eval_views": len(eval_views), "final_loss": float(np.mean(losses[-50:])),
            "eval_top1_of_16": round(acc, 4), "train_top1_of_16": round(train_acc, 4),
            "train_seconds": round(time.time() - t1, 1), "objects": str(objects), "renders": str(renders)}
    save_scorer(out, model.float().cpu(), tok, proc, {**info, **(record or {})})
    log(f"train-scorer: eval top-1 of 16 = {acc:.3f} (train {train_acc:.3f})")
    return info


@dataclass
class ScorerOptions:
    steps: int = 3000
    batch_size: int = 256    # objects per step (one view each)
    lr: float = 5e-4
    device: str = "auto"     # where it trains: how, not what (left out of the config)
    seed: int = 0


class TrainScorerJob(DirJob):
    """The default alignment scorer trained on an objects table and its renders, into one directory
    (model, tokenizer, image processor, then scorer.json, which records the job's config)."""

    stage, marker, what = "train-scorer", "scorer.json", "a trained scorer"

    def __init__(self, objects, renders, options: ScorerOptions):
        if options.steps < 1 or options.batch_size < 1 or not options.lr > 0:
            raise InputError(f"train-scorer: --steps {options.steps} and --batch-size {options.batch_size} must be "
                             f">= 1, --lr {options.lr} > 0")
        self.objects, self.renders, self.options = objects, renders, options

    def config(self) -> dict:
        o = self.options
        return {"stage": self.stage, "objects": str(Path(self.objects).resolve()),
                "renders": str(Path(self.renders).resolve()), "steps": o.steps, "batch_size": o.batch_size,
                "lr": o.lr, "seed": o.seed}

    def recorded_config(self, out: Path) -> dict | None:
        return read_json_record(out / self.marker).get("config")

    def build(self, into: Path, opts: StageOptions, progress: Progress) -> dict:
        o = self.options
        return train(self.objects, self.renders, into, steps=o.steps, batch_size=o.batch_size, lr=o.lr, seed=o.seed,
                     device=o.device, log=progress.log, record={"config": self.config()})
