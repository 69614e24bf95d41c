"""The embedded voxel token codec: layout, round trips, errors, persistence, CLI."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rl3d.formats import codec as codec_mod
from rl3d.formats.codec import (MESH_END, MESH_START, CodecError, VoxelCodec, grids_from_objects,
                                mesh_token_text, pack_bits, unpack_bits)
from rl3d.formats.voxels import color_accuracy, to_bytes, voxel_iou

from helpers import random_shapes




@pytest.fixture(scope="module")
def codec():
    return VoxelCodec.build(random_shapes(200, seed=1), n_patterns=255)


def test_token_spelling():
    assert (MESH_START, MESH_END, mesh_token_text(7)) == ("<mesh-start>", "<mesh-end>", "<mesh7>")
    assert issubclass(CodecError, ValueError)


def test_bits_roundtrip():
    occ = np.random.default_rng(0).random((50, 64)) < 0.5
    assert (unpack_bits(pack_bits(occ)) == occ).all()
    assert pack_bits(np.ones((1, 64), bool))[0] == np.uint64(2 ** 64 - 1)


def test_shape_and_vocab(codec):
    assert (codec.resolution, codec.block, codec.seq_len) == (32, 4, 512)
    assert codec.vocab_size == 1 + 255 * 16
    assert codec_mod.FULL_BLOCK in codec.patterns


def test_raster_order_and_exact_blocks(codec):
    g = np.zeros((32, 32, 32), np.uint8)
    g[4:8, 0:4, 0:4] = 3   # block (1, 0, 0) -> token index 64
    g[0:4, 0:4, 8:12] = 5  # block (0, 0, 2) -> token index 2
    tok = codec.encode(g)
    assert tok.dtype == np.int32 and tok.shape == (512,)
    assert set(np.flatnonzero(tok)) == {2, 64}
    full = int(np.flatnonzero(codec.patterns == codec_mod.FULL_BLOCK)[0])
    assert tok[64] == 1 + full * 16 + 2 and tok[2] == 1 + full * 16 + 4
    assert (codec.decode(tok) == g).all()  # full blocks are exact, colours included
    assert (codec.encode(np.zeros_like(g)) == 0).all()


def test_majority_colour_and_quality(codec):
    grids = random_shapes(40, seed=7)
    dec = codec.decode_batch(codec.encode_batch(grids))
    iou = np.mean([voxel_iou(d, g) for d, g in zip(dec, grids)])
    acc = np.mean([color_accuracy(d, g) for d, g in zip(dec, grids)])
    assert iou > 0.93 and acc > 0.93
    g = np.zeros((32, 32, 32), np.uint8)
    g[0:4, 0:4, 0:4] = 2
    g[0, 0, 0:3] = 9  # 3 of 64 voxels differ: the block keeps colour 2
    assert set(np.unique(codec.decode(codec.encode(g)))) == {0, 2}


def test_stray_voxel_prefers_empty_when_closer(codec):
    g = np.zeros((32, 32, 32), np.uint8)
    g[10, 10, 10] = 1
    tok = codec.encode(g)
    dec = codec.decode(tok)
    # either an exact single-voxel pattern or the empty block, never a bigger wrong pattern
    assert dec.sum() in (0, 1)


def test_batch_equals_single(codec):
    grids = random_shapes(5, seed=3)
    tb = codec.encode_batch(grids)
    assert (tb == np.stack([codec.encode(g) for g in grids])).all()
    assert (codec.decode_batch(tb) == np.stack([codec.decode(t) for t in tb])).all()


def test_decode_errors(codec):
    with pytest.raises(CodecError, match="512"):
        codec.decode(np.zeros(511, np.int32))
    with pytest.raises(CodecError, match="range|\\["):
        codec.decode(np.full(512, codec.vocab_size, np.int32))
    with pytest.raises(CodecError):
        codec.decode(np.full(512, -1, np.int32))


def test_save_load_hash(codec, tmp_path):
    codec.save(tmp_path / "cb")
    again = VoxelCodec.load(tmp_path / "cb")
    assert again.content_hash() == codec.content_hash()
    assert (again.patterns == codec.patterns).all()
    meta = json.loads((tmp_path / "cb" / "codec.json").read_text())
    assert meta["vocab_size"] == codec.vocab_size and meta["content_hash"] == codec.content_hash()
    with pytest.raises(FileNotFoundError, match="not found"):
        VoxelCodec.load(tmp_path / "missing")
    other = VoxelCodec.build(random_shapes(20, seed=9), n_patterns=255)
    assert other.content_hash() != codec.content_hash()


def test_build_is_deterministic_and_fast():
    grids = random_shapes(100, seed=2)
    a, b = VoxelCodec.build(grids, 63), VoxelCodec.build(grids.copy(), 63)
    assert (a.patterns == b.patterns).all() and len(a.patterns) == 63
    assert len(np.unique(a.patterns)) == 63


def test_shipped_codec_loads():
    c = VoxelCodec.load()
    assert c.seq_len == 512 and c.vocab_size == 1 + c.n_patterns * 16
    g = random_shapes(1, seed=5)[0]
    assert voxel_iou(c.decode(c.encode(g)), g) > 0.8


def _objects_table(path, grids):
    pq.write_table(pa.table({"sample_id": [f"o{i}" for i in range(len(grids))],
                             "voxels": pa.array([to_bytes(g) for g in grids], pa.binary()),
                             "status": ["ok"] * len(grids)}), path)


def test_cli_stats_on_table(codec, tmp_path):
    from rl3d.cli.main import main

    codec.save(tmp_path / "cb")
    grids = random_shapes(12, seed=4)
    _objects_table(tmp_path / "objects.parquet", grids)
    r = CliRunner().invoke(main, ["codec", "stats", "--data", str(tmp_path / "objects.parquet"),
                                  "--codec", str(tmp_path / "cb"), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    dec = codec.decode_batch(codec.encode_batch(grids))
    assert s["objects"] == 12
    assert s["voxel_iou"] == pytest.approx(np.mean([voxel_iou(d, g) for d, g in zip(dec, grids)]))
    bad = CliRunner().invoke(main, ["codec", "stats", "--data", str(tmp_path / "nope.parquet")])
    assert bad.exit_code == 2 and "nope.parquet" in bad.output
    pq.write_table(pa.table({"x": [1]}), tmp_path / "x.parquet")
    bad = CliRunner().invoke(main, ["codec", "stats", "--data", str(tmp_path / "x.parquet"), "--codec", str(tmp_path / "cb")])
    assert bad.exit_code == 2 and "voxels" in bad.output


def test_cli_build(tmp_path, monkeypatch):
    from rl3d.stages import codec as stages_codec
    from rl3d.cli.main import main

    monkeypatch.setattr(stages_codec, "synth_grids", lambda n, seed, split: random_shapes(n, seed + (split == "eval")))
    r = CliRunner().invoke(main, ["codec", "build", "--n", "60", "--seed", "3", "--patterns", "31",
                                  "--eval-n", "10", "--out", str(tmp_path / "cb"), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    c = VoxelCodec.load(tmp_path / "cb")
    assert c.n_patterns == 31 and s["vocab_size"] == 1 + 31 * 16 and s["content_hash"] == c.content_hash()
    assert 0 < s["eval"]["voxel_iou"] <= 1
    assert c.stats["train_objects"] == 60


def test_grids_from_objects_rows():
    g = random_shapes(2)
    assert (grids_from_objects([{"voxels": to_bytes(x)} for x in g]) == g).all()
