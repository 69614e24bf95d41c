"""`rl3d doctor`: check what a run will use - the policy dir, its codec and tokenizer, every reward
backend of a reward config, the texturing hook - before any GPU time is spent. Headers only:
config.json, tokenizer files, safetensors headers, a GET of an endpoint's model list; never the
weights. Each check is one Check (ok, or a problem with how to fix it in plain words).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rl3d.formats.codec import CODEBOOK_FILE, MESH_END, MESH_START, VoxelCodec, mesh_token_text
from rl3d.formats.errors import InputError
from rl3d.formats.model_dirs import remote_code_allowed
from rl3d.formats import vqvae64
from rl3d.stages.rewards import config as reward_config

POLICY_META = "rl3d_policy.json"  # as stages/policy/checkpoint.py writes it
PUBLISHED_VQVAE = "3DVQVAE.bin"  # ShapeLLM-Omni's VQ-VAE as published: a torch pickle, converted by rl3d codec convert
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB


@dataclass
class Check:
    what: str            # the thing checked, e.g. "policy tokenizer"
    ok: bool
    detail: str          # what was found
    fix: str = ""        # for a problem: what to do, in plain words

    def line(self) -> str:
        if self.ok:
            return f"ok       {self.what}: {self.detail}"
        return f"PROBLEM  {self.what}: {self.detail}" + (f" -> fix: {self.fix}" if self.fix else "")

    def as_dict(self) -> dict:
        return asdict(self)


def _ok(what, detail) -> Check:
    return Check(what, True, detail)


def _problem(what, detail, fix="") -> Check:
    return Check(what, False, detail, fix)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---- files and headers -----------------------------------------------------------------------------

def safetensors_header(file: Path) -> dict:
    """The header of a safetensors file (name -> {dtype, shape, data_offsets}), checked against the
    file's size so a truncated download is caught; ValueError saying what is wrong."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes: too short to be a safetensors file")
        n = struct.unpack("<Q", head)[0]
        if n > MAX_HEADER or 8 + n > size:
            raise ValueError(f"header of {n} bytes does not fit in the file's {size} bytes "
                             f"(truncated or not safetensors)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"unreadable header ({e})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if 8 + n + end != size:
        raise ValueError(f"the header describes {8 + n + end} bytes but the file has {size} (truncated or damaged)")
    return tensors


def check_weights(d: Path, what: str) -> Check:
    """The dir's safetensors weights (one file or an index of shards), headers only."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            return _problem(what, f"{index}: not a safetensors index ({_one_line(e)})",
                            "re-save the model with save_pretrained(safe_serialization=True)")
        files = sorted(set(weight_map.values()))
    elif (d / "model.safetensors").is_file():
        files, weight_map = ["model.safetensors"], None
    else:
        pickled = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
        detail = f"no model.safetensors in {d}" + (f" (found pickled {', '.join(pickled)})" if pickled else "")
        return _problem(what, detail, "rl3d loads safetensors only: re-save the model with "
                                      "save_pretrained(safe_serialization=True)")
    n_tensors = n_params = 0
    for name in files:
        f = d / name
        if not f.is_file():
            return _problem(what, f"shard {f} is missing",
                            "copy the whole model dir again (every shard the index names)")
        try:
            header = safetensors_header(f)
        except (OSError, ValueError) as e:
            return _problem(what, f"{f}: {e}", "copy or download the file again; its size must match the original")
        if weight_map is not None:
            absent = [k for k, v in weight_map.items() if v == name and k not in header]
            if absent:
                return _problem(what, f"{f} lacks {len(absent)} tensor(s) its index names, e.g. {absent[0]}",
                                "copy the model dir again")
        n_tensors += len(header)
        for v in header.values():
            p = 1
            for s in v["shape"]:
                p *= int(s)
            n_params += p
    return _ok(what, f"{len(files)} safetensors file(s), {n_tensors} tensors, "
                     f"{n_params / 1e6:.3g}M parameters (headers)")


def raw_model_config(d: Path) -> dict:
    """config.json as plain JSON ({} when missing or not an object)."""
    try:
        raw = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def read_model_config(d: Path):
    """transformers' config object of a model dir (config.json only), or raise ValueError."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not (d / "config.json").is_file():
        raise ValueError(f"no config.json in {d}")
    raw = raw_model_config(d)
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING and not remote_code_allowed():
        code = "AutoConfig" in (raw.get("auto_map") or {})
        raise ValueError(f"{d}/config.json: model_type {model_type!r} is not a model type of the installed "
                         f"transformers {transformers.__version__}"
                         + ("; the dir ships its own code for it (config.json auto_map)" if code else ""))
    try:
        return AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=remote_code_allowed())
    except Exception as e:
        raise ValueError(f"{d}/config.json: {type(e).__name__}: {_sentences(_one_line(e), 300)}") from None


