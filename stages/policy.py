"""The policy: loading a causal LM checkpoint, its tokenizer and codec, and the sequence format
shared by gen, sft, rl-step and eval (prompt templates, constrained decoding, log-probs).

Sequence of one level (see docs/internals.md):
    prompt | reasoning text | <mesh-start> | M mesh tokens | <mesh-end> | eos
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rl3d.formats.errors import InputError

LEVELS = ("coarse", "fine", "single")

REQUEST = "Please generate a 3D mesh based on the prompt I provided: {prompt}"

# The instruction texts, in one place; gen records them in its output metadata.
INSTRUCTIONS = {
    "coarse": ("First plan the object at a high level: its sub-category, its key parts, their layout and "
               "proportions, and what any ambiguous words mean. Then generate the coarse mesh."),
    "fine": ("Here is the high-level plan: {plan}\nNow expand the parts into precise detail: part appearance, "
             "counts, symmetry, colours and style. Then generate the refined mesh."),
    "single": "Briefly describe the object, then generate the mesh.",
}

USER, ASSISTANT = "<|user|>", "<|assistant|>"


def build_prompt(prompt: str, level: str, plan: str | None = None) -> str:
    """The text the policy is conditioned on for one level (before the reasoning span)."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}")
    instruction = INSTRUCTIONS[level]
    if level == "fine":
        if plan is None:
            raise ValueError("the fine level needs the coarse plan")
        instruction = instruction.format(plan=plan.strip())
    return f"{USER}{REQUEST.format(prompt=prompt.strip())}\n{instruction}{ASSISTANT}"


# ---- loading and saving ----------------------------------------------------------------------


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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_policy_dir() -> Path:
    """The embedded default policy shipped in rl3d.assets/policy (built by rl3d's own sft)."""
    from importlib.resources import files

    p = Path(str(files("rl3d.assets") / "policy"))
    if not (p / POLICY_META).is_file():
        raise InputError(f"the embedded default policy is not built ({p} is missing); run "
                         f"`rl3d synth` then `rl3d sft` to build one, or pass --policy DIR")
    return p


def resolve_device_dtype(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA + bf16 when available, else CPU + fp32; explicit flags override."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in names:
        dt = names[dtype]
    else:
        raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(sorted(names))}")
    return dev, dt


def read_policy_meta(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"policy dir {p} not found")
    if not (p / "config.json").is_file():
        raise InputError(f"{p} has no config.json (not a saved transformers model)")
    f = p / POLICY_META
    if not f.is_file():
        raise InputError(f"{p} has no {POLICY_META} (save policies with rl3d.stages.policy.save_policy)")
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
    import transformers

    cls = getattr(transformers, name or "AutoModelForCausalLM", None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise InputError(f"{source}: model_class {name!r} is not a transformers model class")
    return cls


def load_codec_for(path: Path, meta: dict):
    from rl3d.formats.codec import VoxelCodec

    ref = meta.get("codec", "default")
    try:
        codec = VoxelCodec.load(None if ref in (None, "default") else path / ref)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"{path / POLICY_META}: codec {ref!r}: {e}") from None
    want = meta.get("codec_hash")
    if want and want != codec.content_hash():
        raise InputError(f"{path / POLICY_META}: codec {ref!r} has hash {codec.content_hash()}, but the policy "
                         f"was trained with codec {want}")
    return codec


