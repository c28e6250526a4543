"""The built-in ``recall`` task (multi-query associative recall) and its evaluation: the generator's
determinism, answers, key positions and lengths; the opt-in family leaving the default mix alone;
the recall evaluation against an oracle model and against kvcache's own greedy decoding; the
benchmark's report rendered from a small fake result."""

from __future__ import annotations

import random
import re
import string

import pytest
import torch

from leantune.data import build_datasets
from leantune.data.tasks import (
    OPT_IN_TASKS,
    RECALL_LENGTH,
    RECALL_PAIRS,
    RECALL_QUERIES,
    TASK_WEIGHTS,
    TASKS,
    generate_examples,
    make_example,
    make_recall,
    task_weights,
)
from leantune.data.tokenizer import build_byte_tokenizer
from leantune.kvcache import KVPolicy
from leantune.longctx.recall import RecallResult, evaluate_recall, greedy_with_cache_bytes, score_recall


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def byte_model():
    from leantune.models import build_model

    return build_model(preset="test", vocab_size=263, attn_implementation="sdpa").eval()


# ------------------------------------------------------------------------------------- generator


def _parse(prompt: str) -> tuple[dict[str, str], str, list[int]]:
    """The plain reading of a recall prompt: pairs, queried keys, key offsets (an independent oracle)."""
    body, tail = prompt.rsplit("\n", 1)
    assert tail.endswith("=")
    pairs, offsets = {}, []
    for i, ch in enumerate(body):
        if ch in string.ascii_uppercase:
            assert body[i + 1] in string.digits
            assert ch not in pairs, "keys are distinct"
            pairs[ch] = body[i + 1]
            offsets.append(i)
    return pairs, tail[:-1], offsets


@pytest.mark.parametrize(("length", "pairs", "queries"), [(RECALL_LENGTH, RECALL_PAIRS, RECALL_QUERIES),
                                                         (11, 3, 3), (64, 1, 1), (512, 8, 5)])  # fmt: skip
def test_recall_prompts_answers_positions_and_lengths(length, pairs, queries):
    rng = random.Random(7)
    for _ in range(200):
        item = make_recall(rng, length, pairs, queries)
        assert len(item.prompt) == length
        found, asked, offsets = _parse(item.prompt)
        assert len(found) == pairs and len(asked) == queries == len(set(asked))
        assert item.response == "".join(found[k] for k in asked)
        assert list(item.positions) == offsets and list(item.keys) == [item.prompt[p] for p in offsets]
        assert all(item.prompt[p + 1] == v for p, v in zip(item.positions, item.values))
        assert [item.keys[i] for i in item.queries] == list(asked)
        filler = [c for i, c in enumerate(item.prompt[: length - queries - 2])
                  if i not in offsets and i - 1 not in offsets]  # fmt: skip
        assert set(filler) <= set(string.ascii_lowercase)


def test_recall_is_deterministic_and_spreads_the_pairs():
    a = [make_recall(random.Random(3), 256) for _ in range(2)]
    assert a[0] == a[1]
    assert make_recall(random.Random(4), 256) != a[0]
    # placement is uniform: over many prompts every tenth of the body holds pairs
    rng = random.Random(0)
    body = 256 - RECALL_QUERIES - 2
    deciles = {int(10 * p / body) for _ in range(300) for p in make_recall(rng, 256).positions}
    assert deciles == set(range(10))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"length": 9, "pairs": 3, "queries": 3}, "cannot hold 3 pairs and 3 queries (at least 11)"),
    ({"pairs": 2, "queries": 3}, "queries (3) must not exceed pairs (2)"),
    ({"pairs": 0}, "pairs must be an int >= 1"),
    ({"queries": 0}, "queries must be an int >= 1"),
    ({"pairs": 27, "queries": 1}, "pairs must be at most 26"),
    ({"length": 64.0}, "length must be an int"),
])  # fmt: skip
def test_recall_bad_counts_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_recall(random.Random(0), **kwargs)


