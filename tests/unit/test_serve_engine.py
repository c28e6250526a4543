"""The pure parts of ``leantune serve``: stream hold-back, request checks and the decode loop of
:class:`leantune.serve.engine.Engine` (no HTTP, no FastAPI needed), and the ``serve`` command's
own logic (the missing-extra message, loopback detection, the run step)."""

from __future__ import annotations

import json
import sys
import threading

import pytest
import torch

from leantune.data import chat_prompt_ids, load_tokenizer
from leantune.evaluate import generate_texts
from leantune.models import build_model
from leantune.serve.engine import Engine, RequestError, SamplingParams, held_back


@pytest.fixture(scope="module")
def engine():
    tok = load_tokenizer(None)
    model = build_model(preset="test", vocab_size=len(tok), seed=0)
    return Engine(model, tok, "tiny", max_tokens_limit=64, max_n=4, max_prompts=2)


def test_held_back():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["xyz"]) == 0
    assert held_back("ab", ["abc", "b"]) == 2  # "b" itself is found by the caller; "ab" may become "abc"
    assert held_back("caf\ufffd", []) == 1  # an unfinished multi-byte character
    assert held_back("x\ufffd\ufffd", ["\ufffdz"]) == 2
    assert held_back("", ["ab"]) == 0


@pytest.mark.parametrize(
    "params, what, code",
    [
        (SamplingParams(temperature=-1), "temperature", None),
        (SamplingParams(top_p=0), "top_p", None),
        (SamplingParams(top_p=1.01), "top_p", None),
        (SamplingParams(n=5), "n", None),
        (SamplingParams(n=0), "n", None),
        (SamplingParams(max_tokens=0), "max_tokens", None),
        (SamplingParams(max_tokens=65), "max_tokens", None),
        (SamplingParams(stop=[""]), "stop", None),
    ],
)
def test_bad_sampling_params(engine, params, what, code):
    with pytest.raises(RequestError) as err:
        engine.prepare_completion("hi", params)
    assert err.value.param == what and err.value.status == 400 and err.value.code == code


def test_context_and_prompt_checks(engine):
    with pytest.raises(RequestError) as err:
        engine.prepare_completion("x" * 255, SamplingParams())  # 256 tokens with bos: no room left
    assert err.value.code == "context_length_exceeded" and err.value.param == "prompt"
    with pytest.raises(RequestError) as err:
        engine.prepare_completion("x" * 200, SamplingParams(max_tokens=60))
    assert err.value.code == "context_length_exceeded" and err.value.param == "max_tokens"
    job = engine.prepare_completion("x" * 200, SamplingParams())  # default: what fits
    assert job.max_tokens == [256 - 201]
    assert engine.prepare_completion("x", SamplingParams()).max_tokens == [64]  # the server's limit
    with pytest.raises(RequestError):
        engine.prepare_completion(["a", "b", "c"], SamplingParams())  # max_prompts=2
    with pytest.raises(RequestError):
        engine.prepare_completion(["a", "b"], SamplingParams(n=3))  # 6 choices > max_n=4
    with pytest.raises(RequestError):
        engine.prepare_completion([1, 2, 10_000], SamplingParams())  # not a token id
    assert engine.prepare_completion([5, 6, 7], SamplingParams()).prompts == [[5, 6, 7]]
    with pytest.raises(RequestError):
        engine.prepare_chat([], SamplingParams())
    msgs = [{"role": "user", "content": "hi"}]
    assert engine.prepare_chat(msgs, SamplingParams()).prompts == [chat_prompt_ids(engine.tokenizer, msgs)]


def test_no_chat_template():
    tok = load_tokenizer(None)
    tok.chat_template = None
    model = build_model(preset="test", vocab_size=len(tok), seed=0)
    with pytest.raises(RequestError) as err:
        Engine(model, tok, "t").prepare_chat([{"role": "user", "content": "x"}], SamplingParams())
    assert err.value.code == "no_chat_template"


