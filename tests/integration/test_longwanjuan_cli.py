"""`leantune data score | classify | mix` end to end on a tiny saved model, and the mixture YAML
read back by the training config."""

from __future__ import annotations

import json

import pytest

from leantune.cli import main


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
    from leantune.config import load_config

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
