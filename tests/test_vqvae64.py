"""The ShapeLLM-Omni 64^3 VQ-VAE codec: checkpoint contract, token layout, frames, meshes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from safetensors.torch import load_file, save_file

from rl3d.formats.codec import CodecError
from rl3d.formats.errors import InputError
from rl3d.formats.glb import face_rgb, read_glb
from rl3d.formats.occupancy import (NEUTRAL_RGBA, ROT_X_90, gltf_to_vq_frame, gltf_to_vq_points,
                                    mesh_to_vq_occupancy, normalise_vertices, occupancy_to_mesh,
                                    voxelise_mesh, vq_to_gltf_frame, vq_to_gltf_points, write_occupancy_glb)
from rl3d.formats.voxels import voxel_iou
from rl3d.formats.vqvae64 import CHECKPOINT_FILE, CONFIG_FILE, VQVAE64Config, expected_shapes, key_table_markdown
from rl3d.stages.codecs.vqvae64 import VQVAE3D, VQVAE64Codec, make_block_replica, pixel_shuffle_3d

DOCS = Path(__file__).resolve().parents[1] / "docs" / "codec.md"
SMALL = VQVAE64Config(channels=(4, 8, 16), num_embeddings=32)


@pytest.fixture(scope="module")
def replica():
    return make_block_replica()


@pytest.fixture(scope="module")
def codec(replica):
    return VQVAE64Codec(replica)


def save_small(out: Path, config: VQVAE64Config = SMALL) -> Path:
    torch.manual_seed(0)
    return VQVAE64Codec(VQVAE3D(config)).save(out)


def one_line_error(fn) -> str:
    with pytest.raises(InputError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---- checkpoint contract ------------------------------------------------------------------------

def test_published_key_table():
    shapes = expected_shapes()
    assert len(shapes) == 149
    assert sum(int(np.prod(s)) for s in shapes.values()) == 133_231_537
    # spot checks against the reference layout (TRELLIS sparse-structure VAE + vq.embeddings)
    assert shapes["Encoder.input_layer.weight"] == (32, 1, 3, 3, 3)
    assert shapes["Encoder.blocks.2.conv.weight"] == (128, 32, 2, 2, 2)      # stride-2 downsample
    assert shapes["Encoder.blocks.5.conv.weight"] == (512, 128, 2, 2, 2)
    assert shapes["Encoder.out_layer.2.weight"] == (16, 512, 3, 3, 3)       # mean + log-variance
    assert shapes["Decoder.input_layer.weight"] == (512, 8, 3, 3, 3)
    assert shapes["Decoder.blocks.2.conv.weight"] == (1024, 512, 3, 3, 3)   # conv + pixel shuffle
    assert shapes["Decoder.blocks.5.conv.weight"] == (256, 128, 3, 3, 3)
    assert shapes["Decoder.out_layer.2.weight"] == (1, 32, 3, 3, 3)
    assert shapes["vq.embeddings.weight"] == (8192, 32)
    assert not any("skip_connection" in k for k in shapes)  # every ResBlock keeps its width


@pytest.mark.parametrize("config", [VQVAE64Config(), SMALL,
                                    VQVAE64Config(channels=(2, 4, 8), num_res_blocks=1, num_res_blocks_middle=3)])
def test_the_network_holds_exactly_the_file_contract(config):
    """formats/vqvae64.py spells the checkpoint's tensors out without torch; the module must match it."""
    with torch.device("meta"):
        model = VQVAE3D(config)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == list(expected_shapes(config).items())


def test_formats_check_a_checkpoint_without_torch(tmp_path):
    """The on-disk layer reads headers and hashes with torch never imported (doctor, codec hash, gen's
    length check); only loading the network brings it in."""
    import subprocess
    import sys

    out = save_small(tmp_path / "vq")
    code = ("import sys\n"
            "from rl3d.formats.codecs import codec_format, codec_seq_len\n"
            f"fmt = codec_format({str(out)!r})\n"
            f"h = fmt.header({str(out)!r})\n"
            f"print(fmt.kind, h['vocab_size'], codec_seq_len({str(out)!r}), fmt.coloured, fmt.external, "
            "'torch' in sys.modules)\n")
    got = subprocess.run([sys.executable, "-c", code], check=True, text=True, stdout=subprocess.PIPE).stdout.split()
    assert got == ["vqvae64", "32", "1024", "False", "True", "False"]


def test_codecs_declare_what_callers_ask(tmp_path):
    from rl3d.formats.codec import VoxelCodec
    from rl3d.stages.codecs import load_codec

    block = load_codec(None)
    assert isinstance(block, VoxelCodec) and block.coloured and not block.external and block.seq_len == 512
    out = save_small(tmp_path / "vq")
    vq = load_codec(out)
    assert isinstance(vq, VQVAE64Codec) and not vq.coloured and vq.external and vq.seq_len == 1024
    assert vq.content_hash() == vq.header(out)["content_hash"]
    assert not VQVAE64Codec(make_block_replica()).external  # built in memory: no file to reference yet