def _sentences(text: str, limit: int) -> str:
    """text cut at a word boundary near `limit` characters (an exception's text can be pages long)."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def remote_code_check(d: Path, config, cls, what: str) -> Check | None:
    """A config.json whose auto_map names code shipped in the dir: say which class actually loads."""
    auto_map = raw_model_config(d).get("auto_map")
    if not auto_map:
        return None
    names = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else str(auto_map)
    if remote_code_allowed():
        return _ok(f"{what} code", f"config.json auto_map ({names}): --trust-remote-code is on, so loading "
                                   f"runs the Python files shipped in {d}")
    mapping = getattr(cls, "_model_mapping", None)  # an auto class: the concrete class it picks
    loaded = mapping[type(config)].__name__ if mapping is not None and type(config) in mapping else cls.__name__
    return _ok(f"{what} code", f"config.json auto_map ({names}) is ignored: rl3d loads transformers' own "
                               f"{loaded} for model_type {config.model_type!r}, not the dir's code (which runs "
                               f"only with rl3d --trust-remote-code)")


def class_accepts(cls, config) -> bool:
    """Can `cls.from_pretrained` build a model from this config (auto classes: via their mapping)?"""
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is not None:
        return type(config) in mapping
    return isinstance(config, cls.config_class)


def check_model_dir(d: Path, what: str, class_name: str, fix_missing: str) -> tuple[list[Check], object]:
    """Dir exists, config.json loads and fits `class_name`, weights headers are whole."""
    import transformers

    if not d.is_dir():
        return [_problem(what, f"{d} does not exist", fix_missing)], None
    try:
        config = read_model_config(d)
    except ValueError as e:
        fix = "point at a saved transformers model dir (config.json + weights)"
        if "is not a model type of the installed transformers" in str(e):
            fix = ("upgrade transformers to a version that knows it, or, if you trust the dir's own model code, "
                   "run rl3d --trust-remote-code doctor ... (and every command) to let transformers import it")
        return [_problem(what, str(e), fix)], None
    cls = getattr(transformers, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        return [_problem(what, f"{class_name!r} is not a transformers model class",
                         "name a class of the installed transformers, e.g. AutoModelForCausalLM")], config
    if not class_accepts(cls, config):
        return [_problem(what, f"{d}: model_type {config.model_type!r} ({type(config).__name__}) cannot be loaded "
                               f"as {class_name}", f"point at a {class_name} model dir")], config
    arch = ",".join(getattr(config, "architectures", None) or []) or "?"
    code = remote_code_check(d, config, cls, what)
    return [_ok(what, f"{d} ({class_name}, model_type {config.model_type}, architectures {arch})"),
            *([code] if code else []), check_weights(d, f"{what} weights")], config


def load_tokenizer_only(d: Path):
    """The dir's tokenizer, as stages/policy/tokenizer.load_tokenizer loads it (the files are small)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = d / "tokenizer_config.json"
    cls_name = json.loads(cfg.read_text()).get("tokenizer_class") if cfg.is_file() else None
    cls = PreTrainedTokenizerFast if cls_name in ("TokenizersBackend", "PreTrainedTokenizerFast") else AutoTokenizer
    return cls.from_pretrained(str(d), local_files_only=True, trust_remote_code=remote_code_allowed())


