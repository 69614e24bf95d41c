"""Header-only checks of files and model dirs: a safetensors file's header against its size, a
transformers model dir's config.json against the class that will load it, its tokenizer files.
Nothing here reads weights or runs a dir's code."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from rl3d.formats.model_dirs import remote_code_allowed
from rl3d.stages.checks.check import Check, one_line, passed, problem

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB


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
            return problem(what, f"{index}: not a safetensors index ({one_line(e)})",
                           "re-save the model with save_pretrained(safe_serialization=True)")
        files = sorted(set(weight_map.values()))
    elif (d / "model.safetensors").is_file():
        files, weight_map = ["model.safetensors"], None
    else:
        pickled = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
        detail = f"no model.safetensors in {d}" + (f" (found pickled {', '.join(pickled)})" if pickled else "")
        return problem(what, detail, "rl3d loads safetensors only: re-save the model with "
                                     "save_pretrained(safe_serialization=True)")
    n_tensors = n_params = 0
    for name in files:
        f = d / name
        if not f.is_file():
            return problem(what, f"shard {f} is missing",
                           "copy the whole model dir again (every shard the index names)")
        try:
            header = safetensors_header(f)
        except (OSError, ValueError) as e:
            return problem(what, f"{f}: {e}", "copy or download the file again; its size must match the original")
        if weight_map is not None:
            absent = [k for k, v in weight_map.items() if v == name and k not in header]
            if absent:
                return problem(what, f"{f} lacks {len(absent)} tensor(s) its index names, e.g. {absent[0]}",
                               "copy the model dir again")
        n_tensors += len(header)
        for v in header.values():
            p = 1
            for s in v["shape"]:
                p *= int(s)
            n_params += p
    return passed(what, f"{len(files)} safetensors file(s), {n_tensors} tensors, "
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
        raise ValueError(f"{d}/config.json: {type(e).__name__}: {cut_at_word(one_line(e), 300)}") from None


def cut_at_word(text: str, limit: int) -> str:
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
        return passed(f"{what} code", f"config.json auto_map ({names}): --trust-remote-code is on, so loading "
                                      f"runs the Python files shipped in {d}")
    mapping = getattr(cls, "_model_mapping", None)  # an auto class: the concrete class it picks
    loaded = mapping[type(config)].__name__ if mapping is not None and type(config) in mapping else cls.__name__
    return passed(f"{what} code", f"config.json auto_map ({names}) is ignored: rl3d loads transformers' own "
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
        return [problem(what, f"{d} does not exist", fix_missing)], None
    try:
        config = read_model_config(d)
    except ValueError as e:
        fix = "point at a saved transformers model dir (config.json + weights)"
        if "is not a model type of the installed transformers" in str(e):
            fix = ("upgrade transformers to a version that knows it, or, if you trust the dir's own model code, "
                   "run rl3d --trust-remote-code doctor ... (and every command) to let transformers import it")
        return [problem(what, str(e), fix)], None
    cls = getattr(transformers, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        return [problem(what, f"{class_name!r} is not a transformers model class",
                        "name a class of the installed transformers, e.g. AutoModelForCausalLM")], config
    if not class_accepts(cls, config):
        return [problem(what, f"{d}: model_type {config.model_type!r} ({type(config).__name__}) cannot be loaded "
                              f"as {class_name}", f"point at a {class_name} model dir")], config
    arch = ",".join(getattr(config, "architectures", None) or []) or "?"
    code = remote_code_check(d, config, cls, what)
    return [passed(what, f"{d} ({class_name}, model_type {config.model_type}, architectures {arch})"),
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
