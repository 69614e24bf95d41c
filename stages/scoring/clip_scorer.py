"""The one CLIP scorer: prompt vs rendered views with a transformers CLIPModel loaded from a local
directory (default: the scorer shipped in rl3d/assets/scorer, trained by `rl3d train-scorer`).

Used by the `clip` reward backend (stages/rewards/clip.py), the eval's CLIP score and KD/FD
features (stages/eval.py, scoring/metrics.py), and train-scorer: one model load, one image loader,
one processor, one pooled-feature helper. The reward's embeddings are L2-normalised in torch and
cached per process (clip_score and pickscore over one model encode each view once); the eval's
are normalised in numpy (clip_score_from_embeddings), which can differ by one float32 ulp.

Per-view scores from cos = cos(text, image):
  clip_score  max(100 * cos, 0)                        as torchmetrics' CLIPScore, in [0, 100]
  pickscore   logit_scale.exp() * cos                  PickScore-style preference logit
  cosine      cos                                      in [-1, 1]
"""
from __future__ import annotations

import functools
import os
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPModel
from transformers.utils import logging as hf_logging

from rl3d.formats.errors import InputError
from rl3d.formats.model_dirs import from_local_dir
from rl3d.stages.policy.device import pick_device
from rl3d.stages.raycast import held_views

try:
    from transformers import CLIPImageProcessorPil as ImageProcessor
except ImportError:  # transformers 4.x: the PIL-based processor is the plain one
    from transformers import CLIPImageProcessor as ImageProcessor

CLIP_METRICS = ("clip_score", "pickscore", "cosine")
PREPROCESS = ("auto", "device", "pil")
_SCORERS: dict[tuple[str, str], "ClipScorer"] = {}
PREP_IMAGES = 8      # images decoded and preprocessed per background task
PREP_THREADS = 16    # background threads (PIL decodes and resizes, numpy normalises, mostly without the GIL)


@functools.lru_cache(maxsize=1)
def prep_pool() -> ThreadPoolExecutor:
    """Threads that decode and preprocess images while the model encodes earlier batches (one per process)."""
    return ThreadPoolExecutor(max(1, min(PREP_THREADS, os.cpu_count() or 1)), thread_name_prefix="rl3d-images")


