"""``serve.port`` under ``dist.strategy=fsdp`` on 2 gloo ranks: collective generation.

Two torchrun runs of ``serve_live_worker.py`` (tiny model, 8 steps, 127.0.0.1): one answering
requests at steps 2, 4, 5 and 8, one without. The run that served ends with bitwise the same weights;
its answers equal what one process gives with the weights of that step (the checkpoint of that step,
or the final model), greedy and seeded; a client leaving mid-stream stops the generation on both
ranks at the same token and the run goes on; a request after the last step gets a 503, not a hang.
The same bitwise check for LoRA with dropout under bf16 mixed precision; and the cost of a step
without requests (one broadcast), in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
pytest.importorskip("httpx")

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("serve_live_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
from tests.distributed import serve_live_worker as W  # noqa: E402


def _launch(mode: str, out: Path, report: Path, *extra: str) -> dict[int, dict[str, Any]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER), mode, str(out), str(report), *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {r: json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fsdp-serve")
    return {
        "serve": _launch("serve", tmp / "serve", tmp / "rep-serve"),
        "plain": _launch("plain", tmp / "plain", tmp / "rep-plain"),
        "serve_dir": tmp / "serve" / "r",
        "plain_dir": tmp / "plain" / "r",
    }


def _one_process(model_dir: Path, temperature: float, n: int = 1, seed: int | None = None) -> list[str]:
    """The same request on the saved weights, in this process (no FSDP), as the worker's engine
    answers it (no eos: see serve_live_worker.NoEos)."""
    from leantune.inference import load_for_inference
    from leantune.serve.engine import Engine, SamplingParams

    loaded = load_for_inference(model_dir, device=torch.device("cpu"))
    engine = Engine(loaded.model, loaded.tokenizer, "m")
    engine.eos_ids = frozenset()
    params = SamplingParams(temperature=temperature, max_tokens=W.MAX_TOKENS, n=n, seed=seed)
    return [c.text for c in engine.run(engine.prepare_completion(W.PROMPT, params)).choices]


def test_final_weights_are_bitwise_those_of_a_run_without_requests(runs):
    served = load_file(str(runs["serve_dir"] / "final" / "model.safetensors"))
    plain = load_file(str(runs["plain_dir"] / "final" / "model.safetensors"))
    assert served.keys() == plain.keys()
    for k in served:
        assert torch.equal(served[k], plain[k]), k


def test_answers_equal_one_process_on_the_same_weights(runs):
    rank0 = runs["serve"][0]
    assert rank0["errors"] == [] and not rank0["alive"], rank0
    answers = {a["kind"]: a for a in rank0["answers"]}
    ckpt = runs["serve_dir"] / "checkpoints"
    assert answers["greedy-stream"]["text"] == _one_process(ckpt / "step-000002", 0.0)[0]
    assert answers["sampled"]["text"] == _one_process(ckpt / "step-000004", 1.0, n=2, seed=7)
    assert answers["greedy-final"]["text"] == _one_process(runs["serve_dir"] / "final", 0.0)[0]
    assert answers["after-end"]["text"] in (503, "closed")


def test_every_rank_generated_the_same_tokens_and_stopped_together(runs):
    r0, r1 = runs["serve"][0]["served"], runs["serve"][1]["served"]
    assert r0 == r1  # same jobs at the same steps, same number of tokens, same finish reasons
    assert [s["step"] for s in r0] == sorted(W.PLAN)
    left = next(s for s in r0 if s["step"] == 5)  # the client that hung up after its first token
    assert left["finish"] == ["cancelled"] and left["completion_tokens"][0] < 200
    assert r0[-1]["step"] == W.STEPS, "the run went on after the disconnect, and answered again"


def test_lora_with_dropout_and_bf16_compute_trains_the_same_while_serving(tmp_path):
    """LoRA (dropout on) + AdamW + FSDP's bf16 mixed precision: the adapter is bitwise that of a run
    without requests, and both ranks generated the same."""
    extra = ["peft.method=lora", "peft.dropout=0.1", "optim.name=adamw", "optim.lr=0.003",
             "dist.mixed_precision=bf16"]  # fmt: skip
    served = _launch("serve", tmp_path / "serve", tmp_path / "rep-serve", *extra)
    _launch("plain", tmp_path / "plain", tmp_path / "rep-plain", *extra)
    a = load_file(str(tmp_path / "serve" / "r" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "r" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert served[0]["errors"] == [] and served[0]["served"] == served[1]["served"]
    assert [s["step"] for s in served[0]["served"]] == sorted(W.PLAN)


def test_without_requests_a_step_costs_one_broadcast(tmp_path, monkeypatch):
    """CollectiveEngine.serve_pending on a 1-rank gloo group: nothing queued -> one broadcast."""
    import torch.distributed as dist

    from leantune.models import build_model
    from leantune.serve.engine import SamplingParams
    from leantune.serve.live import CollectiveEngine

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(preset="test", vocab_size=64, seed=0)
        tok = _TinyTokenizer()
        engine = CollectiveEngine(model, tok, "m", rank=0, comm_device=torch.device("cpu"))
        calls: list[str] = []
        real_broadcast, real_objects = dist.broadcast, dist.broadcast_object_list
        monkeypatch.setattr(
            dist, "broadcast", lambda *a, **k: (calls.append("b"), real_broadcast(*a, **k))[1]
        )
        monkeypatch.setattr(
            dist, "broadcast_object_list", lambda *a, **k: (calls.append("o"), real_objects(*a, **k))[1]
        )
        assert engine.serve_pending(1) is False and calls == ["b"]
        # with a job: the flag, the job, then one broadcast per token
        job = engine.prepare_completion([1, 2, 3], SamplingParams(temperature=0, max_tokens=4))
        box: dict[str, Any] = {}
        t = threading.Thread(target=lambda: box.update(r=engine.run(job)))
        t.start()
        while engine.pending() == 0:
            pass
        calls.clear()
        assert engine.serve_pending(2) is True
        t.join(timeout=30)
        assert calls == ["b", "o", "b", "b", "b", "b"] and box["r"].choices[0].completion_tokens == 4
        engine.close("ended")
        with pytest.raises(Exception, match="ended"):
            engine.run(job)
    finally:
        dist.destroy_process_group()


class _TinyTokenizer:
    eos_token_id = 0

    def __len__(self) -> int:
        return 64

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def test_config_accepts_serve_port_under_fsdp_on_several_ranks():
    from leantune.config import load_config

    cfg = load_config(None, ["serve.port=8000", "dist.strategy=fsdp", "dist.nproc=2"])
    assert cfg.serve.port == 8000
