"""leantune.data.encode, case by case: exact statistics, boundaries, the eval fields, one bos with
templates that write it, the chat label mask against a whole-conversation rendering, and every
error message with the place it names (the gaps a mutation run of this module found)."""

from __future__ import annotations

import re

import pytest

from leantune.data import IGNORE_INDEX, DataError, build_byte_tokenizer, chat_prompt_ids, encode_records
from leantune.data.encode import EncodeStats, _starts_with_bos
from tests.families import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def llama3():
    """A BPE tokenizer whose chat template writes the bos token itself (as Llama 3's does)."""
    return build_tokenizer()


def ids(tok, text, special=True):
    return list(tok(text, add_special_tokens=special)["input_ids"])


def test_statistics_count_every_case_exactly(tok):
    recs = [
        {"prompt": "p\n", "response": "x" * 30},  # truncated
        {"prompt": "p\n", "response": "y" * 30},  # truncated
        {"prompt": "q" * 20, "response": "z"},  # every label masked after truncation
        {"prompt": "q" * 21, "response": "z"},  # the same
        {"prompt": "a\n", "response": "ok"},
    ]
    exact = {"prompt": "p", "response": "w" * (16 - len(ids(tok, "p")) - 1)}  # exactly 16 tokens
    recs.append(exact)
    samples, stats = encode_records(recs, [f"f:{i}" for i in range(6)], "instruction", tok, max_length=16)
    # the two prompt-only ones were truncated first, then dropped
    assert (stats.records, stats.samples, stats.truncated, stats.dropped_no_labels) == (6, 4, 4, 2)
    assert stats.dropped_overlong == 0
    assert [len(s.input_ids) for s in samples] == [16, 16, len(ids(tok, "a\n")) + 3, 16]
    assert stats.tokens == sum(len(s.input_ids) for s in samples)
    # labels: the response tokens and the eos, never position 0 (shifted inside the model)
    want_labels = (16 - len(ids(tok, "p\n"))) * 2 + 3 + (16 - len(ids(tok, "p")))
    assert stats.label_tokens == want_labels
    assert stats.summary() == (
        f"6 records -> 4 sequences, {stats.tokens} tokens ({want_labels} trained); "
        "4 truncated to max_length; 2 dropped with every label masked"
    )
    _, dropped = encode_records(
        recs[:2] + recs[4:], ["f"] * 4, "instruction", tok, max_length=16, overlong="drop"
    )
    assert (dropped.dropped_overlong, dropped.truncated, dropped.samples) == (2, 0, 2)
    assert dropped.summary().endswith("; 2 dropped as longer than max_length")


def test_defaults_truncate_and_pack(tok):
    recs = [{"text": "abcdefghij" * 4}]
    samples, stats = encode_records(recs, ["f:1"], "text", tok, max_length=16)
    assert [len(s.input_ids) for s in samples] == [16, 16] and stats.extra["packed_tokens_dropped"] == 10
    (one,), stats = encode_records(recs, ["f:1"], "text", tok, max_length=16, pack=False)
    assert one.input_ids == ids(tok, "abcdefghij" * 4)[:16] and stats.truncated == 1


def test_a_single_target_token_at_position_one_is_kept(tok):
    """Position 0 is never a target; a sample whose only label is at position 1 trains on it."""
    (s,), stats = encode_records([{"text": ""}], ["f:1"], "text", tok, max_length=16, pack=False)
    assert s.input_ids == [tok.bos_token_id, tok.eos_token_id] and stats.label_tokens == 1


def test_packing_never_emits_a_short_piece(tok):
    text = "a" * (2 * 16 - 1 - len(ids(tok, "")) - 1)  # bos + chars + eos = 31 tokens
    samples, stats = encode_records([{"text": text}], ["f:1"], "text", tok, max_length=16)
    assert len(ids(tok, text)) + 1 == 31
    assert [len(s.input_ids) for s in samples] == [16] and stats.extra["packed_tokens_dropped"] == 15


def test_eval_fields_only_on_instruction_samples(tok):
    (text,), _ = encode_records([{"text": "abc"}], ["f:1"], "text", tok, max_length=16, pack=False)
    assert text.prompt_ids is None and text.answer is None
    (inst,), _ = encode_records(
        [{"prompt": "2+2=", "response": "4"}], ["f:1"], "instruction", tok, max_length=16
    )
    assert inst.prompt_ids == ids(tok, "2+2=") and inst.answer == "4"