def test_recall_is_opt_in_and_leaves_the_default_families_alone():
    from leantune.config import BUILTIN_TASKS

    assert (*TASKS, *OPT_IN_TASKS) == BUILTIN_TASKS
    assert "recall" in OPT_IN_TASKS and "recall" not in TASKS and "recall" not in TASK_WEIGHTS
    assert task_weights(["add", "recall"]) == [3.0, 1.0]
    ex = make_example("recall", random.Random(1))
    item = make_recall(random.Random(1))
    assert ex == {"prompt": item.prompt, "response": item.response, "task": "recall"}
    # the default families draw exactly what they drew before recall existed (same rng stream)
    mixed = generate_examples(["add", "recall", "sort"], 30, seed=5)
    assert [e["task"] for e in mixed[:3]] == ["add", "recall", "sort"]
    with pytest.raises(ValueError, match="choose from add, reverse, sort, count, recall"):
        make_example("recal", random.Random(0))


def test_copy_task_answers_with_its_prompt_text_and_is_opt_in():
    assert "copy" in OPT_IN_TASKS and "copy" not in TASKS and "copy" not in TASK_WEIGHTS
    assert task_weights(["recall", "copy"]) == [1.0, 1.0]
    lengths = set()
    for seed in range(200):
        ex = make_example("copy", random.Random(seed))
        assert ex["task"] == "copy"
        assert ex["prompt"] == f"copy {ex['response']}\n"
        assert set(ex["response"]) <= set(string.ascii_letters + string.digits)
        lengths.add(len(ex["response"]))
        assert make_example("copy", random.Random(seed)) == ex  # seeded
    assert min(lengths) == 8 and max(lengths) == 30


def test_builtin_recall_datasets_train_on_the_answers_only(tok):
    from leantune.config import DataConfig

    cfg = DataConfig(tasks=["recall"], num_train=40, num_eval=8, max_length=RECALL_LENGTH + 8)
    data = build_datasets(cfg, tok)
    assert len(data.train) == 40 and len(data.eval) == 8
    for s in data.train:
        labelled = [t for t, y in zip(s.input_ids, s.labels) if y != -100]
        assert len(s.input_ids) == RECALL_LENGTH + 1 + RECALL_QUERIES + 1  # bos, prompt, answers, eos
        assert len(labelled) == RECALL_QUERIES + 1
        assert tok.decode(labelled[:-1]) in {"".join(p) for p in _digit_strings(RECALL_QUERIES)}


def _digit_strings(n: int):
    import itertools

    return itertools.product(string.digits, repeat=n)


# ------------------------------------------------------------------------------------- evaluation


def test_score_recall_is_per_query():
    assert score_recall("12", "12") == [True, True]
    assert score_recall("13", "12") == [True, False]
    assert score_recall("2", "12") == [False, False]
    assert score_recall("", "1") == [False]


