"""The chat client of the endpoint judge: OpenAI-compatible /v1/chat/completions endpoints (vLLM,
SGLang, OpenAI, ...) through the `openai` Python client (optional extra: pip install rl3d[openai]).

The openai client does the HTTP, the timeouts and the retries: transient failures (timeouts,
connection errors, HTTP 408, 409, 429, 5xx) are retried with exponential backoff (0.5 s doubling,
capped at 8 s, with jitter; a server's Retry-After is honoured); other 4xx (bad request, bad key)
are not, since retrying cannot help. This module never raises for a failed request: every
conversation gets a ChatReply with either text or an error message, in input order, requests
running `concurrency` at a time.
"""
from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rl3d.formats.errors import InputError

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


def import_openai():
    """The openai package, imported lazily on purpose: an optional extra that only the endpoint judge needs."""
    try:
        import openai
    except ImportError:
        raise InputError("the endpoint judge needs the openai client: pip install 'rl3d[openai]'") from None
    return openai


def _base_url(endpoint: str) -> str:
    """The '.../v1' base the openai client appends /chat/completions to."""
    return chat_completions_url(endpoint)[: -len("/chat/completions")]


class ChatClient:
    def __init__(self, endpoint: str, model_name: str, api_key_env: str | None = None,
                 timeout: float = 120.0, retries: int = 3, concurrency: int = 8,
                 backoff: float | None = None, max_tokens: int = 512, temperature: float = 0.0):
        """`backoff` is accepted for old configs and not used: the openai client's schedule applies."""
        if not endpoint or not model_name:
            raise InputError("chat endpoint: both endpoint and model_name are required")
        if retries < 0 or concurrency < 1 or timeout <= 0:
            raise InputError("chat endpoint: need retries >= 0, concurrency >= 1 and timeout > 0")
        self.url = chat_completions_url(endpoint)
        self.model_name = model_name
        api_key = None
        if api_key_env:
            # The key lives only in the environment; configs name the variable, never the key.
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise InputError(f"chat endpoint: environment variable {api_key_env} (api_key_env) is not set")
        self.timeout, self.retries, self.concurrency = float(timeout), int(retries), int(concurrency)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.openai = import_openai()
        # a local server without a key gets no Authorization header (not OPENAI_API_KEY's value either);
        # the client insists on some key, so it gets a placeholder it never sends
        self.headers = {} if api_key else {"Authorization": self.openai.Omit()}
        self.client = self.openai.OpenAI(base_url=_base_url(endpoint), api_key=api_key or "unused", timeout=self.timeout,
                                         max_retries=self.retries)

    def complete_many(self, conversations: list[list[dict]]) -> list[ChatReply]:
        """Send each conversation (a list of chat messages); replies in input order."""
        if not conversations:
            return []
        workers = min(self.concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chat") as pool:
            return list(pool.map(self.complete, conversations))

    def complete(self, messages: list[dict]) -> ChatReply:
        o = self.openai
        gave_up = f" (gave up after {self.retries + 1} attempts)"
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.model_name, messages=messages, max_tokens=self.max_tokens, temperature=self.temperature,
                extra_headers=self.headers)
            reply = raw.parse()
        except o.APITimeoutError:
            return ChatReply(error=f"timeout after {self.timeout:g}s from {self.url}{gave_up}", attempts=self.retries + 1)
        except o.APIConnectionError as e:
            return ChatReply(error=f"connection error to {self.url}: {e}{gave_up}", attempts=self.retries + 1)
        except o.APIStatusError as e:
            transient = e.status_code >= 500 or e.status_code in (408, 409, 429)
            msg = f"HTTP {e.status_code} from {self.url}: {_excerpt(e.response.content)}"
            return (ChatReply(error=msg + gave_up, attempts=self.retries + 1) if transient
                    else ChatReply(error=msg, attempts=1))
        except (o.APIResponseValidationError, ValueError) as e:
            return ChatReply(error=f"malformed chat response from {self.url}: {e}", attempts=1)
        attempts = raw.retries_taken + 1
        try:
            content = reply.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            return ChatReply(error=f"malformed chat response from {self.url}: {_excerpt(raw.content)}",
                             attempts=attempts)
        if not isinstance(content, str):
            return ChatReply(error=f"chat response from {self.url} has no text content: {_excerpt(raw.content)}",
                             attempts=attempts)
        return ChatReply(text=content, attempts=attempts)


def _excerpt(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace") if raw else ""
    return " ".join(text.split())[:_BODY_EXCERPT]
