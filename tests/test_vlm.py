"""VLM judge backend: rubric parsers, reply -> TermResult assembly, and the real transformers path
on a tiny random-init Qwen2.5-VL saved in a temp dir (its replies are garbage -> parse_error)."""

import pytest
from PIL import Image

from helpers import build_tiny_qwen_vl

from rl3d.formats.errors import InputError
from rl3d.stages.rewards import judge_prompts as jp
from rl3d.stages.rewards.base import RewardItem
from rl3d.stages.rewards.vlm import JudgeReply, VLMJudgeBackend, load_view

# ---- parsers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply,expected", [
    ("The object is a chair with a back.\nMATCH: yes", 1.0),
    ("Looks like a stool.\n\nmatch: No.\n", 0.0),
    ("Reasoning...\nMATCH: yes\n```", 1.0),
])
def test_category_match_parses_final_line(reply, expected):
    assert jp.parse_category_match(reply) == {"match": expected}


@pytest.mark.parametrize("reply", ["MATCH: maybe", "MATCH: yes\nI think so.", "", "yes", "MATCH: yes no"])
def test_category_match_rejects(reply):
    with pytest.raises(jp.JudgeParseError):
        jp.parse_category_match(reply)


def test_alignment_parser():
    assert jp.parse_alignment("<think>ok</think>\nSCORE: 4") == {"alignment": 4.0}
    for bad in ["SCORE: 6", "SCORE: 0", "SCORE: 3.5", "SCORE: four", "Score 4", "SCORE: 4\nthanks", "SCORE: -1"]:
        with pytest.raises(jp.JudgeParseError):
            jp.parse_alignment(bad)


def test_alignment_logic_style_parser():
    good = 'Fine.\n{"alignment": 4, "logic": 3, "style": 5}'
    assert jp.parse_alignment_logic_style(good) == {"alignment": 4.0, "logic": 3.0, "style": 5.0}
    for bad in ['{"alignment": 4, "logic": 3}',                              # missing key
                '{"alignment": 4, "logic": 3, "style": 5, "extra": 1}',      # unexpected key
                '{"alignment": 6, "logic": 3, "style": 5}',                  # out of range
                '{"alignment": 4.5, "logic": 3, "style": 5}',                # not an integer
                '{"alignment": true, "logic": 3, "style": 5}',               # bool is not a score
                '{"alignment": "4", "logic": 3, "style": 5}',                # string
                '{"alignment": 4, "logic": 3, "style": 5',                   # broken JSON
                '{"alignment": 4, "logic": 3, "style": 5}\nDone.']:          # not the final line
        with pytest.raises(jp.JudgeParseError):
            jp.parse_alignment_logic_style(bad)


def test_appearance_parser():
    got = jp.parse_appearance('x\n{"colour_smoothness": 0.8, "material": 1, "texture": 0}')
    assert got == {"colour_smoothness": 0.8, "material": 1.0, "texture": 0.0}
    for bad in ['{"colour_smoothness": 1.2, "material": 1, "texture": 0}',
                '{"colour_smoothness": NaN, "material": 1, "texture": 0}',
                '{"color_smoothness": 0.5, "material": 1, "texture": 0}']:
        with pytest.raises(jp.JudgeParseError):
            jp.parse_appearance(bad)


def test_parts_parser_averages_exists_plus_completeness():
    reply = ('Components: tabletop, legs, drawer.\n{"components": [{"name": "tabletop", "exists": 1, '
             '"completeness": 1.0}, {"name": "legs", "exists": 1, "completeness": 0.5}, '
             '{"name": "drawer", "exists": 0, "completeness": 0}]}')
    got = jp.parse_parts(reply)
    assert got["parts"] == pytest.approx((2.0 + 1.5 + 0.0) / 3)
    assert [c["name"] for c in got["components"]] == ["tabletop", "legs", "drawer"]
    for bad in ['{"components": []}',
                '{"components": [{"name": "legs", "exists": 0, "completeness": 0.4}]}',   # inconsistent
                '{"components": [{"name": "legs", "exists": 2, "completeness": 0.4}]}',
                '{"components": [{"name": "", "exists": 1, "completeness": 0.4}]}',
                '{"components": [{"name": "legs", "exists": 1}]}',
                '{"parts": 1.5}']:
        with pytest.raises(jp.JudgeParseError):
            jp.parse_parts(bad)


