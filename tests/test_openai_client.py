"""The OpenAI-compatible chat client and the VLM backend's endpoint path, against a local HTTP server
on 127.0.0.1 (ephemeral port) that speaks /v1/chat/completions and is scripted per test."""
import base64
import io

from PIL import Image

from helpers import chat_server

from rl3d.stages.rewards.base import RewardItem
from rl3d.stages.rewards.openai_client import ChatClient, chat_completions_url
from rl3d.stages.rewards.vlm import VLMJudgeBackend


def _conv(text="hi"):
    return [{"role": "user", "content": text}]


def _client(url, **kw):
    opts = dict(model_name="judge", timeout=2.0, retries=2, concurrency=4, backoff=0.01)
    opts.update(kw)
    return ChatClient(url, **opts)


def test_url_forms():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


def test_replies_in_input_order_with_key_and_greedy_body(monkeypatch):
    monkeypatch.setenv("RL3D_TEST_JUDGE_KEY", "sk-test")

    def behave(n, body):
        return 200, "echo " + body["messages"][0]["content"], 0.02 * (n % 3)   # out-of-order completion

    with chat_server(behave) as srv:
        replies = _client(srv.url, api_key_env="RL3D_TEST_JUDGE_KEY", max_tokens=77).complete_many(
            [_conv(f"m{i}") for i in range(7)])
    assert [r.text for r in replies] == [f"echo m{i}" for i in range(7)]
    assert all(r.error is None and r.attempts == 1 for r in replies)
    assert all(h["Authorization"] == "Bearer sk-test" for h in srv.headers)
    assert srv.bodies[0]["model"] == "judge" and srv.bodies[0]["max_tokens"] == 77
    assert srv.bodies[0]["temperature"] == 0.0


def test_no_key_env_sends_no_authorization_header():
    with chat_server(lambda n, b: (200, "x", 0)) as srv:
        assert _client(srv.url).complete(_conv()).text == "x"
    assert "Authorization" not in srv.headers[0]


def test_500_then_success_is_retried():
    with chat_server(lambda n, b: (500, "boom", 0) if n == 0 else (200, "fine", 0)) as srv:
        r = _client(srv.url, concurrency=1).complete(_conv())
    assert r.text == "fine" and r.error is None and r.attempts == 2 and srv.count == 2


def test_always_500_gives_up_after_retries():
    with chat_server(lambda n, b: (503, "overloaded", 0)) as srv:
        r = _client(srv.url, retries=2).complete(_conv())
    assert r.text is None and "HTTP 503" in r.error and "overloaded" in r.error and "3 attempts" in r.error
    assert srv.count == 3


def test_401_is_not_retried():
    with chat_server(lambda n, b: (401, "invalid api key", 0)) as srv:
        r = _client(srv.url, retries=3).complete(_conv())
    assert r.text is None and "HTTP 401" in r.error and "invalid api key" in r.error
    assert srv.count == 1 and r.attempts == 1


def test_slow_reply_times_out():
    with chat_server(lambda n, b: (200, "late", 0.6)) as srv:
        r = _client(srv.url, timeout=0.15, retries=1).complete(_conv())
    assert r.text is None and "timeout" in r.error and srv.count == 2


def test_connection_refused_is_an_error():
    with chat_server(lambda n, b: (200, "x", 0)) as srv:
        url = srv.url
    r = _client(url, retries=1).complete(_conv())   # server is gone
    assert r.text is None and "connection error" in r.error


def test_malformed_response_is_an_error_not_retried():
    with chat_server(lambda n, b: (200, None, 0)) as srv:   # content null
        r = _client(srv.url).complete(_conv())
    assert r.text is None and "no text content" in r.error and srv.count == 1


def test_concurrency_is_bounded():
    with chat_server(lambda n, b: (200, "ok", 0.08)) as srv:
        replies = _client(srv.url, concurrency=3).complete_many([_conv() for _ in range(9)])
    assert all(r.text == "ok" for r in replies)
    assert 2 <= srv.max_active <= 3


# ---- the VLM backend through an endpoint -------------------------------------------------------


def _item(tmp_path, sid, n_views=2):
    paths = []
    for k in range(n_views):
        p = tmp_path / f"{sid}-{k}.png"
        Image.new("RGB", (60, 60), (200, 30 * k, 10)).save(p)
        paths.append(str(p))
    return RewardItem(sid, "a red stool with three legs", "coarse", paths, category="stool")


def test_backend_scores_via_endpoint(tmp_path):
    def behave(n, body):
        user = body["messages"][1]["content"]
        n_images = sum(c["type"] == "image_url" for c in user)
        assert all(c["image_url"]["url"].startswith("data:image/png;base64,") for c in user if c["type"] == "image_url")
        text = next(c["text"] for c in user if c["type"] == "text")
        assert "a red stool with three legs" in text and body["messages"][0]["role"] == "system"
        if "MATCH:" in text:
            return 200, f"I see {n_images} views of a stool.\nMATCH: yes", 0
        return 200, f"Reasoning.\nSCORE: {1 + n % 5}", 0

    items = [_item(tmp_path, "a"), _item(tmp_path, "b", 3)]
    with chat_server(behave) as srv:
        joint = VLMJudgeBackend(rubric="category_match", endpoint=srv.url + "/v1", model_name="qwen-vl",
                                backoff=0.01, image_size=32)
        res = joint.score(items)
        per_view = VLMJudgeBackend(rubric="alignment", endpoint=srv.url, model_name="qwen-vl", backoff=0.01,
                                   concurrency=2)
        res2 = per_view.score(items)
    assert [(r.status, r.value) for r in res] == [("ok", 1.0), ("ok", 1.0)]
    assert "I see 2 views" not in res[0].message   # ok results carry no message
    # the decoded image is what we rendered, resized to image_size
    url = srv.bodies[0]["messages"][1]["content"][0]["image_url"]["url"]
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (32, 32)
    assert all(r.status == "ok" and r.value is None and len(r.per_view) == n for r, n in zip(res2, (2, 3)))
    assert all(1 <= s <= 5 for r in res2 for s in r.per_view)


def test_backend_garbage_and_failures_are_statuses(tmp_path):
    def behave(n, body):
        text = next(c["text"] for c in body["messages"][1]["content"] if c["type"] == "text")
        if "stool" in text and "appearance" in text:
            return (200, "It looks nice, maybe 0.7 overall", 0) if n == 0 else (500, "down", 0)
        return 500, "down", 0

    items = [_item(tmp_path, "a"), _item(tmp_path, "b")]
    with chat_server(behave) as srv:
        b = VLMJudgeBackend(rubric="appearance", endpoint=srv.url, model_name="m", retries=1, backoff=0.01,
                            concurrency=1)
        first, second = b.score(items)
    assert first.status == "parse_error" and first.value is None and "maybe 0.7 overall" in first.message
    assert second.status == "backend_error" and second.value is None and "HTTP 500" in second.message