def test_chat_has_one_bos_and_labels_only_assistant_turns(llama3):
    msgs = [
        {"role": "user", "content": "add 2+2"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3"},
        {"role": "assistant", "content": "6"},
    ]
    (s,), _ = encode_records([{"messages": msgs}], ["f:1"], "chat", llama3, max_length=256)
    whole = llama3.apply_chat_template(msgs, tokenize=False)
    assert s.input_ids == ids(llama3, whole, special=False)  # the template's bos, no second one
    assert s.input_ids.count(llama3.bos_token_id) == 1
    trained = llama3.decode([t for t in s.labels if t != IGNORE_INDEX])
    assert trained == "4<|eot_id|>6<|eot_id|>"


def test_chat_with_a_template_without_bos_gets_the_tokenizers_one_bos(tok):
    msgs = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"},
            {"role": "user", "content": "ef"}, {"role": "assistant", "content": "gh"}]  # fmt: skip
    (s,), _ = encode_records([{"messages": msgs}], ["f:1"], "chat", tok, max_length=256)
    assert s.input_ids == ids(tok, tok.apply_chat_template(msgs, tokenize=False))  # bos added once
    assert s.input_ids.count(tok.bos_token_id) == 1


def test_one_bos_when_a_message_renders_empty(tok):
    """A template that renders system messages as nothing: the bos still comes once, first."""
    import copy

    odd = copy.deepcopy(tok)
    odd.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    msgs = [{"role": "system", "content": "be brief"}, {"role": "assistant", "content": "hi"}]
    (s,), _ = encode_records([{"messages": msgs}], ["f:1"], "chat", odd, max_length=256)
    assert s.input_ids == ids(odd, "assistant: hi\n")
    assert odd.decode([t for t in s.labels if t != IGNORE_INDEX]) == "hi\n"


def test_chat_starting_with_an_assistant_turn(llama3):
    msgs = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]
    (s,), _ = encode_records([{"messages": msgs}], ["f:1"], "chat", llama3, max_length=256)
    whole = llama3.apply_chat_template(msgs, tokenize=False)
    assert s.input_ids == ids(llama3, whole, special=False)
    trained = llama3.decode([t for t in s.labels[1:] if t != IGNORE_INDEX])  # 0 is never a target
    assert trained == "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"


def test_chat_prompt_ids_end_with_the_generation_prompt_and_have_one_bos(llama3):
    msgs = [{"role": "user", "content": "add 2+2"}]
    got = chat_prompt_ids(llama3, msgs)
    text = llama3.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert got == ids(llama3, text, special=False) and got.count(llama3.bos_token_id) == 1


def test_bos_detection_on_tokenizers_without_one():
    assert _starts_with_bos(object(), "<s>x") is False
    assert _starts_with_bos(type("T", (), {"bos_token": None})(), "x") is False
    assert _starts_with_bos(type("T", (), {"bos_token": "<s>"})(), "<s>x") is True


class _NoEos:
    eos_token_id = None


class _NoTemplate:
    """A tokenizer with no chat_template attribute at all."""

    eos_token_id = 2

    def apply_chat_template(self, *args, **kwargs):
        raise AssertionError("not to be called without a template")


@pytest.mark.parametrize(
    ("records", "fmt", "tokenizer", "message"),
    [
        ([{"text": "a"}], "text", _NoEos(),
         "the tokenizer has no eos token; leantune needs one to end responses"),
        ([{"messages": [{"role": "user", "content": "a"}]}], "chat", _NoTemplate(),
         "dir:f.jsonl:1: chat data needs a tokenizer with a chat template"),
        ([{"text": "a"}], "xml", None, "unknown data format 'xml'"),
    ],
    ids=["no-eos", "no-template", "unknown-format"],
)  # fmt: skip
def test_bad_tokenizer_or_format_is_a_clear_error(tok, records, fmt, tokenizer, message):
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        encode_records(records, ["dir:f.jsonl:1"], fmt, tokenizer or tok, max_length=16, pack=False)