def load_policy(path: str | os.PathLike | None = None, device: str | None = None,
                dtype: str | None = None) -> Policy:
    """A policy checkpoint dir (None = the shipped default) -> model (eval mode), tokenizer, codec."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no weight-loading bars in CLI output
    path = Path(path).resolve() if path is not None else default_policy_dir()
    meta = read_policy_meta(path)
    dev, dt = resolve_device_dtype(device, dtype)
    codec = load_codec_for(path, meta)
    tokenizer = load_tokenizer(path)
    cls = _model_class(meta.get("model_class"), path)
    try:
        model = cls.from_pretrained(str(path), local_files_only=True, dtype=dt)
    except Exception as e:
        raise InputError(f"{path}: cannot load the model ({type(e).__name__}: {e})") from None
    model.to(dev).eval()
    step = int(meta.get("step", 0))
    special = special_ids(tokenizer, codec, model_vocab_size(model), source=str(path))
    pid = f"{path}@{weights_hash(path)}#step{step}"
    return Policy(model, tokenizer, codec, path, pid, step, meta, special)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a policy dir. A plain `tokenizers` tokenizer (rl3d's own, saved as
    TokenizersBackend / PreTrainedTokenizerFast) is loaded as such: AutoTokenizer would pick the
    tokenizer class of config.json's model type (e.g. Qwen2Tokenizer) and rebuild it wrongly."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    cfg_file = path / "tokenizer_config.json"
    try:
        cls_name = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
        generic = cls_name in ("TokenizersBackend", "PreTrainedTokenizerFast")
        cls = PreTrainedTokenizerFast if generic else AutoTokenizer
        return cls.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise InputError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def weights_hash(path: Path) -> str:
    """Short content hash of the weight files. Files up to 1 GiB in total are hashed whole;
    beyond that, the safetensors headers, file sizes and 64 evenly spaced 1 MiB blocks."""
    files = sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin")))
    if not files:
        raise InputError(f"{path}: no weight files (*.safetensors)")
    h = hashlib.sha256()
    whole = sum(f.stat().st_size for f in files) <= _FULL_HASH_LIMIT
    for f in files:
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
    out/codec. `state_dict`: the weights to write when `model` holds only a shard of them (FSDP).
    Written into a temp dir renamed at the end, so a killed save leaves no torn dir."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if state_dict is not None:
        state_dict = _without_tied_copies(model, state_dict)
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    if codec_ref is None:
        codec.save(tmp / "codec")
        codec_ref = "codec"
    arch = (getattr(model.config, "architectures", None) or [None])[0]
    meta = {"codec": codec_ref, "codec_hash": codec.content_hash(), "step": int(step), "base": base,
            "model_class": arch if arch and hasattr(__import__("transformers"), arch) else "AutoModelForCausalLM",
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


# ---- special ids and the one function of constraints ------------------------------------------

# position kinds: what a completion position may emit
KIND_REASONING = 0   # text tokens or <mesh-start>
KIND_FORCE_START = 1  # reasoning budget spent: <mesh-start> forced
KIND_MESH = 2        # mesh tokens only
KIND_FORCE_END = 3   # <mesh-end> forced
KIND_FORCE_EOS = 4   # eos forced
KIND_PAD = 5         # padding / finished rows (log-prob 0, not in the mask)
NUM_KINDS = 6


@dataclass
class SpecialIds:
    mesh_ids: torch.Tensor      # int64[K] vocabulary ids of <mesh0>.. in codec order
    mesh_start: int
    mesh_end: int
    eos: int
    pad: int
    text_ids: torch.Tensor      # int64[n] ids a reasoning position may emit besides <mesh-start>
    vocab_size: int             # logits width
    _bias: dict = field(default_factory=dict, repr=False)

    @property
    def k(self) -> int:
        return int(self.mesh_ids.numel())

    def kind_bias(self, device, dtype=torch.float32) -> torch.Tensor:
        """float[NUM_KINDS, V]: 0 where a kind may emit a token, -inf elsewhere (cached per device)."""
        key = (str(device), dtype)
        if key not in self._bias:
            self._bias[key] = allowed_mask(self).to(device).float().log().to(dtype)  # True -> 0, False -> -inf
        return self._bias[key]

    def codec_lookup(self) -> torch.Tensor:
        """int64[V]: vocabulary id -> codec id (or -1 for non-mesh ids)."""
        lut = torch.full((self.vocab_size,), -1, dtype=torch.long)
        lut[self.mesh_ids] = torch.arange(self.k)
        return lut


def mesh_token_ids(tokenizer, codec, source: str = "tokenizer") -> tuple[torch.Tensor, int, int, int]:
    """-> (int64[K] ids of <mesh0>..<mesh{K-1}> in codec order, id of <mesh-start>, of <mesh-end>, of eos)."""
    from rl3d.formats.codec import MESH_END, MESH_START, mesh_token_text

    vocab = tokenizer.get_vocab()
    names = [mesh_token_text(i) for i in range(codec.vocab_size)]
    missing = [n for n in [MESH_START, MESH_END] + names if n not in vocab]
    if missing:
        raise InputError(f"{source}: tokenizer lacks {len(missing)} codec tokens (e.g. {missing[0]}); "
                         f"the codec needs {MESH_START}, {MESH_END} and <mesh0>..<mesh{codec.vocab_size - 1}>")
    if tokenizer.eos_token_id is None:
        raise InputError(f"{source}: tokenizer has no eos token")
    ids = torch.tensor([vocab[n] for n in names], dtype=torch.long)
    return ids, vocab[MESH_START], vocab[MESH_END], int(tokenizer.eos_token_id)


def special_ids(tokenizer, codec, vocab_size: int | None = None, source: str = "tokenizer") -> SpecialIds:
    mesh, start, end, eos = mesh_token_ids(tokenizer, codec, source)
    v = int(vocab_size or len(tokenizer))
    if max(int(mesh.max()), start, end, eos) >= v:
        raise InputError(f"{source}: tokenizer ids exceed the model's {v} output rows")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # text = every real tokenizer id that is not a special/added control token
    text = torch.zeros(v, dtype=torch.bool)
    text[: min(len(tokenizer), v)] = True
    banned = set(tokenizer.all_special_ids) | {start, end, eos, pad}
    banned |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    text[torch.tensor(sorted(i for i in banned if i < v), dtype=torch.long)] = False
    text[mesh] = False
    return SpecialIds(mesh, int(start), int(end), int(eos), int(pad), text.nonzero()[:, 0], v)


def allowed_mask(special: SpecialIds) -> torch.Tensor:
    """bool[NUM_KINDS, V]: which tokens each position kind may emit. The only definition of the
    constraints, used by the sampler and by log-prob recomputation alike."""
    m = torch.zeros(NUM_KINDS, special.vocab_size, dtype=torch.bool)
    m[KIND_REASONING, special.text_ids] = True
    m[KIND_REASONING, special.mesh_start] = True
    m[KIND_FORCE_START, special.mesh_start] = True
    m[KIND_MESH, special.mesh_ids] = True
    m[KIND_FORCE_END, special.mesh_end] = True
    m[KIND_FORCE_EOS, special.eos] = True
    m[KIND_PAD] = True  # ignored positions: anything (their log-prob is zeroed)
    return m


def masked_logits(logits: torch.Tensor, kinds: torch.Tensor, special: SpecialIds, temperature: float) -> torch.Tensor:
    """(logits [..., V] in fp32 / T) with the tokens a position's kind forbids at -inf."""
    bias = special.kind_bias(logits.device)
    return (logits.float() / float(temperature)).add_(bias.index_select(0, kinds.reshape(-1)).view(*kinds.shape, -1))


