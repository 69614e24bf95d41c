"""HPS v2.1 (Human Preference Score) reward: open_clip ViT-H-14 with the HPS v2.1 checkpoint,
score = cos(text, image) per view, as HPSv2's own scorer and the AR3D-R1 code compute it
(typically 0.2-0.35). Optional extra: `pip install rl3d[hps]` (open_clip_torch), imported lazily.
The checkpoint file (HPS_v2.1_compressed.pt) is given by the user; nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import numpy as np

from rl3d.formats.errors import InputError, first_line
from rl3d.stages.checks.check import Check, env_fix, one_line, passed, problem
from rl3d.stages.checks.model_dir import safetensors_header
from rl3d.stages.rewards.base import RewardBackend, RewardItem, TermResult
from rl3d.stages.policy.device import pick_device
from rl3d.stages.scoring.clip_scorer import load_rgb, prepared_batches

_MODELS: dict[tuple, tuple] = {}


def find_open_clip():
    """(open_clip module or None, why not). Imported for real: an installed open_clip whose
    torchvision does not match torch fails only when imported."""
    if importlib.util.find_spec("open_clip") is None:
        return None, "open_clip is not installed"
    try:
        import open_clip  # lazy: heavy, and optional (rl3d[hps])
    except Exception as e:
        return None, f"open_clip is installed but does not import ({type(e).__name__}: {one_line(e)[:160]})"
    return open_clip, ""


def import_open_clip():
    open_clip, why = find_open_clip()
    if open_clip is None:
        raise InputError(f"the hps backend needs open_clip ({why}): pip install rl3d[hps]")
    return open_clip


def load_hps(checkpoint: str, arch: str, device: str):
    """(model, preprocess, tokenizer), once per process per (checkpoint, arch, device)."""
    key = (os.path.realpath(checkpoint), arch, device)
    if key not in _MODELS:
        open_clip = import_open_clip()
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
        state = _read_weights(checkpoint)
        model.load_state_dict(state)
        _MODELS[key] = (model.eval(), preprocess, open_clip.get_tokenizer(arch))
    return _MODELS[key]


def _read_weights(checkpoint: str) -> dict:
    """HPS weights without running code from the file: a .safetensors file, or a torch file read with
    weights_only=True (the published HPS_v2.1_compressed.pt holds only tensors under `state_dict`)."""
    import torch

    if checkpoint.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(checkpoint)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = first_line(e) or type(e).__name__
        raise InputError(f"option checkpoint: {checkpoint}: not loadable as plain weights (rl3d never unpickles "
                         f"code; convert it to .safetensors): {reason[:200]}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise InputError(f"option checkpoint: {checkpoint}: expected a state dict of tensors")
    return state


class HPSBackend(RewardBackend):
    """Options: checkpoint (path to HPS_v2.1_compressed.pt, required), arch (default ViT-H-14),
    batch_size (views per forward), device (auto | cpu | cuda[:i])."""

    name = "hps"
    needs_views = True

    @classmethod
    def doctor(cls, options: dict, label: str, unset: dict[str, list[str]], timeout: float) -> list[Check]:
        """open_clip imports and knows the arch; the checkpoint is a whole torch zip or safetensors file."""
        checks = []
        open_clip, why = find_open_clip()
        if open_clip is None:
            checks.append(problem(f"{label} package", why, "pip install 'rl3d[hps]' (open_clip_torch, with the "
                                                           "torchvision build that matches your torch)"))
        arch = options.get("arch", "ViT-H-14")
        if open_clip is not None and open_clip.get_model_config(arch) is None:
            checks.append(problem(label, f"open_clip has no model config {arch!r}",
                                  "set option arch to an open_clip model"))
        ckpt = options.get("checkpoint", "")
        if not ckpt:
            fix = env_fix(unset, ("checkpoint",)) or "set option checkpoint"
            return checks + [problem(label, "no HPS checkpoint given" + (f" ({unset['checkpoint'][0]} is unset)"
                                                                          if unset.get("checkpoint") else ""),
                                     fix + " (the path to HPS_v2.1_compressed.pt)")]
        f = Path(ckpt)
        if not f.is_file():
            return checks + [problem(label, f"HPS checkpoint {f} does not exist",
                                     "download HPS_v2.1_compressed.pt to that path, or point option checkpoint "
                                     "(RL3D_HPS_CHECKPOINT) at it")]
        try:
            if f.suffix == ".safetensors":
                n = len(safetensors_header(f))
            else:  # a torch zip: its central directory sits at the end, so a cut file fails here
                with zipfile.ZipFile(f) as z:
                    n = sum(1 for name in z.namelist() if "/data/" in name)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            return checks + [problem(label, f"{f}: not a whole checkpoint ({one_line(e)})",
                                     "download the file again (rl3d reads torch zip files or .safetensors)")]
        return checks + [passed(label, f"{f} ({n} tensors), open_clip arch {arch}")]

    def __init__(self, checkpoint: str = "", arch: str = "ViT-H-14", batch_size: int = 32, device: str = "auto"):
        if not checkpoint:
            raise InputError("option checkpoint is empty: set it to your HPS_v2.1_compressed.pt "
                             "(or export RL3D_HPS_CHECKPOINT for the paper presets)")
        if not Path(checkpoint).is_file():
            raise InputError(f"option checkpoint: {checkpoint}: no such file")
        self.device = pick_device(device)
        self.batch_size = int(batch_size)
        self.model, self.preprocess, self.tokenizer = load_hps(checkpoint, arch, self.device)

    def _pixels(self, paths: list[str]) -> list:
        """Preprocessed pixels per path (runs in background threads, see prepared_batches)."""
        return [self.preprocess(load_rgb(p)) for p in paths]

    def _features(self, paths: list[str], prompts: list[str]) -> np.ndarray:
        """cos(text, image) per (path, prompt). Each distinct prompt is encoded once (not once per
        view), and images are decoded and preprocessed in background threads while the model
        encodes earlier batches."""
        import torch

        if not paths:
            return np.zeros(0)
        texts = list(dict.fromkeys(prompts))
        with torch.inference_mode():
            te = torch.cat([torch.nn.functional.normalize(self.model.encode_text(
                self.tokenizer(texts[s:s + self.batch_size]).to(self.device)).float(), dim=-1)
                for s in range(0, len(texts), self.batch_size)])
            row = {t: i for i, t in enumerate(texts)}
            which = torch.tensor([row[p] for p in prompts], device=te.device)
            cos, done = [], 0
            for pixels in prepared_batches(paths, self._pixels, self.batch_size):
                im = torch.nn.functional.normalize(self.model.encode_image(torch.stack(pixels).to(self.device)).float(),
                                                   dim=-1)
                cos.append((im * te[which[done:done + len(pixels)]]).sum(-1).cpu().numpy())
                done += len(pixels)
        return np.concatenate(cos)

    def score(self, items: list[RewardItem]) -> list[TermResult]:
        results: list[TermResult | None] = [None] * len(items)
        paths, prompts, owner = [], [], []
        for i, it in enumerate(items):
            if not it.image_paths:
                results[i] = TermResult(status="missing_renders", message="no rendered views")
                continue
            paths += it.image_paths
            prompts += [it.prompt] * len(it.image_paths)
            owner += [i] * len(it.image_paths)
        if paths:
            cos, owner_a = self._features(paths, prompts), np.asarray(owner)
            for i in dict.fromkeys(owner):
                results[i] = TermResult(per_view=[float(v) for v in cos[owner_a == i]])
        return results