def test_a_template_that_is_not_prefix_stable_names_the_record(tok):
    import copy

    odd = copy.deepcopy(tok)
    counted = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    prompt_first = "{% if add_generation_prompt %}A:{% endif %}" + counted[len("{{ messages|length }}") :]
    user_then_assistant = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    for template, msgs in ((counted, user_then_assistant), (counted, user_then_assistant[::-1]),
                           (prompt_first, user_then_assistant)):  # fmt: skip
        odd.chat_template = template
        with pytest.raises(DataError, match=r"^f\.jsonl:7: the chat template does not render conversations "
                           r"prefix by prefix$"):  # fmt: skip
            encode_records([{"messages": msgs}], ["f.jsonl:7"], "chat", odd, max_length=64)


def test_no_usable_samples_names_the_file_and_every_cause(tok):
    recs = [
        {"messages": [{"role": "user", "content": "only a question"}]},  # nothing to train on
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 30}]},
    ]
    where = ["dir:f.jsonl:1", "other.jsonl:2"]  # the first record's file is named
    with pytest.raises(DataError) as info:
        encode_records(recs, where, "chat", tok, max_length=32, overlong="drop")
    assert str(info.value) == (
        "dir:f.jsonl: no usable samples out of 2: 1 had every label masked (prompt fills max_length?); "
        "1 were longer than data.max_length=32. Raise data.max_length, use data.overlong=truncate, "
        "or check the data."
    )
    with pytest.raises(DataError, match=r"^data: no usable samples out of 0: no records\. Raise"):
        encode_records([], [], "instruction", tok, max_length=16)


@pytest.mark.parametrize(("where", "name"), [(["a.jsonl:1"], "a.jsonl:1"), ([], "data")])
def test_too_little_text_to_pack_one_sequence(tok, where, name):
    with pytest.raises(DataError) as info:
        encode_records([{"text": "ab"}], where, "text", tok, max_length=16)
    assert str(info.value) == (
        f"{name}: only 4 tokens in all, fewer than one packed sequence of data.max_length=16; "
        "add data or lower max_length"
    )


def test_stats_defaults():
    assert EncodeStats().summary() == "0 records -> 0 sequences, 0 tokens (0 trained)"


# ------------------------------------------------------------------------------- preference pairs
def _pref(records):
    from leantune.data.formats import prepare_records

    recs, fmt = prepare_records(records, [f"p.jsonl:{i + 1}" for i in range(len(records))])
    assert fmt == "preference"
    return recs, [f"p.jsonl:{i + 1}" for i in range(len(records))]


def test_a_plain_text_preference_pair_is_encoded_as_instruction_records_are(llama3):
    from leantune.data import encode_preference, encode_records

    recs, where = _pref([{"prompt": "sort 312", "chosen": "123", "rejected": "321"}])
    (pair,), _ = encode_preference(recs, where, llama3, max_length=256)
    for side, text in ((pair.chosen, "123"), (pair.rejected, "321")):
        (want,), _ = encode_records([{"prompt": "sort 312", "response": text}], where, "instruction", llama3,
                                    max_length=256)  # fmt: skip
        assert (side.input_ids, side.labels) == (want.input_ids, want.labels)
        assert llama3.decode([t for t in side.labels if t != IGNORE_INDEX]) == f"{text}{llama3.eos_token}"


def test_a_preference_pair_in_messages_is_the_prompt_then_each_completion_trained_on_the_completion(llama3):
    from leantune.data import encode_preference

    user = [{"role": "user", "content": "sort 312"}]
    recs, where = _pref([{"prompt": user, "chosen": [{"role": "assistant", "content": "123"}],
                          "rejected": [{"role": "assistant", "content": "321"}]}])  # fmt: skip
    (pair,), stats = encode_preference(recs, where, llama3, max_length=256)
    for side, text in ((pair.chosen, "123"), (pair.rejected, "321")):
        msgs = [{"role": "user", "content": "sort 312"}, {"role": "assistant", "content": text}]
        assert side.input_ids == ids(llama3, llama3.apply_chat_template(msgs, tokenize=False), special=False)
        assert llama3.decode([t for t in side.labels if t != IGNORE_INDEX]) == f"{text}<|eot_id|>"
    prompt = chat_prompt_ids(llama3, [{"role": "user", "content": "sort 312"}])
    assert pair.chosen.input_ids[: len(prompt)] == pair.rejected.input_ids[: len(prompt)] == prompt
    assert stats.samples == 1 and stats.extra == {
        "dropped_empty": 0, "dropped_identical": 0, "dropped_no_completion": 0, "dropped_overlong": 0
    }  # fmt: skip


