"""Many meshes at once on a torch device: cast (torch_engine.cast_meshes), shade and resolve
supersampling there, and bring back only the final images: the same numbers as the numpy path
(renderer.shade_hits), bit for bit, by the same float32 operations in the same order.

Meshes are prepared on the CPU (renderer.prepare_mesh) and rendered in batches sized so that a
batch's per-ray buffers stay within a few GB on CUDA.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from rl3d.stages.raycast import torch_engine
from rl3d.stages.raycast.cameras import cached_cameras, cached_frames
from rl3d.stages.raycast.engines import INVALID_ID

# rays per batch (all views of all its meshes, supersampled): ~40 bytes of buffers per ray
CUDA_BATCH_RAYS = 1 << 26
CPU_BATCH_RAYS = 1 << 22


def meshes_per_batch(views: int, size: int, device: str) -> int:
    """How many meshes of `views` views of size x size rays one batch holds on `device`."""
    budget = CUDA_BATCH_RAYS if torch.device(device).type == "cuda" else CPU_BATCH_RAYS
    return max(1, budget // (views * size * size))


@functools.lru_cache(maxsize=4)
def device_cameras(az: tuple, el: tuple, size: int, fov: float, device: str) -> torch_engine.PinholeCameras:
    """The shared cameras on `device`, built once per camera set."""
    return torch_engine.prepare_cameras(cached_frames(az, el, fov), cached_cameras(az, el, size, fov)[1], fov, device)


def block_sum(a, k: int, dtype):
    """renderer.block_sum in torch: k x k block sums of [B, V, H*k, W*k, ...], added in the same
    order from zeros (float sums keep their bits)."""
    b, v, h, w = a.shape[:4]
    out = torch.zeros((b, v, h // k, w // k, *a.shape[4:]), dtype=dtype, device=a.device)
    for dy in range(k):
        for dx in range(k):
            out += a[:, :, dy::k, dx::k]
    return out


def downsample(views: dict, k: int) -> dict:
    """renderer.downsample in torch (rgb sums in int32 instead of uint16: the same integers)."""
    n = k * k
    rgb = torch.div(block_sum(views["rgb"], k, torch.int32) + n // 2, n, rounding_mode="floor").to(torch.uint8)
    hits = block_sum(views["mask"], k, torch.int32)
    mask = 2 * hits >= n
    per_hit = 1.0 / hits.clamp(min=1).to(torch.float32)
    out = {"rgb": rgb, "mask": mask, "depth": None, "normal": None}
    if views["depth"] is not None:
        out["depth"] = torch.where(mask, block_sum(views["depth"], k, torch.float32) * per_hit, 0.0)
    if views["normal"] is not None:
        total = block_sum(views["normal"], k, torch.float32)
        x, y, z = total.unbind(-1)
        # np.linalg.norm's order of adds; the root taken in float64 and rounded is the correctly
        # rounded float32 root (torch's float32 sqrt on CPU may differ from it by an ulp)
        length = torch.sqrt((x * x + y * y + z * z).double()).float().clamp(min=1e-12)
        out["normal"] = torch.where(mask[..., None], total / length[..., None], 0.0)
    return out


def _shade(prepared: list, keys, with_depth: bool, with_normals: bool) -> dict:
    """Keys int64[B, V, S, S] of prepared meshes -> full-size views on the device: renderer.shade_hits
    before downsampling (colour and normal tables of the batch gathered by one flat index)."""
    dev = keys.device
    nv = keys.shape[1]
    t_hit, pid = torch_engine.keys_to_hits(keys)
    mask = pid != int(INVALID_ID)
    nfaces = torch.tensor([len(p.faces) for p in prepared], device=dev)
    entries = nv * (nfaces + 1)  # one table of V x (F + 1) entries per mesh
    base = torch.cumsum(entries, 0) - entries
    view_base = base[:, None] + torch.arange(nv, device=dev)[None] * (nfaces[:, None] + 1)  # [B, V]
    idx = torch.where(mask, pid, nfaces[:, None, None, None]) + view_base[:, :, None, None]
    table = np.concatenate([p.table.reshape(-1, 4) for p in prepared])  # RGBA rows, one int32 each
    rgba = torch.from_numpy(table.view(np.int32).reshape(-1)).to(dev)[idx]
    views = {"rgb": rgba.contiguous().view(torch.uint8).view(*idx.shape, 4)[..., :3], "mask": mask,
             "depth": None, "normal": None}
    if with_depth:
        scale = torch.tensor([p.scale for p in prepared], dtype=torch.float32, device=dev)
        depth = torch.where(mask, t_hit, 0.0)
        views["depth"] = torch.where((scale != 1.0)[:, None, None, None], depth / scale[:, None, None, None], depth)
    if with_normals:
        rows = [np.concatenate([p.normals.astype(np.float32), np.zeros((nv, 1, 3), np.float32)], 1).reshape(-1, 3)
                for p in prepared]
        views["normal"] = torch.from_numpy(np.concatenate(rows)).to(dev)[idx]
    return views


def to_host(views: dict) -> dict:
    """Device tensors -> numpy arrays (None stays None). From a GPU through page-locked buffers of
    torch's caching host allocator, every copy queued before one wait: bench_render's profile put
    76% of the batched render's GPU time in copies to pageable memory (~2 GB/s)."""
    tensors = {k: v for k, v in views.items() if v is not None}
    if not any(v.is_cuda for v in tensors.values()):
        return {k: None if v is None else v.cpu().numpy() for k, v in views.items()}
    out = {}
    for k, v in tensors.items():
        out[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        out[k].copy_(v, non_blocking=True)
    torch.cuda.current_stream(next(iter(tensors.values())).device).synchronize()
    return {k: out[k].numpy() if k in out else None for k in views}


def render_batch(prepared: list, az: tuple, el: tuple, resolution: int, fov: float, device: str,
                 supersample: int = 1, with_depth: bool = True, with_normals: bool | None = None,
                 max_pairs: int | None = None, device_rgb: bool = False, host: set | None = None) -> list[dict]:
    """Render prepared meshes (renderer.prepare_mesh with these angles and fov) on `device`, as
    many at once as meshes_per_batch allows. Per mesh, numpy: rgb uint8[V,H,W,3], mask bool[V,H,W],
    depth float32[V,H,W] (None unless with_depth) and normal float32[V,H,W,3] (None unless
    with_normals; default: when the meshes were prepared with normals) - renderer.render_views'
    arrays, bit for bit. `device_rgb` on a device other than the CPU: also "device_rgb", the rgb
    left on the device (a torch uint8[V,H,W,3] slice of its batch's tensor, the same bits); on the
    CPU the numpy rgb is that memory already, and no key is added. `host`: the views to bring back
    as numpy (default all); the others are None (render asks for the mask only with normals: it
    was a quarter of the bytes copied back a default step)."""
    if with_normals is None:
        with_normals = all(p.normals is not None for p in prepared)
    device_rgb = device_rgb and torch.device(device).type != "cpu"
    size = int(resolution) * supersample
    cams = device_cameras(tuple(az), tuple(el), size, float(fov), str(device))
    per_batch = meshes_per_batch(len(az), size, device)
    out: list[dict] = []
    for b in range(0, len(prepared), per_batch):
        part = prepared[b:b + per_batch]
        keys = torch_engine.cast_meshes([(p.verts, p.faces) for p in part], cams, max_pairs,
                                        solids=[getattr(p, "solid", 0) for p in part])
        with torch.no_grad():
            views = _shade(part, keys, with_depth, with_normals)
            del keys
            if supersample > 1:
                views = downsample(views, supersample)
            got = to_host({k: v for k, v in views.items() if host is None or k in host})
            got.update({k: None for k in views if k not in got})
            if device_rgb:  # unsupersampled, rgb views the RGBA buffer: kept as is, it would hold 4/3 its bytes
                got["device_rgb"] = views["rgb"].contiguous()
        out += [{k: None if v is None else v[i] for k, v in got.items()} for i in range(len(part))]
    return out
