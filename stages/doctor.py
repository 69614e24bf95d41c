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
from pathlib import Path

from rl3d.formats.codec import CODEBOOK_FILE, MESH_END, MESH_START, VoxelCodec, mesh_token_text
from rl3d.formats.errors import InputError
from rl3d.formats import vqvae64
from rl3d.stages.checks.check import Check, one_line, passed, problem
from rl3d.stages.checks.model_dir import (TOKENIZER_FILES, check_model_dir, has_tokenizer_files, load_tokenizer_only,
                                          raw_model_config)
from rl3d.stages.rewards import reward_config

POLICY_META = "rl3d_policy.json"  # as stages/policy/checkpoint.py writes it
PUBLISHED_VQVAE = "3DVQVAE.bin"  # ShapeLLM-Omni's VQ-VAE as published: a torch pickle, converted by rl3d codec convert


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
                return problem(what, f"{POLICY_META} names codec {ref!r}: {published} is the published VQ-VAE "
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
                    return problem(what, f"{detail} has hash {got} but {POLICY_META} records codec_hash {want}",
                                   "point \"codec\" at the VQ-VAE the policy was trained with, or, if this file "
                                   "is the right one, set \"codec_hash\" to the output of rl3d codec hash "
                                   f"{f}"), None
                return passed(what, f"{detail}, hash {got}" + ("" if want else f" (no codec_hash in {POLICY_META} "
                                                                                 f"to compare)")), cfg.num_embeddings
            if not (p / CODEBOOK_FILE).is_file() and not p.is_file():
                return problem(what, f"{POLICY_META} names codec {ref!r} but {p} holds neither {CODEBOOK_FILE} "
                                     f"nor {vqvae64.CHECKPOINT_FILE}",
                               "copy the codec dir the policy was trained with next to it, or fix \"codec\" "
                               "in rl3d_policy.json"), None
            codec = VoxelCodec.load(p)
            kind = f"32^3 codebook {p}"
    except InputError as e:
        return problem(what, str(e), "convert the published 3DVQVAE.bin with rl3d codec convert "
                                     "(docs/checkpoints.md) and check its config"), None
    except (FileNotFoundError, ValueError, OSError) as e:
        return problem(what, one_line(e), "rebuild or copy the codec (rl3d codec build)"), None
    want = meta.get("codec_hash")
    if want and want != codec.content_hash():
        return problem(what, f"{kind} has hash {codec.content_hash()} but the policy was trained with {want}",
                       "use the codec the policy was trained with"), codec.vocab_size
    return passed(what, f"{kind}, {codec.vocab_size} tokens"), codec.vocab_size


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
        return [problem("policy", f"{d} does not exist", "pass --policy the dir written by rl3d sft / rl-step, "
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
        checks.append(problem("policy metadata", f"{meta_file} is missing",
                              f"write it with rl3d's save_policy, or create it by hand: {example} "
                              f"(docs/checkpoints.md)"))
    else:
        try:
            meta = json.loads(meta_file.read_text())
            if not isinstance(meta, dict):
                raise ValueError("expected a JSON object")
            checks.append(passed("policy metadata", f"{meta_file} (codec {meta.get('codec', 'default')!r}, "
                                                    f"model_class {meta.get('model_class', 'AutoModelForCausalLM')}, "
                                                    f"step {meta.get('step', 0)})"))
        except ValueError as e:
            checks.append(problem("policy metadata", f"{meta_file}: invalid JSON ({one_line(e)})",
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
        return [problem(what, f"no tokenizer files in {d} ({', '.join(TOKENIZER_FILES)})",
                        "save the tokenizer into the policy dir (tokenizer.save_pretrained)")]
    try:
        tok = load_tokenizer_only(d)
    except Exception as e:
        return [problem(what, f"{d}: {type(e).__name__}: {one_line(e)[:200]}", "save the tokenizer again")]
    checks = [passed(what, f"{type(tok).__name__}, {len(tok)} tokens")]
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
            checks.append(problem("policy embeddings", f"model vocab_size {vocab_size} but the tokenizer uses ids up "
                                                      f"to {top}", "resize the model's token embeddings to "
                                                                   f"at least {top + 1} and save it"))
        else:
            checks.append(passed("policy embeddings",
                                 f"model vocab_size {vocab_size} covers every token id (<= {top})"))
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
        return [problem(what, str(e), fix)]
    unset = unset_env_refs(raw)
    checks = [passed(what, f"{cfg.source} ({cfg.name}: "
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


def check_backend(term, label: str, unset: dict[str, list[str]], timeout: float) -> list[Check]:
    """The term's backend's own doctor check (RewardBackend.doctor, stages/rewards/base.py)."""
    try:
        cls = reward_config.backend_class(term.backend)
    except InputError as e:
        return [problem(label, str(e), "install what the backend's module imports (docs/rewards.md)")]
    return cls.doctor(term.options, label, unset, timeout)


# ---- the texturing hook ----------------------------------------------------------------------------

def check_texture_hook(spec: str) -> list[Check]:
    from rl3d.stages.texturing.hook import hook_program, parse_hook

    what = "texture hook"
    try:
        hook = parse_hook(spec)
    except InputError as e:
        return [problem(what, str(e), "see docs/doctor.md for the hook's placeholders")]
    if hook.kind == "entry_point":
        module = hook.spec.split(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return [problem(what, f"module {module!r} is not importable",
                            "install the hook's package or add its folder to PYTHONPATH")]
        return [passed(what, f"entry point {hook.spec} (module found; the function is checked when it runs)")]
    prog = hook_program(hook)
    path = shutil.which(prog)
    if path is None:
        return [problem(what, f"program {prog!r} not found or not executable",
                        "give the full path of the hook's program, or install it on PATH")]
    return [passed(what, f"command {path} with {len(hook.argv) - 1} argument(s)")]


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
