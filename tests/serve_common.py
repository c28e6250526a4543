"""Helpers of the ``leantune serve`` tests: a tiny random model directory and an in-process server.

The server runs uvicorn in a thread of the test process on a socket bound beforehand to a free
loopback port (no race for the port), so tests can reach into the engine (count jobs, slow it down)
while talking HTTP to it like any client.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def tiny_model_dir(root: Path, seed: int = 0) -> Path:
    """A random ``test``-preset LLaMA (context 256) with the built-in byte tokenizer, saved in HF
    format as a run's ``final/`` would be."""
    from leantune.data import load_tokenizer
    from leantune.models import build_model

    tok = load_tokenizer(None)
    model = build_model(preset="test", vocab_size=len(tok), seed=seed)
    out = root / "tiny"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) in a thread; yields the base URL, stops it after."""
    uvicorn = pytest.importorskip("uvicorn")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
