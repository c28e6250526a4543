"""Passkey prompts (exact length, needle depth), the exact-match scorer, the evaluation grid and
loss by position, on the built-in byte tokenizer and tiny random LLaMAs."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from leantune.data.tokenizer import build_byte_tokenizer
from leantune.longctx import (
    PasskeyGrid,
    evaluate_passkey,
    make_passkey_sample,
    perplexity_by_position,
    plot_passkey_heatmap,
    score_answer,
)
from leantune.longctx.passkey import FILLER_SENTENCES, NEEDLE, QUESTION
from tests.helpers import tiny_llama

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def byte_model():
    from leantune.models import build_model

    return build_model(preset="test", vocab_size=263)


def _longest_sentence(tok) -> int:
    return max(len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in FILLER_SENTENCES)


# --------------------------------------------------------------------------------------------------
# samples


@pytest.mark.parametrize("length", [260, 333, 600, 1500])
@pytest.mark.parametrize("depth", DEPTHS)
def test_sample_length_and_depth(tok, length, depth):
    s = make_passkey_sample(tok, length, depth, random.Random(7))
    assert len(s.prompt_ids) == length
    assert s.answer.isdigit() and len(s.answer) == 5
    # Depth honoured within one filler sentence, measured in filler tokens before the needle.
    before = s.needle_token_index - s.filler_start
    assert abs(before - depth * s.filler_len) <= _longest_sentence(tok)
    assert s.actual_depth == pytest.approx(before / s.filler_len)
    # The needle really is at needle_token_index, and the prompt ends with the question.
    needle = tok.decode(s.prompt_ids[s.needle_token_index : s.needle_token_index + s.needle_len])
    assert needle == f" The pass key is {s.answer}. Remember it. {s.answer} is the pass key."
    text = tok.decode(s.prompt_ids)
    assert text.endswith("What is the pass key? The pass key is")
    assert text.count(s.answer) == 2


def test_sample_extremes_and_options(tok):
    first = make_passkey_sample(tok, 400, 0.0, 1, header=None)
    assert first.filler_start == 0 and first.needle_token_index == 0
    last = make_passkey_sample(tok, 400, 1.0, 1, header=None)
    assert last.needle_token_index == last.filler_len  # right before the question
    # Same seed, same key; bos counted in the length.
    bos = make_passkey_sample(tok, 400, 0.5, 1, add_bos=True)
    assert bos.answer == first.answer
    assert bos.prompt_ids[0] == tok.bos_token_id and len(bos.prompt_ids) == 400
    assert make_passkey_sample(tok, 400, 0.5, 1, digits=8).answer.__len__() == 8


def test_sample_works_with_a_bpe_tokenizer():
    # A word-level BPE with merges behaves differently from bytes: lengths must still be exact.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w for s in FILLER_SENTENCES for w in s.replace(".", " .").split()}
    words |= {w for text in (NEEDLE, QUESTION) for w in text.replace(".", " .").replace("?", " ?").split()}
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(words | set("0123456789")))}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    wl = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    for depth in DEPTHS:
        s = make_passkey_sample(wl, 301, depth, 3)
        assert len(s.prompt_ids) == 301
        assert abs(s.actual_depth - depth) * s.filler_len <= 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"length": 50, "depth": 0.5}, r"length must be at least \d+ tokens"),
        ({"length": 400.0, "depth": 0.5}, r"length must be an int"),
        ({"length": 400, "depth": 1.5}, r"depth must be a number in \[0, 1\]"),
        ({"length": 400, "depth": -0.1}, r"depth must be a number in \[0, 1\]"),
        ({"length": 400, "depth": 0.5, "digits": 0}, r"digits must be a positive int"),
        ({"length": 400, "depth": 0.5, "rng": "seed"}, r"rng must be a random.Random or an int"),
    ],
)
def test_sample_errors(tok, kwargs, match):
    kwargs = {"rng": random.Random(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        make_passkey_sample(tok, **kwargs)


# --------------------------------------------------------------------------------------------------
# scorer


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (" 12345.", True),
        ("12345", True),
        (" 12345 is the pass key. 99999", True),
        ("the key: 12345", True),
        (" 1234", False),
        (" 123456", False),
        (" 012345", False),
        (" 12 345", False),
        (" 54321 12345", False),
        ("", False),
        (" no digits here", False),
    ],
)
def test_score_answer(text, ok):
    assert score_answer(text, "12345") is ok


@pytest.mark.parametrize("answer", ["", "12a45", 12345])
def test_score_answer_rejects_bad_answer(answer):
    with pytest.raises(ValueError, match=r"answer must be a string of digits"):
        score_answer("12345", answer)


# --------------------------------------------------------------------------------------------------
# evaluation grid and heatmap


def test_evaluate_passkey_grid(tok, byte_model, tmp_path):
    byte_model.train()
    lengths, depths = [270, 330], [0.0, 0.5, 1.0]
    grid = evaluate_passkey(byte_model, tok, lengths, depths, samples_per_cell=2, seed=0, max_new_tokens=4)
    assert byte_model.training  # mode restored
    assert grid.lengths == lengths and grid.depths == depths
    assert len(grid.correct) == 2 and all(len(r) == 3 for r in grid.correct)
    assert len(grid.records) == 2 * 3 * 2
    assert all(0.0 <= a <= 1.0 for row in grid.accuracy for a in row)
    assert 0.0 <= grid.mean_accuracy <= 1.0
    table = grid.format()
    assert "270" in table and "0.5" in table and "passkey accuracy" in table
    again = PasskeyGrid.from_dict(json.loads(grid.to_json()))
    assert again.correct == grid.correct and again.accuracy == grid.accuracy
    # Same seed, same keys.
    twin = evaluate_passkey(byte_model, tok, lengths, depths, samples_per_cell=2, seed=0, max_new_tokens=4)
    assert [r["answer"] for r in twin.records] == [r["answer"] for r in grid.records]

    out = plot_passkey_heatmap(grid, tmp_path / "heat" / "passkey.png")
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_passkey_counts_correct_answers(tok):
    class Oracle(torch.nn.Module):
        """Answers every prompt with its own pass key: checks the decoding and scoring path."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.todo: list[int] = []

        def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
            if past_key_values is None:  # a new prompt: find its key
                text = tok.decode(input_ids[0].tolist())
                key = text.split("The pass key is ")[1][:5]
                self.todo = tok(key + ".", add_special_tokens=False)["input_ids"]
            logits = torch.zeros(1, 1, 263)
            logits[0, 0, self.todo.pop(0) if self.todo else tok.eos_token_id] = 1.0
            return type("Out", (), {"logits": logits, "past_key_values": "cache"})()

    grid = evaluate_passkey(Oracle(), tok, [300], [0.0, 1.0], samples_per_cell=3, seed=1)
    assert grid.correct == [[3, 3]] and grid.mean_accuracy == 1.0


