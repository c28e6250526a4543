"""Streaming JSON-lines training data (leantune.data.streaming): every record once per pass, ranks
disjoint, the held-out records skipped, exact resume (buffer and packing carry included), bounded
memory, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from leantune.config import load_config
from leantune.data import DataError, build_byte_tokenizer, build_datasets
from leantune.data.streaming import StreamingStream, count_lines


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa(n):
    return [{"prompt": f"q{i:04d}=", "response": f"a{i:04d}"} for i in range(n)]


def stream(paths, tok, **kw):
    args = dict(fmt="auto", columns=None, tokenizer=tok, max_length=32, batch_size=4, pad_id=0, buffer_size=8)
    return StreamingStream([str(p) for p in paths], **{**args, **kw})


def prompts(batch, tok):
    return [
        tok.decode(row[row != 0].tolist()).split("=")[0].removeprefix("<s>") for row in batch["input_ids"]
    ]


def test_every_training_record_once_per_pass_shuffled_with_the_held_out_ones_skipped(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", qa(30))
    b = write(tmp_path / "b.jsonl", qa(50)[30:])
    s = stream([a, b], tok, skip=6)
    assert s.fmt == "instruction" and s.batches_per_epoch == 11 and count_lines([a, b]) == 50
    seen = [p for _ in range(11) for p in prompts(s.next_batch(), tok)]
    assert sorted(seen) == [f"q{i:04d}" for i in range(6, 50)]  # 44 records, every one once
    assert seen != sorted(seen)  # shuffled
    assert s.epoch == 1 or s.epoch_progress > 0.9
    # the next pass has another order
    again = [p for _ in range(11) for p in prompts(s.next_batch(), tok)]
    assert sorted(again) == sorted(seen) and again != seen
    s.close()


def test_ranks_read_disjoint_records(tmp_path, tok):
    path = write(tmp_path / "a.jsonl", qa(40))
    got = []
    for rank in (0, 1):
        s = stream([path], tok, rank=rank, world_size=2)
        got.append({p for _ in range(5) for p in prompts(s.next_batch(), tok)})
        s.close()
    assert got[0].isdisjoint(got[1]) and len(got[0] | got[1]) == 40


@pytest.mark.parametrize("kind", ["instruction", "text-packed"])
def test_a_resumed_stream_continues_exactly(tmp_path, tok, kind):
    rows = (
        qa(60)
        if kind == "instruction"
        else [{"text": f"document number {i} " * (i % 5 + 1)} for i in range(60)]
    )
    path = write(tmp_path / "d.jsonl", rows)

    def make():
        return stream([path], tok, seed=3, max_length=24, buffer_size=7)

    full = make()
    want = [full.next_batch()["input_ids"].tolist() for _ in range(30)]  # past the end of a pass
    full.close()
    part = make()
    for _ in range(9):
        part.next_batch()
    state = part.state_dict()
    part.close()
    torch.save(state, tmp_path / "state.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert [resumed.next_batch()["input_ids"].tolist() for _ in range(21)] == want[9:]
    resumed.close()


def test_memory_is_the_buffer_not_the_file(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", qa(500))
    s = stream([path], tok, buffer_size=16)
    for _ in range(40):
        s.next_batch()
        assert len(s.buffer) <= 16
        assert s._producer.queue.qsize() <= s._producer.queue.maxsize
    s.close()


def test_bad_streams_are_clear_errors(tmp_path, tok):
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"")
    with pytest.raises(DataError, match=r"d\.parquet: data.streaming reads JSON-lines files"):
        stream([parquet], tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in qa(10)) + "{oops\n")
    s = stream([bad], tok)
    with pytest.raises(DataError, match=r"bad\.jsonl record 11: malformed JSON"):
        for _ in range(10):
            s.next_batch()
    s.close()
    pref = write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(DataError, match="preference records are not trained"):
        stream([pref], tok)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="e.jsonl: the file has no records"):
        stream([empty], tok)


def test_build_datasets_streams_on_request_and_refuses_what_needs_memory(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", qa(40))
    cfg = load_config(None, [f"data.train={path}", "data.streaming=true", "data.num_eval=5"]).data
    data = build_datasets(cfg, tok)
    assert data.stream_paths == [str(path)] and data.train == [] and len(data.eval) == 5
    assert data.format == "instruction"
    small = load_config(None, [f"data.train={path}"]).data  # auto: a small file is loaded
    assert build_datasets(small, tok).stream_paths is None
    other = write(tmp_path / "o.jsonl", qa(10))
    mixed = load_config(None, [f"data.train=[{path}, {other}]", "data.weights=[1, 1]", "data.streaming=true"])
    with pytest.raises(DataError, match="data.weights mixes sources held in memory"):
        build_datasets(mixed.data, tok)
    packed = load_config(None, [f"data.train={path}", "data.streaming=true", "data.pack=true"])
    with pytest.raises(DataError, match="data.pack=true packs instruction and chat data held in memory"):
        build_datasets(packed.data, tok)