def test_greedy_equals_generate_texts_and_deltas_add_up(engine):
    tok = engine.tokenizer
    for prompt in ("sort 8213\n", "add 12+34\n", "é"):
        ids = tok(prompt)["input_ids"]
        ref = generate_texts(engine.model, tok, [ids], device=torch.device("cpu"), max_new_tokens=30)[0]
        result = engine.run(engine.prepare_completion(prompt, SamplingParams(temperature=0, max_tokens=30)))
        assert result.choices[0].text == ref
    # streamed pieces add up to the final text, for sampled text with and without stop strings
    for seed in range(12):
        for stop in ([], ["a"], ["\x06\x06", "q"], ["zz"]):
            deltas: dict[int, list[str]] = {0: [], 1: []}
            finishes = {}

            def on_delta(i, text, finish):
                deltas[i].append(text)
                if finish:
                    finishes[i] = finish

            params = SamplingParams(temperature=1.3, max_tokens=24, stop=stop, seed=seed, n=2)
            result = engine.run(engine.prepare_completion("ab", params), on_delta=on_delta)
            for c in result.choices:
                assert "".join(deltas[c.index]) == c.text and finishes[c.index] == c.finish_reason
                assert not any(s in c.text for s in stop)
                assert c.finish_reason in ("stop", "length") and 1 <= c.completion_tokens <= 24


def test_cancel_stops_and_modes_are_restored(engine):
    cancel = threading.Event()
    seen = []

    def on_delta(i, text, finish):
        seen.append(text)
        if len(seen) == 3:
            cancel.set()

    engine.model.train()
    result = engine.run(
        engine.prepare_completion("a", SamplingParams(temperature=1, max_tokens=60, seed=0, n=2)),
        on_delta=on_delta,
        cancel=cancel,
    )
    assert engine.model.training  # put back as it was: a training loop may own the model
    engine.model.eval()
    assert len(result.choices) == 1 and result.choices[0].finish_reason == "cancelled"
    assert result.choices[0].completion_tokens < 10
    assert not engine.lock.locked()


def test_serve_without_fastapi_says_what_to_install(monkeypatch, capsys, tmp_path):
    from leantune.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ModuleNotFoundError
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'leantune[serve]'" in err and "fastapi" in err


def test_serve_help_and_bad_paths(capsys, tmp_path):
    pytest.importorskip("fastapi")
    from leantune.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--api-key" in out and "--max-tokens-limit" in out and "127.0.0.1" in out
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-n", "0"]) == 2


def test_loopback_and_step(tmp_path):
    from leantune.commands.serve import _is_loopback, _step_of

    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.2") and not _is_loopback("example.org")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "manifest.json").write_text(json.dumps({"meta": {"step": 42}}))
    assert _step_of(tmp_path / "final") == 42
    ckpt = tmp_path / "checkpoints" / "step-000012"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "manifest.json").write_text(json.dumps({"meta": {"step": 12}}))
    assert _step_of(ckpt / "model") == 12
    assert _step_of(tmp_path) is None


def test_engine_on_each_device(device):
    """On CUDA too (scripts/gpu-check): greedy = generate_texts, and a seed fixes the samples (the
    generator lives on the model's device)."""
    tok = load_tokenizer(None)
    model = build_model(preset="test", vocab_size=len(tok), seed=1).to(device).eval()
    eng = Engine(model, tok, "t")
    assert eng.device.type == device.type
    ids = tok("sort 8213\n")["input_ids"]
    ref = generate_texts(model, tok, [ids], device=device, max_new_tokens=20)[0]
    greedy = eng.run(eng.prepare_completion("sort 8213\n", SamplingParams(temperature=0, max_tokens=20)))
    assert greedy.choices[0].text == ref

    def sample(seed):
        params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=seed)
        return eng.run(eng.prepare_completion("ab", params)).choices[0].text

    rng = torch.get_rng_state()
    assert sample(5) == sample(5) != sample(6)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is untouched


def test_prefix_tuning_keeps_its_virtual_cache():
    """peft's prefix tuning passes its virtual keys/values as the cache of each forward pass: the
    engine must not swap in its own, so its greedy text is that of full forward passes (the oracle:
    argmax of ``model(ids)`` token by token). ``model.generate`` drops the prefix under transformers 5
    (it equals the base model's), so it is no oracle here."""
    from peft import PrefixTuningConfig, get_peft_model

    tok = load_tokenizer(None)
    model = get_peft_model(
        build_model(preset="test", vocab_size=len(tok), seed=0),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ).eval()
    eng = Engine(model, tok, "prefix")
    assert not eng.reuse_cache
    ids = tok("sort 8213\n")["input_ids"]
    x, want = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(8):
            t = int(model(input_ids=x).logits[0, -1].argmax())
            want.append(t)
            x = torch.cat([x, torch.tensor([[t]])], dim=1)
    got = eng.run(eng.prepare_completion(ids, SamplingParams(temperature=0, max_tokens=8)))
    assert got.choices[0].text == tok.decode(want, skip_special_tokens=True)
