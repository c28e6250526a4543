"""Data: built-in tasks, file formats and their errors, masking, packing, batching, resume."""

from __future__ import annotations

import json
import random
import re

import pytest

from leantune.config import DataConfig
from leantune.data import (
    IGNORE_INDEX,
    TASK_WEIGHTS,
    BatchStream,
    DataError,
    build_byte_tokenizer,
    build_datasets,
    collate,
    encode_records,
    generate_examples,
    load_records,
    task_weights,
)
from leantune.data.formats import prepare_records


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_builtin_tasks_are_deterministic_correct_and_disjoint_from_eval():
    a = generate_examples(["add", "reverse", "sort", "count"], 200, seed=3)
    assert a == generate_examples(["add", "reverse", "sort", "count"], 200, seed=3)
    assert a != generate_examples(["add", "reverse", "sort", "count"], 200, seed=4)
    for ex in a:
        body = ex["prompt"].split(" ", 1)[1].rstrip("\n")
        if ex["task"] == "add":  # least-significant digit first, zero-padded
            x, y = body.split("+")
            assert len(x) == len(y) == 3 and len(ex["response"]) == 4
            assert int(ex["response"][::-1]) == int(x[::-1]) + int(y[::-1])
        elif ex["task"] == "reverse":
            assert ex["response"] == body[::-1]
        elif ex["task"] == "sort":
            assert ex["response"] == "".join(sorted(body))
        else:
            word, letter = ex["prompt"].rstrip("\n").split(": count ")
            assert int(ex["response"]) == word.count(letter)
    data = build_datasets(DataConfig(num_train=500, num_eval=40), build_byte_tokenizer())
    eval_prompts = {tuple(s.prompt_ids) for s in data.eval}
    assert len(eval_prompts) == 40
    assert not eval_prompts & {tuple(s.prompt_ids) for s in data.train}
    assert {s.task for s in data.eval} == {"add", "reverse", "sort", "count"}


def test_builtin_renderings_by_example():
    """The renderings the docs show, from the generators (47 + 305 = 352 written lsd first)."""
    from leantune.data import tasks

    class Draws(random.Random):
        def __init__(self, ints, choices=()):
            super().__init__(0)
            self.ints, self.picks = list(ints), list(choices)

        def randint(self, a, b):
            return self.ints.pop(0)

        def choice(self, seq):
            return self.picks.pop(0)

    assert tasks._add(Draws([2, 47, 3, 305])) == ("add 740+503\n", "2530")
    assert tasks._add(Draws([3, 999, 3, 999])) == ("add 999+999\n", "8991")
    assert tasks._add(Draws([1, 0, 1, 5])) == ("add 000+500\n", "5000")
    assert tasks._count(Draws([5], "abacaa")) == ("abaca: count a\n", "3")


def test_task_weights_set_exact_shares_in_every_prefix():
    tasks = ["add", "reverse", "sort", "count"]
    examples = generate_examples(tasks, 800, seed=0, weights=[3, 1, 2, 2])
    for k in (8, 13, 100, 800):
        counts = {t: sum(ex["task"] == t for ex in examples[:k]) for t in tasks}
        for t, w in zip(tasks, [3, 1, 2, 2]):
            assert abs(counts[t] - k * w / 8) <= 1, (k, counts)
    assert [ex["task"] for ex in examples[:8]].count("add") == 3
    balanced = generate_examples(tasks, 12, seed=0)
    assert [ex["task"] for ex in balanced] == tasks * 3  # no weights: the plain cycle
    assert {ex["task"] for ex in generate_examples(tasks, 50, seed=0, weights=[1, 0, 0, 1])} == {
        "add",
        "count",
    }