def has_tokenizer_files(d: Path) -> bool:
    return any((d / f).is_file() for f in TOKENIZER_FILES)


# ---- the policy ------------------------------------------------------------------------------------

def check_codec(policy: Path, meta: dict) -> tuple[Check, int | None]:
    """The policy's codec (the shipped default, an embedded 32^3 codebook dir, or a 64^3 VQ-VAE
    checkpoint checked by header) -> (check, codec vocab size K)."""
    what = "policy codec"
    ref = meta.get("codec", "default")
    try:
        if ref in (None, "default"):
            codec = VoxelCodec.load(None)
            kind = "the shipped 32^3 codec"
        else:
            p = Path(ref) if Path(ref).is_absolute() else policy / ref
            published = p if p.suffix == ".bin" else p / PUBLISHED_VQVAE
            if published.is_file() and not (p / vqvae64.CHECKPOINT_FILE).is_file():
                return _problem(what, f"{POLICY_META} names codec {ref!r}: {published} is the published VQ-VAE "
                                      f"pickle, not converted to safetensors",
                                f"rl3d codec convert {published} {published.parent}, then set \"codec\" in "
                                f"{POLICY_META} to {published.parent} and \"codec_hash\" to the hash it prints "
                                f"(docs/checkpoints.md)"), None
            if (p / vqvae64.CHECKPOINT_FILE).is_file() or p.suffix == ".safetensors":
                f, cfg = vqvae64.check_checkpoint(p)
                detail = (f"{f}: 64^3 VQ-VAE, channels {list(cfg.channels)}, codebook "
                          f"{cfg.num_embeddings}x{cfg.embedding_dim}")
                want, got = meta.get("codec_hash"), vqvae64.file_hash(f)  # reads the file whole (533 MB published)
                if want and want != got:
                    return _problem(what, f"{detail} has hash {got} but {POLICY_META} records codec_hash {want}",
                                    "point \"codec\" at the VQ-VAE the policy was trained with, or, if this file "
                                    "is the right one, set \"codec_hash\" to the output of rl3d codec hash "
                                    f"{f}"), None
                return _ok(what, f"{detail}, hash {got}" + ("" if want else f" (no codec_hash in {POLICY_META} "
                                                                              f"to compare)")), cfg.num_embeddings
            if not (p / CODEBOOK_FILE).is_file() and not p.is_file():
                return _problem(what, f"{POLICY_META} names codec {ref!r} but {p} holds neither {CODEBOOK_FILE} "
                                      f"nor {vqvae64.CHECKPOINT_FILE}",
                                "copy the codec dir the policy was trained with next to it, or fix \"codec\" "
                                "in rl3d_policy.json"), None
            codec = VoxelCodec.load(p)
            kind = f"32^3 codebook {p}"
    except InputError as e:
        return _problem(what, str(e), "convert the published 3DVQVAE.bin with rl3d codec convert "
                                      "(docs/checkpoints.md) and check its config"), None
    except (FileNotFoundError, ValueError, OSError) as e:
        return _problem(what, _one_line(e), "rebuild or copy the codec (rl3d codec build)"), None
    want = meta.get("codec_hash")
    if want and want != codec.content_hash():
        return _problem(what, f"{kind} has hash {codec.content_hash()} but the policy was trained with {want}",
                        "use the codec the policy was trained with"), codec.vocab_size
    return _ok(what, f"{kind}, {codec.vocab_size} tokens"), codec.vocab_size


