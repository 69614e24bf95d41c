"""The image files a render writes (stages/raycast/images.py): views and sheets as PNGs read back
as the same pixels by Pillow, whatever the content."""
from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from rl3d.stages.raycast import images


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7, 3), (64, 48, 3), (9, 13)])
def test_png_bytes_read_back_as_the_same_pixels(shape):
    rng = np.random.default_rng(sum(shape))
    for a in (rng.integers(0, 256, shape, dtype=np.uint8), np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8)):
        data = images.png_bytes(a)
        got = decoded(data)
        assert got.dtype == np.uint8 and np.array_equal(got, a)
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == ("RGB" if a.ndim == 3 else "L")


def test_png_bytes_of_a_view_and_of_a_strided_array():
    """A rendered-looking view (flat background, a shaded object with hard edges) and a
    non-contiguous slice encode to the pixels they hold; the file is about Pillow's size."""
    a = np.full((96, 128, 3), 255, np.uint8)
    yy, xx = np.mgrid[:96, :128]
    disc = (yy - 48) ** 2 + (xx - 60) ** 2 < 30 ** 2
    a[disc] = np.stack([xx, yy, xx + yy], -1)[disc].astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=images.PNG_LEVEL)
    ours = images.png_bytes(a)
    assert np.array_equal(decoded(ours), a)
    assert len(ours) < 2 * len(buf.getvalue())
    view = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)[:, ::2]
    assert np.array_equal(decoded(images.png_bytes(view)), view)


def test_png_chunks_carry_valid_checksums():
    data = images.png_bytes(np.arange(30, dtype=np.uint8).reshape(2, 5, 3))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert int.from_bytes(data[pos + 8 + n:pos + 12 + n], "big") == zlib.crc32(kind + body)
        kinds.append(kind)
        pos += 12 + n
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]


def test_save_png_writes_uint8_through_png_bytes_and_16_bit_depth_through_pillow(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    images.save_png(rgb, tmp_path / "v.png")
    assert (tmp_path / "v.png").read_bytes() == images.png_bytes(rgb)
    depth = np.array([[0, 1, 65535], [1234, 40000, 7]], np.uint16)
    images.save_png(depth, tmp_path / "d.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d.png")).astype(np.uint16), depth)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_contact_sheets_drawn_by_several_threads_equal_one_drawn_alone():
    """render's writers are threads: each draws captions with its own font objects, so sheets made
    at the same time are the sheet made alone."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    views = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    labels = [f"az {a}  el 20" for a in range(0, 360, 60)]

    def sheet(i):
        return images.contact_sheet(views, f"sample-{i % 3}  |  a red chair with four legs", labels, "white", tile=48)
    alone = [sheet(i) for i in range(3)]
    with ThreadPoolExecutor(4) as ex:
        together = list(ex.map(sheet, range(24)))
    assert all(np.array_equal(s, alone[i % 3]) for i, s in enumerate(together))
