"""torchrun worker: ``dist.strategy=fsdp`` training on 2 gloo ranks, with or without ``serve.port``.

Usage: ``serve_live_worker.py MODE OUT_DIR REPORT_DIR [OVERRIDE ...]`` (MODE ``serve`` or
``plain``; overrides are added to the config). With
``serve``, rank 0 runs a client thread against its live server (127.0.0.1, a free port), paced by
the loop: at each step of ``PLAN`` the loop lets the client send one request and waits (rank 0
only) until that request is queued, so the collective generation at the end of that step answers
it. Every rank writes ``REPORT_DIR/rank{R}.json``: what its engine generated (steps, tokens, finish
reasons); rank 0 adds the answers the client got.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import torch

from leantune.config import load_config
from leantune.serve.live import LiveServer
from leantune.trainer import Trainer, TrainerHook

STEPS = 8
# step -> request: greedy streamed, seeded samples (n=2), a client that leaves mid-stream, and on
# the final weights greedy again
PLAN = {2: "greedy-stream", 4: "sampled", 5: "disconnect", STEPS: "greedy-final"}
PROMPT = "sort 8213\n"
MAX_TOKENS = 8


def overrides(out: str, serve: bool) -> list[str]:
    return [
        "model.preset=test",
        "data.num_train=200",
        "data.num_eval=8",
        "data.tasks=reverse,sort",
        "train.batch_size=4",
        f"train.max_steps={STEPS}",
        "train.save_every=2",
        "train.keep_last=4",  # the weights of every step that answers, for the one-process check
        "optim.name=adalomo",
        "optim.lr=0.05",
        "optim.warmup_steps=2",
        "eval.every=4",
        "eval.accuracy_samples=0",  # exact match (model.generate) under multi-rank fsdp: see report
        "log.every=1",
        "log.progress=false",
        "log.plot=false",
        "log.tensorboard=false",
        "train.device=cpu",
        "dist.strategy=fsdp",
        f"train.output_dir={out}",
        "train.run_name=r",
        *(["serve.port=0"] if serve else []),
    ]


class NoEos(TrainerHook):
    """The tiny model, barely trained, says eos after a few tokens; without eos its answers run to
    max_tokens, long enough for a client to leave mid-stream (the one-process reference does the same)."""

    def __init__(self, live: LiveServer):
        self.live = live

    def on_train_start(self, trainer):
        self.live.engine.eos_ids = frozenset()  # type: ignore[union-attr]


class Client(TrainerHook):
    """Rank 0's client thread and the pacing of it (placed before the LiveServer in the hooks)."""

    def __init__(self, live: LiveServer):
        self.live = live
        self.go = threading.Semaphore(0)
        self.answers: list[dict] = []
        self.errors: list[str] = []
        self.thread: threading.Thread | None = None

    def on_train_start(self, trainer):
        if trainer.is_main:
            self.thread = threading.Thread(target=self.work, daemon=True)
            self.thread.start()

    def on_step_end(self, trainer, step, result):
        if not trainer.is_main or step not in PLAN:
            return
        self.go.release()
        deadline = time.monotonic() + 30
        while self.live.engine.pending() == 0:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"step {step}: the request never reached the queue"
            time.sleep(0.005)

    def work(self) -> None:
        import httpx
        import openai

        client = openai.OpenAI(base_url=self.live.url + "/v1", api_key="x", max_retries=0, timeout=60)
        for step, kind in PLAN.items():
            if not self.go.acquire(timeout=120):
                self.errors.append(f"never told to send {kind}")
                return
            try:
                if kind in ("greedy-stream", "greedy-final"):
                    stream = client.completions.create(
                        model="m", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
                    )
                    text = "".join(c.choices[0].text for c in stream if c.choices)
                    self.answers.append({"step": step, "kind": kind, "text": text})
                elif kind == "sampled":
                    r = client.completions.create(
                        model="m", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=1.0, seed=7, n=2
                    )
                    texts = [c.text for c in r.choices]
                    self.answers.append({"step": step, "kind": kind, "text": texts})
                else:  # read the first token of a long answer, then hang up
                    body = {"model": "m", "prompt": PROMPT, "max_tokens": 200, "temperature": 0,
                            "stream": True}  # fmt: skip
                    with httpx.stream("POST", self.live.url + "/v1/completions", json=body, timeout=60) as r:
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                break
                    self.answers.append({"step": step, "kind": kind, "text": None})
            except Exception as err:  # reported, the test fails on it
                self.errors.append(f"{kind}: {err!r}")
        # after the last answer the run ends: a request now must fail, not hang
        try:
            client.completions.create(model="m", prompt=PROMPT, max_tokens=2, temperature=0)
            self.errors.append("a request after the end was answered")
        except openai.APIStatusError as err:
            self.answers.append({"step": None, "kind": "after-end", "text": err.status_code})
        except openai.APIConnectionError:  # the server had already stopped
            self.answers.append({"step": None, "kind": "after-end", "text": "closed"})


def main() -> None:
    mode, out, report = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    cfg = load_config(None, [*overrides(out, mode == "serve"), *sys.argv[4:]])
    hooks: list = []
    live = client = None
    if mode == "serve":
        live = LiveServer(cfg.serve)
        client = Client(live)
        hooks = [client, live, NoEos(live)]
    trainer = Trainer(cfg, hooks=hooks)
    trainer.run()
    facts: dict = {"served": getattr(live.engine, "served", None) if live else None}
    if client is not None and client.thread is not None:
        client.thread.join(timeout=90)
        facts.update(answers=client.answers, errors=client.errors, alive=client.thread.is_alive())
    report.mkdir(parents=True, exist_ok=True)
    (report / f"rank{trainer.rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main()
    from leantune.distributed.runtime import exit_worker

    exit_worker(0)  # skips interpreter teardown, where gloo can abort a finished worker
