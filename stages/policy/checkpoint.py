"""Policy checkpoints: the one writer (save_policy) and reader (load_policy) of a policy dir, its
metadata file (rl3d_policy.json) and the policy id that names it in every output.

A policy dir: transformers weights (safetensors), the tokenizer, the codec (a copy under codec/,
"default", or a path to a ShapeLLM-Omni VQ-VAE checkpoint kept outside the dir) and
rl3d_policy.json {codec, codec_hash, step, base, model_class, ...}. `step` is the step of the training
that wrote the weights: sft's step for an sft checkpoint, the RL step (also `rl_step`) for an RL
checkpoint, which keeps the SFT step it started from in `sft_step`. Optional prompt and sampling
fields (request_template, chat_template, system_prompt, sampling): docs/checkpoints.md.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.utils import logging as hf_logging

from rl3d.formats.errors import InputError, first_line
from rl3d.formats.model_dirs import remote_code_allowed
from rl3d.formats.reads import require_regular
from rl3d.stages.codecs import load_codec
from rl3d.stages.policy.device import resolve_device_dtype
from rl3d.stages.policy.sequence import REQUEST, PromptFormat
from rl3d.stages.policy.tokenizer import SpecialIds, load_tokenizer, special_ids, strip_loader_keys

POLICY_META = "rl3d_policy.json"
_FULL_HASH_LIMIT = 1 << 30  # weights up to 1 GiB are hashed whole; larger ones by header + samples


@dataclass
class Policy:
    model: "torch.nn.Module"
    tokenizer: object
    codec: object
    path: Path
    policy_id: str
    step: int
    meta: dict = field(default_factory=dict)
    special: "SpecialIds | None" = None
    prompt_format: PromptFormat = field(default_factory=PromptFormat)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_policy_dir() -> Path:
    """The embedded default policy shipped in rl3d.assets/policy (built by rl3d's own sft)."""
    p = Path(str(files("rl3d.assets") / "policy"))
    if not (p / POLICY_META).is_file():
        raise InputError(f"the embedded default policy is not built ({p} is missing); run "
                         f"`rl3d synth` then `rl3d sft` to build one, or pass --policy DIR")
    return p


def read_policy_meta(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"policy dir {p} not found")
    if not (p / "config.json").is_file():
        raise InputError(f"{p} has no config.json (not a saved transformers model)")
    f = p / POLICY_META
    if not f.is_file():
        raise InputError(f"{p} has no {POLICY_META} (save policies with rl3d.stages.policy.checkpoint.save_policy)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{f}: invalid JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{f}: expected a JSON object")
    return meta


def _model_class(name: str | None, source: Path):
    """`model_class` of rl3d_policy.json: a transformers class name (auto or concrete); default
    AutoModelForCausalLM. Qwen2.5-VL checkpoints name e.g. Qwen2_5_VLForConditionalGeneration."""
    cls = getattr(transformers, name or "AutoModelForCausalLM", None)
    # a model class (an AutoModel* or a PreTrainedModel), not any class that loads: AutoTokenizer,
    # AutoConfig or a processor would load and then fail deep in the stage
    if not isinstance(cls, type) or not issubclass(cls, (transformers.PreTrainedModel, _BaseAutoModelClass)):
        raise InputError(f"{source}: model_class {name!r} is not a transformers model class")
    return cls


def codec_path(path: Path, meta: dict) -> Path | None:
    """The codec rl3d_policy.json names: None for "default" (the shipped codec), else a path
    relative to the policy dir (a copy under codec/) or absolute (an external VQ-VAE checkpoint)."""
    ref = meta.get("codec", "default")
    return None if ref in (None, "default") else Path(path) / ref


def load_codec_for(path: Path, meta: dict, device: str | None = None):
    """The policy's codec, checked against the content hash the policy was trained with."""
    ref = meta.get("codec", "default")
    try:
        codec = load_codec(codec_path(path, meta), device=device)
    except InputError as e:
        raise InputError(f"{path / POLICY_META}: codec {ref!r}: {e}") from None
    want = meta.get("codec_hash")
    if want and want != codec.content_hash():
        raise InputError(f"{path / POLICY_META}: codec {ref!r} has hash {codec.content_hash()}, but the policy "
                         f"was trained with codec {want}")
    return codec


def prompt_format_for(meta: dict, tokenizer, source: str = POLICY_META) -> PromptFormat:
    """The prompt layout rl3d_policy.json asks for: `request_template` (must hold "{prompt}"),
    `chat_template` (true: wrap the user turn with the tokenizer's own chat template, as
    ShapeLLM-Omni's inference does) and `system_prompt` (a system turn, chat template only)."""
    request = meta.get("request_template") or REQUEST
    if "{prompt}" not in request:
        raise InputError(f"{source}: request_template {request!r} has no {{prompt}} placeholder")
    chat = bool(meta.get("chat_template", False))
    if chat and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{source}: chat_template is true but the tokenizer has no chat template "
                         f"(tokenizer_config.json / chat_template.jinja)")
    return PromptFormat(request=request, chat_tokenizer=tokenizer if chat else None,
                        system_prompt=meta.get("system_prompt"))


