"""``leantune serve --draft``: speculative decoding behind the OpenAI routes, over real HTTP with the
official client. The oracle is the same server without a draft: greedy text, finish reasons and
usage must be identical, streamed or not, with stop strings and max_tokens; a draft that fails ends
its request with a 500 (or a stream's error event) and the next request is served; a draft with
another vocabulary is refused at start (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from leantune.cli import main  # noqa: E402
from leantune.inference import load_for_inference  # noqa: E402
from leantune.serve.app import create_app  # noqa: E402
from leantune.serve.engine import Engine, Speculative  # noqa: E402
from tests.serve_common import running_server  # noqa: E402

CPU = torch.device("cpu")
PROMPTS = ["hello", "sort 8213\n", "abc"]
CHATS = [[{"role": "user", "content": "sort 8213"}], [{"role": "user", "content": "hi"}]]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """target (peaked, so DuoDecoding drafts long sequences), same (a copy: a perfect draft),
    small (a random 1-layer draft) and other (8 more ids: refused), all with the byte tokenizer."""
    from leantune.data import build_byte_tokenizer
    from tests.helpers import byte_llama

    tok = build_byte_tokenizer()
    root = tmp_path_factory.mktemp("serve-spec")
    for name, layers, vocab, seed in (
        ("target", 2, len(tok), 2),
        ("small", 1, len(tok), 1),
        ("other", 1, len(tok) + 8, 1),
    ):
        model = byte_llama(vocab, layers, seed)
        if name == "target":
            with torch.no_grad():
                model.lm_head.weight.mul_(30)
            model.save_pretrained(root / "same")
            tok.save_pretrained(root / "same")
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def urls(dirs):
    """The plain server and three speculative ones on the same target model object."""
    target = load_for_inference(dirs / "target", device=CPU)
    same = load_for_inference(dirs / "same", device=CPU).model
    small = load_for_inference(dirs / "small", device=CPU).model
    engines = {
        "plain": Engine(target.model, target.tokenizer, "tiny"),
        "sd": Engine(target.model, target.tokenizer, "tiny", speculative=Speculative(same, "sd", 4)),
        "duo": Engine(target.model, target.tokenizer, "tiny", speculative=Speculative(same, "duo", 6)),
        "duo-small": Engine(
            target.model, target.tokenizer, "tiny", speculative=Speculative(small, "duo", 4, label="small")
        ),
    }
    # one lock for all: the servers share the target model object
    for e in engines.values():
        e.lock = engines["plain"].lock
    with (
        running_server(create_app(engines["plain"])) as plain,
        running_server(create_app(engines["sd"])) as sd,
        running_server(create_app(engines["duo"])) as duo,
        running_server(create_app(engines["duo-small"])) as duo_small,
    ):
        yield {"plain": plain, "sd": sd, "duo": duo, "duo-small": duo_small}, engines


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _completion(url, stream, **kw):
    """(text, finish_reason, usage) of a one-choice completion, streamed or not."""
    c = _client(url)
    if not stream:
        r = c.completions.create(model="tiny", temperature=0, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.model_dump()
    text, finish, usage = "", None, None
    for chunk in c.completions.create(
        model="tiny", temperature=0, stream=True, stream_options={"include_usage": True}, **kw
    ):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for ch in chunk.choices:
            text += ch.text
            finish = ch.finish_reason or finish
    return text, finish, usage


def _chat(url, stream, messages, **kw):
    c = _client(url)
    if not stream:
        r = c.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.model_dump()
    text, finish, usage = "", None, None
    for chunk in c.chat.completions.create(
        model="tiny",
        messages=messages,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    ):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish, usage


SPEC = ["sd", "duo", "duo-small"]


@pytest.mark.parametrize("decoding", SPEC)
def test_greedy_completions_and_chat_equal_the_plain_server(urls, decoding):
    url, plain = urls[0][decoding], urls[0]["plain"]
    for stream in (False, True):
        for prompt in PROMPTS:
            want = _completion(plain, False, prompt=prompt, max_tokens=24)
            assert _completion(url, stream, prompt=prompt, max_tokens=24) == want
            assert want[1] == "length" and want[2]["completion_tokens"] == 24
        for messages in CHATS:
            want = _chat(plain, False, messages, max_tokens=20)
            assert _chat(url, stream, messages, max_tokens=20) == want


@pytest.mark.parametrize("decoding", ["sd", "duo"])
def test_stop_strings_max_tokens_and_usage(urls, decoding):
    url, plain = urls[0][decoding], urls[0]["plain"]
    text = _completion(plain, False, prompt="hello", max_tokens=30)[0]
    for stop in ([text[9:11]], [text[4], text[20:23]], [text[15:17]]):
        want = _completion(plain, False, prompt="hello", max_tokens=30, stop=stop)
        assert want[1] == "stop" and want[2]["completion_tokens"] < 30
        for stream in (False, True):
            assert _completion(url, stream, prompt="hello", max_tokens=30, stop=stop) == want
    for n in (1, 2, 7):  # a round of gamma + 1 tokens is cut at max_tokens
        got = _completion(url, True, prompt="abc", max_tokens=n)
        assert got == _completion(plain, False, prompt="abc", max_tokens=n)
        usage = got[2]
        assert usage["completion_tokens"] == n and usage["total_tokens"] == usage["prompt_tokens"] + n


def test_sampling_seed_n_and_a_list_of_prompts(urls):
    c = _client(urls[0]["sd"])
    kw = {"model": "tiny", "prompt": ["hello", "abc"], "max_tokens": 6, "n": 2, "temperature": 0.9}
    a = c.completions.create(seed=3, top_p=0.9, **kw)
    b = c.completions.create(seed=3, top_p=0.9, **kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 4
    assert a.usage.completion_tokens == 24 and [x.index for x in a.choices] == [0, 1, 2, 3]


def test_health_models_and_info_say_the_decoding(urls):
    base, engines = urls
    assert httpx.get(base["plain"] + "/health").json() == {"status": "ok"}
    assert httpx.get(base["sd"] + "/health").json() == {"status": "ok", "decoding": "sd"}
    assert _client(base["duo"]).models.list().data[0].model_dump()["decoding"] == "duo"
    assert _client(base["plain"]).models.list().data[0].model_dump()["decoding"] == "ar"
    info = httpx.get(base["duo-small"] + "/v1/leantune/info").json()
    assert info["decoding"] == "duo" and info["speculative"]["draft"] == "small"
    assert info["speculative"]["gamma"] == 4 and info["speculative"]["draft_device"] == "cpu"


def test_a_failing_draft_is_a_500_or_an_error_event_and_the_server_goes_on(urls, monkeypatch):
    base, engines = urls
    url, draft = base["sd"], engines["sd"].speculative.draft
    forward = draft.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 6 == 0:  # mid-request: in the second round (a round drafts with 4 forwards)
            raise RuntimeError("draft device lost (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(draft, "forward", flaky)
    r = httpx.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 40}, timeout=60)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "draft_error"
    assert "draft device lost" in error["message"]
    calls["n"] = 0
    body = {"prompt": "abc", "max_tokens": 40, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "draft_error"
    monkeypatch.undo()
    want = _completion(base["plain"], False, prompt="abc", max_tokens=12)
    assert _completion(url, True, prompt="abc", max_tokens=12) == want
    assert _completion(url, False, prompt="abc", max_tokens=12) == want


# ---------------------------------------------------------------- the command


def test_serve_command_with_a_draft(dirs, urls, monkeypatch, capsys):
    """`leantune serve TARGET --draft ...`: uvicorn.run is replaced by an in-process server, so the
    test sees the app the command built (its draft loaded, checked and profiled)."""
    import uvicorn

    seen = {}

    def serve(app, **kw):
        with running_server(app) as base:
            seen["health"] = httpx.get(base + "/health").json()
            seen["out"] = _completion(base, True, prompt="sort 8213\n", max_tokens=16)

    monkeypatch.setattr(uvicorn, "run", serve)
    want = _completion(urls[0]["plain"], False, prompt="sort 8213\n", max_tokens=16)
    target = str(dirs / "target")
    for extra, decoding in ((["--decoding", "sd", "--gamma", "3"], "sd"), ([], "duo")):
        args = ["serve", target, "--device", "cpu", "--draft", str(dirs / "same"), "--spec-stats", *extra]
        assert main(args) == 0
        assert seen.pop("health") == {"status": "ok", "decoding": decoding}
        assert seen.pop("out") == want
        cap = capsys.readouterr()
        assert f"{decoding} with draft" in cap.out and f"{decoding}: 16 tokens" in cap.err
        if decoding == "duo":
            assert "gamma* =" in cap.err  # --gamma auto: profiled at start


@pytest.mark.parametrize(
    "extra,code,message",
    [
        (["--draft", "{other}"], 2, "vocabulary"),
        (["--decoding", "sd"], 2, "needs --draft"),
        (["--draft", "{missing}"], 2, "--draft"),
    ],
)
def test_serve_refuses_a_draft_it_cannot_use(dirs, monkeypatch, capsys, extra, code, message):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    extra = [x.format(other=dirs / "other", missing=dirs / "missing") for x in extra]
    assert main(["serve", str(dirs / "target"), "--device", "cpu", *extra]) == code
    assert message in capsys.readouterr().err
