"""sft's model: a fresh Qwen2 of a named shape with a tokenizer trained on the table, or --init's
(mesh tokens added), the codec it learns, the completion-only loss and the optimizer."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from rl3d.formats.errors import InputError
from rl3d.formats.model_dirs import from_local_dir
from rl3d.stages.codecs import load_codec
from rl3d.stages.policy.checkpoint import POLICY_META, carried_meta, model_class_for, read_policy_meta
from rl3d.stages.policy.tokenizer import SpecialIds, add_mesh_tokens, build_tokenizer, load_tokenizer
from rl3d.stages.supervised.options import QWEN2_COMMON, CONFIGS, SFTOptions


def build_model(config_name: str, vocab_size: int, tokenizer):
    if config_name not in CONFIGS:
        raise InputError(f"--config: unknown config {config_name!r} (choose from {', '.join(CONFIGS)})")
    cfg = Qwen2Config(vocab_size=vocab_size, **QWEN2_COMMON, **CONFIGS[config_name],
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(cfg)


def load_init(path: Path, n_mesh: int):
    """(model float32, tokenizer) from a policy / causal-LM dir; mesh tokens added when missing."""
    if not (Path(path) / "config.json").is_file():
        raise InputError(f"{path}: not a model directory (no config.json)")
    tok = load_tokenizer(path)
    model = from_local_dir(model_class_for(path), path, "causal LM", dtype="float32")
    try:
        add_mesh_tokens(tok, n_mesh)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
    if len(tok) > model.get_input_embeddings().weight.shape[0]:  # (a VLM resizes its text embeddings)
        model.resize_token_embeddings(len(tok))
    return model, tok


def policy_codec(opts: SFTOptions):
    path = opts.codec
    if path is None and opts.init is not None and (Path(opts.init) / POLICY_META).is_file():
        meta = json.loads((Path(opts.init) / POLICY_META).read_text())
        if meta.get("codec") not in (None, "default"):
            path = Path(opts.init) / meta["codec"]
    try:
        return load_codec(path)  # the block codec, or a 64^3 VQ-VAE checkpoint (stages/codecs)
    except InputError as e:
        raise InputError(f"--codec: {e}") from None


def initial_model(opts: SFTOptions, rows: dict, codec, resume: Path | None):
    """(model, tokenizer): the latest checkpoint of this run, else --init, else a fresh --config
    model with a tokenizer trained on the table's texts."""
    if resume is not None:
        tokenizer = load_tokenizer(resume)
        return from_local_dir(model_class_for(resume), resume, "causal LM", dtype="float32"), tokenizer
    if opts.init is not None:
        return load_init(Path(opts.init), codec.vocab_size)
    texts = [t for c in ("prompt", "plan", "detail") if c in rows for t in rows[c]]
    tokenizer = build_tokenizer(texts, codec, opts.text_vocab)
    return build_model(opts.config, len(tokenizer), tokenizer), tokenizer


def inherited_prompt_meta(opts: SFTOptions, resume: Path | None) -> dict:
    """The prompt / sampling fields of the run's checkpoint or --init's rl3d_policy.json (e.g. a
    ShapeLLM-Omni policy's chat template), kept in every checkpoint sft writes."""
    src = resume if resume is not None else (Path(opts.init) if opts.init is not None else None)
    if src is None or not (src / POLICY_META).is_file():
        return {}
    return carried_meta(read_policy_meta(src))


def set_special_ids(model, tokenizer) -> None:
    """Pad/eos ids on the model and a sane generation config (sampling as in docs/hi_grpo.md)."""
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = None
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        do_sample=True, temperature=0.7, top_p=0.7, max_length=model.config.get_text_config().max_position_embeddings)


def mesh_id_table(special: SpecialIds, device) -> torch.Tensor:
    """bool[V]: which vocabulary ids are mesh tokens (from the tokenizer's table, contiguous or not)."""
    is_mesh = torch.zeros(special.vocab_size, dtype=torch.bool)
    is_mesh[special.mesh_ids] = True
    return is_mesh.to(device)


def completion_loss(model, batch, is_mesh: torch.Tensor):
    """(sum of token NLL over completion tokens, per-kind sums for metrics) of one micro-batch;
    is_mesh from mesh_id_table."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                          reduction="none").view_as(target)
    with torch.no_grad():
        valid = target != -100
        mesh = valid & is_mesh[target.clamp(min=0)]
        correct = (logits.argmax(-1) == target) & mesh
        stats = torch.stack([nll[valid].sum(), valid.sum(), nll[mesh].sum(), mesh.sum(), correct.sum()]).double()
    return nll.sum(), stats


def build_optimizer(model, opts: SFTOptions) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases); frozen parameters
    (a vision tower) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr, betas=(0.9, 0.95))
