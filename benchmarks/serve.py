"""``leantune serve`` and ``serve.port``: how fast the server answers, and what it costs a run.

    python benchmarks/serve.py [--only server,training] [--repeats 2] [--train-steps 150]

Server. A model directory is served by ``leantune serve`` (its own process); 16 streaming
``/v1/completions`` requests (the same 16 built-in-task prompts, ``max_tokens`` fixed, temperature 0)
are sent by 1, 4 and 16 concurrent clients (``httpx`` streams on one asyncio loop in the measuring
process). Reported: the aggregate tokens/s (completion tokens, from each stream's usage chunk, over
the wall time of all 16) and the time to first token (from sending a request to its first text
chunk: it includes the wait in the server's queue, which grows with the number of clients since
the server generates for one request at a time). Against: ``leantune.evaluate.generate_texts``
(what ``leantune generate`` runs) on the same prompts in one process, one prompt at a time (as the
server does) and all 16 in one padded batch. Models: the ``tiny`` preset (the default job's model)
and the ``0.1b`` preset, random init with the built-in byte tokenizer (speed does not depend on
the weights; the random models never sample eos greedily within these lengths, checked).

Training. The default job shortened (``train.max_steps``, ``eval.every=0``), its throughput
(``metrics["tokens_per_s"]`` of the run summary) with no server, with ``serve.port`` and no
requests, and with one request per second arriving (a client process sending a 16-token sampled
completion every second, as a person at the chat page would, but more often). Goal: >= 0.95x.
Interleaved repeats.

Each measurement is a fresh subprocess (``benchlib.run_matrix``). Results:
``benchmarks/results/serve.{md,json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    f"{task} {digits}\n"
    for task in ("sort", "reverse", "add", "count")
    for digits in ("8213", "4071", "952", "36")
]
CLIENTS = (1, 4, 16)
MODELS = {"tiny": 32, "0.1b": 16}  # preset -> max_tokens per request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(work: Path, preset: str) -> Path:
    """A random ``preset`` model with the built-in tokenizer, saved in HF format."""
    out = work / f"model-{preset}"
    if (out / "config.json").is_file():
        return out
    from leantune.data import load_tokenizer
    from leantune.models import build_model

    tok = load_tokenizer(None)
    model = build_model(preset=preset, vocab_size=len(tok), seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ------------------------------------------------------------------ server


async def _stream_one(client: Any, url: str, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            if first is None and any(c.get("text") for c in msg.get("choices", [])):
                first = time.perf_counter() - t0
    return {
        "ttft": first if first is not None else float("nan"),
        "tokens": tokens,
        "seconds": time.perf_counter() - t0,
    }


async def _warm_up(url: str) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        await _stream_one(client, url, PROMPTS[0], 4)


async def _level(url: str, clients: int, max_tokens: int) -> dict[str, Any]:
    """All PROMPTS, taken from one queue by ``clients`` concurrent streaming clients."""
    import httpx

    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in PROMPTS:
        queue.put_nowait(p)
    results: list[dict[str, float]] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 2)) as client:

        async def one_client() -> None:
            while not queue.empty():
                results.append(await _stream_one(client, url, queue.get_nowait(), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "completion_tokens": tokens,
        "min_tokens": min(r["tokens"] for r in results),
        "wall_seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(ttft),
        "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "ttft_max_s": ttft[-1],
    }


def server_worker(params: dict) -> dict[str, Any]:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(params["threads"])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "leantune",
            "serve",
            params["model_dir"],
            "--port",
            str(port),
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"leantune serve did not start: {proc.stderr.read() if proc.stderr else ''}"
                )
            time.sleep(0.2)
        # one untimed request: the first forward passes allocate and warm up
        asyncio.run(_warm_up(url))
        levels = [asyncio.run(_level(url, c, params["max_tokens"])) for c in CLIENTS]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"levels": levels}


def generate_worker(params: dict) -> dict[str, Any]:
    import torch

    from leantune.evaluate import generate_texts
    from leantune.inference import load_for_inference

    torch.set_num_threads(params["threads"])
    loaded = load_for_inference(params["model_dir"], device=torch.device("cpu"))
    ids = [list(loaded.tokenizer(p)["input_ids"]) for p in PROMPTS]
    n = params["max_tokens"]
    generate_texts(loaded.model, loaded.tokenizer, ids[:1], device=torch.device("cpu"), max_new_tokens=4)
    out = {}
    for name, batch in (("one_at_a_time", 1), ("batch_16", len(ids))):
        t0 = time.perf_counter()
        texts = generate_texts(
            loaded.model,
            loaded.tokenizer,
            ids,
            device=torch.device("cpu"),
            max_new_tokens=n,
            batch_size=batch,
        )
        wall = time.perf_counter() - t0
        # greedy: the same tokens as the server's temperature-0 answers, which were all max_tokens long
        out[name] = {"wall_seconds": wall, "tokens_per_s": len(ids) * n / wall, "texts": len(texts)}
    return out


# ------------------------------------------------------------------ training


def client_main(url: str, rate: float, max_tokens: int, out: Path) -> int:
    """The 1-request-per-second client (its own process): until SIGTERM, then its stats to ``out``."""
    import httpx

    stop = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    latencies: list[float] = []
    steps: list[int] = []
    errors, refused = 0, 0
    while not stop:  # wait for the server (it starts when training does)
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    next_at = time.monotonic()
    while not stop:
        t0 = time.perf_counter()
        try:
            r = httpx.post(
                url + "/v1/completions",
                timeout=60,
                json={"prompt": "sort 8213\n", "max_tokens": max_tokens, "temperature": 0.7},
            )
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
                steps.append(httpx.get(url + "/v1/leantune/info", timeout=10).json()["step"])
            else:
                errors += 1
        except httpx.TransportError:
            refused += 1  # the server stopped with the run (or had not started)
        next_at += 1.0 / rate
        time.sleep(max(0.0, next_at - time.monotonic()))
    out.write_text(
        json.dumps(
            {
                "answered": len(latencies),
                "errors": errors,
                "refused": refused,
                "latencies": latencies,
                "steps": steps,
            }
        )
    )
    return 0


def train_worker(params: dict) -> dict[str, Any]:
    import torch

    from leantune.config import load_config
    from leantune.trainer import Trainer

    torch.set_num_threads(params["threads"])
    overrides = list(params["overrides"])
    mode = params["mode"]
    hooks: list[Any] = []
    client = None
    stats_file = Path(params["work"]) / f"client-{os.getpid()}.json"
    if mode != "none":
        overrides.append("serve.port=0")
    cfg = load_config(None, overrides)
    generation: list[float] = []  # seconds the requests' generation held the model (and the lock)
    if mode != "none":
        from leantune.serve.engine import Engine
        from leantune.serve.live import LiveServer

        choice = Engine._choice

        def timed_choice(self: Any, *a: Any, **kw: Any) -> Any:  # runs under the engine's lock
            t0 = time.perf_counter()
            try:
                return choice(self, *a, **kw)
            finally:
                generation.append(time.perf_counter() - t0)

        Engine._choice = timed_choice  # type: ignore[method-assign]

        live = LiveServer(cfg.serve)
        hooks.append(live)
        if mode == "1rps":
            client = subprocess.Popen(
                [sys.executable, __file__, "--client", live.url, "--out", str(stats_file)],
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
    try:
        s = Trainer(cfg, hooks=hooks).run()
    finally:
        if client is not None:
            client.terminate()
            client.wait(timeout=60)
    out: dict[str, Any] = {
        "tokens_per_s": s.metrics["tokens_per_s"],
        "train_seconds": s.metrics["train_seconds"],
        "steps": s.steps,
        "generation_seconds": sum(generation),
    }
    if client is not None:
        stats = json.loads(stats_file.read_text())
        lat = sorted(stats["latencies"])
        out["requests_answered"] = stats["answered"]
        out["request_errors"] = stats["errors"]
        out["requests_refused"] = stats["refused"]
        out["latency_median_s"] = statistics.median(lat) if lat else None
        out["latency_max_s"] = lat[-1] if lat else None
        # the steps whose weights answered: the first and the last (they must differ: answers came
        # while the run trained)
        out["answered_at_steps"] = [min(stats["steps"]), max(stats["steps"])] if stats["steps"] else []
    return out


# ------------------------------------------------------------------ driver


def worker(params: dict) -> None:
    kind = params["kind"]
    fn = {"server": server_worker, "generate": generate_worker, "train": train_worker}[kind]
    benchlib.emit_result(fn(params))


def server_part(args: argparse.Namespace) -> dict[str, Any]:
    configs: dict[str, dict[str, Any]] = {}
    for preset in args.presets:
        max_tokens = MODELS[preset]
        model_dir = str(make_model(args.work, preset))
        common = {"model_dir": model_dir, "max_tokens": max_tokens, "threads": args.threads}
        configs[f"serve-{preset}"] = {"kind": "server", **common}
        configs[f"generate-{preset}"] = {"kind": "generate", **common}
    runs = benchlib.run_matrix(Path(__file__), configs, timeout=args.timeout)
    return {name: r[0] for name, r in runs.items()}


def training_part(args: argparse.Namespace) -> dict[str, Any]:
    import shutil

    shutil.rmtree(args.work / "runs", ignore_errors=True)
    base = [
        f"train.max_steps={args.train_steps}",
        "eval.every=0",
        "log.progress=false",
        "log.plot=false",
        "log.tensorboard=false",
        "train.device=cpu",
        # the default job's data, fewer of them: generated in setup, not all used in these steps
        f"data.num_train={max(2000, 64 * args.train_steps)}",
        f"train.output_dir={args.work / 'runs'}",
    ]
    configs = {
        mode: {
            "kind": "train",
            "mode": mode,
            "overrides": base,
            "threads": args.threads,
            "work": str(args.work),
        }
        for mode in ("none", "idle", "1rps")
    }
    runs = benchlib.run_matrix(Path(__file__), configs, repeats=args.repeats, timeout=args.timeout)
    return runs


def _median(runs: list[dict], key: str) -> float | None:
    xs = [r[key] for r in runs if key in r and r[key] is not None]
    return statistics.median(xs) if xs else None


def render(report: dict) -> str:
    f = benchlib.fmt
    lines = [
        "# `leantune serve` and `serve.port` (issue 19)",
        "",
        benchlib.source_note(report.get("source")),
        f"- Machine: {report['machine'].get('cpu_model')}, torch threads {report['threads']}; load average "
        f"at the start {benchlib.format_load(report.get('load_start'))}, at the end "
        f"{benchlib.format_load(report.get('load_end'))} (the machine was shared).",
        "",
    ]
    srv = report.get("server")
    if srv:
        rows = []
        for preset, max_tokens in MODELS.items():
            if f"serve-{preset}" not in srv:
                continue
            s, g = srv.get(f"serve-{preset}", {}), srv.get(f"generate-{preset}", {})
            if "error" in s:
                rows.append([preset, "server failed", s["error"], "", "", "", ""])
            else:
                for lv in s["levels"]:
                    rows.append(
                        [
                            preset,
                            f"server, {lv['clients']} client(s)",
                            f(lv["tokens_per_s"], ".0f"),
                            f(lv["ttft_median_s"] * 1000, ".0f", " ms"),
                            f(lv["ttft_p90_s"] * 1000, ".0f", " ms"),
                            f(lv["ttft_max_s"] * 1000, ".0f", " ms"),
                            f"{lv['completion_tokens']} ({lv['min_tokens']}-{max_tokens} per request)",
                        ]
                    )
            if "error" in g:
                rows.append([preset, "generate_texts failed", g["error"], "", "", "", ""])
            else:
                for name, label in (
                    ("one_at_a_time", "generate_texts, 1 prompt at a time"),
                    ("batch_16", "generate_texts, batch of 16"),
                ):
                    rows.append(
                        [preset, label, f(g[name]["tokens_per_s"], ".0f"), "", "", "", f"{16 * max_tokens}"]
                    )
        lines += [
            "## Server: 16 streaming requests, temperature 0",
            "",
            f"max_tokens: {', '.join(f'{p} {n}' for p, n in MODELS.items())}. Time to first token (TTFT) "
            "includes the wait in the queue.",
            "",
            benchlib.render_table(
                ["model", "what", "tokens/s", "TTFT median", "TTFT p90", "TTFT max", "tokens"],
                rows,
                "llrrrrr",
            ),
            "",
        ]
    tr = report.get("training")
    if tr:
        floor = _median(tr.get("none", []), "tokens_per_s")
        rows = []
        for mode, label in (
            ("none", "no server"),
            ("idle", "serve.port, no requests"),
            ("1rps", "serve.port, 1 request/s"),
        ):
            rs = [r for r in tr.get(mode, []) if "error" not in r]
            failed = [r["error"] for r in tr.get(mode, []) if "error" in r]
            med = _median(rs, "tokens_per_s")
            each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs)
            extra = ""
            if mode == "1rps" and rs:
                extra = (
                    f"{sum(r['requests_answered'] for r in rs)} answered, "
                    f"{sum(r['request_errors'] for r in rs)} errors, "
                    f"{sum(r['requests_refused'] for r in rs)} refused (the server stopped with the run); "
                    f"answered at steps {', '.join('-'.join(map(str, r['answered_at_steps'])) for r in rs)}; "
                    "latency median "
                    f"{f(_median(rs, 'latency_median_s'), '.2f', ' s')}, max "
                    f"{f(max(r['latency_max_s'] or 0 for r in rs), '.2f', ' s')}"
                )
            if failed:
                extra += f" FAILED: {failed[0]}"
            ratio = med / floor if med and floor else None
            share = [r["generation_seconds"] / r["train_seconds"] for r in rs if r.get("generation_seconds")]
            if share:
                extra += f"; generation held the model {100 * statistics.median(share):.1f}% of train time"
            rows.append([label, f(med, ".0f"), each, f(ratio, ".3f", "x"), extra])
        lines += [
            f"## Training: the default job, {report['train_steps']} steps, eval.every=0",
            "",
            benchlib.render_table(
                ["run", "tokens/s (median)", "each run", "vs no server", "requests"], rows, "lrrrl"
            ),
            "",
        ]
    lines += [report.get("notes", ""), ""]
    return "\n".join(lines)


NOTES = """Notes. The server generates for one request at a time (docs/serve.md), so its aggregate
tokens/s stays that of one stream whatever the number of clients, and the time to first token of
the last of 16 simultaneous requests is about 15 answers long. Its decode loop (one forward pass per
token on the KV cache, a detokenization and an event per token) is compared with generate_texts,
i.e. transformers' generate on the same prompts. The client processes share the 2 cores with the
server and the training.