def test_rubric_text_mentions_prompt_and_format():
    r = jp.get_rubric("category_match")
    text = r.user_text('a "red" office chair', 6, category="chair")
    assert "a 'red' office chair" in text and "Expected category: chair" in text and "6 images" in text
    assert "MATCH: yes" in text
    assert "SCORE: <integer 1-5>" in jp.get_rubric("alignment").user_text("x", 1)
    with pytest.raises(KeyError):
        jp.get_rubric("nope")


# ---- reply -> TermResult, with a scripted engine ----------------------------------------------


class ScriptedEngine:
    """Answers requests from a list of replies, in order, recording what it was asked."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []

    def generate(self, requests):
        self.requests.extend(requests)
        return [self.replies.pop(0) for _ in requests]


def _views(tmp_path, n=3, size=(40, 30)):
    paths = []
    for k in range(n):
        p = tmp_path / f"view{k}.png"
        Image.new("RGB", size, (40 * k, 100, 200)).save(p)
        paths.append(str(p))
    return paths


def _backend(rubric, engine, **kw):
    b = VLMJudgeBackend.__new__(VLMJudgeBackend)   # skip model loading; options as __init__ sets them
    b.rubric, b.views, b.image_size, b.weights = jp.get_rubric(rubric), kw.get("views"), 56, kw.get("weights")
    b.engine = engine
    return b


def test_per_view_rubric_returns_per_view_and_no_value(tmp_path):
    item = RewardItem("p-0-fine", "a blue mug", "fine", _views(tmp_path))
    replies = [JudgeReply(text='{"alignment": %d, "logic": 2, "style": 3}' % a) for a in (1, 4, 5)]
    eng = ScriptedEngine(replies)
    (res,) = _backend("alignment_logic_style", eng).score([item])
    assert res.status == "ok" and res.value is None
    assert res.per_view == [6.0, 9.0, 10.0]
    assert res.details["alignment"] == [1.0, 4.0, 5.0] and res.details["views"] == [0, 1, 2]
    assert [len(r.images) for r in eng.requests] == [1, 1, 1]
    assert eng.requests[0].images[0].size == (56, 42)   # longer side resized to image_size


def test_joint_rubric_sends_selected_views_and_weights(tmp_path):
    item = RewardItem("p-0-fine", "a blue mug", "fine", _views(tmp_path, 4))
    eng = ScriptedEngine([JudgeReply(text='ok\n{"colour_smoothness": 0.5, "material": 1, "texture": 0.25}')])
    (res,) = _backend("appearance", eng, views=[1, 3], weights={"material": 2.0}).score([item])
    assert res.status == "ok" and res.per_view is None
    assert res.value == pytest.approx(0.5 + 2.0 + 0.25)
    assert res.details["material"] == 1.0
    assert len(eng.requests) == 1 and len(eng.requests[0].images) == 2 and "2 images" in eng.requests[0].text


def test_errors_keep_status_and_excerpt_never_a_score(tmp_path):
    views = _views(tmp_path, 2)
    items = [RewardItem("a", "a mug", "coarse", views), RewardItem("b", "a mug", "coarse", views),
             RewardItem("c", "a mug", "coarse", []), RewardItem("d", "a mug", "coarse", [str(tmp_path / "nope.png")]),
             RewardItem("e", "a mug", "coarse", views)]
    eng = ScriptedEngine([JudgeReply(text="SCORE: 5"), JudgeReply(text="I would say 5 out of 5!"),
                          JudgeReply(text="SCORE: 3"), JudgeReply(error="HTTP 500 from x (gave up after 4 attempts)"),
                          JudgeReply(text="SCORE: 2"), JudgeReply(text="SCORE: 4")])
    a, b, c, d, e = _backend("alignment", eng).score(items)
    assert a.status == "parse_error" and a.per_view is None and a.value is None
    assert "view 1" in a.message and "I would say 5 out of 5!" in a.message
    assert a.details["parsed_views"] == {"0": {"alignment": 5.0}}
    assert b.status == "backend_error" and "HTTP 500" in b.message and b.per_view is None
    assert c.status == "missing_views" and "no rendered views" in c.message
    assert d.status == "missing_views" and "nope.png" in d.message
    assert e.status == "ok" and e.per_view == [2.0, 4.0]


def test_missing_view_index_is_an_error(tmp_path):
    item = RewardItem("a", "a mug", "coarse", _views(tmp_path, 2))
    (res,) = _backend("category_match", ScriptedEngine([]), views=[0, 5]).score([item])
    assert res.status == "missing_views" and "[5]" in res.message


def test_options_are_validated(tmp_path):
    with pytest.raises(InputError, match="unknown rubric"):
        VLMJudgeBackend(rubric="beauty", endpoint="http://127.0.0.1:1", model_name="m")
    with pytest.raises(InputError, match="exactly one"):
        VLMJudgeBackend(rubric="alignment")
    with pytest.raises(InputError, match="exactly one"):
        VLMJudgeBackend(rubric="alignment", model=str(tmp_path), endpoint="http://x", model_name="m")
    with pytest.raises(InputError, match="model_name"):
        VLMJudgeBackend(rubric="alignment", endpoint="http://x")
    with pytest.raises(InputError, match="does not exist"):
        VLMJudgeBackend(rubric="alignment", model=str(tmp_path / "missing"))
    with pytest.raises(InputError, match="weights"):
        VLMJudgeBackend(rubric="alignment", endpoint="http://x", model_name="m", weights={"logic": 1})
    with pytest.raises(InputError, match="finite numbers"):
        VLMJudgeBackend(rubric="alignment", endpoint="http://x", model_name="m", weights={"alignment": "2"})
    with pytest.raises(InputError, match="views"):
        VLMJudgeBackend(rubric="alignment", endpoint="http://x", model_name="m", views=[-1])
    with pytest.raises(InputError, match="api_key_env"):
        VLMJudgeBackend(rubric="alignment", endpoint="http://x", model_name="m", api_key_env="RL3D_NO_SUCH_KEY_VAR")


def test_load_view_resizes_longer_side(tmp_path):
    (p,) = _views(tmp_path, 1, size=(100, 50))
    assert load_view(p, 28).size == (28, 14)
    assert load_view(p, None).size == (100, 50)


# ---- the real transformers path on a tiny random Qwen2.5-VL -----------------------------------

@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny_qwen_vl"))


def test_transformers_path_runs_and_never_scores_garbage(tiny_vl, tmp_path):
    items = [RewardItem(f"s{i}", "a red chair with four legs", "coarse", _views(tmp_path, 2 + i, size=(64, 48)))
             for i in range(2)]
    per_view = VLMJudgeBackend(rubric="alignment", model=str(tiny_vl), max_new_tokens=6, image_size=56,
                               batch_size=3)
    res = per_view.score(items)
    assert [r.status for r in res] == ["parse_error", "parse_error"]
    assert all(r.value is None and r.per_view is None and "unparseable judge reply" in r.message for r in res)

    joint = VLMJudgeBackend(rubric="appearance", model=str(tiny_vl), max_new_tokens=6, image_size=56)
    assert joint.engine.model is per_view.engine.model            # loaded once per process
    assert next(joint.engine.model.parameters()).dtype.is_floating_point
    res2 = joint.score(items)
    assert [r.status for r in res2] == ["parse_error", "parse_error"] and res2[0].value is None

    # Greedy + left padding: a request's reply does not depend on its batch mates.
    requests = [rq for it in items for _, rq in per_view.requests_for(it)]
    batched = [r.text for r in per_view.engine.generate(requests)]
    per_view.engine.batch_size = 1
    alone = [r.text for r in per_view.engine.generate(requests)]
    per_view.engine.batch_size = 3
    assert batched == alone and all(isinstance(t, str) for t in batched)


def test_docs_show_the_current_rubric_texts():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "judges.md").read_text()
    ph = dict(views_note="{views_note}", prompt="{prompt}", category_line="{category_line}")
    for r in jp.RUBRICS.values():
        assert r.template.format(**ph) in doc, f"docs/judges.md is out of date for rubric {r.name}"
    assert jp.SYSTEM in doc