@dataclass
class PolicyDir:
    """What a policy dir says before its model loads: rl3d_policy.json, the policy id (the weights
    hashed once), the tokenizer and the prompt layout (read once). gen checks its prompts against
    these before any output is touched, then hands them to load_policy for the model."""
    path: Path
    meta: dict
    policy_id: str
    tokenizer: object
    prompt_format: PromptFormat


def open_policy_dir(path: str | os.PathLike | None = None) -> PolicyDir:
    """A policy dir (None = the shipped default) without its model: InputError on a missing or bad
    rl3d_policy.json, tokenizer or prompt layout, or no weight files."""
    path = Path(path).resolve() if path is not None else default_policy_dir()
    meta = read_policy_meta(path)
    tokenizer = load_tokenizer(path)
    fmt = prompt_format_for(meta, tokenizer, str(path / POLICY_META))
    return PolicyDir(path, meta, policy_id(path, meta), tokenizer, fmt)


def load_policy(path: str | os.PathLike | None = None, device: str | None = None,
                dtype: str | None = None, opened: PolicyDir | None = None) -> Policy:
    """A policy checkpoint dir (None = the shipped default) -> model (eval mode), tokenizer, codec.
    `opened`: the dir as open_policy_dir read it (its tokenizer and id are used, not read again)."""
    hf_logging.disable_progress_bar()  # no weight-loading bars in CLI output
    d = opened or open_policy_dir(path)
    dev, dt = resolve_device_dtype(device, dtype)
    codec = load_codec_for(d.path, d.meta, device=str(dev))
    cls, path = _model_class(d.meta.get("model_class"), d.path), str(d.path)
    try:
        model = cls.from_pretrained(path, local_files_only=True, dtype=dt, trust_remote_code=remote_code_allowed())
    except Exception as e:
        raise InputError(f"{d.path}: cannot load the model ({type(e).__name__}: {e})") from None
    model.to(dev).eval()
    special = special_ids(d.tokenizer, codec, model_vocab_size(model), source=str(d.path))
    return Policy(model, d.tokenizer, codec, d.path, d.policy_id, int(d.meta.get("step", 0)), d.meta, special,
                  d.prompt_format)


def sft_step_of(meta: dict) -> int:
    """The SFT step a policy's weights descend from: its `sft_step`, else its `step` when it is
    no RL checkpoint (an sft output or a converted base), else 0 (an RL checkpoint of before
    sft_step was recorded)."""
    if "sft_step" in meta:
        return int(meta["sft_step"])
    return 0 if "rl_step" in meta else int(meta.get("step", 0))


def policy_id(path: Path, meta: dict) -> str:
    """The id every output names its policy by: "<abs dir>@<weights hash>#step<N>"."""
    return f"{path}@{weights_hash(path)}#step{int(meta.get('step', 0))}"


