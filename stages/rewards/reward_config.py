"""Reward configs: which terms score each level, with which backend, weight, view aggregation
and scale; and finding a backend by name: backend "<name>" is the RewardBackend subclass that
stages/rewards/<name>.py declares (name = "<name>"), imported when a config first names it, so
nothing else lists the backends and a geometry-only config never imports the model backends.

A config is a TOML file (YAML too when pyyaml is installed) or the name of a shipped preset
(stages/rewards/presets/<name>.toml). Layout:

    name = "default"
    description = "..."
    codec = ""                      # optional codec dir for decoding mesh_tokens ("" = shipped)

    [[levels.coarse]]               # one table per term; levels: coarse, fine, single
    name = "clip_score"             # column name in the rewards table
    backend = "clip"                # a backend: stages/rewards/<backend>.py
    weight = 1.0                    # term value = weight * scale * raw
    scale = 0.01                    # a number or a fraction string such as "1/3"
    aggregate = "max"               # over views: max | mean | min | none (backend gives one value)
    required = true                 # a failed required term makes the row's total null
    options = { metric = "clip_score" }   # passed to the backend's constructor

A string option may be exactly "${RL3D_NAME}" (a whole value naming an RL3D_ environment variable);
it is expanded when loading, and an option whose value expands to "" is dropped (the backend then
reports it as missing). A variable inside a longer string (a URL), any other variable, or the API
key's variable (`api_key_env`, sent only in the Authorization header) is refused.
Every error names the file and the key path, e.g. `levels.fine[2].aggregate`.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import pkgutil
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from importlib.resources import files
from pathlib import Path

from rl3d.formats.errors import InputError
from rl3d.stages.rewards.base import RewardBackend

LEVELS = ("coarse", "fine", "single")
AGGREGATES = ("max", "mean", "min", "none")
TERM_KEYS = {"name", "backend", "weight", "scale", "aggregate", "required", "options"}
TOP_KEYS = {"name", "description", "codec", "levels"}

REWARDS_PACKAGE = "rl3d.stages.rewards"  # backend <name> is the RewardBackend of REWARDS_PACKAGE.<name>

_TERM_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_RESERVED = {"sample_id", "prompt_id", "sample_index", "level", "total", "status", "message", "prompt"}
MAX_FACTOR = 1e6  # the largest weight or scale of a term
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class TermConfig:
    name: str
    backend: str
    weight: float = 1.0
    scale: float = 1.0
    aggregate: str = "max"
    required: bool = True
    options: dict = field(default_factory=dict)

    @property
    def factor(self) -> float:
        """Raw value -> the term's contribution to the total."""
        return self.weight * self.scale

    def backend_key(self) -> str:
        """Terms with the same backend and options share one backend instance."""
        return self.backend + ":" + json.dumps(self.options, sort_keys=True, default=str)


@dataclass
class RewardConfig:
    name: str
    levels: dict[str, list[TermConfig]]
    description: str = ""
    codec: str = ""
    source: str = ""

    def terms(self, level: str) -> list[TermConfig]:
        return self.levels.get(level, [])

    def term_names(self) -> list[str]:
        """Every term name over all levels, first-seen order (the table's term columns)."""
        seen: dict[str, None] = {}
        for lvl in LEVELS:
            for t in self.terms(lvl):
                seen.setdefault(t.name, None)
        return list(seen)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "codec": self.codec,
                "levels": {lvl: [asdict(t) for t in ts] for lvl, ts in self.levels.items()}}


def preset_names() -> list[str]:
    d = files("rl3d.stages.rewards") / "presets"
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".toml"))


def preset_path(name: str) -> Path:
    return Path(str(files("rl3d.stages.rewards") / "presets" / f"{name}.toml"))


def load_config(spec: str | os.PathLike) -> RewardConfig:
    """A config file path or a preset name -> a validated RewardConfig."""
    p = Path(spec)
    if not p.is_file():
        if str(spec) in preset_names():
            p = preset_path(str(spec))
        else:
            raise InputError(f"--config {spec}: no such file and not a preset "
                             f"(presets: {', '.join(preset_names())})")
    raw = _read(p)
    return parse_config(raw, str(p), default_name=p.stem)


