"""Tiny random-init replicas of the reward models a real run points at, saved in temp dirs with the
real classes and file layouts: a CLIP dir, an open_clip HPS checkpoint (a tiny model config
registered at runtime), and (from test_vlm) a Qwen2.5-VL judge dir. Nothing is downloaded."""
import json
from pathlib import Path

TINY_HPS_ARCH = "rl3d-tiny-hps"
TINY_HPS_CONFIG = {"embed_dim": 16,
                   "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def build_tiny_clip(d: Path, prompts=("a red chair", "a blue table")) -> Path:
    """A CLIPModel dir (config, safetensors, tokenizer, image processor) as rl3d train-scorer saves one."""
    from rl3d.stages.train_scorer import init_scorer, save_scorer

    model, tok, proc = init_scorer(list(prompts), seed=0, hidden=32, layers=1, heads=2, image_size=32, patch=8,
                                   projection=16)
    save_scorer(d, model, tok, proc, {})
    return d


def register_tiny_open_clip(d: Path) -> str:
    """Register the tiny open_clip model config under TINY_HPS_ARCH (this process only)."""
    import open_clip

    f = Path(d) / f"{TINY_HPS_ARCH}.json"
    f.write_text(json.dumps(TINY_HPS_CONFIG))
    open_clip.add_model_config(f)
    return TINY_HPS_ARCH


def build_tiny_hps(d: Path) -> Path:
    """A tiny open_clip model saved as a plain state dict under `state_dict`, the published HPS
    file's layout; returns the checkpoint path."""
    import open_clip
    import torch

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    register_tiny_open_clip(d)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_HPS_ARCH, pretrained=None)
    f = d / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, f)
    return f


def open_clip_missing() -> str:
    """Why open_clip cannot be used here ("" when it can): not installed, or installed with a
    torchvision build that does not match torch (its import then fails with a RuntimeError)."""
    try:
        import open_clip  # noqa: F401
    except Exception as e:
        return f"open_clip_torch is not importable here ({type(e).__name__}: {str(e)[:120]})"
    return ""