def test_the_default_training_set_follows_task_weights_and_the_eval_set_is_balanced():
    data = build_datasets(DataConfig(num_train=800, num_eval=40), build_byte_tokenizer())
    train = {t: sum(s.task == t for s in data.train) for t in TASK_WEIGHTS}
    total = sum(TASK_WEIGHTS.values())
    assert all(abs(train[t] - 800 * w / total) <= 1 for t, w in TASK_WEIGHTS.items()), train
    assert {t: sum(s.task == t for s in data.eval) for t in TASK_WEIGHTS} == dict.fromkeys(TASK_WEIGHTS, 10)
    even = build_datasets(
        DataConfig(num_train=800, num_eval=40, task_weights=[1, 1, 1, 1]), build_byte_tokenizer()
    )
    assert {t: sum(s.task == t for s in even.train) for t in TASK_WEIGHTS} == dict.fromkeys(TASK_WEIGHTS, 200)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0], "data.task_weights has 1 entries for 2 data.tasks"),
        ([1.0, -1.0], "must be finite, >= 0, with a positive sum"),
        ([0.0, 0.0], "must be finite, >= 0, with a positive sum"),
        ([float("inf"), 1.0], "must be finite"),
    ],
)
def test_bad_task_weights_are_errors(weights, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_examples(["add", "sort"], 4, seed=0, weights=weights)
    with pytest.raises(ValueError, match=re.escape(message)):
        task_weights(["add", "sort"], weights)


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="Unknown built-in task 'multiply'"):
        generate_examples(["multiply"], 3, seed=0)


def test_instruction_labels_are_masked_exactly_on_prompt_tokens(tok):
    recs = [{"prompt": "add 1+2\n", "response": "3"}]
    (s,), stats = encode_records(recs, ["x:1"], "instruction", tok, max_length=64)
    prompt_ids = tok("add 1+2\n")["input_ids"]
    response_ids = tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert s.input_ids == prompt_ids + response_ids
    assert s.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert s.prompt_ids == prompt_ids and s.answer == "3"
    assert stats.label_tokens == len(response_ids)