def _read(p: Path) -> dict:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not UTF-8 text (byte {e.start}); a reward config is a TOML file") from None
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"{p}: YAML configs need pyyaml (pip install pyyaml), or use TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InputError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        except RecursionError:
            raise InputError(f"{p}: nested too deeply to be a reward config") from None
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"{p}: not valid TOML ({e})") from None
        except RecursionError:  # tomllib recurses once per level of arrays or inline tables
            raise InputError(f"{p}: nested too deeply to be a reward config") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: a reward config must be a table of keys")
    return data


def parse_config(raw: dict, source: str = "<config>", default_name: str = "config") -> RewardConfig:
    def bad(key: str, what: str):
        raise InputError(f"{source}: {key}: {what}")

    for k in raw:
        if k not in TOP_KEYS:
            bad(k, f"unknown key (expected one of {', '.join(sorted(TOP_KEYS))})")
    levels_raw = raw.get("levels")
    if not isinstance(levels_raw, dict) or not levels_raw:
        bad("levels", "missing or empty: give at least one of levels.coarse, levels.fine, levels.single")
    levels: dict[str, list[TermConfig]] = {}
    for lvl, terms in levels_raw.items():
        if lvl not in LEVELS:
            bad(f"levels.{lvl}", f"unknown level (expected one of {', '.join(LEVELS)})")
        if not isinstance(terms, list) or not terms:
            bad(f"levels.{lvl}", "must be a non-empty list of term tables ([[levels." + lvl + "]])")
        parsed, names = [], set()
        for i, t in enumerate(terms):
            term = _parse_term(t, f"levels.{lvl}[{i}]", bad)
            if term.name in names:
                bad(f"levels.{lvl}[{i}].name", f"duplicate term name {term.name!r} in level {lvl}")
            names.add(term.name)
            parsed.append(term)
        levels[lvl] = parsed
    for key in ("name", "description", "codec"):
        if key in raw and not isinstance(raw[key], str):
            bad(key, "must be a string")
    return RewardConfig(name=raw.get("name", default_name), levels=levels,
                        description=raw.get("description", ""), codec=_expand(raw.get("codec", "")),
                        source=source)


def _parse_term(t, key: str, bad) -> TermConfig:
    if not isinstance(t, dict):
        bad(key, "must be a table with name, backend, weight, ...")
    for k in t:
        if k not in TERM_KEYS:
            bad(f"{key}.{k}", f"unknown key (expected one of {', '.join(sorted(TERM_KEYS))})")
    for k in ("name", "backend"):
        if k not in t:
            bad(f"{key}.{k}", "missing")
        if not isinstance(t[k], str):
            bad(f"{key}.{k}", "must be a string")
    name, backend = t["name"], t["backend"]
    if not _TERM_NAME.match(name) or name in _RESERVED or name.endswith(("_raw", "_views", "_status", "_message")):
        bad(f"{key}.name", f"{name!r} is not a usable column name (lowercase letters, digits, _; "
                           f"not a reserved column or suffix)")
    try:
        cls = backend_class(backend)
    except InputError as e:
        bad(f"{key}.backend", str(e))
    weight = _number(t.get("weight", 1.0), f"{key}.weight", bad)
    scale = _number(t.get("scale", 1.0), f"{key}.scale", bad)
    agg = t.get("aggregate", "max")
    if agg not in AGGREGATES:
        bad(f"{key}.aggregate", f"{agg!r} is not one of {'|'.join(AGGREGATES)}")
    req = t.get("required", True)
    if not isinstance(req, bool):
        bad(f"{key}.required", "must be true or false")
    opts = t.get("options", {})
    if not isinstance(opts, dict):
        bad(f"{key}.options", "must be a table of backend options")
    for k, v in opts.items():  # secrets: a config never sends the environment anywhere
        _check_env_refs(v, f"{key}.options.{k}", opts.get("api_key_env"), bad)
    # an option given as "${VAR}" with VAR unset is dropped, so the backend reports it as missing
    opts = {k: _expand(v) for k, v in opts.items() if not (isinstance(v, str) and _ENV.search(v) and not _expand(v))}
    opts = {**cls.default_options(name), **opts}
    return TermConfig(name=name, backend=backend, weight=weight, scale=scale, aggregate=agg,
                      required=req, options=opts)


