"""VLM judge reward backend: a Qwen2.5-VL model loaded with transformers from a local dir, or any
OpenAI-compatible chat endpoint (e.g. a vLLM server), asked one of our rubrics
(stages/rewards/judge_prompts.py) about the rendered views of each sample.

Per-view rubrics send one request per view and return TermResult.per_view (the stage aggregates,
e.g. max over views); joint rubrics send all selected views in one request and return value.
A reply that does not parse, or a request that failed, gives a TermResult with status
"parse_error" / "backend_error" and an excerpt of the reply in the message, never a score.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from rl3d.formats.errors import InputError
from rl3d.formats.model_dirs import from_local_dir
from rl3d.stages.checks.check import Check, env_fix, problem
from rl3d.stages.checks.endpoint import check_endpoint
from rl3d.stages.checks.model_dir import check_model_dir, has_tokenizer_files
from rl3d.stages.policy.device import pick_device
from rl3d.stages.rewards.base import RewardBackend, RewardItem, TermResult
from rl3d.stages.rewards.judge_prompts import SYSTEM, JudgeParseError, Rubric, RUBRICS, get_rubric
from rl3d.stages.rewards.openai_client import ChatClient, user_message

_REPLY_EXCERPT = 240


@dataclass
class JudgeRequest:
    text: str
    images: list = field(default_factory=list)   # PIL images, in view order
    system: str = SYSTEM


@dataclass
class JudgeReply:
    text: str | None = None
    error: str | None = None


# ---- images -------------------------------------------------------------------------------------

class MissingViews(Exception):
    pass


def load_view(path: str, image_size: int | None):
    """One rendered view as RGB, resized so its longer side is image_size (None: as rendered)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise MissingViews(f"cannot read view image {path}: {e}") from None
    if image_size and max(im.size) != image_size:
        scale = image_size / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.LANCZOS)
    return im


def select_views(item: RewardItem, views: list[int] | None) -> list[tuple[int, str]]:
    """(view index, path) of the views to send; all views when `views` is None."""
    if not item.image_paths:
        raise MissingViews("no rendered views")
    if views is None:
        return list(enumerate(item.image_paths))
    missing = [v for v in views if not 0 <= v < len(item.image_paths)]
    if missing:
        raise MissingViews(f"view indices {missing} not rendered (have {len(item.image_paths)} views)")
    return [(v, item.image_paths[v]) for v in views]


# ---- transformers engine ------------------------------------------------------------------------

_MODEL_CACHE: dict[tuple, tuple] = {}
_MODEL_LOCK = threading.Lock()


