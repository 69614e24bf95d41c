"""Evaluation metrics: pure numpy/torch functions, one per number the eval report shows.

Distribution metrics compare features of generated renders with features of reference renders:
  - KD: the kernel distance of KID (Binkowski et al. 2018): the UNBIASED estimate of MMD^2 with the
    cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets, reported x100
    as in the Hi-GRPO paper's tables.
  - KD as the paper's released eval script computes it (`kd_paper`, only on request): the mean RBF
    kernel between reference and generated features, exp(-||x - y||^2 / d) (scikit-learn's rbf_kernel
    with its default gamma = 1/d), averaged over all pairs. A similarity, not a distance (1 for
    identical features, towards 0 apart); kept apart from KD so numbers can sit beside the published table.
  - FD: the Frechet distance between Gaussians fitted to the two feature sets (FID's formula).
Per-sample metrics: CLIP score (mean over views of 100 * max(cos, 0), from the one CLIP scorer in
scoring/clip_scorer.py), spec accuracy, geometry rates and decode failures are aggregated by
`rate`/`mean_std`; diversity is the mean pairwise voxel IoU of one prompt's samples (lower = more
diverse).

The KD/FD feature model is loaded here, from local paths only.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPModel

from rl3d.formats.errors import InputError
from rl3d.formats.model_dirs import from_local_dir
from rl3d.stages.scoring.clip_scorer import load_rgb_or_fail, pooled

KD_SCALE = 100.0  # KD is reported x100, like KID in the paper's tables


# ---------------------------------------------------------------- distribution metrics

def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3, the KID kernel, for all pairs of rows."""
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (diagonal terms excluded). Needs >= 2 rows each."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("MMD^2 needs at least 2 samples in each set")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def mean_rbf_kernel(reference: np.ndarray, generated: np.ndarray, gamma: float | None = None) -> float:
    """The paper's eval-script "KD": mean over all (reference, generated) pairs of
    exp(-gamma ||x - y||^2), gamma = 1 / d by default (scikit-learn's rbf_kernel(real, fake).mean()).
    Symmetric in its two sets; 1.0 for identical single features. Needs >= 1 row each."""
    x, y = np.asarray(reference, np.float64), np.asarray(generated, np.float64)
    if len(x) < 1 or len(y) < 1:
        raise ValueError("the mean RBF kernel needs at least 1 sample in each set")
    g = 1.0 / x.shape[1] if gamma is None else float(gamma)
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return float(np.exp(-g * np.maximum(sq, 0.0)).mean())


