"""LongWanjuan's long-text metrics, classes and mixture (issue 23): statistical metrics against hand
counts, coherence against a plain-loop oracle and against a model that can copy, the classifier on
hand-made rows, and the score files' bad inputs and resume."""

from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leantune.data import DataError
from leantune.data.longtext_classes import load_rules, mixture
from leantune.data.quality import (
    COHERENCE_KEYS,
    Windows,
    coherence_scores,
    line_stats,
    text_metrics,
    type_token_ratio,
    words,
)
from leantune.data.quality_files import check_readable, read_scores, score_file, scores_path
from tests.helpers import tiny_llama

# --- statistical metrics ----------------------------------------------------------------------------


def test_ttr_of_a_a_a_is_one_third():
    assert type_token_ratio(words("a a a")) == pytest.approx(1 / 3)
    assert type_token_ratio([7, 7, 7]) == pytest.approx(1 / 3)
    assert type_token_ratio(words("a b c a")) == pytest.approx(3 / 4)
    assert math.isnan(type_token_ratio([]))


def test_text_metrics_match_hand_counts():
    text = "However, it rained.\n\nAs a result they stayed | home\nin fact"
    m = text_metrics(text)
    # words: however , it rained . as a result they stayed | home in fact -> 14
    assert m["words"] == 14
    assert m["pronoun_rate"] == pytest.approx(2 / 14)  # it, they
    assert m["connective_rate"] == pytest.approx(3 / 14)  # however, as a result, in fact
    assert m["word_ttr"] == pytest.approx(1.0)
    lengths = [19, 30, 7]  # the empty line is dropped
    mean = sum(lengths) / 3
    assert m["lines"] == 3 and m["line_mean"] == pytest.approx(mean)
    assert m["line_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in lengths) / 3))
    assert (m["line_median"], m["line_max"], m["line_min"]) == (19, 30, 7)
    assert (m["newlines"], m["commas"], m["pipes"], m["spaces"]) == (3, 1, 1, 9)
    assert m["newline_rate"] == pytest.approx(3 / len(text))


def test_connectives_need_whole_words_and_lines_of_blanks_give_nan():
    assert text_metrics("sonnet yetis butter")["connective_rate"] == 0  # so / yet / but inside words
    stats = line_stats("\n \n")
    assert stats["lines"] == 0 and math.isnan(stats["line_mean"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4096,2048", "three token counts"),
        ("64,x,8", "three token counts"),
        ("64,16,16", "LONG > SHORT > EVAL"),
        ("16,32,8", "LONG > SHORT > EVAL"),
        ("64,16,0", "eval must be a positive"),
    ],
)
def test_bad_windows_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        Windows.parse(text)


# --- coherence --------------------------------------------------------------------------------------


def oracle(model, ids, w):
    """Plain loops: every scored token on its own prefix, full logits, float64."""
    per = {"nll_wi": [], "nll_wo": [], "acc_wi": [], "acc_wo": [], "ppl_wi": [], "ppl_wo": []}
    for c in range(len(ids) // w.long):
        window = ids[c * w.long : (c + 1) * w.long]
        for tag, ctx in (("wi", window), ("wo", window[-w.short :])):
            nlls, hits = [], []
            for j in range(len(ctx) - w.eval, len(ctx)):
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ctx[:j]])).logits[0, -1].double()
                nlls.append(-F.log_softmax(logits, -1)[ctx[j]].item())
                hits.append(float(logits.argmax().item() == ctx[j]))
            per[f"nll_{tag}"] += nlls
            per[f"acc_{tag}"].append(sum(hits) / len(hits))
            per[f"ppl_{tag}"].append(math.exp(sum(nlls) / len(nlls)))
    out = {k: sum(v) / len(v) for k, v in per.items()}
    out["acc_delta"] = out["acc_wi"] - out["acc_wo"]
    out["acc_ratio"] = out["acc_delta"] / (out["acc_wi"] + 1e-5)
    out["ppl_delta"] = out["ppl_wo"] - out["ppl_wi"]
    out["ppl_ratio"] = out["ppl_delta"] / (out["ppl_wo"] + 1e-5)
    return out