def test_identical_and_truncated_away_pairs_are_counted_and_dropped(llama3):
    from leantune.data import encode_preference

    long_prompt = "x " * 200
    recs, where = _pref(
        [
            {"prompt": "a", "chosen": "b", "rejected": "b"},  # identical
            {"prompt": "a", "chosen": "", "rejected": "c"},  # empty
            {"prompt": long_prompt, "chosen": "b", "rejected": "c"},  # no completion token left
            {"prompt": "a", "chosen": "b", "rejected": "c"},
        ]
    )
    pairs, stats = encode_preference(recs, where, llama3, max_length=64)
    assert len(pairs) == 1 and stats.records == 4
    assert stats.extra == {
        "dropped_empty": 1, "dropped_identical": 1, "dropped_no_completion": 1, "dropped_overlong": 0
    }  # fmt: skip
    assert stats.truncated == 1  # the long prompt's chosen side, before it was found empty
    message = r"p.jsonl: no usable preference pairs out of 3 \(1 empty, 1 identical, 1 no completion\)"
    with pytest.raises(DataError, match=message):
        encode_preference(recs[:3], where[:3], llama3, max_length=64)
    pairs, stats = encode_preference(recs[2:], where[2:], llama3, max_length=64, overlong="drop")
    assert len(pairs) == 1 and stats.extra["dropped_overlong"] == 1


# --- the survivors of the second mutation run (benchmarks/results/mutation.md) ---

TOOLS_TEMPLATE = (  # the byte tokenizer's template with a tools preamble, as Llama 3.1's has
    "{% if tools is not none %}{{ '<|system|>tools:' }}{% for t in tools %}{{ t['name'] + ';' }}{% endfor %}"
    "{{ '\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def with_tools(tok):
    import copy

    from leantune.data.tokenizer import CHAT_TEMPLATE

    out = copy.deepcopy(tok)
    out.chat_template = TOOLS_TEMPLATE + CHAT_TEMPLATE
    return out


def test_a_conversations_tools_reach_the_chat_template(with_tools):
    from leantune.data.formats import prepare_records

    msgs = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "sunny"}]
    tools = [{"name": "w", "description": "weather"}, {"name": "t"}]
    recs, fmt = prepare_records([{"messages": msgs, "tools": tools}, {"messages": msgs, "tools": []},
                                 {"messages": msgs}], ["f:1", "f:2", "f:3"])  # fmt: skip
    samples, _ = encode_records(recs, ["f:1", "f:2", "f:3"], fmt, with_tools, max_length=256)
    whole = with_tools.apply_chat_template(msgs, tools=tools, tokenize=False)
    assert whole.startswith("<|system|>tools:w;t;\n")
    assert samples[0].input_ids == ids(with_tools, whole)
    assert with_tools.decode([t for t in samples[0].labels if t != IGNORE_INDEX]) == "sunny</s>"
    # an empty list is no tools: the template is not handed one (it would write an empty preamble)
    bare = ids(with_tools, with_tools.apply_chat_template(msgs, tokenize=False))
    assert samples[1].input_ids == samples[2].input_ids == bare


def test_a_template_that_refuses_a_conversation_is_named_with_its_place(tok):
    import copy

    strict = copy.deepcopy(tok)
    strict.chat_template = "{{ raise_exception('no tool role') }}"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError) as err:
        encode_records([{"messages": msgs}], ["f.jsonl:7"], "chat", strict, max_length=64)
    assert str(err.value) == (
        "f.jsonl:7: the tokenizer's chat template refuses this conversation: no tool role"
    )
    from leantune.data import encode_preference

    recs, where = _pref([{"prompt": [{"role": "user", "content": "a"}],
                          "chosen": [{"role": "assistant", "content": "b"}],
                          "rejected": [{"role": "assistant", "content": "c"}]}])  # fmt: skip
    with pytest.raises(DataError) as err:
        encode_preference(recs, where, strict, max_length=64)
    assert str(err.value) == (
        "p.jsonl:1 (chosen): the tokenizer's chat template refuses this conversation: no tool role"
    )


