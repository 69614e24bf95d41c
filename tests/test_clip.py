"""CLIP-family backends through the real loading path, against a direct computation."""
import numpy as np
import pytest
import torch
from PIL import Image

from rl3d.formats.errors import InputError
from rl3d.stages.rewards.base import RewardItem

PROMPTS = ["a red chair with four legs", "a blue round table", "a tall green tower"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rl3d.stages.train_scorer import init_scorer, phrasings, save_scorer

    d = tmp_path_factory.mktemp("clip")
    model, tok, proc = init_scorer([ph for p in PROMPTS for ph in phrasings(p)], seed=1, hidden=32, layers=1,
                                   heads=2, image_size=32, patch=8, projection=16)
    save_scorer(d / "model", model, tok, proc, {})
    rng = np.random.default_rng(0)
    imgs = []
    for i in range(4):
        p = d / f"v{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8)).save(p)
        imgs.append(str(p))
    return d / "model", imgs


def direct(model_dir, prompt, paths):
    """cos(text, image) computed by hand from the saved model and processors."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    from rl3d.stages.scoring.clip_scorer import load_rgb

    m = CLIPModel.from_pretrained(str(model_dir)).eval()
    tok, proc = AutoTokenizer.from_pretrained(str(model_dir)), CLIPImageProcessorPil.from_pretrained(str(model_dir))
    with torch.no_grad():
        t = m.get_text_features(**tok([prompt], return_tensors="pt")).pooler_output
        i = m.get_image_features(**proc(images=[load_rgb(p) for p in paths], return_tensors="pt")).pooler_output
    t, i = t / t.norm(dim=-1, keepdim=True), i / i.norm(dim=-1, keepdim=True)
    return (i @ t.T)[:, 0].numpy(), float(m.logit_scale.detach().exp())


def test_clip_score_and_pickscore_equal_direct_computation(tiny):
    from rl3d.stages.rewards.clip import ClipBackend

    model_dir, imgs = tiny
    cos, scale = direct(model_dir, PROMPTS[0], imgs[:3])
    items = [RewardItem("a", PROMPTS[0], "coarse", imgs[:3]), RewardItem("b", PROMPTS[1], "coarse", imgs[3:])]
    cs = ClipBackend(model=str(model_dir), metric="clip_score", batch_size=2).score(items)
    ps = ClipBackend(model=str(model_dir), metric="pickscore").score(items)
    np.testing.assert_allclose(cs[0].per_view, np.maximum(100 * cos, 0), atol=1e-3)
    np.testing.assert_allclose(ps[0].per_view, scale * cos, atol=1e-4)
    assert len(cs[1].per_view) == 1 and cs[0].value is None


def test_missing_views_and_files_are_statuses(tiny):
    from rl3d.stages.rewards.clip import ClipBackend

    model_dir, imgs = tiny
    r = ClipBackend(model=str(model_dir)).score([RewardItem("a", "x", "fine", []),
                                                 RewardItem("b", "x", "fine", [imgs[0], "/nope.png"])])
    assert [x.status for x in r] == ["missing_renders", "image_error"]
    assert all(x.value is None and x.per_view is None for x in r)


def test_bad_options(tmp_path):
    from rl3d.stages.rewards.clip import ClipBackend

    with pytest.raises(InputError, match="does not exist"):
        ClipBackend(model=str(tmp_path / "none"))
    with pytest.raises(InputError, match="unknown clip metric"):
        ClipBackend(model=str(tmp_path), metric="aesthetic")
    with pytest.raises(InputError, match="no config.json"):
        ClipBackend(model=str(tmp_path))


def test_tokenizer_round_trips_and_pads_with_eos():
    from rl3d.stages.train_scorer import build_tokenizer

    tok = build_tokenizer(PROMPTS * 3, vocab_size=400)
    ids = tok(["a red chair", "a tall green tower"], padding=True)["input_ids"]
    assert ids[0][0] == tok.bos_token_id and ids[0][-1] == tok.eos_token_id == tok.pad_token_id
    assert tok.decode(ids[1], skip_special_tokens=True).strip() == "a tall green tower"


def test_hps_without_open_clip_names_the_extra(tmp_path, monkeypatch):
    import sys

    from rl3d.stages.rewards.hps import HPSBackend

    ckpt = tmp_path / "hps.pt"
    ckpt.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import fails as if not installed
    with pytest.raises(InputError, match=r"pip install rl3d\[hps\]"):
        HPSBackend(checkpoint=str(ckpt))
    with pytest.raises(InputError, match="checkpoint is empty"):
        HPSBackend()


def test_background_image_preparation_keeps_the_embeddings(tiny, monkeypatch):
    """Images decoded and preprocessed in background threads (any task size, batches split across
    tasks) give the same embeddings as encoding each image alone on the spot."""
    from rl3d.stages.scoring import clip_scorer as clip

    model_dir, imgs = tiny
    paths = imgs * 5 + ["/no/such/view.png"]
    want = []
    for p in dict.fromkeys(paths):
        scorer = clip.ClipScorer(model_dir, "cpu")
        want.append(scorer.image_embeddings([p], 1)[0])
    monkeypatch.setattr(clip, "PREP_IMAGES", 3)
    got = clip.ClipScorer(model_dir, "cpu").image_embeddings(list(dict.fromkeys(paths)), 2)
    assert np.allclose(got[:-1], np.stack(want[:-1]), atol=1e-6) and np.isnan(got[-1]).all()
    batches = list(clip.prepared_batches(list(range(11)), lambda xs: [x * 10 for x in xs], 4))
    assert batches == [[0, 10, 20, 30], [40, 50, 60, 70], [80, 90, 100]]


def test_hps_features_match_per_view_text_encoding(tiny):
    """HPS encodes each distinct prompt once and prepares images in background threads: the cosines
    equal the per-view computation (a stub open_clip model: no extra needed)."""
    from rl3d.stages.rewards.hps import HPSBackend
    from rl3d.stages.scoring.clip_scorer import load_rgb

    torch.manual_seed(0)
    img_w, txt_w = torch.randn(3 * 8 * 8, 5), torch.randn(50, 5)

    class Stub:
        def encode_image(self, px):
            return px.flatten(1) @ img_w

        def encode_text(self, ids):
            return txt_w[ids].sum(1)

    hps = object.__new__(HPSBackend)
    hps.model, hps.device, hps.batch_size = Stub(), "cpu", 3
    hps.preprocess = lambda im: torch.from_numpy(np.asarray(im.resize((8, 8)), np.float32) / 255).permute(2, 0, 1)
    hps.tokenizer = lambda texts: torch.tensor([[len(t) % 50, len(t.split()) % 50] for t in texts])
    _, imgs = tiny
    paths = imgs + imgs[:3]
    prompts = [PROMPTS[i % 2] for i in range(len(paths))]
    norm = torch.nn.functional.normalize
    want = [float((norm(Stub().encode_image(hps.preprocess(load_rgb(p))[None]), dim=-1)
                   * norm(Stub().encode_text(hps.tokenizer([t])), dim=-1)).sum()) for p, t in zip(paths, prompts)]
    assert np.allclose(hps._features(paths, prompts), want, atol=1e-6)


def test_device_preprocessing_is_within_a_grey_level_of_the_image_processor(tmp_path):
    """The torch path resizes as PIL does (two antialiased passes, each rounded to 8 bits): on a
    smooth render-like image nearly every pixel equals the processor's, none is off by more than 2
    grey levels; a non-square image is resized on its shortest edge and centre-cropped the same way."""
    from transformers import CLIPImageProcessorPil

    from rl3d.stages.scoring.clip_scorer import device_preprocessing

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = device_preprocessing(proc)
    yy, xx = np.mgrid[0:120, 0:90]
    img = np.stack([(xx * 2) % 256, (yy * 3) % 256, ((xx + yy) > 100) * 200 + 30], -1).astype(np.uint8)
    want = proc(images=[Image.fromarray(img)], return_tensors="np")["pixel_values"][0]
    got = pixels(torch.from_numpy(img[None]))[0].numpy()
    assert got.shape == want.shape == (3, 32, 32)
    grey = np.abs(got - want) * np.asarray(proc.image_std)[:, None, None] * 255
    assert grey.max() <= 2.01 and (grey < 0.5).mean() > 0.95
    assert device_preprocessing(CLIPImageProcessorPil(size={"longest_edge": 32}, do_center_crop=False)) is None


def test_clip_preprocess_option_keeps_scores_close_and_is_checked(tiny):
    from rl3d.stages.rewards.clip import ClipBackend

    model_dir, imgs = tiny
    items = [RewardItem("a", PROMPTS[0], "coarse", imgs)]
    pil = ClipBackend(model=str(model_dir), preprocess="pil").score(items)[0].per_view
    dev = ClipBackend(model=str(model_dir), preprocess="device").score(items)[0].per_view
    np.testing.assert_allclose(dev, pil, atol=1.0)  # random-noise views: the worst case for resize rounding
    with pytest.raises(InputError, match="unknown clip preprocess 'gpu'"):
        ClipBackend(model=str(model_dir), preprocess="gpu")