def kernel_distance(x: np.ndarray, y: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID-style kernel distance (raw MMD^2, not scaled) -> (mean, std over subsets).

    When both sets fit in one subset the full-set unbiased estimate is returned with std 0;
    otherwise `subsets` random subsets of size min(subset_size, m, n) (without replacement inside
    a subset, as torch-fidelity/clean-fid do) are averaged.
    """
    m, n = len(x), len(y)
    if m <= subset_size and n <= subset_size:
        return mmd2_unbiased(x, y), 0.0
    size = min(subset_size, m, n)
    rng = np.random.default_rng(seed)
    vals = [mmd2_unbiased(x[rng.choice(m, size, replace=False)], y[rng.choice(n, size, replace=False)])
            for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(feats, np.float64)
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as sum(sqrt(eig(S1^(1/2) S2 S1^(1/2)))): that matrix is symmetric
    PSD and similar to S1 S2, so the trace is the same as pytorch-fid's scipy.linalg.sqrtm(S1 @ S2)
    but without its complex round-off and singular-matrix failures (eigenvalues clipped at 0).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """FD between Gaussians fitted to two feature sets (rows = samples). Needs >= 2 rows each."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError("FD needs at least 2 samples in each set")
    return frechet_from_stats(*gaussian_stats(x), *gaussian_stats(y))


# ---------------------------------------------------------------- per-sample metrics

def pairwise_iou_mean(grids: np.ndarray) -> float:
    """Mean voxel IoU over all pairs of a prompt's samples (occupancy only). Lower = more diverse.
    Two empty grids count as IoU 1 (formats.voxels.voxel_iou's convention)."""
    occ = (np.asarray(grids).reshape(len(grids), -1) > 0).astype(np.float32)
    if len(occ) < 2:
        raise ValueError("diversity needs at least 2 samples")
    inter = occ @ occ.T
    size = occ.sum(1)
    union = size[:, None] + size[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    i, j = np.triu_indices(len(occ), 1)
    return float(iou[i, j].mean())


def mean_std(values) -> tuple[float, float, int]:
    """Mean, population std and count of the finite values (None / NaN are not counted)."""
    v = np.array([x for x in values if x is not None], np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std()), int(v.size)


def rate(flags) -> tuple[float, int]:
    """Fraction of True among the non-None flags, and their count."""
    v = [bool(f) for f in flags if f is not None]
    return (float(np.mean(v)) if v else float("nan")), len(v)


# ---------------------------------------------------------------- models from local dirs

def _check_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: {what} not found (models are loaded from local directories only)")
    return p


def _load_images(paths: list[str]):
    """RGB images (transparency on white, as the CLIP scorer loads them); an unreadable file is bad input."""
    return [load_rgb_or_fail(p) for p in paths]


@dataclass
class FeatureModel:
    """An image feature extractor for KD/FD, loaded from a local path:
      - a transformers directory: CLIP -> projected image embeddings; DINOv2 (or any AutoModel)
        -> the CLS token of the last hidden state;
      - a TorchScript file (*.pt) of Inception-V3 in the StyleGAN3 / clean-fid convention
        (`inception-2015-12-05.pt`: float pixels 0..255, NCHW, called with return_features=True).
    """
    path: Path
    kind: str          # "clip" | "hf" | "torchscript"
    model: object
    processor: object | None
    device: str = "cpu"

    @classmethod
    def load(cls, path, device: str = "cpu") -> "FeatureModel":
        p = _check_dir(path, "feature model")
        try:
            if p.is_file():
                return cls(p, "torchscript", torch.jit.load(str(p), map_location=device).eval(), None, device)
            cfg = from_local_dir(AutoConfig, p, "feature model config")
            proc = from_local_dir(AutoImageProcessor, p, "image processor")
            if cfg.model_type == "clip":
                return cls(p, "clip", from_local_dir(CLIPModel, p, "CLIP model").to(device).eval(), proc, device)
            return cls(p, "hf", from_local_dir(AutoModel, p, "feature model").to(device).eval(), proc, device)
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(f"{p}: not a loadable feature model ({type(e).__name__}: {e})") from None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.path.name}"

    def features(self, paths: list[str], batch_size: int = 32) -> np.ndarray:
        chunks = []
        for i in range(0, len(paths), batch_size):
            imgs = _load_images(paths[i:i + batch_size])
            with torch.no_grad():
                if self.kind == "torchscript":
                    x = torch.from_numpy(np.stack([np.asarray(im.resize((299, 299))) for im in imgs]))
                    f = self.model(x.permute(0, 3, 1, 2).float().to(self.device), return_features=True)
                else:
                    px = self.processor(images=imgs, return_tensors="pt")["pixel_values"].to(self.device)
                    if self.kind == "clip":
                        f = pooled(self.model.get_image_features(pixel_values=px))
                    else:
                        f = self.model(pixel_values=px).last_hidden_state[:, 0]
            chunks.append(f.reshape(len(imgs), -1).float().cpu().numpy())
        return np.concatenate(chunks).astype(np.float64) if chunks else np.zeros((0, 0))


def model_fingerprint(path) -> str:
    """A short content id of a model dir/file (config + weight file sizes and names) for reports."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        h.update(f.name.encode())
        h.update(str(os.path.getsize(f)).encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
    return h.hexdigest()[:12]