def mesh_token_report(tokenizer, k: int) -> tuple[bool, str]:
    """(all present, description) of <mesh-start>, <mesh0>..<mesh{k-1}>, <mesh-end> in a vocab."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (MESH_START, MESH_END) if t not in vocab]
    ids = [vocab.get(mesh_token_text(i)) for i in range(k)]
    absent = [i for i, v in enumerate(ids) if v is None]
    if absent:
        span = f"..<mesh{absent[-1]}> ({len(absent)} of {k})" if len(absent) > 1 else ""
        missing.append(f"<mesh{absent[0]}>{span}")
    if missing:
        return False, "missing " + ", ".join(missing)
    contiguous = ids == list(range(ids[0], ids[0] + k))
    extra = mesh_token_text(k) in vocab
    desc = (f"<mesh0>..<mesh{k - 1}> = ids {min(ids)}..{max(ids)} "
            f"({'contiguous' if contiguous else 'not contiguous'}), "
            f"<mesh-start> = {vocab[MESH_START]}, <mesh-end> = {vocab[MESH_END]}")
    if extra:
        return False, desc + f"; but the tokenizer also has {mesh_token_text(k)}: it was built for a larger codec"
    return True, desc


def check_policy(policy: str | os.PathLike) -> list[Check]:
    d = Path(policy)
    if not d.is_dir():
        return [_problem("policy", f"{d} does not exist", "pass --policy the dir written by rl3d sft / rl-step, "
                                                          "or a converted checkpoint (docs/checkpoints.md)")]
    meta_file = d / POLICY_META
    checks: list[Check] = []
    meta: dict = {}
    if not meta_file.is_file():
        # the class config.json's architectures names stands in for model_class, so the missing file is
        # one problem and not also a class that does not fit (a vision-language checkpoint)
        meta = {"model_class": _architecture_class(d)} if _architecture_class(d) else {}
        example = json.dumps({"codec": "<the codec dir, or default>",
                              "model_class": meta.get("model_class", "AutoModelForCausalLM")})
        checks.append(_problem("policy metadata", f"{meta_file} is missing",
                               f"write it with rl3d's save_policy, or create it by hand: {example} "
                               f"(docs/checkpoints.md)"))
    else:
        try:
            meta = json.loads(meta_file.read_text())
            if not isinstance(meta, dict):
                raise ValueError("expected a JSON object")
            checks.append(_ok("policy metadata", f"{meta_file} (codec {meta.get('codec', 'default')!r}, "
                                                 f"model_class {meta.get('model_class', 'AutoModelForCausalLM')}, "
                                                 f"step {meta.get('step', 0)})"))
        except ValueError as e:
            checks.append(_problem("policy metadata", f"{meta_file}: invalid JSON ({_one_line(e)})",
                                   "fix the file: it must be one JSON object"))
            meta = {}
    class_name = meta.get("model_class") or "AutoModelForCausalLM"
    model_checks, config = check_model_dir(d, "policy model", class_name, "")
    checks += model_checks
    codec_check, k = check_codec(d, meta) if meta_file.is_file() else (None, None)
    if codec_check:
        checks.append(codec_check)
    checks += check_policy_tokenizer(d, k, config)
    return checks


def _architecture_class(d: Path) -> str | None:
    """The transformers class config.json's architectures names, when the installed transformers has it."""
    import transformers

    arch = (raw_model_config(d).get("architectures") or [None])[0]
    return arch if isinstance(arch, str) and hasattr(transformers, arch) else None


