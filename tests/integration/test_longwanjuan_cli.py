"""`leantune data score | classify | mix` end to end on a tiny saved model, and the mixture YAML
read back by the training config."""

from __future__ import annotations

import json

import pytest

from leantune.cli import main
from leantune.config import load_config
from leantune.data.quality_files import read_scores


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from leantune.data import build_byte_tokenizer

    tok = build_byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("scorer")
    LlamaForCausalLM(cfg).save_pretrained(root / "with_tok")
    tok.save_pretrained(root / "with_tok")
    LlamaForCausalLM(cfg).save_pretrained(root / "no_tok")
    return root


def test_score_classify_mix(tmp_path, model_dir, capsys):
    docs = tmp_path / "docs.jsonl"
    texts = ["It was late. However, she kept the key, because it opened the door. " * 3, "x" * 50, ""]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = ["data", "score", str(docs), "--model", str(model_dir / "with_tok"), "--windows", "96,48,16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 scored, 1 shorter than one window (coherence NaN), 1 skipped (1 empty text)" in out
    assert main(args) == 0  # resumed: nothing left to score
    assert (
        "0 scored, 0 shorter than one window (coherence NaN), 3 kept from an earlier run"
        in capsys.readouterr().out
    )

    assert main(["data", "classify", str(docs), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "| unscored | 1 |" in out  # the short document
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["documents"] == 2 and "hist_ppl_ratio.png" in report["plots"]
    assert (tmp_path / "report" / "hist_ppl_ratio.png").stat().st_size > 1000

    rules = tmp_path / "rules.yaml"
    rules.write_text("chaotic: {}\nholistic: {pronoun_rate: {min: 0.01}}\n")  # no coherence rule
    assert main(["data", "mix", str(docs), "--rules", str(rules), "--out", str(tmp_path / "mix")]) == 0
    capsys.readouterr()
    cfg = load_config(tmp_path / "mix" / "mixture.yaml")
    assert [p.rsplit("/", 1)[1] for p in cfg.data.train] == ["holistic.jsonl", "aggregated.jsonl"]
    assert sum(cfg.data.weights) == pytest.approx(1.0)
    assert json.loads((tmp_path / "mix" / "holistic.jsonl").read_text())["text"] == texts[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "{root}/no_tok"], "no usable tokenizer"),
        (["--model", "{root}/missing"], "does not exist"),
        (["--model", "{root}/with_tok", "--windows", "10,20,5"], "LONG > SHORT > EVAL"),
    ],
)
def test_score_errors(tmp_path, model_dir, capsys, extra, message):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "hello"}\n')
    extra = [x.format(root=model_dir) for x in extra]
    assert main(["data", "score", str(docs), *extra]) == 2
    assert message in capsys.readouterr().err


def test_score_refuses_a_missing_file_before_loading_the_model(tmp_path, capsys):
    assert main(["data", "score", str(tmp_path / "nope.jsonl"), "--model", str(tmp_path)]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err


def _score(docs, model_dir, *extra) -> int:
    return main(["data", "score", str(docs), "--model", str(model_dir / "with_tok"), "--windows", "96,48,16",
                 *extra])  # fmt: skip


STORY = "It was late. However, she kept the key, because it opened the door. " * 3


def test_parquet_in_and_out(tmp_path, model_dir, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "body": [STORY, "x" * 50, None, STORY.upper()]}), docs)
    assert _score(docs, model_dir) == 2  # checked before the model is loaded
    assert "no column 'text' (columns: id, body); use --field" in capsys.readouterr().err
    assert _score(docs, model_dir, "--field", "body") == 0
    assert "2 scored, 1 shorter than one window (coherence NaN), 1 skipped (1 'body' is null)" in (
        capsys.readouterr().out
    )
    assert [r["line"] for r in read_scores(tmp_path / "docs.scores.jsonl")[1]] == [1, 2, 3, 4]  # rows from 1

    rules = tmp_path / "rules.yaml"
    rules.write_text("chaotic: {}\nholistic: {pronoun_rate: {min: 0.01}}\n")
    # the scores file names the Parquet data file as well
    assert main(["data", "classify", str(tmp_path / "docs.scores.jsonl"), "--rules", str(rules),
                 "--out", str(tmp_path / "report")]) == 0  # fmt: skip
    assert STORY[:40] in (tmp_path / "report" / "report.md").read_text()  # an example read from Parquet
    for fmt in ("parquet", "jsonl"):
        out = tmp_path / f"mix_{fmt}"
        args = ["data", "mix", str(docs), "--rules", str(rules), "--out", str(out), "--format", fmt]
        assert main(args) == 0
        capsys.readouterr()
        if fmt == "parquet":
            got = pq.read_table(out / "holistic.parquet").to_pylist()
        else:
            got = [json.loads(x) for x in (out / "holistic.jsonl").read_text().splitlines()]
        assert got == [{"id": 1, "body": STORY}, {"id": 4, "body": STORY.upper()}]  # every column
        assert load_config(out / "mixture.yaml").data.train[0].endswith(f"holistic.{fmt}")


def test_mix_of_json_lines_into_parquet(tmp_path, model_dir, capsys):
    import pyarrow.parquet as pq

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": STORY, "n": 1}) + "\n" + json.dumps({"text": STORY[::-1]}) + "\n")
    assert _score(docs, model_dir) == 0
    rules = tmp_path / "rules.yaml"
    rules.write_text("chaotic: {}\nholistic: {ppl_ratio: {min: -100}}\n")  # both holistic
    assert main(["data", "mix", str(docs), "--rules", str(rules), "--out", str(tmp_path / "mix"),
                 "--format", "parquet"]) == 0  # fmt: skip
    rows = pq.read_table(tmp_path / "mix" / "holistic.parquet").to_pylist()
    assert rows == [{"text": STORY, "n": 1}, {"text": STORY[::-1], "n": None}]  # columns merged


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b + b'{"text": "one more"}\n', r"its size is \d+ bytes, it was \d+"),
        (lambda b: b.replace(b"late", b"LATE", 1), "its content hash differs"),  # same size
    ],
)
def test_mix_refuses_a_data_file_changed_since_scoring(tmp_path, model_dir, capsys, change, message):
    import re

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": STORY}) + "\n")
    assert _score(docs, model_dir) == 0
    docs.write_bytes(change(docs.read_bytes()))
    capsys.readouterr()
    assert main(["data", "mix", str(docs), "--out", str(tmp_path / "mix")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "changed since" in err and "score it again" in err
    assert not (tmp_path / "mix").exists()
    assert main(["data", "classify", str(docs), "--out", str(tmp_path / "report")]) == 0  # only a warning
    assert "warning:" in capsys.readouterr().err
    assert _score(docs, model_dir) == 2  # nor is a changed file resumed
    assert "the data file changed since" in capsys.readouterr().err