def token_logprobs(logits: torch.Tensor, kinds: torch.Tensor, tokens: torch.Tensor, special: SpecialIds,
                   temperature: float) -> torch.Tensor:
    """float32 log-probs of `tokens` under log_softmax(masked logits / T); PAD positions -> 0.
    A forced position has a single allowed token, so its log-prob is exactly 0."""
    lp = torch.log_softmax(masked_logits(logits, kinds, special, temperature), dim=-1)
    out = lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(kinds == KIND_PAD, 0.0)


# ---- sequences: building, batching, log-probs ----------------------------------------------------

def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt or reasoning text (no BOS/EOS added: the templates carry the roles)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_sequence(tokenizer, special: SpecialIds, prompt_text: str, reasoning: str, mesh_tokens) -> dict:
    """One level's full sequence (e.g. an SFT target) in the samples-table layout:
    input_ids and the span boundaries prompt_len, reasoning_end, mesh_start, mesh_end."""
    p = encode_text(tokenizer, prompt_text)
    r = encode_text(tokenizer, reasoning) if reasoning else []
    m = special.mesh_ids[torch.as_tensor(mesh_tokens, dtype=torch.long)].tolist()
    ids = p + r + [special.mesh_start] + m + [special.mesh_end, special.eos]
    re = len(p) + len(r)
    return {"input_ids": ids, "prompt_len": len(p), "reasoning_start": len(p), "reasoning_end": re,
            "mesh_start": re + 1, "mesh_end": re + 1 + len(m), "reasoning_truncated": False}


def completion_kinds(prompt_lens: torch.Tensor, reasoning_end: torch.Tensor, mesh_end: torch.Tensor,
                     lengths: torch.Tensor, truncated: torch.Tensor, width: int) -> torch.Tensor:
    """int64[B, width]: the kind of completion position j (absolute index prompt_len + j) of each row,
    from the samples-table spans. `truncated`: the reasoning hit its budget, so <mesh-start> was forced."""
    p = prompt_lens[:, None] + torch.arange(width, device=prompt_lens.device)[None]
    re, me = reasoning_end[:, None], mesh_end[:, None]
    start_kind = torch.where(truncated[:, None], KIND_FORCE_START, KIND_REASONING)
    k = torch.full_like(p, KIND_PAD)
    k = torch.where(p < re, KIND_REASONING, k)
    k = torch.where(p == re, start_kind, k)
    k = torch.where((p > re) & (p < me), KIND_MESH, k)
    k = torch.where(p == me, KIND_FORCE_END, k)
    k = torch.where(p == me + 1, KIND_FORCE_EOS, k)
    return torch.where(p < lengths[:, None], k, KIND_PAD)