def test_coherence_matches_a_plain_loop_oracle():
    model = tiny_llama(3).eval()
    w = Windows(24, 12, 5)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 48, (n,), generator=g).tolist() for n in (55, 24, 23)]  # 2 windows, 1, 0
    got = coherence_scores(model, docs, w, batch_size=2)
    assert [r["chunks"] for r in got] == [2, 1, 0]
    for doc, res in zip(docs[:2], got[:2]):
        want = oracle(model, doc, w)
        for k in COHERENCE_KEYS:
            # fp32 logits: a perplexity of ~50 is good to ~1e-5 relative, and so are the deltas
            assert res[k] == pytest.approx(want[k], rel=1e-5, abs=1e-5 * want["ppl_wo"]), k
    assert all(math.isnan(got[2][k]) for k in COHERENCE_KEYS)  # shorter than one window: NaN, not -1


def test_coherence_is_deterministic_and_independent_of_the_batch():
    model = tiny_llama(1).eval()
    w = Windows(20, 10, 4)
    docs = [list(range(i, i + 47)) for i in range(0, 8, 3)]
    docs = [[t % 48 for t in d] for d in docs]
    a = coherence_scores(model, docs, w, batch_size=1)
    b = coherence_scores(model, docs, w, batch_size=1)
    c = coherence_scores(model, docs, w, batch_size=5)
    assert a == b
    for x, y in zip(a, c):
        for k in COHERENCE_KEYS:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6)


def test_bf16_model_scores_close_to_fp32():
    w = Windows(24, 12, 6)
    doc = [(7 * i) % 48 for i in range(48)]
    (hi,) = coherence_scores(tiny_llama(2).eval(), [doc], w)
    (lo,) = coherence_scores(tiny_llama(2, dtype=torch.bfloat16).eval(), [doc], w)
    assert all(math.isfinite(lo[k]) for k in COHERENCE_KEYS)
    assert lo["nll_wi"] == pytest.approx(hi["nll_wi"], rel=0.05)
    assert lo["ppl_wo"] == pytest.approx(hi["ppl_wo"], rel=0.05)