def check_policy_tokenizer(d: Path, k: int | None, config) -> list[Check]:
    what = "policy tokenizer"
    if not has_tokenizer_files(d):
        return [_problem(what, f"no tokenizer files in {d} ({', '.join(TOKENIZER_FILES)})",
                         "save the tokenizer into the policy dir (tokenizer.save_pretrained)")]
    try:
        tok = load_tokenizer_only(d)
    except Exception as e:
        return [_problem(what, f"{d}: {type(e).__name__}: {_one_line(e)[:200]}", "save the tokenizer again")]
    checks = [_ok(what, f"{type(tok).__name__}, {len(tok)} tokens")]
    if k is None:
        return checks
    ok, desc = mesh_token_report(tok, k)
    fix = (f"add the codec's {k} mesh tokens: rl3d.stages.policy.tokenizer.add_mesh_tokens(tokenizer, {k}), "
           f"resize the model's embeddings, and save both (docs/doctor.md)")
    checks.append(Check("policy mesh tokens", ok, f"codec has {k} tokens; {desc}", "" if ok else fix))
    vocab_size = _vocab_size(config) if config is not None else None
    if ok and vocab_size is not None:
        top = max(tok.get_vocab()[t] for t in (MESH_START, MESH_END, mesh_token_text(0), mesh_token_text(k - 1)))
        top = max(top, len(tok) - 1)
        if top >= vocab_size:
            checks.append(_problem("policy embeddings", f"model vocab_size {vocab_size} but the tokenizer uses ids up "
                                                       f"to {top}", "resize the model's token embeddings to "
                                                                    f"at least {top + 1} and save it"))
        else:
            checks.append(_ok("policy embeddings", f"model vocab_size {vocab_size} covers every token id (<= {top})"))
    return checks


def _vocab_size(config) -> int | None:
    for c in (config, getattr(config, "text_config", None)):
        v = getattr(c, "vocab_size", None) if c is not None else None
        if isinstance(v, int):
            return v
    return None


# ---- reward backends -------------------------------------------------------------------------------

def unset_env_refs(raw: dict) -> dict[tuple[str, int, str], list[str]]:
    """(level, term index, option) -> the ${VAR}s it names that are unset or empty."""
    found = {}
    for lvl, terms in (raw.get("levels") or {}).items():
        for i, t in enumerate(terms if isinstance(terms, list) else []):
            for opt, v in ((t.get("options") or {}) if isinstance(t, dict) else {}).items():
                if isinstance(v, str):
                    names = [m.group(1) for m in reward_config._ENV.finditer(v) if not os.environ.get(m.group(1))]
                    if names:
                        found[(lvl, i, opt)] = names
    return found


def check_rewards(spec: str, timeout: float) -> list[Check]:
    what = "reward config"
    p = Path(spec)
    try:
        cfg = reward_config.load_config(spec)
        raw = reward_config._read(Path(cfg.source))
    except InputError as e:
        fix = "fix the key it names (docs/rewards.md)" if p.is_file() or spec in reward_config.preset_names() \
            else "pass a reward config file or a preset name"
        return [_problem(what, str(e), fix)]
    unset = unset_env_refs(raw)
    checks = [_ok(what, f"{cfg.source} ({cfg.name}: "
                        + ", ".join(f"{lvl} {len(cfg.terms(lvl))} terms" for lvl in reward_config.LEVELS
                                    if cfg.terms(lvl)) + ")")]
    seen: dict[str, list[Check]] = {}
    for lvl in reward_config.LEVELS:
        for i, term in enumerate(cfg.terms(lvl)):
            label = f"reward {lvl}.{term.name} ({term.backend})"
            env = {opt: names for (l, j, opt), names in unset.items() if l == lvl and j == i}
            key = term.backend_key()
            if key in seen:  # same backend and options as an earlier term: same verdict, said once
                first = seen[key]
                ok = all(c.ok for c in first)
                checks.append(Check(label, ok, "same backend and options as " + first[0].what.split(" ")[1]
                                    + ("" if ok else " (see above)")))
                continue
            term_checks = check_backend(term, label, env, timeout)
            seen[key] = term_checks
            checks += term_checks
    return checks


def _env_fix(env: dict[str, list[str]], options: tuple[str, ...]) -> str:
    names = [n for o in options for n in env.get(o, [])]
    return " or ".join(f"export {n}=..." for n in dict.fromkeys(names))


