"""A small client for OpenAI-compatible /v1/chat/completions endpoints (vLLM, SGLang, OpenAI, ...).

Stdlib only (urllib + a thread pool), so the project adds no HTTP dependency. It never raises
for a failed request: every request gets a ChatReply with either text or an error message, in
input order. Transient failures (timeouts, connection errors, HTTP 5xx, 408, 429) are retried
with exponential backoff; other 4xx (bad request, bad key) are not, since retrying cannot help.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rl3d.formats.errors import InputError

_RETRY_STATUS = {408, 429}  # client-side codes that mean "try again later"
_MAX_BACKOFF_S = 30.0
_BODY_EXCERPT = 300


@dataclass
class ChatReply:
    text: str | None = None      # the assistant message content, when the request succeeded
    error: str | None = None     # why it failed after all attempts, else None
    attempts: int = 0


def chat_completions_url(endpoint: str) -> str:
    """Accepts 'http://host:8000', 'http://host:8000/v1' or the full '.../v1/chat/completions'."""
    base = endpoint.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


def image_data_url(image) -> str:
    """A PIL image as a base64 PNG data URL (lossless: the judge sees exactly our render)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def user_message(text: str, images: list) -> dict:
    """One user turn: the images first (as data URLs), then the text."""
    content = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


class _Transient(Exception):
    """A failure worth retrying."""


class ChatClient:
    def __init__(self, endpoint: str, model_name: str, api_key_env: str | None = None,
                 timeout: float = 120.0, retries: int = 3, concurrency: int = 8,
                 backoff: float = 1.0, max_tokens: int = 512, temperature: float = 0.0):
        if not endpoint or not model_name:
            raise InputError("chat endpoint: both endpoint and model_name are required")
        if retries < 0 or concurrency < 1 or timeout <= 0:
            raise InputError("chat endpoint: need retries >= 0, concurrency >= 1 and timeout > 0")
        self.url = chat_completions_url(endpoint)
        self.model_name = model_name
        self.api_key = None
        if api_key_env:
            # The key lives only in the environment; configs name the variable, never the key.
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise InputError(f"chat endpoint: environment variable {api_key_env} (api_key_env) is not set")
        self.timeout, self.retries, self.concurrency = float(timeout), int(retries), int(concurrency)
        self.backoff, self.max_tokens, self.temperature = float(backoff), int(max_tokens), float(temperature)

    def complete_many(self, conversations: list[list[dict]]) -> list[ChatReply]:
        """Send each conversation (a list of chat messages); replies in input order."""
        if not conversations:
            return []
        workers = min(self.concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chat") as pool:
            return list(pool.map(self.complete, conversations))

    def complete(self, messages: list[dict]) -> ChatReply:
        body = json.dumps({"model": self.model_name, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode("utf-8")
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), _MAX_BACKOFF_S))
            try:
                return ChatReply(text=self._post(body), attempts=attempt + 1)
            except _Transient as e:
                last_error = str(e)
            except _Permanent as e:
                return ChatReply(error=str(e), attempts=attempt + 1)
        return ChatReply(error=f"{last_error} (gave up after {self.retries + 1} attempts)",
                         attempts=self.retries + 1)

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = _excerpt(e.read())
            msg = f"HTTP {e.code} from {self.url}: {detail}"
            if e.code >= 500 or e.code in _RETRY_STATUS:
                raise _Transient(msg) from None
            raise _Permanent(msg) from None
        except (TimeoutError, socket.timeout) as e:
            raise _Transient(f"timeout after {self.timeout:g}s from {self.url}") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Transient(f"timeout after {self.timeout:g}s from {self.url}") from None
            raise _Transient(f"connection error to {self.url}: {e.reason}") from None
        except (ConnectionError, OSError) as e:
            raise _Transient(f"connection error to {self.url}: {e}") from None
        return _content(raw, self.url)


class _Permanent(Exception):
    """A failure that retrying cannot fix (4xx, malformed response)."""


def _excerpt(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace") if raw else ""
    return " ".join(text.split())[:_BODY_EXCERPT]


def _content(raw: bytes, url: str) -> str:
    """The first choice's message content, or _Permanent naming what is wrong with the response."""
    try:
        obj = json.loads(raw)
        content = obj["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Permanent(f"malformed chat response from {url}: {_excerpt(raw)}") from None
    if not isinstance(content, str):
        raise _Permanent(f"chat response from {url} has no text content: {_excerpt(raw)}")
    return content