class CopyModel(nn.Module):
    """An induction head by construction: at position t it predicts the token that followed the last
    earlier occurrence of token t (logit 8), else nothing (all logits 0). It can only use what is in
    its input, so the long context helps exactly when the text repeats beyond the short window."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.register_buffer("anchor", torch.zeros(()))

    def forward(self, input_ids, logits_to_keep=0):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        for i in range(b):
            row = input_ids[i].tolist()
            last: dict[int, int] = {}
            for pos, tok in enumerate(row):
                if tok in last:
                    logits[i, pos, row[last[tok] + 1]] = 8.0
                last[tok] = pos
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_a_document_repeating_its_first_half_is_far_more_coherent_than_random_text():
    vocab, w = 1000, Windows(64, 16, 8)
    g = torch.Generator().manual_seed(0)
    half = (torch.randperm(vocab - 1, generator=g)[:32] + 1).tolist()  # distinct tokens, never 0
    repeated = half + half
    random_doc = (torch.randperm(vocab - 1, generator=g)[:64] + 1).tolist()
    rep, rnd = coherence_scores(CopyModel(vocab), [repeated, random_doc], w)
    # The long window holds the first half: every scored token is copied. The short one does not.
    assert rep["acc_wi"] == 1.0 and rep["acc_wo"] == 0.0 and rep["acc_delta"] == 1.0
    assert rnd["acc_delta"] == 0.0 and rnd["ppl_delta"] == pytest.approx(0.0, abs=1e-6)
    assert rep["ppl_delta"] > 900 and rep["ppl_ratio"] > 0.99  # ppl ~vocab without, ~1 with


# --- classes and mixture ----------------------------------------------------------------------------

HOLISTIC = {"ppl_ratio": 0.2, "word_ttr": 0.4, "pronoun_rate": 0.05, "connective_rate": 0.01}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, "holistic"),
        ({"ppl_ratio": 0.005}, "aggregated"),  # long context barely helps: independent pieces
        ({"pronoun_rate": 0.0}, "aggregated"),  # no references back
        ({"ppl_ratio": -0.1}, "chaotic"),  # the long context hurts
        ({"word_ttr": 0.95}, "chaotic"),  # random strings
        ({"word_ttr": 0.6}, "chaotic"),  # shuffled characters: most "words" are new
        ({"word_ttr": 0.01}, "chaotic"),  # one word repeated
        ({"ppl_ratio": math.nan}, "unscored"),  # shorter than one window
        ({"connective_rate": None}, "unscored"),
    ],
)
def test_default_rules_on_hand_made_documents(change, expected):
    assert load_rules().classify({**HOLISTIC, **change}) == expected


@pytest.mark.parametrize(
    ("ppl_ratio", "expected"),
    [
        (0.0, "aggregated"),  # the context neither helps nor hurts: not chaotic (InternLM2's <= 0 alone)
        (-0.005, "aggregated"),  # scorer noise inside the dead band
        (0.005, "aggregated"),
        (-0.01, "chaotic"),  # the bounds are inclusive
        (0.01, "holistic"),
    ],
)
def test_the_default_coherence_rules_leave_a_dead_band_around_zero(ppl_ratio, expected):
    assert load_rules().classify({**HOLISTIC, "ppl_ratio": ppl_ratio}) == expected
    # without cohesion the same values make aggregated text, except where the context hurts
    flat = {**HOLISTIC, "ppl_ratio": ppl_ratio, "pronoun_rate": 0.0, "connective_rate": 0.0}
    assert load_rules().classify(flat) == ("chaotic" if expected == "chaotic" else "aggregated")


def test_rules_from_yaml_replace_sections(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("holistic:\n  ttr: {min: 0.5, max: 0.7}\nupsample: {aggregated: 3}\n")
    rules = load_rules(path, known=["ttr", "ppl_ratio", "word_ttr"])
    assert rules.holistic.keys() == {"ttr"} and "ppl_ratio" in rules.chaotic  # chaotic kept
    assert rules.upsample["aggregated"] == 3 and rules.upsample["chaotic"] == 0  # merged, still dropped
    assert rules.classify({"ttr": 0.6, "ppl_ratio": 0.1, "word_ttr": 0.4}) == "holistic"
    assert rules.classify({"ttr": 0.8, "ppl_ratio": 0.1, "word_ttr": 0.4}) == "aggregated"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"holistc": {}}, r"unknown section 'holistc' \(did you mean 'holistic'\?\)"),
        ({"holistic": {"ppl_ratoi": {"min": 0}}}, r"no such metric \(did you mean 'ppl_ratio'\?\)"),
        ({"holistic": {"ppl_ratio": {"minimum": 0}}}, r"unknown bound 'minimum'"),
        ({"holistic": {"ppl_ratio": {"min": 0.5, "max": 0.1}}}, "min 0.5 is above max 0.1"),
        ({"holistic": {"ppl_ratio": {"min": "high"}}}, "ppl_ratio.min must be a number"),
        ({"holistic": {"ppl_ratio": 0.1}}, "a range is a mapping"),
        ({"upsample": {"aggregated": -1}}, "upsample.aggregated must be >= 0"),
        ({"upsample": {"agregated": 2}}, r"did you mean 'aggregated'"),
    ],
)
def test_bad_rules_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        load_rules(spec, known=["ppl_ratio", "word_ttr", "pronoun_rate", "connective_rate"])


def test_mixture_weights_are_token_shares_times_upsample():
    files = {"holistic": "h.jsonl", "aggregated": "a.jsonl", "chaotic": "c.jsonl"}
    tokens = {"holistic": 600, "aggregated": 100, "chaotic": 300}
    got = mixture(files, tokens, {"holistic": 1.0, "aggregated": 2.0, "chaotic": 0.0})
    assert got["train"] == ["h.jsonl", "a.jsonl"]  # chaotic dropped
    assert got["weights"] == pytest.approx([600 / 800, 200 / 800])
    with pytest.raises(ValueError, match="no documents are left"):
        mixture({"chaotic": "c.jsonl"}, {"chaotic": 5}, {"chaotic": 0.0})


# --- score files ------------------------------------------------------------------------------------


class ByteModel(CopyModel):
    """The copy model over the built-in byte tokenizer's vocabulary, with HF's embedding accessor."""

    def __init__(self, vocab: int) -> None:
        super().__init__(vocab)
        self.embed = nn.Embedding(vocab, 1)

    def get_input_embeddings(self):
        return self.embed


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    return path


def bad_input(tmp_path):
    long_text = "the cat sat on the mat. " * 8  # 192 bytes: 2 windows of 96
    return write_lines(tmp_path / "docs.jsonl", [
        json.dumps({"text": long_text}).encode(),
        json.dumps({"text": "too short"}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "caf\xe9"}',  # latin-1, not UTF-8
        b'{"text": "unterminated',
        json.dumps({"body": "no text field"}).encode(),
        json.dumps([1, 2]).encode(),
        b"",
        json.dumps({"text": long_text[::-1]}).encode(),
    ])  # fmt: skip


def test_score_file_counts_bad_lines_and_short_documents(tmp_path):
    from leantune.data import build_byte_tokenizer

    tok = build_byte_tokenizer()
    src = bad_input(tmp_path)
    counts = score_file(src, ByteModel(len(tok)), tok, Windows(96, 32, 8), model_name="copy", group=2)
    assert (counts.scored, counts.short) == (2, 1)
    assert counts.skipped == {"empty text": 1, "not valid UTF-8": 1, "malformed JSON": 1,
                              "no 'text' field": 1, "not a JSON object": 1}  # fmt: skip
    meta, rows = read_scores(scores_path(src))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta == {"model": "copy", "windows": [96, 32, 8], "field": "text",
                    "input": {"size": src.stat().st_size, "sha256": digest}}  # fmt: skip
    by_line = {r["line"]: r for r in rows}
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 9]  # input order; blank line 8 is no document
    assert (
        by_line[1]["status"] == "ok" and by_line[1]["chunks"] == 2 and math.isfinite(by_line[1]["acc_delta"])
    )
    assert by_line[2]["status"] == "short" and math.isnan(by_line[2]["ppl_ratio"])
    assert by_line[2]["word_ttr"] == pytest.approx(1.0)  # statistical metrics are still there
    assert "at byte 13" in by_line[4]["reason"]


def test_score_file_resumes_after_a_torn_line(tmp_path):
    from leantune.data import build_byte_tokenizer

    tok = build_byte_tokenizer()
    src = bad_input(tmp_path)
    model, w = ByteModel(len(tok)), Windows(96, 32, 8)
    score_file(src, model, tok, w, model_name="copy")
    out = scores_path(src)
    full = out.read_bytes()
    out.write_bytes(full[: full.rfind(b"\n", 0, len(full) - 1) + 1] + b'{"line": 9, "sta')  # torn
    again = score_file(src, model, tok, w, model_name="copy")
    assert again.resumed == 7 and again.scored == 1  # only the torn document is scored again
    _, rows = read_scores(out)
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5, 6, 7, 9]
    with pytest.raises(DataError, match="was scored with windows"):
        score_file(src, model, tok, Windows(64, 32, 8), model_name="copy")


def test_unreadable_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        check_readable(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="a directory"):
        check_readable(tmp_path)
    (tmp_path / "a.json").write_text('[{"text": "x"}]')
    with pytest.raises(DataError, match="a JSON array; only JSON-lines"):
        check_readable(tmp_path / "a.json")


def test_a_tokenizer_beyond_the_models_vocabulary_is_an_error(tmp_path):
    from leantune.data import build_byte_tokenizer

    src = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "hello world"}).encode()])
    with pytest.raises(DataError, match="beyond the model's vocabulary of 48"):
        score_file(src, tiny_llama(), build_byte_tokenizer(), Windows(8, 4, 2), model_name="m")


def test_parquet_documents_and_records_across_batches(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from leantune.data import quality_inputs

    monkeypatch.setattr(quality_inputs, "_BATCH_ROWS", 2)  # rows 1-2, 3-4, 5
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a b", None, " ", "c", "d"], "n": [1, 2, 3, 4, 5]}), path)
    assert list(quality_inputs.iter_documents(path)) == [
        (1, "a b", None), (2, None, "'text' is null"), (3, None, "empty text"),
        (4, "c", None), (5, "d", None),
    ]  # fmt: skip
    assert quality_inputs.count_documents(path) == 5
    got = quality_inputs.read_records(path, {1, 4, 5})
    assert got == {1: {"text": "a b", "n": 1}, 4: {"text": "c", "n": 4}, 5: {"text": "d", "n": 5}}
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(DataError, match="column 'text' holds int64, not text"):
        check_readable(path, "text")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        check_readable(tmp_path / "bad.parquet", "text")
