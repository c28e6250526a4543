"""The serve engine with a draft model (:class:`leantune.serve.engine.Speculative`), without HTTP:
greedy choices equal the plain engine's (the oracle: its own token-by-token loop), also when eos, a
stop string or max_tokens falls in the middle of a round that committed several tokens; cancel;
a failing draft; option validation."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from leantune.serve.engine import CANCELLED, LENGTH, STOP, Engine, SamplingParams, Speculative
from leantune.speculative import DraftError
from tests.helpers import byte_llama

PROMPTS = ["hello", "sort 8213\n", "abc"]


def _llama(vocab: int, layers: int, seed: int) -> torch.nn.Module:
    return byte_llama(vocab, layers, seed).eval()


@pytest.fixture(scope="module")
def models():
    from leantune.data import build_byte_tokenizer

    tok = build_byte_tokenizer()
    target = _llama(len(tok), 2, 2)
    with torch.no_grad():  # peaked distributions: DuoDecoding then drafts one long sequence
        target.lm_head.weight.mul_(30)
    # a copy of the target drafts perfectly (rounds of gamma + 1 tokens); a random one, hardly ever
    return tok, target, copy.deepcopy(target), _llama(len(tok), 1, 1)


def _engines(models, method: str, draft: str, gamma: int = 4):
    tok, target, same, small = models
    spec = Speculative(same if draft == "same" else small, method, gamma)
    return Engine(target, tok, "t"), Engine(target, tok, "t", speculative=spec)


def _run(engine: Engine, prompt: str, **params):
    deltas: list[str] = []
    job = engine.prepare_completion(prompt, SamplingParams(**{"temperature": 0, **params}))
    res = engine.run(job, on_delta=lambda i, text, finish: deltas.append(text))
    return res, "".join(deltas)


CASES = [("sd", "same"), ("duo", "same"), ("sd", "small"), ("duo", "small")]


@pytest.mark.parametrize("method,draft", CASES)
def test_greedy_choices_equal_the_plain_loop(models, method, draft):
    plain, spec = _engines(models, method, draft)
    for prompt in PROMPTS:
        for max_tokens in (1, 6, 29):
            want, want_stream = _run(plain, prompt, max_tokens=max_tokens)
            got, got_stream = _run(spec, prompt, max_tokens=max_tokens)
            assert got.choices == want.choices and got.usage() == want.usage()
            assert got_stream == want_stream == got.choices[0].text
            assert got.choices[0].finish_reason == LENGTH
            assert got.choices[0].completion_tokens == max_tokens
    totals = spec.info()["speculative"]
    assert totals["tokens"] == 3 * (1 + 6 + 29) and totals["target_forwards"] > 0
    if (method, draft) == ("sd", "same"):  # a perfect draft: every round commits gamma + 1 tokens
        assert totals["tokens_per_target_forward"] > 3


@pytest.mark.parametrize("method", ["sd", "duo"])
def test_eos_and_stop_strings_inside_a_round(models, method):
    plain, spec = _engines(models, method, "same", gamma=6)
    text = _run(plain, "hello", max_tokens=30)[0].choices[0].text
    for stop in (text[9:11], text[4], text[17:20]):
        want, want_stream = _run(plain, "hello", max_tokens=30, stop=[stop])
        got, got_stream = _run(spec, "hello", max_tokens=30, stop=[stop])
        assert got.choices == want.choices and got_stream == want_stream
        assert got.choices[0].finish_reason == STOP and stop not in got_stream
    # eos: make a token of the greedy continuation, one not seen before it, the end of the turn
    ids = plain.tokenizer("hello")["input_ids"]
    greedy = SamplingParams(temperature=0)
    tokens = list(plain._tokens(ids, 30, greedy, torch.Generator(), threading.Event()))
    eos = next(t for i, t in enumerate(tokens) if i >= 8 and t not in tokens[:i])
    for engine in (plain, spec):
        engine.eos_ids = frozenset({eos})
    try:
        want, got = _run(plain, "hello", max_tokens=30)[0], _run(spec, "hello", max_tokens=30)[0]
    finally:
        plain.eos_ids = spec.eos_ids = frozenset({plain.tokenizer.eos_token_id})
    assert got.choices == want.choices and want.choices[0].finish_reason == STOP
    assert got.choices[0].completion_tokens == tokens.index(eos) + 1


def test_sampling_is_seeded_and_n_choices(models):
    _, spec = _engines(models, "sd", "small")
    params = {"temperature": 0.8, "top_p": 0.9, "max_tokens": 8, "n": 2, "seed": 5}
    a, b = _run(spec, "hello", **params)[0], _run(spec, "hello", **params)[0]
    assert a.choices == b.choices and len(a.choices) == 2 and a.completion_tokens == 16
    c = _run(spec, "hello", **{**params, "seed": 6})[0]
    assert c.choices != a.choices


def test_cancel_stops_after_the_round(models):
    _, spec = _engines(models, "sd", "same")
    cancel = threading.Event()
    job = spec.prepare_completion("hello", SamplingParams(temperature=0, max_tokens=100))
    res = spec.run(job, on_delta=lambda *_: cancel.set(), cancel=cancel)
    # every round of a perfect draft commits 5 tokens; the first delta may come after round 2 (a
    # byte-level text ending in half a character waits)
    assert res.choices[0].finish_reason == CANCELLED and res.choices[0].completion_tokens in (5, 10)


@pytest.mark.parametrize("method", ["sd", "duo"])
def test_a_failing_draft_ends_the_job_and_the_engine_goes_on(models, method, monkeypatch):
    plain, spec = _engines(models, method, "small")
    draft = spec.speculative.draft
    calls = {"n": 0}
    forward = draft.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("draft device lost (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(draft, "forward", flaky)
    with pytest.raises(DraftError, match="draft device lost"):
        _run(spec, "hello", max_tokens=20)
    monkeypatch.undo()
    assert not spec.lock.locked() and not spec.model.training
    assert _run(spec, "abc", max_tokens=7)[0].choices == _run(plain, "abc", max_tokens=7)[0].choices


@pytest.mark.parametrize(
    "kwargs,match",
    [({"method": "ar"}, "method must be 'sd' or 'duo'"), ({"gamma": 0}, "gamma must be >= 1")],
)
def test_speculative_options_are_checked(models, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Speculative(models[2], **kwargs)


def test_info_says_which_decoding(models):
    plain, spec = _engines(models, "duo", "small")
    assert plain.info()["decoding"] == "ar" and "speculative" not in plain.info()
    info = spec.info()
    assert info["decoding"] == "duo" and info["speculative"]["gamma"] == 4
    assert info["speculative"]["draft_device"] == "cpu"
