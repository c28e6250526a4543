"""``leantune serve RUN|MODEL_DIR``: an OpenAI-compatible server and a chat page for a model."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import Any

from leantune.commands.spec_options import add_speculative_options, load_draft

DESCRIPTION = """\
Serve the model of RUN|MODEL_DIR (a run directory, a checkpoint directory or a local Hugging Face
model directory; a peft adapter run is served on its base) over an OpenAI-compatible HTTP API, with
a chat page at http://HOST:PORT/.

Routes: POST /v1/chat/completions, POST /v1/completions (stream, temperature, top_p, max_tokens,
stop, seed, n), GET /v1/models, GET /v1/leantune/info, GET /health. Requests are served one at a
time, in arrival order. With --draft DRAFT_RUN every request is decoded with speculative decoding
(same output, fewer forwards of the model). See docs/serve.md.

Needs the serve extra: pip install 'leantune[serve]' (FastAPI + uvicorn).
"""

EPILOG = """\
examples:
  leantune serve runs/RUN                          # http://127.0.0.1:8000/ in a browser
  leantune serve path/to/base --adapter runs/LORA  # a LoRA run's adapter on a base model
  LEANTUNE_API_KEY=secret leantune serve runs/RUN --host 0.0.0.0
  leantune serve runs/RUN --draft runs/SMALL --decoding sd --gamma 4   # speculative decoding
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "sort 8213\\n", "max_tokens": 8, "temperature": 0}'
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible API, with a chat page",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", metavar="RUN|MODEL_DIR", help="run directory, checkpoint directory or HF model directory"
    )
    p.add_argument(
        "--adapter",
        metavar="RUN",
        help="a peft adapter (a run, checkpoint or adapter directory) to load onto RUN|MODEL_DIR",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on the /v1 routes (default: $LEANTUNE_API_KEY, else none)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--model-name", help="the model id clients see (default: the run's or directory's name)")
    p.add_argument(
        "--max-tokens-limit", type=int, default=2048, help="most new tokens one choice may ask for"
    )
    p.add_argument("--max-n", type=int, default=8, help="most choices (n x prompts) one request may ask for")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (else 413)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modelling code")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_speculative_options(p)
    p.set_defaults(func=run)


def _step_of(model_dir: Path) -> int | None:
    """The training step a run's final model or checkpoint was written at (its manifest says)."""
    for manifest in (model_dir / "manifest.json", model_dir.parent / "manifest.json"):
        try:
            step = json.loads(manifest.read_text())["meta"]["step"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int):
            return step
    return None


def _load(args: argparse.Namespace, device: Any) -> tuple[Any, Any, str, dict[str, Any]]:
    """Model, tokenizer, model name and info for the engine."""
    import torch

    from leantune.inference import load_for_inference, resolve_model_dir

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    loaded = load_for_inference(
        args.model, device=device, dtype=dtype, trust_remote_code=args.trust_remote_code
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    source_dir, source_run = loaded.model_dir, loaded.run_dir
    info: dict[str, Any] = {}
    if args.adapter:
        from leantune.adapters import ADAPTER_WEIGHTS, is_adapter_dir

        adapter_dir, adapter_run = resolve_model_dir(args.adapter)
        if not is_adapter_dir(adapter_dir):
            raise ValueError(
                f"--adapter {args.adapter}: {adapter_dir} holds no peft adapter (adapter_config.json)"
            )
        if not (adapter_dir / ADAPTER_WEIGHTS).is_file():  # peft would fall back to a pickled .bin
            raise ValueError(f"--adapter {args.adapter}: no {ADAPTER_WEIGHTS} in {adapter_dir}")
        if is_adapter_dir(loaded.model_dir):
            raise ValueError(f"{args.model} is itself an adapter run: give its base model with --adapter")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).to(device)
        model.eval()
        if (adapter_dir / "tokenizer_config.json").is_file():  # the tokenizer the adapter trained with
            from leantune.data import load_tokenizer

            tokenizer = load_tokenizer(adapter_dir, trust_remote_code=args.trust_remote_code)
        info["base"] = str(loaded.model_dir)
        source_dir, source_run = adapter_dir, adapter_run
    name = args.model_name or (source_run.name if source_run is not None else source_dir.name)
    info["path"] = str(source_dir)
    step = _step_of(source_dir)
    if step is not None:
        info["step"] = step
    return model, tokenizer, name, info


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        print(
            f"leantune serve needs FastAPI and uvicorn ({err.name} is not installed): "
            "pip install 'leantune[serve]'",
            file=sys.stderr,
        )
        return 2
    from leantune.inference import resolve_device
    from leantune.serve.app import create_app
    from leantune.serve.engine import Engine

    api_key = args.api_key or os.environ.get("LEANTUNE_API_KEY") or None
    for flag, value in (
        ("--max-tokens-limit", args.max_tokens_limit),
        ("--max-n", args.max_n),
        ("--max-body", args.max_body),
    ):
        if value < 1:
            print(f"leantune serve: {flag} must be >= 1", file=sys.stderr)
            return 2
    if not 0 <= args.port < 65536:
        print(f"leantune serve: --port {args.port} is not a port", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
        model, tokenizer, name, info = _load(args, device)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"leantune serve: {err}", file=sys.stderr)
        return 2
    spec = _speculative(args, model, tokenizer)
    if isinstance(spec, int):
        return spec
    engine = Engine(
        model,
        tokenizer,
        name,
        device=device,
        max_tokens_limit=args.max_tokens_limit,
        max_n=args.max_n,
        info=info,
        speculative=spec,
    )
    app = create_app(engine, api_key=api_key, max_body_bytes=args.max_body)
    if not _is_loopback(args.host) and api_key is None:
        print(
            f"leantune serve: warning: listening on {args.host} without an API key: anyone who can reach "
            "this port can use the model (set --api-key or LEANTUNE_API_KEY)",
            file=sys.stderr,
        )
    where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    drafted = f", {spec.method} with draft {spec.label} (gamma {spec.gamma})" if spec is not None else ""
    print(
        f"serving {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {device}"
        f"{drafted}) at {where}/  (OpenAI API: {where}/v1{', API key required' if api_key else ''})",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _speculative(args: argparse.Namespace, model: Any, tokenizer: Any) -> Any:
    """The engine's :class:`~leantune.serve.engine.Speculative` for ``--draft``, None (plain decoding,
    also for ``--decoding ar``), or an exit code (2) after a message: the draft is loaded and
    checked against the model's tokenizer and vocabulary as ``leantune generate`` does."""
    from types import SimpleNamespace

    from leantune.serve.engine import Speculative

    if args.draft and _prefix_tuning(model):
        print("leantune serve: --draft does not work with a prefix-tuning adapter", file=sys.stderr)
        return 2
    spec = load_draft(args, SimpleNamespace(model=model, tokenizer=tokenizer), "leantune serve")
    if isinstance(spec, int):
        return spec
    draft, method, gamma = spec
    if method == "ar":
        return None
    on_stats = None
    if args.spec_stats:

        def on_stats(stats: dict[str, Any]) -> None:
            tokens, fwd = stats["tokens"], max(stats["target_forwards"], 1)
            print(
                f"{stats['decoding']}: {tokens} tokens in {stats['seconds']:.2f} s "
                f"({tokens / max(stats['seconds'], 1e-9):.1f} tokens/s), {tokens / fwd:.2f} tokens per "
                f"target forward, {stats['draft_forwards']} draft forwards, time to first token "
                f"{1e3 * (stats['ttft_s'] or 0):.1f} ms",
                file=sys.stderr,
                flush=True,
            )

    return Speculative(draft, method, gamma, label=args.draft, on_stats=on_stats)


def _prefix_tuning(model: Any) -> bool:
    peft_type = getattr(getattr(model, "active_peft_config", None), "peft_type", None)
    return str(getattr(peft_type, "value", peft_type)) == "PREFIX_TUNING"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