def test_evaluate_passkey_errors(tok, byte_model):
    with pytest.raises(ValueError, match=r"depths must be in \[0, 1\]"):
        evaluate_passkey(byte_model, tok, [300], [2.0])
    with pytest.raises(ValueError, match=r"samples_per_cell must be a positive int"):
        evaluate_passkey(byte_model, tok, [300], [0.5], samples_per_cell=0)


# --------------------------------------------------------------------------------------------------
# loss by position


@pytest.mark.parametrize(("batch", "length", "bucket"), [(1, 40, 16), (3, 33, 8), (2, 17, 1), (1, 10, 64)])
def test_perplexity_by_position_matches_manual(batch, length, bucket):
    model = tiny_llama()
    ids = torch.randint(0, 48, (batch, length), generator=torch.Generator().manual_seed(0))
    buckets = perplexity_by_position(model, ids, bucket, chunk_size=7)
    # Buckets tile positions 1 .. L-1 (position 0 has nothing to predict it).
    assert buckets[0].start == 1 and buckets[-1].end == length
    assert all(a.end == b.start for a, b in zip(buckets, buckets[1:]))
    assert all(b.start % bucket == 0 for b in buckets[1:])
    # Oracle: one full cross-entropy, no reduction, then averaged by hand.
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 48), ids[:, 1:].reshape(-1), reduction="none")
    nll = nll.view(batch, length - 1)
    for b in buckets:
        expected = nll[:, b.start - 1 : b.end - 1].mean().item()
        assert b.mean_nll == pytest.approx(expected, rel=1e-5)
        assert b.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    overall = sum(b.mean_nll * (b.end - b.start) for b in buckets) / (length - 1)
    assert overall == pytest.approx(nll.mean().item(), rel=1e-5)


def test_perplexity_by_position_1d_and_errors():
    model = tiny_llama()
    ids = torch.arange(20) % 48
    assert perplexity_by_position(model, ids, 5) == perplexity_by_position(model, ids[None], 5)
    with pytest.raises(ValueError, match=r"bucket_size must be a positive int"):
        perplexity_by_position(model, ids, 0)
    with pytest.raises(ValueError, match=r"at least 2 tokens"):
        perplexity_by_position(model, ids[:1], 4)
    with pytest.raises(ValueError, match=r"input_ids must be a 1-D or 2-D"):
        perplexity_by_position(model, ids.view(1, 1, 20), 4)