def _number(v, key: str, bad) -> float:
    if isinstance(v, bool):
        bad(key, "must be a number")
    if isinstance(v, (int, float)):
        if not math.isfinite(v):  # nan or inf would make every total NaN (or inf) with status ok
            bad(key, f"{v!r} is not a finite number")
        if abs(v) > MAX_FACTOR:  # 1e308 overflows the totals and the advantages to inf / NaN
            bad(key, f"{v!r} is outside [-{MAX_FACTOR:g}, {MAX_FACTOR:g}]")
        return float(v)
    if isinstance(v, str):
        try:
            f = float(Fraction(v.replace(" ", "")))
        except (ValueError, ZeroDivisionError, OverflowError):
            f = None
        if f is not None and abs(f) > MAX_FACTOR:
            bad(key, f"{v!r} is outside [-{MAX_FACTOR:g}, {MAX_FACTOR:g}]")
        if f is not None:
            return f
    bad(key, f"{v!r} is not a number or a fraction such as \"1/3\"")


_WHOLE_RL3D_VAR = re.compile(r"\$\{RL3D_[A-Z0-9_]*\}")


def _check_env_refs(v, key: str, api_key_env, bad) -> None:
    """A `${VAR}` may only be a whole option value naming an RL3D_ variable (a path, a model dir, an
    endpoint the user set for rl3d): never part of a longer string such as a URL, never another
    variable of the environment, never the API key's variable (the key goes only into the
    Authorization header, read by the client from `api_key_env`)."""
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_env_refs(x, f"{key}[{i}]", api_key_env, bad)
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_env_refs(x, f"{key}.{k}", api_key_env, bad)
    elif isinstance(v, str) and "${" in v:
        if not _WHOLE_RL3D_VAR.fullmatch(v):
            bad(key, f"{v!r}: only a whole value \"${{RL3D_NAME}}\" may name an environment variable "
                     f"(a variable inside a longer string, or outside RL3D_*, would send the environment away)")
        if api_key_env and v == f"${{{api_key_env}}}":
            bad(key, f"{v!r} is the API key's variable (api_key_env): the key goes only into the "
                     f"Authorization header")


def _expand(v):
    """${VAR} -> the environment variable's value ("" when unset: the backend then says what is missing)."""
    if isinstance(v, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1), ""), v)
    if isinstance(v, list):
        return [_expand(x) for x in v]
    if isinstance(v, dict):
        return {k: _expand(x) for k, x in v.items()}
    return v


def backend_class(name: str) -> type[RewardBackend]:
    """The backend a config names: the RewardBackend subclass with this `name` in
    stages/rewards/<name>.py, imported on first use. InputError when there is none, or its module
    does not import (a missing optional dependency)."""
    cls = _declared_backend(name)
    if cls is None:
        raise InputError(f"unknown backend {name!r} (known: {', '.join(backend_names())})")
    return cls


def backend_names() -> list[str]:
    """Every backend stages/rewards/ declares, by importing each of its modules (for listings and
    the unknown-backend message; a config's own backends are found by name alone)."""
    names = []
    for m in pkgutil.iter_modules(importlib.import_module(REWARDS_PACKAGE).__path__):
        try:
            if _declared_backend(m.name) is not None:
                names.append(m.name)
        except InputError:  # a backend whose module does not import here is not offered
            continue
    return sorted(names)


def _declared_backend(name: str) -> type[RewardBackend] | None:
    """The RewardBackend subclass named `name` that stages/rewards/<name>.py defines, else None."""
    module = f"{REWARDS_PACKAGE}.{name}"
    if not _TERM_NAME.match(name) or importlib.util.find_spec(module) is None:
        return None
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise InputError(f"reward backend {name!r} is not available ({module}: {e})") from None
    found = [c for c in vars(mod).values() if isinstance(c, type) and issubclass(c, RewardBackend)
             and c is not RewardBackend and c.__module__ == module and c.name == name]
    return found[0] if found else None


def make_backend(term: TermConfig):
    """Instantiate a term's backend; constructor errors become an InputError naming the term."""
    cls = backend_class(term.backend)
    try:
        return cls(**term.options)
    except InputError as e:
        raise InputError(f"term {term.name!r} (backend {term.backend}): {e}") from None
    except TypeError as e:
        raise InputError(f"term {term.name!r} (backend {term.backend}): bad options: {e}") from None
