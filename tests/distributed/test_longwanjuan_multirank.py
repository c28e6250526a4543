"""`leantune data score` on two CPU ranks (gloo, torchrun) against one: documents sharded by rank,
one scores file written by rank 0, equal to the one-rank file; and a two-rank resume."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
WORDS = ["she", "kept", "the", "key", "because", "it", "opened", "the", "old", "door", "however", "they"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from leantune.data import build_byte_tokenizer

    tok = build_byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("scorer")
    LlamaForCausalLM(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def write_docs(path: Path) -> Path:
    """11 document lines: long, short and bad ones, and a blank line, in a fixed order."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(9)]
    lines = [json.dumps({"text": t}) for t in texts]
    lines[3] = json.dumps({"body": "no text field"})
    lines.insert(6, "")
    lines.append('{"text": "unterminated')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def score(docs: Path, model: Path, nproc: int, torchrun: bool = False) -> str:
    args = ["data", "score", str(docs), "--model", str(model), "--windows", "96,48,16", "--batch-size", "1",
            "--device", "cpu"]  # fmt: skip
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "leantune", *args]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "leantune", *args, "--nproc", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_two_ranks_write_the_one_rank_scores_file_and_resume(tmp_path, model_dir):
    one = write_docs(tmp_path / "one" / "docs.jsonl")
    two = write_docs(tmp_path / "two" / "docs.jsonl")
    out1 = score(one, model_dir, 1)
    out2 = score(two, model_dir, 2)
    assert out1.count(" -> ") == 1 and out2.count(" -> ") == 1  # one report, from rank 0
    assert out1.split(": ", 1)[1] == out2.split(": ", 1)[1]  # the same counts
    a = (tmp_path / "one" / "docs.scores.jsonl").read_text()
    b = (tmp_path / "two" / "docs.scores.jsonl").read_text()
    rows = [json.loads(x) for x in a.splitlines()[1:]]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11]  # input order, blank 7 left out
    assert sum(r["status"] == "ok" for r in rows) >= 4
    assert a == b  # same values, same order, same header

    # an interrupted two-rank run: the last three rows lost and a fourth torn; resumed under torchrun
    scores = tmp_path / "two" / "docs.scores.jsonl"
    kept = b.splitlines(keepends=True)[:-4]
    scores.write_text("".join(kept) + b.splitlines()[-4][:20])
    out = score(two, model_dir, 2, torchrun=True)
    assert f"{len(kept) - 1} kept from an earlier run" in out
    assert scores.read_text() == a
