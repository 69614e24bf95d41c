"""What `rl3d doctor` asks an OpenAI-compatible endpoint: one GET of its model list (with the API key
from the named variable), never a completion."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from rl3d.stages.checks.check import Check, one_line, passed, problem


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
            return problem(label, f"api_key_env names {key_env}, which is unset", f"export {key_env}=<your key>")
        headers["Authorization"] = f"Bearer {key}"
    if not model_name:
        return problem(label, "endpoint without model_name", "set option model_name to the served model's name")
    url = models_url(endpoint)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            body = r.read(1 << 20)
    except urllib.error.HTTPError as e:
        fix = f"check the key in {key_env}" if e.code in (401, 403) else "check the endpoint URL and the server"
        return problem(label, f"GET {url}: HTTP {e.code}", fix)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        reason = one_line(reason) if isinstance(reason, Exception) else reason
        return problem(label, f"GET {url}: unreachable ({reason})",
                       "start the server (e.g. vllm serve ...) or fix option endpoint")
    try:
        served = [m.get("id") for m in json.loads(body).get("data", [])]
    except (ValueError, AttributeError, TypeError):
        return passed(label, f"{url} answered (model list not readable; model_name {model_name!r} not verified)")
    if served and model_name not in served:
        return problem(label, f"{url} serves {', '.join(map(str, served[:5]))}, not {model_name!r}",
                       "set option model_name to one of the served names, or serve the model under that name")
    return passed(label, f"{url} serves {model_name!r}")
