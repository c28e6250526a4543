"""Several training sources (leantune.data.mixture): what a source means (files, directories,
saved datasets), proportions within a binomial bound, exact resume, and bad input."""

from __future__ import annotations

import json
import math

import pytest

from leantune.config import ConfigError, load_config
from leantune.data import DataError, MixtureStream, Sample, build_byte_tokenizer, build_datasets
from leantune.data.mixture import expand_source


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tagged(tag: int, n: int) -> list[Sample]:
    # the first token names the source, the second the sample
    return [Sample([tag, i, 1], [-100, i, 1]) for i in range(n)]


def drawn_sources(stream: MixtureStream, batches: int) -> list[int]:
    return [int(t) for _ in range(batches) for t in stream.next_batch()["input_ids"][:, 0]]


def test_proportions_are_within_a_binomial_bound():
    stream = MixtureStream([("a", tagged(0, 50)), ("b", tagged(1, 500))], [0.7, 0.3], 16, pad_id=9, seed=3)
    got = drawn_sources(stream, 250)
    n, share_a = len(got), got.count(0) / len(got)
    assert abs(share_a - 0.7) <= 4 * math.sqrt(0.7 * 0.3 / n)  # 4 sigma: fails ~1 in 16,000 seeds
    assert stream.realised() == {"a": got.count(0) / n, "b": got.count(1) / n}
    assert stream.describe().startswith(f"data mixture over {n} samples: a ")
    # a source smaller than its share cycles through all of its samples before repeating one
    stream = MixtureStream([("a", tagged(0, 10)), ("b", tagged(1, 1000))], [0.5, 0.5], 4, pad_id=9)
    a_ids = [int(b[1]) for _ in range(20) for b in stream.next_batch()["input_ids"] if b[0] == 0]
    assert sorted(a_ids[:10]) == list(range(10))


def test_zero_weight_sources_are_never_drawn_and_ranks_take_disjoint_samples():
    stream = MixtureStream([("a", tagged(0, 40)), ("b", tagged(1, 40))], [1, 0], 8, pad_id=9)
    assert set(drawn_sources(stream, 10)) == {0}
    ranks = [MixtureStream([("a", tagged(0, 40))], [1], 4, pad_id=9, rank=r, world_size=2) for r in (0, 1)]
    seen = [{int(x) for _ in range(5) for x in s.next_batch()["input_ids"][:, 1]} for s in ranks]
    assert seen[0].isdisjoint(seen[1]) and len(seen[0]) == len(seen[1]) == 20


def test_a_resumed_mixture_draws_exactly_the_batches_of_an_uninterrupted_one():
    def make():
        return MixtureStream([("a", tagged(0, 30)), ("b", tagged(1, 70))], [0.4, 0.6], 8, pad_id=9, seed=5)

    full = make()
    want = [full.next_batch()["input_ids"].tolist() for _ in range(40)]
    part = make()
    for _ in range(17):
        part.next_batch()
    state = part.state_dict()
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # what a checkpoint keeps
    assert [resumed.next_batch()["input_ids"].tolist() for _ in range(23)] == want[17:]
    other = MixtureStream([("a", tagged(0, 30)), ("c", tagged(1, 70))], [0.4, 0.6], 8, pad_id=9)
    with pytest.raises(DataError, match=r"sources \['a', 'b'\], this run has \['a', 'c'\]"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="sources one source"):
        other.load_state_dict({"epoch": 0, "cursor": 3, "seed": 0})


def test_a_directory_is_every_data_file_in_it_and_a_saved_dataset_is_read_as_such(tmp_path):
    import datasets

    write(tmp_path / "d" / "b.jsonl", [{"text": "b"}])
    write(tmp_path / "d" / "a.jsonl", [{"text": "a"}])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    assert expand_source(str(tmp_path / "d")) == [
        str(tmp_path / "d" / "a.jsonl"),
        str(tmp_path / "d" / "b.jsonl"),
    ]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(
        [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(30)]
    ).save_to_disk(saved)
    assert expand_source(str(saved)) == [str(saved)]
    cfg = load_config(None, [f"data.train={saved}", "data.num_eval=3"]).data
    data = build_datasets(cfg, build_byte_tokenizer())
    assert data.format == "instruction" and len(data.train) == 27 and len(data.eval) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no \.jsonl, \.json or \.parquet files in this directory"):
        expand_source(str(tmp_path / "empty"))


def test_several_sources_in_their_own_formats_are_split_and_mixed(tmp_path):
    chat = write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                         {"role": "assistant", "content": f"a{i}"}]}
                                           for i in range(40)])  # fmt: skip
    alpaca = write(
        tmp_path / "alp" / "x.jsonl", [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(60)]
    )
    overrides = [f"data.train=[{chat}, {alpaca.parent}]", "data.weights=[1, 3]", "data.num_eval=10"]
    data = build_datasets(load_config(None, overrides).data, build_byte_tokenizer())
    assert data.format == "alpaca+chat" and data.weights == [1.0, 3.0]
    assert {k: len(v) for k, v in data.sources.items()} == {str(chat): 36, str(alpaca.parent): 54}
    assert len(data.eval) == 10 and len(data.train) == 90  # held out in proportion: 4 + 6
    # without weights every sample is equally likely: one stream over all of them
    plain = build_datasets(load_config(None, overrides[:1] + overrides[2:]).data, build_byte_tokenizer())
    assert plain.weights is None and len(plain.train) == 90


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.train=[a.jsonl, b.jsonl]", "data.weights=[1]"],
            "data.weights has 1 entries for 2 data.train",
        ),
        (["data.train=[a.jsonl, b.jsonl]", "data.weights=[1, -1]"], "data.weights must be >= 0"),
        (["data.train=[a.jsonl, b.jsonl]", "data.weights=[0, 0]"], "with a positive sum"),
        (["data.train=[]"], "data.train needs at least one source"),
    ],
)
def test_bad_mixtures_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_missing_or_empty_source_is_named(tmp_path):
    good = write(tmp_path / "good.jsonl", [{"text": "x"}] * 20)
    cfg = load_config(None, [f"data.train=[{good}, {tmp_path / 'missing.jsonl'}]"]).data
    with pytest.raises(FileNotFoundError, match="missing.jsonl' does not exist"):
        build_datasets(cfg, build_byte_tokenizer())
    (tmp_path / "empty.jsonl").write_text("")
    cfg = load_config(None, [f"data.train=[{good}, {tmp_path / 'empty.jsonl'}]"]).data
    with pytest.raises(DataError, match="empty.jsonl: the file has no records"):
        build_datasets(cfg, build_byte_tokenizer())
    with pytest.raises(DataError, match="tiny: 1 samples cannot be shared by 2 rank"):
        MixtureStream([("tiny", tagged(0, 1)), ("b", tagged(1, 50))], [1, 1], 2, pad_id=9, world_size=2)