def test_docs_list_every_key():
    assert key_table_markdown() in DOCS.read_text()


def test_full_size_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(0)
    model = VQVAE3D()
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}  # as a half-precision export
    save_file(state, str(tmp_path / CHECKPOINT_FILE))
    codec = VQVAE64Codec.load(tmp_path)  # a dir holding 3DVQVAE.safetensors, no config: the published one
    assert (codec.seq_len, codec.vocab_size, codec.resolution) == (1024, 8192, 64)
    assert codec.config == VQVAE64Config()
    loaded = codec.model.state_dict()
    assert loaded.keys() == state.keys()
    for k in ("Encoder.input_layer.weight", "Decoder.blocks.2.conv.bias", "vq.embeddings.weight"):
        assert torch.equal(loaded[k], state[k].float())


def test_small_replica_save_load(tmp_path):
    out = save_small(tmp_path / "vq")
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_FILE, CONFIG_FILE]
    codec = VQVAE64Codec.load(out / CHECKPOINT_FILE)
    assert codec.config == SMALL and codec.vocab_size == 32
    assert codec.content_hash() == VQVAE64Codec.load(out).content_hash()
    assert expected_shapes(SMALL).keys() == expected_shapes().keys()  # same names at reduced channels


def edit_checkpoint(out: Path, edit) -> Path:
    f = out / CHECKPOINT_FILE
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f))
    return out


@pytest.mark.parametrize("edit, expect", [
    (lambda s: s.pop("Decoder.blocks.3.conv1.bias"), "missing 1 key(s): Decoder.blocks.3.conv1.bias"),
    (lambda s: s.update({"vq.extra": torch.zeros(1)}), "unexpected 1 key(s): vq.extra"),
    (lambda s: s.update({"vq.embeddings.weight": torch.zeros(32, 16)}),
     "vq.embeddings.weight is [32, 16], expected [32, 32]"),
])
def test_bad_keys_fail_in_one_line(tmp_path, edit, expect):
    out = edit_checkpoint(save_small(tmp_path / "vq"), edit)
    msg = one_line_error(lambda: VQVAE64Codec.load(out))
    assert str(out / CHECKPOINT_FILE) in msg and "not a ShapeLLM-Omni 3D VQ-VAE checkpoint" in msg
    assert expect in msg