def check_backend(term, label: str, env: dict[str, list[str]], timeout: float) -> list[Check]:
    o = term.options
    if term.backend in ("geometry", "spec"):
        return [_ok(label, "no model needed")]
    if term.backend == "clip":
        if not o.get("model"):
            from rl3d.stages.scoring.clip import default_scorer_dir

            if env.get("model"):
                return [_problem(label, f"option model names {env['model'][0]}, which is unset, so the shipped "
                                        f"scorer would be used", _env_fix(env, ("model",)))]
            d = default_scorer_dir()
            return [_ok(label, f"the shipped scorer {d}")] if (d / "config.json").is_file() else \
                [_problem(label, f"the shipped scorer {d} is not built", "run rl3d train-scorer, or set option model")]
        d = Path(o["model"])
        checks, _ = check_model_dir(d, label, "CLIPModel", "set option model to a local CLIP dir (config.json, "
                                                           "safetensors, tokenizer, preprocessor_config.json)")
        if d.is_dir() and checks[0].ok:
            if not has_tokenizer_files(d):
                checks.append(_problem(label + " tokenizer", f"no tokenizer files in {d}",
                                       "save the CLIP tokenizer into the dir"))
            if not (d / "preprocessor_config.json").is_file():
                checks.append(_problem(label + " image processor", f"no preprocessor_config.json in {d}",
                                       "save the CLIP image processor into the dir"))
        return checks
    if term.backend == "hps":
        return check_hps(o, label, env)
    if term.backend == "vlm":
        return check_vlm(o, label, env, timeout)
    return [_ok(label, "not checked (no doctor check for this backend)")]


def import_open_clip():
    """(open_clip module or None, why not). Imported for real: an installed open_clip whose torchvision
    does not match torch fails only here."""
    if importlib.util.find_spec("open_clip") is None:
        return None, "open_clip is not installed"
    try:
        import open_clip  # lazy: heavy, and optional (rl3d[hps])
    except Exception as e:
        return None, f"open_clip is installed but does not import ({type(e).__name__}: {_one_line(e)[:160]})"
    return open_clip, ""


def check_hps(o: dict, label: str, env: dict[str, list[str]]) -> list[Check]:
    checks = []
    open_clip, why = import_open_clip()
    if open_clip is None:
        checks.append(_problem(f"{label} package", why, "pip install 'rl3d[hps]' (open_clip_torch, with the "
                                                        "torchvision build that matches your torch)"))
    arch = o.get("arch", "ViT-H-14")
    if open_clip is not None and open_clip.get_model_config(arch) is None:
        checks.append(_problem(label, f"open_clip has no model config {arch!r}",
                               "set option arch to an open_clip model"))
    ckpt = o.get("checkpoint", "")
    if not ckpt:
        fix = _env_fix(env, ("checkpoint",)) or "set option checkpoint"
        return checks + [_problem(label, "no HPS checkpoint given" + (f" ({env['checkpoint'][0]} is unset)"
                                                                       if env.get("checkpoint") else ""),
                                  fix + " (the path to HPS_v2.1_compressed.pt)")]
    f = Path(ckpt)
    if not f.is_file():
        return checks + [_problem(label, f"HPS checkpoint {f} does not exist",
                                  "download HPS_v2.1_compressed.pt to that path, or point option checkpoint "
                                  "(RL3D_HPS_CHECKPOINT) at it")]
    try:
        if f.suffix == ".safetensors":
            n = len(safetensors_header(f))
        else:  # a torch zip: its central directory sits at the end, so a cut file fails here
            with zipfile.ZipFile(f) as z:
                n = sum(1 for name in z.namelist() if "/data/" in name)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return checks + [_problem(label, f"{f}: not a whole checkpoint ({_one_line(e)})",
                                  "download the file again (rl3d reads torch zip files or .safetensors)")]
    return checks + [_ok(label, f"{f} ({n} tensors), open_clip arch {arch}")]