Training: a generation and a step never overlap (the lock), so what a run loses to the time its
generations hold the model is that share of the training time, measured inside the run. On the 2
cores of this machine that is not the whole cost: in the run of 2026-12-06 (a quiet machine, load
averages above) 1 request per second cost 0.68x tokens/s against the 0.95x goal, with generation
holding the model 2.2% of the time; the rest is the CPU the server's event loop, the token-by-token
streaming and the client process take from the two cores the training's torch threads use. An idle
server cost 0.94x. Compare tokens/s of separate runs only on a quiet machine: under load, runs of
the same job differ by several times."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS / "serve")
    p.add_argument("--only", default="server,training")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the training runs")
    p.add_argument("--train-steps", type=int, default=150)  # this run: --train-steps 40 --repeats 1
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--presets", default="tiny,0.1b", help="models of the server part")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--work", type=Path, default=Path("/tmp/leantune-serve-bench"))
    args = p.parse_args(argv)
    if args.client:
        return client_main(args.client, 1.0, 16, args.out)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    only = benchlib.parse_only(args.only, ["server", "training"])
    args.presets = benchlib.parse_only(args.presets, list(MODELS))
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "source": benchlib.source(),
        "machine": benchlib.machine(),
        "threads": args.threads,
        "train_steps": args.train_steps,
        "load_start": benchlib.loadavg(),
    }
    old = args.out.with_suffix(".json")
    if old.is_file() and set(only) != {"server", "training"}:
        earlier = json.loads(old.read_text())
        for part in {"server", "training"} - set(only):
            if part in earlier:
                report[part] = earlier[part]
    t0 = time.perf_counter()
    report["notes"] = NOTES
    if "training" in only:
        report["training"] = training_part(args)
        benchlib.write_report(args.out, report, render(report))  # kept should the server part not end
    if "server" in only:
        report["server"] = server_part(args)
    report["load_end"] = benchlib.loadavg()
    report["seconds"] = time.perf_counter() - t0
    report["notes"] = NOTES
    benchlib.write_report(args.out, report, render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
