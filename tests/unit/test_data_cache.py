"""The tokenised cache (data.cache_dir): a second build reads exactly the samples the first one
made; any change to the data, the settings or the tokenizer makes another entry; a broken entry
is rebuilt; nothing executable is stored."""

from __future__ import annotations

import json
import os

from leantune.config import load_config
from leantune.data import build_byte_tokenizer, build_datasets
from leantune.data.cache import cache_key


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def samples(data):
    return [(s.input_ids, s.labels, s.position_ids, s.prompt_ids, s.answer, s.task) for s in data]


def test_a_second_build_reads_the_same_samples_from_the_cache(tmp_path):
    path = write(
        tmp_path / "d.jsonl",
        [{"prompt": f"{i}+1=", "response": str(i + 1), "task": "inc"} for i in range(50)],
    )
    other = write(tmp_path / "o.jsonl", [{"text": f"doc {i} " * 9} for i in range(40)])
    tok = build_byte_tokenizer()
    for extra in ([], ["data.pack=true"], [f"data.train=[{path}, {other}]", "data.weights=[1, 2]"]):
        cfg = load_config(None, [f"data.train={path}", f"data.cache_dir={tmp_path / 'cache'}", *extra]).data
        first = build_datasets(cfg, tok)
        again = build_datasets(cfg, tok)
        assert first.cache_note.startswith("tokenised and cached") and again.cache_note.startswith(
            "read from"
        )
        assert samples(again.train) == samples(first.train) and samples(again.eval) == samples(first.eval)
        assert again.format == first.format and again.weights == first.weights
        assert again.train_stats == first.train_stats and again.pack_stats == first.pack_stats
        assert {k: samples(v) for k, v in (again.sources or {}).items()} == {
            k: samples(v) for k, v in (first.sources or {}).items()
        }
    assert not any(p.suffix in (".pt", ".pkl") for p in (tmp_path / "cache").iterdir())


def test_the_key_changes_with_the_data_the_settings_and_the_tokenizer(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "a b c"}] * 30)
    tok = build_byte_tokenizer()
    cfg = load_config(None, [f"data.train={path}", f"data.cache_dir={tmp_path}"]).data
    key = cache_key(cfg, tok)
    assert cache_key(cfg, build_byte_tokenizer()) == key
    assert cache_key(load_config(None, [f"data.train={path}", "data.max_length=32"]).data, tok) != key
    builtin = cache_key(load_config(None, []).data, tok)
    assert cache_key(load_config(None, ["data.task_weights=[1, 1, 1, 1]"]).data, tok) != builtin
    other = build_byte_tokenizer()
    other.chat_template = "{{ messages }}"
    assert cache_key(cfg, other) != key
    write(path, [{"text": "a b c d"}] * 30)
    os.utime(path, ns=(1, 1))
    assert cache_key(cfg, tok) != key


def test_a_broken_entry_is_rebuilt(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "a b c " * 10}] * 30)
    tok = build_byte_tokenizer()
    cfg = load_config(None, [f"data.train={path}", f"data.cache_dir={tmp_path / 'c'}"]).data
    first = build_datasets(cfg, tok)
    key = cache_key(cfg, tok)
    (tmp_path / "c" / f"{key}.safetensors").write_bytes(b"garbage")
    again = build_datasets(cfg, tok)
    assert again.cache_note.startswith("tokenised and cached") and samples(again.train) == samples(
        first.train
    )