def check_vlm(o: dict, label: str, env: dict[str, list[str]], timeout: float) -> list[Check]:
    if o.get("model") and o.get("endpoint"):
        return [_problem(label, "both model and endpoint are set", "give exactly one of them")]
    if o.get("model"):
        d = Path(o["model"])
        checks, _ = check_model_dir(d, label, "Qwen2_5_VLForConditionalGeneration",
                                    "set option model to a local Qwen2.5-VL-style dir")
        if d.is_dir() and checks[0].ok:
            missing = [n for n, ok in (("tokenizer", has_tokenizer_files(d)),
                                       ("preprocessor_config.json", (d / "preprocessor_config.json").is_file()))
                       if not ok]
            if missing:
                checks.append(_problem(label + " processor", f"{d} lacks {', '.join(missing)}",
                                       "copy the model's tokenizer and preprocessor files into the dir"))
        return checks
    if o.get("endpoint"):
        return [check_endpoint(o["endpoint"], o.get("model_name"), o.get("api_key_env"), label, timeout)]
    fix = _env_fix(env, ("model", "endpoint")) or "set option model (a local dir) or endpoint (a base URL)"
    return [_problem(label, "no judge model: neither model nor endpoint is set", fix)]


def models_url(endpoint: str) -> str:
    base = endpoint.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base + ("/models" if base.endswith("/v1") else "/v1/models")


def check_endpoint(endpoint: str, model_name: str | None, key_env: str | None, label: str, timeout: float) -> Check:
    headers = {}
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            return _problem(label, f"api_key_env names {key_env}, which is unset", f"export {key_env}=<your key>")
        headers["Authorization"] = f"Bearer {key}"
    if not model_name:
        return _problem(label, "endpoint without model_name", "set option model_name to the served model's name")
    url = models_url(endpoint)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            body = r.read(1 << 20)
    except urllib.error.HTTPError as e:
        fix = f"check the key in {key_env}" if e.code in (401, 403) else "check the endpoint URL and the server"
        return _problem(label, f"GET {url}: HTTP {e.code}", fix)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        reason = _one_line(reason) if isinstance(reason, Exception) else reason
        return _problem(label, f"GET {url}: unreachable ({reason})",
                        "start the server (e.g. vllm serve ...) or fix option endpoint")
    try:
        served = [m.get("id") for m in json.loads(body).get("data", [])]
    except (ValueError, AttributeError, TypeError):
        return _ok(label, f"{url} answered (model list not readable; model_name {model_name!r} not verified)")
    if served and model_name not in served:
        return _problem(label, f"{url} serves {', '.join(map(str, served[:5]))}, not {model_name!r}",
                        "set option model_name to one of the served names, or serve the model under that name")
    return _ok(label, f"{url} serves {model_name!r}")


# ---- the texturing hook ----------------------------------------------------------------------------

def check_texture_hook(spec: str) -> list[Check]:
    from rl3d.stages.texturing.hook import hook_program, parse_hook

    what = "texture hook"
    try:
        hook = parse_hook(spec)
    except InputError as e:
        return [_problem(what, str(e), "see docs/doctor.md for the hook's placeholders")]
    if hook.kind == "entry_point":
        module = hook.spec.split(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return [_problem(what, f"module {module!r} is not importable",
                             "install the hook's package or add its folder to PYTHONPATH")]
        return [_ok(what, f"entry point {hook.spec} (module found; the function is checked when it runs)")]
    prog = hook_program(hook)
    path = shutil.which(prog)
    if path is None:
        return [_problem(what, f"program {prog!r} not found or not executable",
                         "give the full path of the hook's program, or install it on PATH")]
    return [_ok(what, f"command {path} with {len(hook.argv) - 1} argument(s)")]


# ---- the command -----------------------------------------------------------------------------------

def run_doctor(policy: str | None = None, rewards: str | None = None, texture_hook: str | None = None,
               timeout: float = 5.0) -> list[Check]:
    """Every check for what was given; InputError when nothing was given."""
    if policy is None and rewards is None and texture_hook is None:
        raise InputError("nothing to check: give --policy, --rewards and/or --texture-hook")
    if timeout <= 0:
        raise InputError(f"--timeout must be > 0 seconds, got {timeout}")
    checks: list[Check] = []
    if policy is not None:
        checks += check_policy(policy)
    if rewards is not None:
        checks += check_rewards(rewards, timeout)
    if texture_hook is not None:
        checks += check_texture_hook(texture_hook)
    return checks
