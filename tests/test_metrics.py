import numpy as np
import pytest
import scipy.linalg

import helpers as fx

from rl3d.formats.errors import InputError
from rl3d.stages.scoring import metrics
from rl3d.stages.scoring.clip_scorer import ClipScorer


def test_kd_hand_computed_three_points():
    # k(a, b) = (a*b/1 + 1)^3 in d = 1; off-diagonal kxx = 2*(1+1+27)/6, kyy = 2*(27+64+343)/6,
    # kxy = (3 + 99 + 495)/9  ->  MMD^2 = 58/6 + 868/6 - 2*597/9 = 65/3
    x, y = np.array([[0.0], [1.0], [2.0]]), np.array([[1.0], [2.0], [3.0]])
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(65 / 3)
    assert metrics.kernel_distance(x, y) == (pytest.approx(65 / 3), 0.0)


def test_kd_same_distribution_near_zero_and_different_large():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    c = rng.normal(loc=0.5, size=(400, 16))
    same, _ = metrics.kernel_distance(a, b)
    diff, _ = metrics.kernel_distance(a, c)
    assert abs(same) < 0.02 and diff > 0.5
    # unbiased: for one set against itself it is -2/m (mean diagonal - mean off-diagonal kernel), slightly < 0
    k = metrics.polynomial_kernel(a, a)
    off = (k.sum() - np.trace(k)) / (400 * 399)
    assert metrics.mmd2_unbiased(a, a) == pytest.approx(-2 / 400 * (np.trace(k) / 400 - off))


def test_kd_subsets_average_and_report_std():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 8)), rng.normal(loc=0.3, size=(300, 8))
    full, _ = metrics.kernel_distance(a, b)
    sub, std = metrics.kernel_distance(a, b, subsets=50, subset_size=100, seed=3)
    assert std > 0 and sub == pytest.approx(full, abs=4 * std)
    assert metrics.kernel_distance(a, b, subsets=50, subset_size=100, seed=3) == (sub, std)  # seeded


def test_fd_analytic_and_matches_scipy_sqrtm():
    mu1, mu2 = np.zeros(2), np.array([1.0, 2.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    # ||mu||^2 + sum(s1 + s2 - 2 sqrt(s1 s2)) = 5 + (1 + 9 - 6) + (4 + 1 - 4)
    assert metrics.frechet_from_stats(mu1, s1, mu2, s2) == pytest.approx(10.0)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 40)), rng.normal(size=(6, 40))
    c1, c2 = a @ a.T / 40 + 0.1 * np.eye(6), b @ b.T / 40
    ref = np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert metrics.frechet_from_stats(np.zeros(6), c1, np.zeros(6), c2) == pytest.approx(ref, rel=1e-8)
    # singular covariances (fewer samples than dims) stay finite and >= 0
    x, y = rng.normal(size=(5, 32)), rng.normal(size=(5, 32))
    assert np.isfinite(metrics.frechet_distance(x, y)) and metrics.frechet_distance(x, y) >= 0


def test_fd_from_samples_close_to_analytic():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40000, 3)) * np.array([1.0, 2.0, 0.5])
    y = rng.normal(size=(40000, 3)) * np.array([2.0, 2.0, 1.0]) + np.array([1.0, 0.0, 0.0])
    analytic = 1.0 + (1 + 4 - 4) + (4 + 4 - 8) + (0.25 + 1 - 1)
    assert metrics.frechet_distance(x, y) == pytest.approx(analytic, abs=0.05)
    assert metrics.frechet_distance(x[:20000], x[20000:]) < 0.01


def test_diversity_pairwise_iou():
    g = np.zeros((3, 4, 4, 4), np.uint8)
    g[0, :2] = 1
    g[1, :2] = 5          # same occupancy, other colour: IoU 1
    g[2, 2:] = 1          # disjoint: IoU 0
    assert metrics.pairwise_iou_mean(g) == pytest.approx((1 + 0 + 0) / 3)
    assert metrics.pairwise_iou_mean(g[:2]) == 1.0
    with pytest.raises(ValueError):
        metrics.pairwise_iou_mean(g[:1])