def _chat_template(model_dir: Path, tokenizer) -> str:
    """The dir's chat template: chat_template.jinja / chat_template.json, else the tokenizer's."""
    jinja, js = model_dir / "chat_template.jinja", model_dir / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if js.is_file():
        return json.loads(js.read_text(encoding="utf-8"))["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise InputError(f"{model_dir}: no chat template (chat_template.jinja/.json or in tokenizer_config.json)")


def load_qwen_vl(model_dir: str, device: str | None = None):
    """(model, processor) for a local Qwen2.5-VL dir, loaded once per process (cached by dir)."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from transformers import Qwen2_5_VLProcessor

    path = Path(model_dir).resolve()
    if not (path / "config.json").is_file():
        raise InputError(f"{model_dir}: not a model dir (no config.json)")
    device = pick_device(device)
    key = (str(path), device)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]

        class ImageOnlyProcessor(Qwen2_5_VLProcessor):
            # Judges see images only. Building the processor from its tokenizer + image processor
            # skips the video processor, which needs torchvision (not installed on CPU boxes).
            def check_argument_for_proper_class(self, name, arg):
                if name == "video_processor" and arg is None:
                    return None
                return super().check_argument_for_proper_class(name, arg)

        tokenizer = from_local_dir(AutoTokenizer, path, "judge tokenizer", padding_side="left")
        image_processor = from_local_dir(AutoImageProcessor, path, "judge image processor")
        processor = ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       video_processor=None, chat_template=_chat_template(path, tokenizer))
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = from_local_dir(
            Qwen2_5_VLForConditionalGeneration, path, "judge model", dtype=dtype).to(device).eval()
        _MODEL_CACHE[key] = (model, processor)
        return model, processor


class TransformersEngine:
    def __init__(self, model_dir: str, max_new_tokens: int, batch_size: int, device: str | None = None):
        self.model, self.processor = load_qwen_vl(model_dir, device)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def _messages(self, req: JudgeRequest) -> list[dict]:
        content = [{"type": "image"} for _ in req.images] + [{"type": "text", "text": req.text}]
        return [{"role": "system", "content": [{"type": "text", "text": req.system}]},
                {"role": "user", "content": content}]

    def generate(self, requests: list[JudgeRequest]) -> list[JudgeReply]:
        replies: list[JudgeReply] = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            try:
                replies.extend(JudgeReply(text=t) for t in self._generate_batch(batch))
            except Exception as e:  # e.g. CUDA OOM: these requests fail, the rest go on
                replies.extend(JudgeReply(error=f"generation failed: {type(e).__name__}: {e}") for _ in batch)
        return replies

    def _generate_batch(self, batch: list[JudgeRequest]) -> list[str]:
        import torch

        texts = [self.processor.apply_chat_template(self._messages(r), add_generation_prompt=True, tokenize=False)
                 for r in batch]
        images = [im for r in batch for im in r.images]
        enc = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        enc = enc.to(self.model.device)
        tok = self.processor.tokenizer
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
        new_tokens = out[:, enc["input_ids"].shape[1]:]  # left padding: prompts end at the same column
        return tok.batch_decode(new_tokens, skip_special_tokens=True)


# ---- endpoint engine ----------------------------------------------------------------------------

class EndpointEngine:
    def __init__(self, endpoint: str, model_name: str, api_key_env: str | None, timeout: float,
                 retries: int, concurrency: int, backoff: float, max_new_tokens: int):
        self.client = ChatClient(endpoint, model_name, api_key_env=api_key_env, timeout=timeout,
                                 retries=retries, concurrency=concurrency, backoff=backoff,
                                 max_tokens=max_new_tokens, temperature=0.0)

    def generate(self, requests: list[JudgeRequest]) -> list[JudgeReply]:
        convs = [[{"role": "system", "content": r.system}, user_message(r.text, r.images)] for r in requests]
        return [JudgeReply(text=c.text, error=c.error) for c in self.client.complete_many(convs)]


# ---- the backend --------------------------------------------------------------------------------

def _reply_excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _REPLY_EXCERPT else "..." + flat[-_REPLY_EXCERPT:]


def combine(rubric: Rubric, fields: dict, weights: dict[str, float] | None) -> float:
    """The term's value from the parsed fields: their (weighted) sum."""
    w = weights or {}
    return float(sum(w.get(k, 1.0) * fields[k] for k in rubric.fields))


class VLMJudgeBackend(RewardBackend):
    """Options (the config's term table): rubric; model (local dir) XOR endpoint + model_name
    [+ api_key_env]; timeout, retries, backoff, concurrency (endpoint); batch_size, device
    (transformers); max_new_tokens, views, image_size, weights (both)."""

    name = "vlm"
    needs_views = True

    @classmethod
    def doctor(cls, options: dict, label: str, unset: dict[str, list[str]], timeout: float) -> list[Check]:
        """A local judge dir (config, weights headers, tokenizer, processor) or an endpoint serving model_name."""
        if options.get("model") and options.get("endpoint"):
            return [problem(label, "both model and endpoint are set", "give exactly one of them")]
        if options.get("model"):
            d = Path(options["model"])
            checks, _ = check_model_dir(d, label, "Qwen2_5_VLForConditionalGeneration",
                                        "set option model to a local Qwen2.5-VL-style dir")
            if d.is_dir() and checks[0].ok:
                found = {"tokenizer": has_tokenizer_files(d),
                         "preprocessor_config.json": (d / "preprocessor_config.json").is_file()}
                missing = [n for n, present in found.items() if not present]
                if missing:
                    checks.append(problem(label + " processor", f"{d} lacks {', '.join(missing)}",
                                          "copy the model's tokenizer and preprocessor files into the dir"))
            return checks
        if options.get("endpoint"):
            return [check_endpoint(options["endpoint"], options.get("model_name"), options.get("api_key_env"), label,
                                   timeout)]
        fix = env_fix(unset, ("model", "endpoint")) or "set option model (a local dir) or endpoint (a base URL)"
        return [problem(label, "no judge model: neither model nor endpoint is set", fix)]

    def __init__(self, rubric: str, model: str | None = None, endpoint: str | None = None,
                 model_name: str | None = None, api_key_env: str | None = None, timeout: float = 120.0,
                 retries: int = 3, concurrency: int = 8, max_new_tokens: int = 512,
                 views: list[int] | None = None, image_size: int | None = 448,
                 weights: dict[str, float] | None = None, backoff: float = 1.0, batch_size: int = 8,
                 device: str | None = None):
        if rubric not in RUBRICS:
            raise InputError(f"vlm judge: unknown rubric {rubric!r}; choose from {sorted(RUBRICS)}")
        self.rubric = get_rubric(rubric)
        if (model is None) == (endpoint is None):
            raise InputError("vlm judge: give exactly one of model (a local dir) or endpoint (a base URL)")
        if endpoint is not None and not model_name:
            raise InputError("vlm judge: endpoint needs model_name (the served model's name)")
        if views is not None and (not isinstance(views, (list, tuple)) or not views
                                  or not all(isinstance(v, int) and v >= 0 for v in views)):
            raise InputError(f"vlm judge: views must be a non-empty list of view indices, got {views!r}")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 28):
            raise InputError(f"vlm judge: image_size must be an integer >= 28, got {image_size!r}")
        if weights is not None and not set(weights) <= set(self.rubric.fields):
            raise InputError(f"vlm judge: weights for rubric {rubric!r} may name {list(self.rubric.fields)}, "
                             f"got {sorted(weights)}")
        if weights is not None and not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                           and w == w and abs(w) != float("inf") for w in weights.values()):
            raise InputError(f"vlm judge: weights must be finite numbers, got {weights!r}")
        if max_new_tokens < 1 or batch_size < 1:
            raise InputError("vlm judge: max_new_tokens and batch_size must be >= 1")
        self.views = list(views) if views is not None else None
        self.image_size, self.weights = image_size, weights
        if model is not None:
            if not os.path.isdir(model):
                raise InputError(f"vlm judge: model dir {model} does not exist")
            self.engine = TransformersEngine(model, max_new_tokens, batch_size, device)
        else:
            self.engine = EndpointEngine(endpoint, model_name, api_key_env, timeout, retries, concurrency,
                                         backoff, max_new_tokens)

    def requests_for(self, item: RewardItem) -> list[tuple[int | None, JudgeRequest]]:
        """(view index or None for joint, request) for one item; raises MissingViews."""
        chosen = select_views(item, self.views)
        images = [(v, load_view(p, self.image_size)) for v, p in chosen]
        if self.rubric.per_view:
            text = self.rubric.user_text(item.prompt, 1, item.category)
            return [(v, JudgeRequest(text, [im])) for v, im in images]
        text = self.rubric.user_text(item.prompt, len(images), item.category)
        return [(None, JudgeRequest(text, [im for _, im in images]))]

    def score(self, items: list[RewardItem]) -> list[TermResult]:
        results: list[TermResult | None] = [None] * len(items)
        per_item: dict[int, list[tuple[int | None, int]]] = {}   # item -> [(view, request index)]
        requests: list[JudgeRequest] = []
        for i, item in enumerate(items):
            try:
                reqs = self.requests_for(item)
            except MissingViews as e:
                results[i] = TermResult(status="missing_views", message=f"{item.sample_id}: {e}")
                continue
            per_item[i] = [(v, len(requests) + k) for k, (v, _) in enumerate(reqs)]
            requests.extend(r for _, r in reqs)
        replies = self.engine.generate(requests) if requests else []
        for i, slots in per_item.items():
            results[i] = self._result([(v, replies[j]) for v, j in slots])
        return results

    def _result(self, view_replies: list[tuple[int | None, JudgeReply]]) -> TermResult:
        """One item's TermResult from its replies (one per view, or one joint)."""
        parsed, errors, kind = [], [], "parse_error"
        for v, reply in view_replies:
            where = "" if v is None else f"view {v}: "
            if reply.error is not None:
                kind = "backend_error"
                errors.append(f"{where}{reply.error}")
                continue
            try:
                parsed.append((v, self.rubric.parse(reply.text)))
            except JudgeParseError as e:
                errors.append(f"{where}unparseable judge reply ({e}): {_reply_excerpt(reply.text)!r}")
        if errors:
            # No partial aggregate: a max over the views that happened to parse would be biased.
            return TermResult(status=kind, message="; ".join(errors),
                              details={"parsed_views": {str(v): f for v, f in parsed if v is not None}})
        if not self.rubric.per_view:
            fields = parsed[0][1]
            return TermResult(value=combine(self.rubric, fields, self.weights), details=fields)
        details = {k: [f[k] for _, f in parsed] for k in parsed[0][1]}
        details["views"] = [v for v, _ in parsed]
        return TermResult(per_view=[combine(self.rubric, f, self.weights) for _, f in parsed], details=details)