def collate(rows: list[dict], special: SpecialIds, device=None) -> dict:
    """Samples-table rows -> a batch for completion_logprobs: prompts left-padded so every completion
    starts at the same column (the sampler's layout), completions right-padded.
    Each row needs input_ids, prompt_len, reasoning_end, mesh_end and reasoning_truncated."""
    n = len(rows)
    plen = torch.tensor([int(r["prompt_len"]) for r in rows])
    lens = torch.tensor([len(r["input_ids"]) for r in rows])
    P, T = int(plen.max()), int((lens - plen).max())
    ids = torch.full((n, P + T), special.pad, dtype=torch.long)
    att = torch.zeros((n, P + T), dtype=torch.long)
    for i, r in enumerate(rows):  # per row, not per token: a copy of each sequence
        seq = torch.as_tensor(r["input_ids"], dtype=torch.long)
        s = P - int(plen[i])
        ids[i, s:s + len(seq)] = seq
        att[i, s:s + len(seq)] = 1
    kinds = completion_kinds(plen, torch.tensor([int(r["reasoning_end"]) for r in rows]),
                             torch.tensor([int(r["mesh_end"]) for r in rows]), lens,
                             torch.tensor([bool(r["reasoning_truncated"]) for r in rows]), T)
    out = {"input_ids": ids, "attention_mask": att, "prompt_lens": plen, "kinds": kinds}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: positions count attended tokens only (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _uses_plain_head(model) -> bool:
    """True when logits == lm_head(last hidden state) (no soft-capping / scaling after the head)."""
    cfg = model.config.get_text_config()
    return (model.get_output_embeddings() is not None
            and not getattr(cfg, "final_logit_softcapping", None)
            and getattr(cfg, "logit_scale", None) in (None, 1.0))


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument of model.forward ('cache' in transformers >= 5.2x, else
    'past_key_values')."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class CompletionLogprobs(torch.nn.Module):
    """completion_logprobs as a module around the policy, so that a DDP / FSDP wrapper made by
    accelerate runs the whole computation in its forward: calling the decoder and head of a wrapped
    model directly would bypass the wrapper's gradient synchronisation."""

    def __init__(self, model, special: SpecialIds, temperature: float):
        super().__init__()
        self.model, self.special, self.temperature = model, special, float(temperature)
        # the decoder-layer classes FSDP's transformer-based auto-wrap looks for on the root module
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def tie_weights(self, *args, **kwargs):
        """Re-tie the policy's input and output embeddings. accelerate's FSDP2 preparation loads the
        sharded weights with load_state_dict(assign=True), which gives each parameter name its own
        tensor, and then calls tie_weights() on the wrapped module if it has one."""
        self.model.tie_weights()

    def forward(self, input_ids, attention_mask, prompt_lens, kinds):
        return completion_logprobs(self.model, input_ids, attention_mask, prompt_lens, kinds, self.special,
                                   self.temperature)


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: torch.Tensor,
                        kinds: torch.Tensor, special: SpecialIds, temperature: float = 1.0,
                        chunk_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each row's completion, with the sampler's masking.

    input_ids/attention_mask [B, L] (any padding; a row's tokens are contiguous), prompt_lens [B],
    kinds [B, T] from completion_kinds/collate. Returns (float32 [B, T] log-probs, bool [B, T] mask of
    real completion tokens); padded positions are 0. logprobs[b, j] is the log-prob of token
    prompt_len_b + j of row b. Differentiable: the output head, masking and log_softmax run in chunks
    of `chunk_size` positions under activation checkpointing when grad is on, so only hidden states
    of the completion are kept, never [B, T, V] logits.
    """
    B, L = input_ids.shape
    T = kinds.shape[1]
    pos = position_ids_from_mask(attention_mask)
    first = attention_mask.long().argmax(1)  # column of each row's first token
    cols = first[:, None] + prompt_lens[:, None].to(first.device) + torch.arange(T, device=first.device)[None]
    targets = input_ids.gather(1, cols.clamp(max=L - 1))
    pred_cols = (cols - 1).clamp(0, L - 1)  # the position whose output predicts each target
    if _uses_plain_head(model):
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                     use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
    else:  # heads with soft-capping: take the model's own logits for the completion positions
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False).logits
        head = torch.nn.Identity()
    h = hidden.gather(1, pred_cols[..., None].expand(-1, -1, hidden.shape[-1]))

    def chunk_lp(h_c, tok_c, kind_c):
        return token_logprobs(head(h_c), kind_c, tok_c, special, temperature)

    out = []
    for s in range(0, T, chunk_size):
        args = (h[:, s:s + chunk_size], targets[:, s:s + chunk_size], kinds[:, s:s + chunk_size])
        if torch.is_grad_enabled() and h.requires_grad:
            from torch.utils.checkpoint import checkpoint

            out.append(checkpoint(chunk_lp, *args, use_reentrant=False))
        else:
            out.append(chunk_lp(*args))
    lp = torch.cat(out, 1) if out else h.new_zeros((B, 0), dtype=torch.float32)
    return lp.float(), kinds != KIND_PAD