def test_mean_std_and_rate_ignore_missing():
    assert metrics.mean_std([1.0, None, 3.0, float("nan")]) == (2.0, 1.0, 2)
    assert metrics.rate([True, False, None, True]) == (pytest.approx(2 / 3), 3)
    m, s, n = metrics.mean_std([None])
    assert n == 0 and np.isnan(m)


def test_clip_score_equals_direct_computation(tmp_path):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    d = fx.make_tiny_clip(tmp_path / "clip")
    imgs = fx.write_pngs(tmp_path / "img", 3)
    scorer = ClipScorer(d)
    got = scorer.score(["a red chair", "a blue cube"], [imgs[:2], imgs[2:]])
    model, proc = CLIPModel.from_pretrained(d).eval(), AutoProcessor.from_pretrained(d)
    with torch.no_grad():
        enc = proc(text=["a red chair", "a blue cube"], images=[Image.open(p).convert("RGB") for p in imgs],
                   return_tensors="pt", padding=True)
        out = model(**enc)
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    per_view = 100 * (img @ txt.T).clamp(min=0)
    want = [per_view[:2, 0].mean().item(), per_view[2, 1].item()]
    assert got == pytest.approx(want, abs=1e-4)
    assert all(0 <= v <= 100 for v in got)


def test_feature_model_clip_and_missing_dir(tmp_path):
    d = fx.make_tiny_clip(tmp_path / "clip")
    f = metrics.FeatureModel.load(d)
    feats = f.features(fx.write_pngs(tmp_path / "img", 5), batch_size=2)
    assert feats.shape == (5, 16) and np.isfinite(feats).all()
    with pytest.raises(InputError, match="not found"):
        metrics.FeatureModel.load(tmp_path / "nope")


def test_transparent_reference_images_go_on_white(tmp_path):
    from PIL import Image

    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "a.png")
    (img,) = metrics._load_images([str(tmp_path / "a.png")])
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def test_kd_paper_is_the_mean_rbf_kernel_of_the_papers_script():
    """kd_paper = mean over (reference, generated) pairs of exp(-||x - y||^2 / d), scikit-learn's
    rbf_kernel(real, fake).mean() with its default gamma = 1/d; a similarity, unlike KD."""
    # d = 1: pairs (0,1) (0,3) (2,1) (2,3) -> distances^2 1, 9, 1, 1
    ref, gen = np.array([[0.0], [2.0]]), np.array([[1.0], [3.0]])
    assert metrics.mean_rbf_kernel(ref, gen) == pytest.approx((3 * np.exp(-1.0) + np.exp(-9.0)) / 4)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 8)), rng.normal(size=(20, 8))
    direct = np.mean([[np.exp(-np.sum((x - y) ** 2) / 8) for y in b] for x in a])
    assert metrics.mean_rbf_kernel(a, b) == pytest.approx(direct)
    assert metrics.mean_rbf_kernel(a, b) == pytest.approx(metrics.mean_rbf_kernel(b, a))
    assert metrics.mean_rbf_kernel(a, b, gamma=0.5) == pytest.approx(
        np.mean([[np.exp(-0.5 * np.sum((x - y) ** 2)) for y in b] for x in a]))
    assert metrics.mean_rbf_kernel(a[:1], a[:1]) == pytest.approx(1.0)
    # higher = closer (a similarity), where KD (a distance) goes the other way
    far = a + 3.0
    assert metrics.mean_rbf_kernel(a, b) > metrics.mean_rbf_kernel(a, far)
    assert metrics.kernel_distance(a, b)[0] < metrics.kernel_distance(a, far)[0]


def test_kd_paper_is_its_own_registered_metric():
    from rl3d.stages.scoring import registry

    assert registry.BY_NAME["kd_paper"].label != registry.BY_NAME["kd_x100"].label
    assert registry.direction("kd_paper") is None and registry.direction("kd_x100") is False