def weights_hash(path: Path) -> str:
    """Short content hash of the weight files. Files up to 1 GiB in total are hashed whole;
    beyond that, the safetensors headers, file sizes and 64 evenly spaced 1 MiB blocks."""
    weight_files = sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin")))
    if not weight_files:
        raise InputError(f"{path}: no weight files (*.safetensors)")
    for f in weight_files:  # a link to /dev/zero would be hashed for ever
        require_regular(f, "weight file")
    h = hashlib.sha256()
    whole = sum(f.stat().st_size for f in weight_files) <= _FULL_HASH_LIMIT
    for f in weight_files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if whole:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            else:
                head = int.from_bytes(fh.read(8), "little") + 8
                fh.seek(0)
                h.update(fh.read(min(head, 1 << 24)))
                for k in range(64):
                    fh.seek(size * k // 64)
                    h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


def save_policy(out: str | os.PathLike, model, tokenizer, codec, step: int = 0, base: str | None = None,
                codec_ref: str | None = None, extra: dict | None = None, state_dict: dict | None = None) -> Path:
    """Write a checkpoint dir that load_policy reads: weights (safetensors), tokenizer and
    rl3d_policy.json. `codec_ref`: "default" (the shipped codec) or None to copy the codec into
    out/codec - except an external VQ-VAE checkpoint, which is referenced by its absolute path
    (never copied: the published file is 533 MB). `state_dict`: the weights to write when `model` holds only a shard of them (FSDP).
    Written into a temp dir renamed at the end, so a killed save leaves no torn dir. The one writer
    of a policy dir: sft's final policy and trainer checkpoints and rl-step's checkpoints use it.
    `step`: the training step the weights are at; an RL checkpoint (`extra` holds `rl_step`) is at its
    RL step whatever `step` says, so its policy id ends in #step<rl_step> as the run names it."""
    out = Path(out)
    if extra and "rl_step" in extra:
        step = extra["rl_step"]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if state_dict is not None:
        state_dict = _without_tied_copies(model, state_dict)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    except Exception as e:  # safetensors reports a full disk as a SafetensorError holding the OS error code
        shutil.rmtree(tmp, ignore_errors=True)
        code = re.search(r"\bcode: (\d+)", str(e))
        if isinstance(e, OSError) or code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(out / "model.safetensors")) from None
    if state_dict is not None:
        _record_written_dtype(tmp, model, state_dict)
    strip_loader_keys(tokenizer)  # a loaded-and-resaved tokenizer writes the bytes it was saved with
    tokenizer.save_pretrained(str(tmp))
    if codec_ref is None and codec.external:
        codec_ref = str(Path(codec.source).resolve())
    elif codec_ref is None:
        codec.save(tmp / "codec")
        codec_ref = "codec"
    arch = (getattr(model.config, "architectures", None) or [None])[0]
    meta = {"codec": codec_ref, "codec_hash": codec.content_hash(), "step": int(step), "base": base,
            "model_class": arch if arch and hasattr(transformers, arch) else "AutoModelForCausalLM",
            **(extra or {})}
    (tmp / POLICY_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    return out


def _record_written_dtype(out: Path, model, state_dict: dict) -> None:
    """config.json's dtype made that of the weights written: save_pretrained records the live
    model's, which differs when `state_dict` holds other tensors (--bf16-weights saves the float32
    masters of bf16 parameters). Rewritten only then, the way save_pretrained writes it."""
    written = next((t.dtype for t in state_dict.values() if t.is_floating_point()), None)
    if written is None or written == model.dtype:
        return
    config = copy.deepcopy(model.config)
    config.dtype = str(written).removeprefix("torch.")
    config.save_pretrained(str(out))


def _without_tied_copies(model, state_dict: dict) -> dict:
    """`state_dict` less the names under which `model` holds a parameter it also holds under an
    earlier name (a tied lm_head.weight): a gathered state dict (FSDP, DDP) copies each name
    to its own tensor, and some transformers versions then write the tied copy as a weight of its
    own, so a tied policy's checkpoint would come back with a separate lm_head.weight."""
    seen, aliases = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.add(id(p))
    return {k: v for k, v in state_dict.items() if k not in aliases}


def model_vocab_size(model) -> int:
    """Rows of the output head (the logits width), which may exceed len(tokenizer)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.get_text_config().vocab_size)


# ---- RNG and trainer state, loadable with torch.load(weights_only=True) ----

def rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers, so trainer_state.pt loads with
    torch.load(weights_only=True) (numpy's state tuple holds an ndarray, which would need pickle)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_plain_state(path: Path, what: str, note: str = "") -> dict:
    """A torch.save'd state without unpickling code: tensors, numbers, strings and containers only;
    anything else is one line naming the file and `what` it should have been."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = first_line(e) or type(e).__name__
        raise InputError(f"{path}: not a loadable {what} (only tensors and plain values are "
                         f"accepted{note}: {reason[:200]})") from None


def load_optimizer_state(path: Path) -> dict:
    """A parent checkpoint's optimizer.pt."""
    return load_plain_state(path, "optimizer state")


def load_trainer_state(path: Path) -> dict:
    """trainer_state.pt."""
    return load_plain_state(path, "rl3d trainer state", "; files from before rl3d 0.1 cannot be resumed")


# module names of a vision-language policy's image side: Qwen2.5-VL's vision tower (which holds its
# patch merger, the projector) is `visual`; LLaVA-style models use the other two
VISION_MODULES = ("visual", "vision_tower", "multi_modal_projector")
# rl3d_policy.json keys about prompting and sampling that every checkpoint of a run carries on
PROMPT_META_KEYS = ("request_template", "chat_template", "system_prompt", "sampling")


def freeze_vision(model) -> int:
    """requires_grad False on the vision tower and projector (text-only policies: they get no
    gradient and must not drift under weight decay); returns how many parameters were frozen."""
    n = 0
    for name, p in model.named_parameters():
        if any(part in VISION_MODULES for part in name.split(".")):
            p.requires_grad_(False)
            n += p.numel()
    return n


def carried_meta(meta: dict) -> dict:
    """The prompt / sampling fields of a parent's rl3d_policy.json that a child checkpoint keeps."""
    return {k: meta[k] for k in PROMPT_META_KEYS if k in meta}


def model_class_for(path: Path):
    """The transformers class to load a model dir with: rl3d_policy.json's model_class, else
    config.json's architectures[0] when it is a transformers class, else AutoModelForCausalLM."""
    path = Path(path)
    name = None
    if (path / POLICY_META).is_file():
        name = read_policy_meta(path).get("model_class")
    if name is None and (path / "config.json").is_file():
        try:
            arch = (json.loads((path / "config.json").read_text()).get("architectures") or [None])[0]
        except json.JSONDecodeError as e:
            raise InputError(f"{path / 'config.json'}: invalid JSON ({e.msg})") from None
        name = arch if arch and hasattr(transformers, arch) else None
    return _model_class(name, path)
