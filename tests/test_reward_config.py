"""Reward configs: presets parse, errors name the bad key, ${VAR} options."""
import pytest

from rl3d.formats.errors import InputError
from rl3d.stages.rewards.config import load_config, parse_config, preset_names


def term(**kw):
    t = {"name": "stability", "backend": "geometry", "aggregate": "none"}
    t.update(kw)
    return t


def test_presets_parse_with_expected_levels_and_paper_scales():
    assert {"default", "flat", "paper", "paper-flat"} <= set(preset_names())
    assert set(load_config("default").levels) == {"coarse", "fine"}
    assert set(load_config("flat").levels) == {"single"}
    paper = load_config("paper")
    fine = {t.name: t for t in paper.terms("fine")}
    assert fine["unified"].scale == pytest.approx(1 / 3) and fine["parts"].scale == pytest.approx(0.5)
    assert fine["hps"].aggregate == "max" and fine["appearance"].aggregate == "none"
    assert [t.name for t in paper.terms("coarse")] == ["hps", "unified_alignment", "category_match"]


@pytest.mark.parametrize("raw, key", [
    ({"levels": {"coarse": [term(aggregate="median")]}}, "levels.coarse[0].aggregate"),
    ({"levels": {"coarse": [term(weight="heavy")]}}, "levels.coarse[0].weight"),
    ({"levels": {"coarse": [term(), term(name="x", backend="nope")]}}, "levels.coarse[1].backend"),
    ({"levels": {"coarse": [term(colour=1)]}}, "levels.coarse[0].colour"),
    ({"levels": {"medium": [term()]}}, "levels.medium"),
    ({"levels": {"fine": [term(), term()]}}, "levels.fine[1].name"),
    ({"levels": {"fine": [term(required="yes")]}}, "levels.fine[0].required"),
    ({"levels": {"fine": [term(name="total")]}}, "levels.fine[0].name"),
    ({"levels": {"fine": [{"backend": "geometry"}]}}, "levels.fine[0].name"),
    ({"levles": {}}, "levles"),
    ({}, "levels"),
])
def test_errors_name_the_bad_key(raw, key):
    with pytest.raises(InputError) as e:
        parse_config(raw, "my.toml")
    assert f"my.toml: {key}:" in str(e.value)


def test_fraction_scale_and_geometry_metric_default():
    c = parse_config({"levels": {"fine": [term(scale="1/3", weight=2)]}})
    t = c.terms("fine")[0]
    assert t.factor == pytest.approx(2 / 3) and t.options == {"metric": "stability"}


def test_env_options_expand_or_drop(monkeypatch):
    raw = {"levels": {"fine": [term(name="h", backend="hps", aggregate="max",
                                    options={"checkpoint": "${RL3D_TEST_CKPT}", "arch": "ViT-H-14"})]}}
    monkeypatch.delenv("RL3D_TEST_CKPT", raising=False)
    assert parse_config(raw).terms("fine")[0].options == {"arch": "ViT-H-14"}
    monkeypatch.setenv("RL3D_TEST_CKPT", "/m/hps.pt")
    assert parse_config(raw).terms("fine")[0].options["checkpoint"] == "/m/hps.pt"


def test_files_toml_yaml_and_unknown(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[[levels.single]]\nname = "sym"\nbackend = "geometry"\naggregate = "none"\n'
                 'options = { metric = "symmetry" }\n')
    assert load_config(p).terms("single")[0].options == {"metric": "symmetry"}
    y = tmp_path / "c.yaml"
    y.write_text("levels:\n  single:\n    - {name: sym, backend: geometry, aggregate: mean, weight: 0.5}\n")
    assert load_config(y).terms("single")[0].weight == 0.5
    bad = tmp_path / "bad.toml"
    bad.write_text("levels = [")
    with pytest.raises(InputError, match="bad.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(InputError, match="not a preset"):
        load_config("nonexistent-preset")


def test_paper_preset_without_models_says_what_is_missing(monkeypatch):
    from rl3d.stages.rewards.config import make_backend

    monkeypatch.delenv("RL3D_HPS_CHECKPOINT", raising=False)
    hps = load_config("paper").terms("coarse")[0]
    with pytest.raises(InputError, match="term 'hps'.*checkpoint"):
        make_backend(hps)
