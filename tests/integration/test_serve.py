"""``leantune serve`` over real HTTP: the official OpenAI client against an in-process server with a
tiny random model, the greedy oracle (``leantune.evaluate.generate_texts``), a LoRA run, the API
key, and bounded abuse (concurrency, bad bodies, disconnects, a slow reader, memory)."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from leantune.data import chat_prompt_ids  # noqa: E402
from leantune.evaluate import generate_texts  # noqa: E402
from leantune.inference import load_for_inference  # noqa: E402
from leantune.serve.app import create_app  # noqa: E402
from leantune.serve.engine import Engine  # noqa: E402
from tests.serve_common import running_server, tiny_model_dir  # noqa: E402

CPU = torch.device("cpu")
HI = [{"role": "user", "content": "sort 8213"}]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_for_inference(tiny_model_dir(tmp_path_factory.mktemp("serve")), device=CPU)


@pytest.fixture(scope="module")
def engine(loaded):
    return Engine(loaded.model, loaded.tokenizer, "tiny", max_tokens_limit=512, max_n=4, info={"step": 7})


@pytest.fixture(scope="module")
def url(engine):
    with running_server(create_app(engine)) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def greedy(loaded, ids, n):
    return generate_texts(loaded.model, loaded.tokenizer, [ids], device=CPU, max_new_tokens=n)[0]


def post(url, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        url + path, content=data, headers={"Content-Type": "application/json"}, timeout=30, **kw
    )


# ---------------------------------------------------------------- the OpenAI client


def test_models_health_info_and_page(client, url):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    info = httpx.get(url + "/v1/leantune/info").json()
    assert info["model"] == "tiny" and info["step"] == 7 and info["context_length"] == 256
    assert "/v1/chat/completions" in httpx.get(url + "/openapi.json").json()["paths"]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "leantune chat" in page.text and "http" not in page.text.replace("http-equiv", "")  # no CDN


def test_completion_at_temperature_0_is_greedy_generate_texts(client, loaded):
    prompt = "sort 8213\n"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    ids = loaded.tokenizer(prompt)["input_ids"]
    assert r.choices[0].text == greedy(loaded, ids, 24)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 24
    assert r.usage.total_tokens == len(ids) + 24 and r.model == "tiny" and r.object == "text_completion"


def test_chat_applies_the_chat_template(client, loaded):
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=16, temperature=0)
    ids = chat_prompt_ids(loaded.tokenizer, HI)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy(loaded, ids, 16)
    # multi-turn, content parts and a system message render through the same template
    turns = [
        {"role": "system", "content": "be brief"},
        *HI,
        {"role": "assistant", "content": "1238"},
        {"role": "user", "content": [{"type": "text", "text": "again"}]},
    ]
    r = client.chat.completions.create(model="tiny", messages=turns, max_tokens=4, temperature=0)
    flat = [*turns[:3], {"role": "user", "content": "again"}]
    assert r.usage.prompt_tokens == len(chat_prompt_ids(loaded.tokenizer, flat))


def test_streaming_chat_and_completion_match_the_non_streamed_text(client):
    whole = client.chat.completions.create(model="tiny", messages=HI, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 3  # token by token, not one blob
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    text = client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0).choices[0].text
    streamed = client.completions.create(
        model="tiny", prompt="abc", max_tokens=12, temperature=0, stream=True
    )
    chunks = list(streamed)
    assert (
        "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == "length"
    )
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


def test_raw_stream_is_sse_ending_in_done(url):
    with httpx.stream(
        "POST", url + "/v1/completions", json={"prompt": "ab", "max_tokens": 5, "stream": True}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = raw.split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    assert all(e.startswith("data: {") for e in events[:-2])


def test_seed_n_and_usage(client):
    def ask(seed, n=1):
        return client.completions.create(
            model="tiny", prompt="xyz", max_tokens=20, temperature=1.0, seed=seed, n=n
        )

    a, b, c = ask(7), ask(7), ask(8)
    assert a.choices[0].text == b.choices[0].text != c.choices[0].text
    three = ask(7, n=3)
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    assert three.choices[0].text == a.choices[0].text  # choice 0 draws first from the same generator
    assert len({ch.text for ch in three.choices}) == 3
    full = sum(ch.finish_reason == "length" for ch in three.choices)  # 20 tokens; a sampled eos: fewer
    assert (
        full * 20 < three.usage.completion_tokens <= 60 and three.usage.prompt_tokens == a.usage.prompt_tokens
    )
    assert three.usage.total_tokens == three.usage.prompt_tokens + three.usage.completion_tokens
    chat = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, n=2, seed=1, stream=True)
    texts = {0: "", 1: ""}
    for chunk in chat:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    assert all(texts.values()) and texts[0] != texts[1]
    top = client.completions.create(
        model="tiny", prompt="xyz", max_tokens=20, temperature=1.0, top_p=1e-6, seed=3
    )
    assert (
        top.choices[0].text
        == client.completions.create(model="tiny", prompt="xyz", max_tokens=20, temperature=0).choices[0].text
    )  # a tiny nucleus keeps the most likely token only: greedy


def test_stop_sequences_cut_the_text_streamed_or_not(client):
    full = (
        client.completions.create(model="tiny", prompt="sort 42", max_tokens=30, temperature=0)
        .choices[0]
        .text
    )
    i = next(k for k in range(3, len(full) - 2) if "\ufffd" not in full[k : k + 2])
    stop = full[i : i + 2]
    cut = full[: full.find(stop)]
    for stops in (stop, [stop, "never-there"]):
        r = client.completions.create(
            model="tiny", prompt="sort 42", max_tokens=30, temperature=0, stop=stops
        )
        assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt="sort 42", max_tokens=30, temperature=0, stop=stop, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_bad_requests_are_openai_errors(client, url):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x" * 1000, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x" * 200, max_tokens=100)
    assert err.value.code == "context_length_exceeded" and err.value.param == "max_tokens"
    cases = {
        b"{not json": None,
        b"[1, 2]": None,
        json.dumps({"prompt": "x", "max_tokens": 10**9}): "max_tokens",
        json.dumps({"prompt": "x", "temperature": -0.5}): "temperature",
        json.dumps({"prompt": "x", "top_p": 0}): "top_p",
        json.dumps({"prompt": "x", "top_p": 1.5}): "top_p",
        json.dumps({"prompt": "x", "n": 100}): "n",
        json.dumps({"prompt": "x", "max_tokens": "5"}): "max_tokens",
        json.dumps({"prompt": 3}): "prompt",
        json.dumps({"prompt": [10**6]}): "prompt",
        json.dumps({"prompt": "x", "logprobs": 2}): "logprobs",
        json.dumps({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}): "stop",
        json.dumps({"prompt": "x", "stop": ""}): "stop",
        json.dumps({"prompt": "x", "seed": 10**30}): "seed",
    }
    for body, param in cases.items():
        r = post(url, "/v1/completions", body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], body
        assert error["param"] == param, (body, error)
    for body, param in {
        json.dumps({"messages": []}): "messages",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}): "messages.[0].role",
        json.dumps({"messages": HI, "tools": []}): "tools",
        json.dumps({"messages": HI, "stream": "yes"}): "stream",
    }.items():
        r = post(url, "/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):  # what a cross-origin form could send
        r = httpx.post(url + "/v1/completions", content=b'{"prompt": "a"}', headers={"Content-Type": ctype})
        assert r.status_code == 400 and "application/json" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/nothing").json()["error"]["message"] == "Not Found"
    assert httpx.get(url + "/v1/completions").status_code == 405


def test_body_over_the_limit_is_413(url):
    big = json.dumps({"prompt": "x" * (2 << 20)})
    r = post(url, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit trips while reading
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(url + "/v1/completions", content=chunked(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_api_key(engine):
    with running_server(create_app(engine, api_key="s3cret")) as base:
        assert httpx.get(base + "/health").status_code == 200
        assert httpx.get(base + "/").status_code == 200  # the page asks for the key itself
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (
                ("GET", "/v1/models"),
                ("GET", "/v1/leantune/info"),
                ("POST", "/v1/completions"),
            ):
                r = httpx.request(method, base + path, headers=headers, json={"prompt": "x"})
                assert r.status_code == 401, (headers, path)
                assert r.json()["error"]["code"] == "invalid_api_key"
        for body in (b"{bad json", json.dumps({"prompt": "x", "nope": 1})):  # 401 before any body check
            r = httpx.post(
                base + "/v1/completions", content=body, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens == 2


def test_a_failing_generation_is_a_500_and_the_server_goes_on(url, engine, client, monkeypatch):
    def broken(*a):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "_pick", broken)
    r = post(url, "/v1/completions", {"prompt": "a", "max_tokens": 3})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "out of memory" in r.json()["error"]["message"]
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "a", "stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert "out of memory" in json.loads(events[-1][6:])["error"]["message"]  # the status was sent
    monkeypatch.undo()
    assert client.completions.create(model="tiny", prompt="a", max_tokens=3).usage.completion_tokens == 3


# ---------------------------------------------------------------- a LoRA run


def test_lora_run_and_adapter_flag(tmp_path):
    from leantune.cli import main
    from leantune.commands.serve import _load

    args = [
        "model.preset=test", "data.num_train=64", "data.num_eval=8", "data.tasks=sort",
        "train.batch_size=8", "train.max_steps=3", "optim.lr=0.05", "optim.warmup_steps=1",
        "eval.every=0", "eval.accuracy_samples=0", "log.every=1", "log.progress=false",
        "log.plot=false", "log.tensorboard=false", "peft.method=lora",
        f"train.output_dir={tmp_path}", "train.run_name=lora",
    ]  # fmt: skip
    assert main(["train", *args]) == 0
    run = tmp_path / "lora"
    ref = load_for_inference(run, device=CPU)
    ids = ref.tokenizer("sort 4213\n")["input_ids"]
    expected = greedy(ref, ids, 12)
    opts = dict(adapter=None, dtype="auto", trust_remote_code=False, model_name=None)
    for ns in (
        SimpleNamespace(model=str(run), **opts),
        SimpleNamespace(**{**opts, "model": str(run / "base"), "adapter": str(run)}),
    ):
        model, tok, name, info = _load(ns, CPU)
        assert type(model).__name__.startswith("PeftModel") and name == "lora" and info["step"] == 3
        with running_server(create_app(Engine(model, tok, name, info=info))) as base:
            c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
            r = c.completions.create(model="lora", prompt="sort 4213\n", max_tokens=12, temperature=0)
            assert r.choices[0].text == expected
            assert httpx.get(base + "/v1/leantune/info").json()["step"] == 3


# ---------------------------------------------------------------- abuse, bounded


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


async def _stream_all(url, n, max_tokens):
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def one(i):
            body = {"messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": max_tokens,
                    "stream": True, "seed": i}  # fmt: skip
            text, done = "", False
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        for ch in json.loads(line[6:])["choices"]:
                            text += ch["delta"].get("content") or ""
                    done = done or line == "data: [DONE]"
            return done, text

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_abuse_concurrency_disconnects_slow_client_and_memory(url, engine, client, monkeypatch):
    # warm up every path once so that allocator pools and caches exist before the idle reading
    for _ in range(2):
        asyncio.run(_stream_all(url, 4, 8))
        client.completions.create(model="tiny", prompt="warm", max_tokens=8)
        post(url, "/v1/completions", b"{bad")
    gc.collect()
    idle = _rss()

    t0 = time.monotonic()
    results = asyncio.run(_stream_all(url, 32, 8))
    assert all(done for done, _ in results) and len(results) == 32
    assert time.monotonic() - t0 < 30

    # a client that leaves mid-stream: its generation stops and frees the worker (greedy: no early eos
    # can end it first; the seed-0 model runs the full 250 tokens)
    runs = []
    real_run, real_pick = engine.run, engine._pick

    def recording_run(job, **kw):
        result = real_run(job, **kw)
        runs.append(result)
        return result

    def slow_pick(*a):
        time.sleep(0.005)  # 250 tokens take >= 1.25 s: long enough to leave in the middle
        return real_pick(*a)

    monkeypatch.setattr(engine, "run", recording_run)
    monkeypatch.setattr(engine, "_pick", slow_pick)
    for _ in range(3):
        with httpx.stream(
            "POST",
            url + "/v1/completions",
            json={"prompt": "a", "max_tokens": 250, "stream": True, "temperature": 0},
        ) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert all(g.startswith("data: {") or g == "" for g in got)
        # closed here, after a few tokens
    deadline = time.monotonic() + 10
    while len(runs) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(runs) == 3, "a disconnected stream's job did not end"
    assert all(
        r.choices[0].finish_reason == "cancelled" and r.choices[0].completion_tokens < 200 for r in runs
    )
    monkeypatch.setattr(engine, "_pick", real_pick)

    # a client that sends a request and then reads its stream one byte at a time, slowly, does not
    # hold up the others: the worker never waits for a reader
    slow = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps({"prompt": "slow", "max_tokens": 200, "stream": True}).encode()
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    stop_reading = threading.Event()

    def trickle():
        while not stop_reading.is_set() and slow.recv(1):
            time.sleep(0.01)

    reader = threading.Thread(target=trickle, daemon=True)
    reader.start()
    t0 = time.monotonic()
    r = client.completions.create(model="tiny", prompt="fast", max_tokens=8)
    assert r.usage.completion_tokens == 8 and time.monotonic() - t0 < 10
    stop_reading.set()
    reader.join(timeout=5)
    slow.close()
    # a half-sent body, then gone
    half = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    half.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"pro')
    half.close()

    # bad bodies in a loop, then the server still answers and memory is back where it was
    for i in range(40):
        post(url, "/v1/completions", b"{bad" * i)
        post(url, "/v1/completions", {"prompt": "x" * 300, "max_tokens": 4})
        post(url, "/v1/chat/completions", {"messages": HI, "max_tokens": 10**9})
    asyncio.run(_stream_all(url, 8, 8))
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=4)
    assert r.usage.completion_tokens == 4
    assert len(runs) > 3  # the recorder saw the later jobs run too
    gc.collect()
    after = _rss()
    print(f"server RSS: idle {idle / 2**20:.0f} MiB, after the abuse {after / 2**20:.0f} MiB")
    assert after < idle * 1.10, f"RSS grew from {idle / 2**20:.0f} MiB to {after / 2**20:.0f} MiB"


# ---------------------------------------------------------------- the command itself


@pytest.mark.slow
def test_leantune_serve_command_end_to_end(loaded, tmp_path):
    """`python -m leantune serve DIR` in a subprocess: it binds, answers, and stops on SIGINT."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:  # a free port (released just before the server takes it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "leantune", "serve", str(loaded.model_dir), "--port", str(port),
           "--device", "cpu", "--model-name", "cli-tiny", "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LEANTUNE_API_KEY": "k"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "leantune serve did not come up"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        assert c.models.list().data[0].id == "cli-tiny"
        r = c.completions.create(model="cli-tiny", prompt="sort 8213\n", max_tokens=10, temperature=0)
        assert r.choices[0].text == greedy(loaded, loaded.tokenizer("sort 8213\n")["input_ids"], 10)
        assert httpx.get(base + "/v1/models").status_code == 401  # the key came from the environment
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in out and "API key required" in out
