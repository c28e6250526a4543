"""Data formats (leantune.data.formats): detection, normalisation to messages, renamed columns, the
loss mask of each format against a hand-built expectation, and bad input.

The fixtures in tests/fixtures/formats hold one file per format with its tricky cases (alpaca with
an empty ``input`` and with ``history``; sharegpt with a system turn, a function call and tools;
OpenAI messages with a developer turn, text parts, tool calls and a tool turn).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leantune.config import DATA_COLUMNS, DATA_FORMATS, ConfigError, load_config
from leantune.data import IGNORE_INDEX, DataError, build_byte_tokenizer, encode_records, read_records
from leantune.data.formats import COLUMN_FIELDS, FORMATS, prepare_records

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "formats"


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def fixture(name: str) -> str:
    return str(FIXTURES / f"{name}.jsonl")


def expected(tok, *segments: tuple[str, bool]) -> tuple[list[int], list[int]]:
    """ids and labels from (text, trained) pieces, each tokenized on its own (the byte tokenizer
    splits a concatenation exactly where its parts meet); a leading bos, never trained."""
    ids, labels = [tok.bos_token_id], [IGNORE_INDEX]
    for text, trained in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def user(text):
    return (f"<|user|>{text}\n", False)


def system(text):
    return (f"<|system|>{text}\n", False)


def reply(text):
    return [("<|assistant|>", False), (f"{text}</s>", True)]


def encode(records, where, fmt, tok, max_length=512):
    samples, _ = encode_records(records, where, fmt, tok, max_length=max_length)
    return [(s.input_ids, s.labels) for s in samples]


def test_the_config_knows_every_format_and_column():
    assert DATA_FORMATS == FORMATS and DATA_COLUMNS == COLUMN_FIELDS


def test_alpaca_input_history_and_system(tok):
    records, where, fmt = read_records(fixture("alpaca"))
    assert fmt == "alpaca" and where[0].endswith("alpaca.jsonl:1")
    assert records == [
        {"messages": [{"role": "user", "content": "Add\n2 3"}, {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet"},
                      {"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                      {"role": "user", "content": "2+1?"}, {"role": "assistant", "content": "3"},
                      {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "4"}]},
    ]  # fmt: skip
    got = encode(records, where, fmt, tok)
    assert got[0] == expected(tok, user("Add\n2 3"), *reply("5"))
    assert got[1] == expected(tok, system("Be brief."), user("Greet"), *reply("hi"))
    # every assistant turn of the history is trained on, like the last one
    assert got[2] == expected(tok, user("1+1?"), *reply("2"), user("2+1?"), *reply("3"), user("And now?"),
                              *reply("4"))  # fmt: skip


def test_sharegpt_roles_function_call_observation_and_tools(tok):
    records, where, fmt = read_records(fixture("sharegpt"))
    assert fmt == "sharegpt"
    call = '{"name": "w"}'
    assert records[1] == {
        "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "weather?"},
                     {"role": "assistant", "content": call}, {"role": "tool", "content": "sun"},
                     {"role": "assistant", "content": "sunny"}],
        "tools": [{"name": "w", "description": "weather"}],
    }  # fmt: skip
    got = encode(records, where, fmt, tok)
    assert got[0] == expected(tok, user("hi"), *reply("hello"))
    # the function call is trained (the model must learn to make it), the observation is not
    tool = ("<|tool|>sun\n", False)
    assert got[1] == expected(tok, system("Be kind."), user("weather?"), *reply(call), tool, *reply("sunny"))
    assert got[2] == expected(tok, system("S"), user("a"), *reply("b"), user("c"), *reply("d"))


def test_openai_messages_developer_parts_tool_calls_and_tool_turns(tok):
    records, where, fmt = read_records(fixture("chat"))
    assert fmt == "chat"
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert records[1] == {
        "messages": [{"role": "system", "content": "D"}, {"role": "user", "content": "tu"},
                     {"role": "assistant", "content": "", "tool_calls": calls},
                     {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"},
                     {"role": "assistant", "content": "done", "name": "bot"}],
    }  # fmt: skip
    got = encode(records, where, fmt, tok)
    assert got[0] == expected(tok, system("S"), user("q"), *reply("a"))
    tool = ("<|tool|>42\n", False)
    assert got[1] == expected(tok, system("D"), user("tu"), *reply(json.dumps(calls)), tool, *reply("done"))


def test_preference_records_are_read_but_not_trained_by_supervised_fine_tuning(tok):
    records, where, fmt = read_records(fixture("preference"))
    assert fmt == "preference"
    assert records[0] == {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
        "plain": True,  # three strings: encoded as text, like instruction records
    }
    assert "plain" not in records[1]
    assert records[1]["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    with pytest.raises(
        DataError, match=r"preference\.jsonl:1: prompt/chosen/rejected records are preference data"
    ):
        encode_records(records, where, fmt, tok, max_length=64)


def test_columns_rename_fields_before_detection(tok):
    records, where, fmt = read_records(
        fixture("custom_columns"), columns={"prompt": "question", "response": "answer"}
    )
    assert fmt == "instruction"
    assert records == [{"prompt": "Capital of France?", "response": "Paris"}]
    with pytest.raises(DataError, match="cannot tell the data format from the fields"):
        read_records(fixture("custom_columns"))


def test_columns_and_format_through_the_config_and_the_trainer(tmp_path):
    from leantune.data import build_datasets

    rows = [{"q": f"{i} + 1 =", "a": str(i + 1)} for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None, [f"data.train={path}", "data.columns={prompt: q, response: a}", "data.num_eval=4"]
    )
    data = build_datasets(cfg.data, build_byte_tokenizer())
    assert data.format == "instruction" and len(data.train) == 36 and len(data.eval) == 4
    with pytest.raises(ConfigError, match=r"data.columns maps field names a format reads"):
        load_config(None, ["data.columns={promt: q}"])
    with pytest.raises(
        ConfigError, match=r"data.format must be auto, text, instruction, chat, alpaca, sharegpt"
    ):
        load_config(None, ["data.format=alpacca"])


def test_a_forced_format_reads_records_that_detection_would_not(tok):
    # an alpaca record that also has a "text" field: detection says alpaca; forced text reads text
    recs = [{"instruction": "i", "output": "o", "text": "plain"}]
    assert prepare_records(recs, ["f:1"])[1] == "alpaca"
    assert prepare_records(recs, ["f:1"], "text") == ([{"text": "plain"}], "text")


def test_task_field_is_kept_for_per_task_evaluation():
    recs = [{"prompt": "p", "response": "r", "task": "add", "other": 1}]
    assert prepare_records(recs, ["f:1"])[0] == [{"prompt": "p", "response": "r", "task": "add"}]


QA = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"foo": 1, "bar": 2}], r"f\.jsonl:1: cannot tell the data format from the fields \['bar', 'foo'\]"),
        ([{"text": "a"}, {"instruction": "i", "output": "o"}],
         r"f\.jsonl:2: the fields \['instruction', 'output'\] are those of alpaca records, but the first "
         r"record \(.*f\.jsonl:1\) is text: one format per file"),
        ([{"prompt": "a", "response": "b"}, {"prompt": "c"}],
         r"f\.jsonl:2: missing field 'response' \(format instruction needs prompt, response; found prompt\)"),
        ([{"conversations": [{"from": "bot", "value": "x"}]}],
         r"conversations\[0\] is from 'bot'; use human, gpt"),
        ([{"conversations": [{"from": "human", "value": "x"}]}], "no assistant message"),
        ([{"conversations": [{"from": "human"}]}],
         r"conversations\[0\] must be an object with string 'from' and"),
        ([{"conversations": []}], "'conversations' must be a non-empty list"),
        ([{"instruction": "i", "output": "o", "history": [["only one"]]}], "'history' must be a list of"),
        ([{"instruction": "i", "output": 3}], "field 'output' must be a string, got int"),
        ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}],
         r"messages\[1\] has no 'content' \(only an assistant message with tool_calls may\)"),
        ([{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}],
         r"content parts of type \['image_url'\] are not text"),
        ([{"messages": [{"role": "user", "content": 5}]}], "'content' must be a string or a list of"),
        ([{"messages": [{"role": "narrator", "content": "x"}]}], "use system, user, assistant or tool"),
        ([{"messages": [{"content": "x"}]}], r"messages\[0\] must be an object with a string 'role'"),
        ([{"prompt": "p", "chosen": "c", "rejected": [{"role": "user", "content": "u"}]}],
         "'rejected' has no assistant message"),
        ([{"prompt": "p", "chosen": "c"}], None),  # instruction-like? no: prompt + chosen is no format
        ([{"messages": QA, "tools": "{x"}],
         "'tools' is a string but not JSON"),
        ([{"messages": QA, "tools": [1]}],
         "'tools' must be a list of function definitions"),
    ],
)  # fmt: skip
def test_bad_records_name_the_file_line_and_what_is_wrong(tmp_path, lines, message):
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataError, match=message or r"f\.jsonl:1: cannot tell the data format"):
        read_records(str(path))


def test_an_unknown_forced_format_and_a_template_that_refuses_a_role(tok):
    with pytest.raises(DataError, match=r"f:1: unknown data format 'csv' \(choose from auto, text"):
        prepare_records([{"text": "a"}], ["f:1"], "csv")
    strict = build_byte_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    records, where, fmt = read_records(fixture("chat"))
    with pytest.raises(
        DataError, match=r"chat\.jsonl:2: the tokenizer's chat template refuses this conversation"
    ):
        encode_records(records, where, fmt, strict, max_length=512)