def test_chat_labels_cover_only_assistant_turns(tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
    (s,), _ = encode_records([{"messages": msgs}], ["x:1"], "chat", tok, max_length=256)
    assert tok.decode(s.input_ids) == tok.apply_chat_template(msgs, tokenize=False) or tok.decode(
        s.input_ids
    ).endswith(tok.apply_chat_template(msgs, tokenize=False))
    trained = tok.decode([t for t, label in zip(s.input_ids, s.labels) if label != IGNORE_INDEX])
    assert trained == "yo</s>ok</s>"


def test_text_packing_fills_full_sequences(tok):
    recs = [{"text": "abcdefghij" * 3}, {"text": "klmnop" * 5}]
    samples, stats = encode_records(recs, ["a", "b"], "text", tok, max_length=16, pack=True)
    total = sum(len(tok(r["text"])["input_ids"]) + 1 for r in recs)
    assert all(len(s.input_ids) == 16 and s.labels == s.input_ids for s in samples)
    assert len(samples) == total // 16
    assert stats.extra["packed_tokens_dropped"] == total % 16


@pytest.mark.parametrize(
    ("policy", "kept", "truncated", "dropped"), [("truncate", 2, 1, 0), ("drop", 1, 0, 1)]
)
def test_overlong_policy_is_applied_and_counted(tok, policy, kept, truncated, dropped):
    recs = [{"prompt": "p\n", "response": "x" * 40}, {"prompt": "p\n", "response": "ok"}]
    samples, stats = encode_records(recs, ["a", "b"], "instruction", tok, max_length=16, overlong=policy)
    assert len(samples) == kept and stats.truncated == truncated and stats.dropped_overlong == dropped
    assert all(len(s.input_ids) <= 16 for s in samples)
    assert str(truncated or dropped) in stats.summary()


@pytest.mark.parametrize("fmt", ["instruction", "text"])
def test_truncation_keeps_exactly_the_first_max_length_tokens(tok, fmt):
    """The tokens a truncated sample keeps are the first ``max_length`` of the untruncated one,
    labels aligned with them (counted here from the tokenizer, not from the encoder)."""
    rec = {"prompt": "p: ", "response": "abcdefghij" * 4} if fmt == "instruction" else {"text": "xyz" * 20}
    if fmt == "instruction":
        prompt = tok(rec["prompt"])["input_ids"]
        response = tok(rec["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        full, labels = prompt + response, [IGNORE_INDEX] * len(prompt) + response
    else:
        full = tok(rec["text"])["input_ids"] + [tok.eos_token_id]
        labels = full
    assert len(full) > 17
    (sample,), stats = encode_records([rec], ["r"], fmt, tok, max_length=17, overlong="truncate", pack=False)
    assert stats.truncated == 1
    assert sample.input_ids == full[:17] and sample.labels == labels[:17]


def test_every_label_masked_is_a_clear_error(tok):
    recs = [{"prompt": "x" * 40, "response": "y"}]
    with pytest.raises(DataError, match="every label masked"):
        encode_records(recs, ["f.jsonl:1"], "instruction", tok, max_length=16)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:4: malformed JSON"):
        load_records(path)


def test_missing_field_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    records, where = load_records(path)
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'response'"):
        prepare_records(records, where, "instruction")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "has no records"),
        ('{"foo": 1}\n', "cannot tell the data format"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant message"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "use system, user, assistant or tool"),
        ('{"text": 3}\n', "field 'text' must be a string"),
        ("[1, 2]\n", "expected a JSON object per line"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        records, where = load_records(path)
        prepare_records(records, where)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(tmp_path / "d.csv")


def test_json_array_and_parquet_files(tmp_path):
    recs = [{"prompt": f"q{i}\n", "response": f"a{i}"} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    assert load_records(tmp_path / "d.json")[0] == recs
    import datasets

    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "d.parquet"))
    loaded, where = load_records(tmp_path / "d.parquet")
    assert loaded == recs and where[0].endswith("record 1")


def test_file_datasets_hold_out_an_eval_split(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}\n", "response": f"a{i}"} for i in range(50)])
    data = build_datasets(DataConfig(train=str(path), num_eval=5), tok)
    assert data.format == "instruction" and len(data.eval) == 5 and len(data.train) == 45


def test_collate_pads_right_and_masks_padding(tok):
    (a, b), _ = encode_records(
        [{"prompt": "a\n", "response": "bb"}, {"prompt": "ccc\n", "response": "ddddd"}],
        ["1", "2"],
        "instruction",
        tok,
        max_length=64,
    )
    batch = collate([a, b], tok.pad_token_id)
    n = len(a.input_ids)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(b.input_ids) - n)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()


def test_batch_stream_resumes_exactly_and_shards_by_rank(tok):
    data = build_datasets(DataConfig(num_train=100, num_eval=0), tok)
    full = BatchStream(data.train, 8, tok.pad_token_id, seed=1)
    seq = [full.next_batch()["input_ids"] for _ in range(30)]  # crosses epoch boundaries
    part = BatchStream(data.train, 8, tok.pad_token_id, seed=1)
    for _ in range(17):
        part.next_batch()
    resumed = BatchStream(data.train, 8, tok.pad_token_id, seed=1)
    resumed.load_state_dict(part.state_dict())
    assert all((resumed.next_batch()["input_ids"] == x).all() for x in seq[17:])
    r0 = BatchStream(data.train, 4, tok.pad_token_id, seed=1, rank=0, world_size=2)
    r1 = BatchStream(data.train, 4, tok.pad_token_id, seed=1, rank=1, world_size=2)
    assert set(r0._epoch_order()).isdisjoint(r1._epoch_order())
    assert len(r0._epoch_order()) == len(r1._epoch_order()) == 50
    with pytest.raises(ValueError, match="cannot fill one batch"):
        BatchStream(data.train[:3], 8, tok.pad_token_id)


def test_a_template_that_writes_bos_gets_one_bos_and_generate_prompts_match_training():
    """Llama 3's template writes <|begin_of_text|> itself; the tokenizer would add a second one."""
    from leantune.data import chat_prompt_ids
    from tests.families import build_tokenizer

    llama3 = build_tokenizer()
    msgs = [{"role": "user", "content": "add 2+3"}, {"role": "assistant", "content": "5"}]
    (sample,), _ = encode_records(
        [{"messages": msgs}], ["f:1"], "chat", llama3, max_length=256, overlong="truncate"
    )
    assert sample.input_ids.count(llama3.bos_token_id) == 1 and sample.input_ids[0] == llama3.bos_token_id
    prompt = chat_prompt_ids(llama3, msgs[:1])
    assert sample.input_ids[: len(prompt)] == prompt  # generation continues where training's prompt ends
    assert all(label == IGNORE_INDEX for label in sample.labels[: len(prompt)])
    # a template without bos (the built-in one): the tokenizer adds it, once
    byte = build_byte_tokenizer()
    ids = chat_prompt_ids(byte, msgs[:1])
    assert ids[0] == byte.bos_token_id and ids.count(byte.bos_token_id) == 1