class _Oracle(torch.nn.Module):
    """Answers a recall prompt by reading it (the plain-loop oracle), ``wrong`` answers excepted."""

    def __init__(self, tok, wrong: int = 0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.wrong, self.todo = tok, wrong, []

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        if cache is None:
            found, asked, _ = _parse(self.tok.decode(input_ids[0].tolist(), skip_special_tokens=True))
            answer = "".join(found[k] for k in asked)
            if self.wrong:
                answer = answer[:-1] + str((int(answer[-1]) + 1) % 10)
            self.todo = self.tok(answer, add_special_tokens=False)["input_ids"]
        logits = torch.zeros(1, 1, len(self.tok))
        logits[0, 0, self.todo.pop(0) if self.todo else self.tok.eos_token_id] = 1.0
        return type("Out", (), {"logits": logits, "cache": type("Cache", (), {"layers": []})()})()


def test_evaluate_recall_against_an_oracle(tok):
    res = evaluate_recall(_Oracle(tok), tok, [24, 48], samples=6, pairs=3, queries=2)
    assert res.correct == [12, 12] and res.exact == [6, 6] and res.accuracy() == [1.0, 1.0]
    assert res.tokens == [25.0, 49.0]  # bos + one token per character
    bad = evaluate_recall(_Oracle(tok, wrong=1), tok, [24], samples=5, pairs=3, queries=2)
    assert bad.correct == [5] and bad.exact == [0] and bad.exact_accuracy() == [0.0]
    again = RecallResult.from_dict(res.to_dict())
    assert again.accuracy() == res.accuracy() and "recall (full)" in res.format()


def test_evaluate_recall_decodes_like_kvcache_and_counts_the_kept_bytes(tok, byte_model):
    from leantune.kvcache import LongCacheConfig, greedy_continue

    cfg = byte_model.config
    per_token = (
        cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    )
    ids = list(tok(make_recall(random.Random(2), 64).prompt)["input_ids"])
    windows = LongCacheConfig(global_size=4, local_size=32, span=4, topk=2, clip=6, chunk=16)
    for kv, kept in [(None, 65), (KVPolicy("nacl", budget=0.2, sink=2, recent=6, proxies=4), 13),
                     (KVPolicy("streaming", budget=16, sink=2), 16),
                     (KVPolicy("longcache", train_length=64, longcache=windows), 65)]:  # fmt: skip
        new, nbytes = greedy_with_cache_bytes(byte_model, ids, 3, None, kv)
        assert nbytes == kept * per_token, kv
        if kv is not None:
            assert new == greedy_continue(byte_model, ids, 3, None, kv)
    res = evaluate_recall(
        byte_model, tok, [64], samples=3, kv=KVPolicy("random", budget=0.5, sink=2, recent=4)
    )
    assert res.policy == "random 0.5" and res.kv_bytes == [32 * per_token]


def test_late_queries_with_the_full_cache_answer_as_queries_in_the_prompt(tok, byte_model):
    """Fed one at a time through a full cache, the queried keys give the same answers as the same
    keys prefilled with the prompt; under a policy the budget and the bytes are the prefilled
    part's (bos, filler and pairs, newline)."""
    from leantune.kvcache import KVPolicy, greedy_continue

    ids = list(tok(make_recall(random.Random(4), 64).prompt)["input_ids"])
    assert greedy_continue(byte_model, ids[:-3], 4, None, KVPolicy(), forced=ids[-3:]) == greedy_continue(
        byte_model, ids, 4, None, KVPolicy()
    )
    early = evaluate_recall(byte_model, tok, [64], samples=4, seed=3)
    late = evaluate_recall(byte_model, tok, [64], samples=4, seed=3, late_queries=True)
    assert [r["output"] for r in late.records] == [r["output"] for r in early.records]
    assert late.late_queries and not early.late_queries and late.tokens == [62.0]
    assert "queries after eviction" in late.format()
    nacl = evaluate_recall(byte_model, tok, [64], samples=2, late_queries=True,
                           kv=KVPolicy("nacl", budget=0.5, sink=1, recent=4, proxies=4))  # fmt: skip
    assert nacl.kv_bytes == [late.kv_bytes[0] * 31 / 62]
    assert RecallResult.from_dict(late.to_dict()).late_queries


def test_evaluate_recall_errors(tok, byte_model):
    with pytest.raises(ValueError, match="lengths must not be empty"):
        evaluate_recall(byte_model, tok, [])
    with pytest.raises(ValueError, match="samples must be a positive int"):
        evaluate_recall(byte_model, tok, [64], samples=0)
    with pytest.raises(ValueError, match="cannot hold"):
        evaluate_recall(byte_model, tok, [8])
    with pytest.raises(ValueError, match="below --kv-sink \\+ --kv-recent"):
        evaluate_recall(byte_model, tok, [64], samples=1, kv=KVPolicy("nacl", budget=0.1))


# ------------------------------------------------------------------------------------- benchmark


def test_benchmark_report_renders_from_a_fake_result():
    import kv_recall as bench

    report = bench.fake_report()
    md = bench.render(report)
    assert "| nacl | 80% |" in md and "| longcache | 8x |" in md
    assert "Goals" in md and "not reproduced" in md.lower()
    assert bench.goals(report)["nacl_80_keeps_90pct"] is False
