"""`leantune generate --draft ... --decoding ar|sd|duo` end to end on tiny saved models: greedy
output identical across decodings, gamma* printed, mismatched tokenizer -> exit 2."""

from __future__ import annotations

import pytest

from leantune.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from leantune.data import build_byte_tokenizer
    from tests.helpers import byte_llama

    tok = build_byte_tokenizer()
    root = tmp_path_factory.mktemp("spec")
    for name, layers, vocab in (("target", 2, len(tok)), ("draft", 1, len(tok)), ("other", 1, len(tok) + 8)):
        byte_llama(vocab, layers, seed=layers).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_generate_decodings_agree(models, capsys):
    outs = {}
    for decoding in ("ar", "sd", "duo"):
        args = ["generate", str(models / "target"), "hello", "abc", "--max-new-tokens", "12"]
        args += ["--device", "cpu", "--draft", str(models / "draft"), "--decoding", decoding, "--spec-stats"]
        assert main(args) == 0
        cap = capsys.readouterr()
        outs[decoding] = cap.out
        assert f"{decoding}: " in cap.err and "tokens/s" in cap.err
        if decoding == "duo":
            assert "gamma* =" in cap.err
    assert main(["generate", str(models / "target"), "hello", "abc", "--max-new-tokens", "12"]) == 0
    plain = capsys.readouterr().out
    assert outs["ar"] == outs["sd"] == outs["duo"] == plain


def test_generate_sampling_with_draft_runs(models, capsys):
    args = ["generate", str(models / "target"), "hello", "--draft", str(models / "draft"), "--sample"]
    assert main([*args, "--temperature", "0.7", "--top-p", "0.9", "--gamma", "4", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--temperature", "0.7", "--top-p", "0.9", "--gamma", "4", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # seeded


def test_mismatched_draft_and_bad_options_exit_2(models, capsys):
    t = str(models / "target")
    assert main(["generate", t, "hi", "--draft", str(models / "other")]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert main(["generate", t, "hi", "--decoding", "sd"]) == 2
    assert "needs --draft" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", t, "hi", "--draft", t, "--gamma", "0"])


@pytest.mark.slow  # builds the built-in evaluation set twice (~30 s on 2 busy cores)
def test_eval_exact_match_through_speculative_decoding(models, capsys):
    base = ["eval", str(models / "target"), "--accuracy-samples", "6", "--max-new-tokens", "6"]
    assert main(base) == 0
    plain = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("exact match")]
    assert main([*base, "--draft", str(models / "draft"), "--decoding", "sd", "--spec-stats"]) == 0
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if ln.startswith("exact match")] == plain
    assert "sd: " in out and "acceptance" in out