def prepared_batches(paths: list, prepare, batch_size: int):
    """Lists of up to `batch_size` prepared paths, in order: `prepare(paths)` (one entry per path)
    runs in background threads, PREP_IMAGES paths a task and a few batches ahead of the consumer,
    so decoding and resizing overlap the model's forward passes."""
    pool = prep_pool()
    tasks = [paths[a:a + PREP_IMAGES] for a in range(0, len(paths), PREP_IMAGES)]
    ahead = max(2, 4 * batch_size // PREP_IMAGES)
    futures = deque(pool.submit(prepare, t) for t in tasks[:ahead])
    queued = len(futures)
    ready: list = []
    while futures:
        ready.extend(futures.popleft().result())
        if queued < len(tasks):
            futures.append(pool.submit(prepare, tasks[queued]))
            queued += 1
        while len(ready) >= batch_size or (ready and not futures):
            yield ready[:batch_size]
            ready = ready[batch_size:]


def default_scorer_dir() -> Path:
    """The shipped CLIP scorer's directory (rl3d/assets/scorer)."""
    return Path(str(files("rl3d.assets") / "scorer"))


def load_rgb(path: str | os.PathLike, background=(255, 255, 255)) -> Image.Image:
    """An image as RGB; transparent pixels composited over `background` (renders may be RGBA;
    convert("RGB") alone would put them on black). Training, rewards and eval load images this way."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, tuple(background) + (255,))
            return Image.alpha_composite(bg, im).convert("RGB")
        return im.convert("RGB")


def pooled(out):
    """get_text/image_features return a tensor (transformers 4.x) or an output object (5.x)."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def load_processors(model_dir: str | os.PathLike):
    """(tokenizer, image processor) from a CLIP model dir, PIL image backend (no torchvision)."""
    return (from_local_dir(AutoTokenizer, model_dir, "CLIP tokenizer"),
            from_local_dir(ImageProcessor, model_dir, "CLIP image processor"))


def clip_score_from_embeddings(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """100 * max(cos, 0) per row pair from raw embeddings, normalised in numpy (the eval's CLIP score).

    The reward normalises in torch instead (ClipScorer.text/image_embeddings). The two norms can differ
    in the last float32 bit, so a score may differ by one ulp (about 1e-5 on the 0..100 scale); each
    caller keeps its own so that neither's recorded numbers change."""
    a = image_emb / np.linalg.norm(image_emb, axis=-1, keepdims=True)
    b = text_emb / np.linalg.norm(text_emb, axis=-1, keepdims=True)
    return 100.0 * np.clip((a * b).sum(-1), 0, None)


def device_preprocessing(processor):
    """The image processor's pixels computed in torch on the images' device, as a function uint8
    [N, H, W, 3] -> float32 [N, 3, S, S]; None when the processor does more than resize (bilinear or
    bicubic) to a shortest edge or a fixed size, centre crop inside the image, rescale and normalise.

    The resize is PIL's two-pass antialiased filter (horizontal, then vertical, each rounded to 8
    bits as PIL does); PIL's fixed-point weights still differ from torch's float ones by a grey level
    or two on ~0.1% of pixels, so the embeddings are close to, not equal to, the processor's."""
    from transformers.image_transforms import get_resize_output_image_size

    modes = {2: "bilinear", 3: "bicubic"}
    size, crop = dict(processor.size or {}), dict(processor.crop_size or {})
    resample = int(getattr(processor, "resample", 3) or 3)
    if (not processor.do_resize or resample not in modes or set(size) - {"shortest_edge", "height", "width"}
            or not (size.get("shortest_edge") or (size.get("height") and size.get("width")))
            or getattr(processor, "do_pad", False)):
        return None
    if processor.do_center_crop and not (crop.get("height") and crop.get("width")):
        return None
    mean = torch.tensor(processor.image_mean if processor.do_normalize else [0.0] * 3).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std if processor.do_normalize else [1.0] * 3).view(1, 3, 1, 1)
    scale = float(processor.rescale_factor) if processor.do_rescale else 1.0

    def resized(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        def one_pass(y, hh, ww):
            if (hh, ww) == tuple(y.shape[-2:]):
                return y
            y = torch.nn.functional.interpolate(y, size=(hh, ww), mode=modes[resample], antialias=True,
                                                align_corners=False)
            return y.round_().clamp_(0, 255)
        return one_pass(one_pass(x, x.shape[-2], w), h, w)

    def pixels(images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        H, W = x.shape[-2:]
        if size.get("shortest_edge"):
            h, w = get_resize_output_image_size(np.empty((3, H, W), np.uint8), size=int(size["shortest_edge"]),
                                                default_to_square=False, input_data_format="channels_first")
        else:
            h, w = int(size["height"]), int(size["width"])
        x = resized(x, h, w)
        if processor.do_center_crop:
            ch, cw = int(crop["height"]), int(crop["width"])
            if ch > h or cw > w:
                raise ValueError(f"a {H}x{W} image resized to {h}x{w} is smaller than the {ch}x{cw} crop")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        return (x * scale - mean.to(x.device)) / std.to(x.device)

    return pixels


def view_scores(cos: np.ndarray, metric: str, logit_scale: float) -> np.ndarray:
    """Per-view score of one metric (CLIP_METRICS) from cosine similarities."""
    if metric == "clip_score":
        return np.maximum(100.0 * cos, 0.0)
    if metric == "pickscore":
        return logit_scale * cos
    return cos


class ClipScorer:
    """A CLIPModel + its processors -> normalised text and image embeddings (cached by text / path)."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto", cache_size: int = 8192):
        hf_logging.disable_progress_bar()  # no per-load bars in stage logs
        d = Path(model_dir)
        if not (d / "config.json").is_file():
            raise InputError(f"CLIP model dir {d}: no config.json (a transformers CLIPModel saved with "
                             f"save_pretrained is expected)")
        self.dir = d
        self.device = pick_device(device)
        self.model = from_local_dir(CLIPModel, d, "CLIP model", dtype=torch.float32).to(self.device).eval()
        self.tokenizer, self.image_processor = load_processors(d)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.logit_scale = float(self.model.logit_scale.detach().exp().cpu())
        self.device_pixels = device_preprocessing(self.image_processor)
        self._img: dict[str, OrderedDict[str, np.ndarray]] = {"device": OrderedDict(), "pil": OrderedDict()}
        self._txt: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_size = cache_size

    def text_embeddings(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        return self._cached(self._txt, texts, self._encode_texts, batch_size)

    def image_embeddings(self, paths: list[str], batch_size: int = 64, preprocess: str = "pil") -> np.ndarray:
        """One row per path; an unreadable image gets a NaN row (its item fails alone). `preprocess`:
        "pil" = the image processor on the CPU (the eval's way), "device" = the same steps in torch on
        the scorer's device (device_preprocessing; "pil" where the processor does more), "auto" =
        "device" on a GPU, "pil" on a CPU (where PIL's resize is the faster)."""
        if preprocess not in PREPROCESS:
            raise InputError(f"clip preprocess {preprocess!r}: expected one of {', '.join(PREPROCESS)}")
        if preprocess == "auto":
            preprocess = "device" if torch.device(self.device).type == "cuda" else "pil"
        if preprocess == "device" and self.device_pixels is None:
            preprocess = "pil"
        encode = self._encode_on_device if preprocess == "device" else self._encode_images
        return self._cached(self._img[preprocess], [str(p) for p in paths], encode, batch_size)

    def score(self, prompts: list[str], views: list[list[str]], batch_size: int = 32) -> list[float]:
        """The eval's CLIP score: per sample, the mean over its views of 100 * max(cos, 0) (NaN without
        views). Views are encoded in batches of `batch_size` in order, prompts in one padded batch, and
        the embeddings normalised in numpy (clip_score_from_embeddings), as the eval always has: the
        eval's numbers stay what they were. An unreadable view is an InputError naming the file."""
        flat = [p for vs in views for p in vs]
        chunks = [self._image_features([load_rgb_or_fail(p) for p in flat[i:i + batch_size]]).cpu().numpy()
                  for i in range(0, len(flat), batch_size)]
        img = np.concatenate(chunks) if chunks else np.zeros((0, self.model.config.projection_dim), np.float32)
        txt = self._text_features(prompts).cpu().numpy()
        owner = np.repeat(np.arange(len(views)), [len(v) for v in views])
        per_view = clip_score_from_embeddings(img, txt[owner])
        return [float(per_view[owner == i].mean()) if len(v) else float("nan") for i, v in enumerate(views)]

    def _cached(self, cache: OrderedDict, keys: list[str], encode, batch_size: int) -> np.ndarray:
        """Embeddings of `keys`, encoding those not cached: `encode(keys, batch_size)` yields
        (keys, embeddings) per batch."""
        todo = list(dict.fromkeys(k for k in keys if k not in cache))
        failed: dict[str, np.ndarray] = {}
        for chunk, emb in encode(todo, batch_size):
            fresh = dict(zip(chunk, emb))
            cache.update({k: e for k, e in fresh.items() if not np.isnan(e).any()})
            failed.update({k: e for k, e in fresh.items() if np.isnan(e).any()})
        out = np.stack([cache.get(k, failed.get(k)) for k in keys]) if keys else np.zeros((0, 1), np.float32)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        return out

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        """Pooled text features (not normalised), float32."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            return pooled(self.model.get_text_features(**{k: v.to(self.device) for k, v in enc.items()})).float()

    def _image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """Pooled image features (not normalised), float32."""
        px = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            return pooled(self.model.get_image_features(pixel_values=px.to(self.device))).float()

    def _encode_texts(self, texts: list[str], batch_size: int):
        for s in range(0, len(texts), batch_size):
            chunk = texts[s:s + batch_size]
            yield chunk, torch.nn.functional.normalize(self._text_features(chunk), dim=-1).cpu().numpy()

    def _pixels(self, paths: list[str]) -> list:
        """Per path its preprocessed pixels float32[3, S, S], or None when it does not read
        (runs in background threads: the processor works image by image, so any grouping of the
        images gives the same pixels)."""
        images = self._loaded(paths)
        ok = [im for im in images if im is not None]
        px = iter(self.image_processor(images=ok, return_tensors="np")["pixel_values"] if ok else [])
        return [None if im is None else next(px) for im in images]

    def _encode_images(self, paths: list[str], batch_size: int):
        """(paths, normalised embeddings) per batch; an unreadable image gets a NaN row. Images are
        decoded and preprocessed in background threads while the model encodes earlier batches."""
        done = 0
        for pixels in prepared_batches(paths, self._pixels, batch_size):
            out = np.full((len(pixels), self.model.config.projection_dim), np.nan, np.float32)
            ok = [i for i, p in enumerate(pixels) if p is not None]
            if ok:
                out[ok] = self._embeddings(torch.from_numpy(np.stack([pixels[i] for i in ok])))
            yield paths[done:done + len(pixels)], out
            done += len(pixels)

    @staticmethod
    def _read(path: str):
        """The pixels this process rendered into `path` and still holds (held_views: uint8[H, W, 3],
        a numpy array or a torch tensor on the device that cast it), else the file as an RGB image
        (load_rgb), else None when it does not read."""
        if (px := held_views.held(path)) is not None:
            return px if isinstance(px, torch.Tensor) else np.asarray(px)
        try:
            return load_rgb(path)
        except (OSError, ValueError):
            return None

    @classmethod
    def _loaded(cls, paths: list[str]) -> list:
        """Per path its RGB image, or None when it does not read."""
        def image(im):
            if isinstance(im, torch.Tensor):  # PIL's processor takes host pixels
                im = im.cpu().numpy()
            return Image.fromarray(im) if isinstance(im, np.ndarray) else im
        return [image(im) for im in map(cls._read, paths)]

    @classmethod
    def _decoded(cls, paths: list[str]) -> list:
        """Per path its RGB pixels uint8[H, W, 3] (a held tensor stays one, on its device), or None when
        it does not read (background threads)."""
        return [im if im is None or isinstance(im, torch.Tensor) else np.asarray(im) for im in map(cls._read, paths)]

    def _embeddings(self, pixel_values: torch.Tensor) -> np.ndarray:
        """L2-normalised image embeddings of preprocessed pixels (any device)."""
        with torch.inference_mode():
            feats = pooled(self.model.get_image_features(pixel_values=pixel_values.to(self.device))).float()
        return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()

    def _encode_on_device(self, paths: list[str], batch_size: int):
        """_encode_images with only the decoding in background threads: resizing, cropping and
        normalising run on the device (device_preprocessing), batched by image size. Held tensors
        (held_views) are stacked on the device, arrays on the host and copied over."""
        done = 0
        for images in prepared_batches(paths, self._decoded, batch_size):
            out = np.full((len(images), self.model.config.projection_dim), np.nan, np.float32)
            by_size: dict[tuple, list[int]] = {}
            for i, im in enumerate(images):
                if im is not None:  # tensors apart from arrays: each kind is stacked where it lives
                    by_size.setdefault((isinstance(im, torch.Tensor), *im.shape), []).append(i)
            for (tensors, *_), idx in by_size.items():
                if tensors:
                    px = torch.stack([images[i].to(self.device) for i in idx])
                else:
                    px = torch.from_numpy(np.stack([images[i] for i in idx])).to(self.device)
                out[idx] = self._embeddings(self.device_pixels(px))
            yield paths[done:done + len(images)], out
            done += len(images)


def load_rgb_or_fail(path) -> Image.Image:
    """load_rgb, an unreadable file being bad input (the eval's rule; the reward fails the item alone)."""
    try:
        return load_rgb(path)
    except OSError as e:
        raise InputError(f"{path}: not a readable image ({e})") from None


def load_scorer(model_dir: str | os.PathLike | None = None, device: str = "auto") -> ClipScorer:
    """One ClipScorer per (dir, device) per process."""
    d = str(Path(model_dir) if model_dir else default_scorer_dir())
    key = (os.path.realpath(d), pick_device(device))
    if key not in _SCORERS:
        _SCORERS[key] = ClipScorer(d, device)
    return _SCORERS[key]
