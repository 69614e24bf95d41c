"""Reward configs: presets parse, errors name the bad key, ${VAR} options."""
import pytest

from rl3d.formats.errors import InputError
from rl3d.stages.rewards.reward_config import load_config, parse_config, preset_names


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
    from rl3d.stages.rewards.reward_config import make_backend

    monkeypatch.delenv("RL3D_HPS_CHECKPOINT", raising=False)
    hps = load_config("paper").terms("coarse")[0]
    with pytest.raises(InputError, match="term 'hps'.*checkpoint"):
        make_backend(hps)


def test_each_backend_declares_its_needs_on_itself():
    """The backends are the RewardBackend subclasses the files of stages/rewards/ declare; what the reward
    stage and doctor ask of one (views, host worker processes) is its own class attribute."""
    from rl3d.stages.rewards.reward_config import backend_class, backend_names

    assert backend_names() == ["clip", "geometry", "hps", "spec", "vlm"]
    declared = {n: (backend_class(n).needs_views, backend_class(n).host_workers) for n in backend_names()}
    assert declared == {"clip": (True, False), "geometry": (False, True), "hps": (True, False),
                        "spec": (False, True), "vlm": (True, False)}
    for module_not_backend in ("base", "config", "judge_prompts", "openai_client"):
        with pytest.raises(InputError, match=f"unknown backend '{module_not_backend}' \\(known: clip, geometry"):
            backend_class(module_not_backend)


PROMPT_LENGTH_BACKEND = '''
from rl3d.stages.checks.check import passed
from rl3d.stages.rewards.base import RewardBackend, TermResult


class PromptLengthBackend(RewardBackend):
    name = "prompt_length"
    host_workers = True

    @classmethod
    def default_options(cls, term_name):
        return {"unit": "words"}

    @classmethod
    def doctor(cls, options, label, unset, timeout):
        return [passed(label, f"counts {options['unit']}")]

    def __init__(self, unit):
        self.unit = unit

    def score(self, items):
        return [TermResult(value=float(len(it.prompt.split() if self.unit == "words" else it.prompt)))
                for it in items]
'''


def test_a_new_backend_is_one_file_that_config_stage_and_doctor_find(tmp_path, monkeypatch):
    import importlib
    import sys

    import rl3d.stages.rewards as rewards_pkg
    from rl3d.stages.doctor import check_rewards
    from rl3d.stages.rewards.base import RewardItem
    from rl3d.stages.rewards.reward_config import backend_names, make_backend

    (tmp_path / "prompt_length.py").write_text(PROMPT_LENGTH_BACKEND)
    monkeypatch.setattr(rewards_pkg, "__path__", [*rewards_pkg.__path__, str(tmp_path)])  # as if in the folder
    importlib.invalidate_caches()
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[levels.single]]\nname = "length"\nbackend = "prompt_length"\naggregate = "none"\n')
    try:
        t = load_config(cfg).terms("single")[0]
        assert t.options == {"unit": "words"}                        # its declared default option
        assert "prompt_length" in backend_names()
        items = [RewardItem("a", "a tall red chair", "single", [])]
        assert make_backend(t).score(items)[0].value == 4.0
        checks = check_rewards(str(cfg), timeout=1.0)
        assert [c.line() for c in checks[1:]] == ["ok       reward single.length (prompt_length): counts words"]
    finally:  # the module lives in tmp_path: no later test may find it
        sys.modules.pop("rl3d.stages.rewards.prompt_length", None)