def test_preference_records_are_refused_for_supervised_fine_tuning_naming_the_first_record(tok):
    recs, where = _pref([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    rest = (
        ": prompt/chosen/rejected records are preference data, for a preference objective; supervised "
        "fine-tuning needs text, instruction or chat records (data.columns={messages: chosen} trains on "
        "the chosen conversations when they hold the prompt)"
    )
    for records, places, named in ((recs, where, "p.jsonl:1"), ([], [], "data")):
        with pytest.raises(DataError) as err:
            encode_records(records, places, "preference", tok, max_length=64)
        assert str(err.value) == named + rest


def test_preference_counts_every_dropped_pair_and_keeps_the_task(llama3):
    from leantune.data import encode_preference

    long_prompt = "x " * 200
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    recs, where = _pref(
        [
            {"prompt": "a", "chosen": "b", "rejected": "b"},
            {"prompt": "d", "chosen": "e", "rejected": "e"},  # two identical
            {"prompt": "a", "chosen": "", "rejected": "c"},
            {"prompt": "a", "chosen": "b", "rejected": ""},  # two empty
            {"prompt": long_prompt, "chosen": "b", "rejected": "c"},
            {"prompt": long_prompt, "chosen": "d", "rejected": "c"},  # two with no completion left
            {"prompt": "a", "chosen": "b", "rejected": "c", "task": "sort"},
            # a reply that is only a tool call is not empty
            {"prompt": [{"role": "user", "content": "call f"}],
             "chosen": [{"role": "assistant", "content": None, "tool_calls": call}],
             "rejected": [{"role": "assistant", "content": "no"}]},
        ]
    )  # fmt: skip
    pairs, stats = encode_preference(recs, where, llama3, max_length=64)
    assert stats.extra == {
        "dropped_empty": 2, "dropped_identical": 2, "dropped_no_completion": 2, "dropped_overlong": 0
    }  # fmt: skip
    assert [(p.chosen.task, p.rejected.task) for p in pairs] == [("sort", "sort"), (None, None)]
    # finish()'s per-side counters are reported per pair in ``extra`` only
    assert (stats.dropped_overlong, stats.dropped_no_labels, stats.truncated) == (0, 0, 2)
    with pytest.raises(DataError) as err:
        encode_preference(recs[:6], where[:6], llama3, max_length=64)
    assert str(err.value) == (
        "p.jsonl: no usable preference pairs out of 6 (2 empty, 2 identical, 2 no completion); "
        "raise data.max_length or check the data"
    )
    _, dropped = encode_preference(recs[4:7], where[4:7], llama3, max_length=64, overlong="drop")
    assert dropped.extra["dropped_overlong"] == 2 and dropped.dropped_overlong == 0
    with pytest.raises(DataError) as err:
        encode_preference([], [], llama3, max_length=64)
    assert str(err.value) == (
        "data: no usable preference pairs out of 0 (no records); raise data.max_length or check the data"
    )


def test_an_instruction_prompt_one_token_short_of_max_length_keeps_its_eval_fields(tok):
    # prompt of max_length - 1 tokens: one label left (the first response token), so it is trained
    # and evaluated; a prompt of max_length tokens leaves none and is dropped
    n = 16
    prompt = "p" * (n - 2)  # bos + 14 bytes = 15 tokens
    assert len(ids(tok, prompt)) == n - 1
    record = {"prompt": prompt, "response": "ab"}
    (s,), stats = encode_records([record], ["f:1"], "instruction", tok, max_length=n)
    assert s.prompt_ids == ids(tok, prompt) and s.answer == "ab" and stats.truncated == 1
    with pytest.raises(DataError, match="1 had every label masked"):
        record = {"prompt": prompt + "p", "response": "ab"}
        encode_records([record], ["f:1"], "instruction", tok, max_length=n)


def test_overlong_is_truncate_by_default_and_anything_but_truncate_or_drop_is_refused(tok, llama3):
    from leantune.data import encode_preference

    (s,), stats = encode_records([{"text": "x" * 40}], ["f:1"], "text", tok, max_length=16, pack=False)
    assert len(s.input_ids) == 16 and stats.truncated == 1
    recs, where = _pref([{"prompt": "x " * 200, "chosen": "b", "rejected": "c"},
                         {"prompt": "a", "chosen": "b", "rejected": "c"}])  # fmt: skip
    _, stats = encode_preference(recs, where, llama3, max_length=64)
    assert stats.truncated == 1 and stats.extra["dropped_no_completion"] == 1
    for call in (
        lambda: encode_records([{"text": "x"}], ["f:1"], "text", tok, max_length=16, overlong="cut"),
        lambda: encode_preference(recs, where, llama3, max_length=64, overlong="Drop"),
    ):
        with pytest.raises(ValueError, match=r"^overlong must be 'truncate' or 'drop', got '(cut|Drop)'$"):
            call()