def test_unreadable_checkpoints_fail_in_one_line(tmp_path):
    msg = one_line_error(lambda: VQVAE64Codec.load(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in msg and "not found" in msg
    msg = one_line_error(lambda: VQVAE64Codec.load(tmp_path))  # a dir without the file
    assert str(tmp_path / CHECKPOINT_FILE) in msg and "not found" in msg
    out = save_small(tmp_path / "vq")
    f = out / CHECKPOINT_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated download
    msg = one_line_error(lambda: VQVAE64Codec.load(out))
    assert str(f) in msg and "not a readable safetensors file" in msg
    (tmp_path / "3DVQVAE.bin").write_bytes(b"pickle")
    msg = one_line_error(lambda: VQVAE64Codec.load(tmp_path / "3DVQVAE.bin"))
    assert "convert it to safetensors" in msg


def test_published_bin_converts(tmp_path):
    from rl3d.formats.vqvae64 import convert_bin_checkpoint

    state = {k: torch.zeros(s, dtype=torch.float16) for k, s in expected_shapes().items()}
    torch.save(state, tmp_path / "3DVQVAE.bin")
    out = convert_bin_checkpoint(tmp_path / "3DVQVAE.bin", tmp_path / CHECKPOINT_FILE)
    assert load_file(str(out)).keys() == state.keys()
    torch.save({"module.vq.embeddings.weight": torch.zeros(8192, 32)}, tmp_path / "bad.bin")
    assert "missing 149 key(s)" in one_line_error(
        lambda: convert_bin_checkpoint(tmp_path / "bad.bin", tmp_path / "x.safetensors"))


# ---- token layout -------------------------------------------------------------------------------

def test_pixel_shuffle_offsets():
    x = torch.arange(2 * 8 * 3 * 3 * 3, dtype=torch.float32).reshape(1, 16, 3, 3, 3)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (1, 2, 6, 6, 6)
    for c, i, j, k in [(0, 0, 0, 0), (1, 1, 0, 1), (0, 0, 1, 1), (1, 1, 1, 0)]:
        assert y[0, c, 2 * 2 + i, 2 * 1 + j, 2 * 0 + k] == x[0, c * 8 + i * 4 + j * 2 + k, 2, 1, 0]


def test_raster_order_in_the_vq_frame(replica):
    """Token t holds latent cells (x, y, z) = (t // 64, t // 4 % 16, 4 * (t % 4) + q), q = 0..3."""
    occ = torch.zeros(1, 1, 64, 64, 64)
    cells = [(3, 5, 9), (15, 0, 0), (0, 15, 14)]  # latent cells, each a 4^3 voxel block
    for x, y, z in cells:
        occ[0, 0, 4 * x:4 * x + 4, 4 * y:4 * y + 4, 4 * z:4 * z + 4] = 1
    ids = replica.encode_indices(occ)[0]
    assert ids.shape == (1024,)
    want = {x * 64 + y * 4 + z // 4: 1 << (z % 4) for x, y, z in cells}  # code bit q = cell q of the token
    assert {int(t): int(ids[t]) for t in torch.nonzero(ids).ravel()} == want
    logits = replica.decode_logits(ids[None])
    assert torch.equal(logits > 0, occ > 0)


def test_codec_round_trip_box_and_sphere(codec):
    x, y, z = np.meshgrid(*[np.arange(64) + 0.5] * 3, indexing="ij")
    box = ((x > 8) & (x < 24) & (y > 4) & (y < 40) & (z > 16) & (z < 32)).astype(np.uint8)  # whole 4^3 blocks
    odd_box = ((x > 9) & (x < 47) & (y > 3) & (y < 30) & (z > 20) & (z < 55)).astype(np.uint8)
    sphere = (((x - 32) ** 2 + (y - 30) ** 2 + (z - 33) ** 2) < 18 ** 2).astype(np.uint8)
    grids = np.stack([box, odd_box, sphere])
    tokens = codec.encode_batch(grids)
    assert tokens.dtype == np.int32 and tokens.shape == (3, 1024)
    assert tokens.min() >= 0 and tokens.max() < codec.vocab_size
    dec = codec.decode_batch(tokens)
    assert dec.dtype == np.uint8 and dec.shape == (3, 64, 64, 64) and set(np.unique(dec)) <= {0, 1}
    ious = [voxel_iou(d, g) for d, g in zip(dec, grids)]
    assert ious[0] == 1.0 and ious[1] > 0.8 and ious[2] > 0.8  # others: 4^3-block approximations
    assert (codec.decode(codec.encode(box)) == box).all()


def test_codec_token_errors(codec):
    with pytest.raises(CodecError, match="1024 mesh tokens"):
        codec.decode(np.zeros(512, np.int64))
    with pytest.raises(CodecError, match=r"\[0, 16\)"):
        codec.decode(np.full(1024, 16))
    with pytest.raises(ValueError, match="64, 64, 64"):
        codec.encode_batch(np.zeros((1, 32, 32, 32), np.uint8))


# ---- frames and voxelisation --------------------------------------------------------------------

def test_frame_turns_match_the_authors_point_rotation():
    rng = np.random.default_rng(0)
    grid = (rng.random((64, 64, 64)) < 0.01).astype(np.uint8)
    # the authors: voxel centres, rotate_points(+90 deg about x), back to indices with int()
    centres = (np.argwhere(grid) + 0.5) / 64 - 0.5
    idx = ((gltf_to_vq_points(centres) + 0.5) * 64).astype(np.int64)
    theirs = np.zeros_like(grid)
    theirs[tuple(idx.T)] = 1
    assert (gltf_to_vq_frame(grid) == theirs).all()
    assert (vq_to_gltf_frame(gltf_to_vq_frame(grid)) == grid).all()
    np.testing.assert_allclose(gltf_to_vq_points([[0.1, 0.2, 0.3]]), [[0.1, -0.3, 0.2]])  # up -> +Z, front -> -Y
    np.testing.assert_allclose(vq_to_gltf_points([[0.1, -0.3, 0.2]]), [[0.1, 0.2, 0.3]])
    assert np.allclose(ROT_X_90, trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0])[:3, :3])


def tower_with_nose():
    """A tall thin box (up = +Y) with a nose sticking out to the front (+Z) near the top."""
    body = trimesh.creation.box(extents=(0.2, 1.0, 0.2))
    body.apply_translation((0, 0.5, 0))
    nose = trimesh.creation.box(extents=(0.1, 0.1, 0.2))
    nose.apply_translation((0, 0.85, 0.2))
    return trimesh.util.concatenate([body, nose])


def test_normalisation_is_the_authors_scalar_min_max():
    # one min (-0.1) and one max (1.0) over all coordinates: scale 1.1, aspect kept, not centred
    v = normalise_vertices(np.array([[-0.1, 0.0, -0.1], [0.1, 1.0, 0.3]]))
    want = (np.array([[0.0, 0.1, 0.0], [0.2, 1.1, 0.4]]) / 1.1 - 0.5).clip(-0.5 + 1e-6, 0.5 - 1e-6)
    np.testing.assert_allclose(v, want, atol=1e-12)


def test_voxelisation_convention():
    mesh = tower_with_nose()
    own = voxelise_mesh(mesh)  # mesh frame (= rl3d frame): up is +Y
    occ = np.argwhere(own)
    # scalar min / max (-0.1, 1.0): y = 0 -> 0.1 / 1.1 * 64 = voxel 5, y = 1 -> voxel 63; x, z start at 0
    assert (occ[:, 1].min(), occ[:, 1].max()) == (5, 63)
    assert occ[:, 0].min() == 0 and occ[:, 0].max() < 13 and occ[:, 2].min() == 0  # not centred in x, z
    vq = mesh_to_vq_occupancy(mesh)  # what the authors encode
    assert vq.dtype == np.uint8 and vq.shape == (64, 64, 64)
    pts = np.argwhere(vq)
    assert (pts[:, 2].min(), pts[:, 2].max()) == (5, 63)  # up became +Z
    body = pts[pts[:, 2] < 40]
    nose = pts[(pts[:, 1] < body[:, 1].min())]             # front (+Z) became -Y: the nose has the smallest y
    assert len(nose) and nose[:, 2].min() > 48              # ... and sits near the top
    centres = (occ + 0.5) / 64 - 0.5
    idx = ((centres @ ROT_X_90.T + 0.5) * 64).astype(np.int64)
    assert set(map(tuple, idx)) == set(map(tuple, pts))


# ---- meshes -------------------------------------------------------------------------------------

def test_decoded_column_is_a_y_up_mesh(codec, replica, tmp_path):
    vq = torch.zeros(1, 1, 64, 64, 64)
    vq[0, 0, 28:36, 28:36, 4:60] = 1  # a column along the VQ-VAE's up axis (+Z)
    tokens = replica.encode_indices(vq).numpy()
    grid = codec.decode(tokens[0])   # rl3d frame
    mesh = occupancy_to_mesh(grid)
    ext = mesh.extents
    assert ext[1] == pytest.approx(56 / 64) and ext[0] == ext[2] == pytest.approx(8 / 64)
    assert mesh.is_watertight
    path = write_occupancy_glb(grid, tmp_path / "col.glb")
    back = read_glb(path)
    np.testing.assert_allclose(back.bounds, mesh.bounds, atol=1e-6)
    assert (face_rgb(back) == NEUTRAL_RGBA[:3]).all()
    assert back.visual.material.metallicFactor == 0.0


def test_block_replica_survives_save_and_load(codec, tmp_path):
    grid = np.zeros((64, 64, 64), np.uint8)
    grid[12:20, 0:32, 40:44] = 1
    loaded = VQVAE64Codec.load(codec.save(tmp_path / "replica"))
    assert loaded.config == codec.config and loaded.content_hash() == codec.content_hash()
    assert (loaded.encode(grid) == codec.encode(grid)).all()
    assert (loaded.decode(loaded.encode(grid)) == grid).all()


def test_codec_convert_command_writes_the_checkpoint_and_its_hash(tmp_path):
    """`rl3d codec convert BIN OUT_DIR` = convert_bin_checkpoint into OUT_DIR/3DVQVAE.safetensors, with
    the content hash rl3d_policy.json records; a rerun skips; a bad pickle is one line, exit 2."""
    import json

    from click.testing import CliRunner

    from rl3d.cli.main import main
    from rl3d.formats.vqvae64 import file_hash

    state = {k: torch.zeros(s, dtype=torch.float16) for k, s in expected_shapes().items()}
    torch.save(state, tmp_path / "3DVQVAE.bin")
    r = CliRunner().invoke(main, ["codec", "convert", str(tmp_path / "3DVQVAE.bin"), str(tmp_path / "vq"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    out = tmp_path / "vq" / CHECKPOINT_FILE
    assert summary["checkpoint"] == str(out) and load_file(str(out)).keys() == state.keys()
    assert summary["content_hash"] == file_hash(out) == VQVAE64Codec.load(tmp_path / "vq").content_hash()
    again = json.loads(CliRunner().invoke(main, ["codec", "convert", str(tmp_path / "3DVQVAE.bin"),
                                                 str(tmp_path / "vq"), "--json"]).stdout)
    assert again["skipped"] is True and again["content_hash"] == summary["content_hash"]
    torch.save({"module.vq.embeddings.weight": torch.zeros(8192, 32)}, tmp_path / "bad.bin")
    r = CliRunner().invoke(main, ["codec", "convert", str(tmp_path / "bad.bin"), str(tmp_path / "bad")])
    assert r.exit_code == 2 and "missing 149 key(s)" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "bad" / CHECKPOINT_FILE).exists()
