"""Chat with a model while it trains: ``leantune train ... serve.port=8000``.

:class:`LiveServer` is a :class:`~leantune.trainer.TrainerHook` that runs the app of ``leantune
serve`` (uvicorn, in a daemon thread) on the trainer's own model and tokenizer. Every request is
answered with the weights of the latest finished optimizer step: the hook holds the engine's lock
for the duration of each step (from :meth:`~LiveServer.on_step_start` to
:meth:`~LiveServer.on_step_end`), and :meth:`leantune.serve.engine.Engine.run` takes the same lock,
so a generation never overlaps a step. It also holds the lock through an evaluation (which switches
the model between eval and train mode itself) and from the last step to the end of the run.

Serving must not change the training; the final weights of a run with requests are bitwise those of
a run without. What makes that so:

* generation runs under ``torch.inference_mode`` on the model in eval mode and restores its
  train/eval mode afterwards: no graph, so fused optimizers (AdaLomo, LOMO, ``*_in_backward``),
  whose updates hang on gradient hooks, never fire, and no dropout;
* sampling draws from a ``torch.Generator`` of its own per request, never the global RNG (which
  the data order and dropout of the run use);
* nothing else of the model is touched (gradient checkpointing stays as it is: transformers
  checkpoints in train mode only).

Under ``dist.strategy=ddp`` rank 0 serves its replica (the same weights as every rank's after a
step); the other ranks start no server. A generation between steps delays rank 0 only, and the other
ranks wait for it at the next step's gradient all-reduce. ``dist.strategy=fsdp`` on more than one
rank is refused: each rank holds a shard of every weight, so one forward pass needs all of them.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from leantune.commands.serve import _is_loopback
from leantune.config import ConfigError, ServeConfig
from leantune.trainer import TrainerHook

if TYPE_CHECKING:
    from leantune.serve.engine import Engine
    from leantune.trainer import StepResult, Trainer

__all__ = ["LiveServer", "StepLock", "bind", "check_port"]


class StepLock:
    """The lock a training loop and the engine share, handed over fairly.

    A plain ``threading.Lock`` released at the end of a step is, almost always, taken again by the
    training thread at the start of the next one before a waiting generation thread even wakes up,
    so requests would starve. Here the training side first waits (:meth:`yield_to_waiting`) until
    every thread that was already waiting has had its turn."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self.waiting = 0  # threads blocked in acquire()

    def acquire(self) -> bool:
        with self._cond:
            self.waiting += 1
        try:
            return self._lock.acquire()
        finally:
            with self._cond:
                self.waiting -= 1
                self._cond.notify_all()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> StepLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def yield_to_waiting(self, timeout: float = 60.0) -> None:
        """Return once no thread waits for the lock any more (each one took it; call this while not
        holding it). ``timeout`` bounds the wait should a waiter never get there."""
        with self._cond:
            self._cond.wait_for(lambda: self.waiting == 0, timeout=timeout)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``port`` 0: a free one), bound now so that a port in use
    is an error before training starts, not after setup.

    Raises:
        ConfigError: the address cannot be bound (in use, not an address of this machine, ...).
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    # a port left in TIME_WAIT by an earlier server is free; one another server listens on is not
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        why = err.strerror or str(err)
        hint = (
            ": another process listens there (another `leantune serve` or live run?); choose another "
            "serve.port, or serve.port=0 for any free one"
            if err.errno in (98, 48)  # EADDRINUSE on Linux, macOS
            else ""
        )
        raise ConfigError(f"serve.port={port}: cannot listen on {host}:{port}: {why}{hint}") from None
    return sock


def check_port(host: str, port: int) -> None:
    """Raise :class:`ConfigError` now if ``host:port`` cannot be bound (the launcher's check before
    it starts the worker processes, one of which binds it for good)."""
    bind(host, port).close()


def _rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


class LiveServer(TrainerHook):
    """Serve the trainer's model over the OpenAI API of ``leantune serve`` while it trains.

    Args:
        cfg: the ``serve:`` section (``port`` must be set).
        rank: this process's rank (default: ``$RANK``, else 0); only rank 0 binds and serves.
        model_name: the id clients see (default: the run directory's name).
        max_tokens_limit: the most new tokens one choice may ask for.

    Raises:
        ConfigError: the serve extra is not installed, or the port cannot be bound.

    Example:
        >>> from leantune.config import load_config
        >>> from leantune.trainer import Trainer
        >>> cfg = load_config(None, ["serve.port=8000"])
        >>> Trainer(cfg, hooks=[LiveServer(cfg.serve)]).run()  # chat at http://127.0.0.1:8000/
    """

    def __init__(
        self,
        cfg: ServeConfig,
        *,
        rank: int | None = None,
        model_name: str | None = None,
        max_tokens_limit: int = 2048,
    ) -> None:
        if cfg.port is None:
            raise ValueError("LiveServer needs serve.port")
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                f"serve.port needs FastAPI and uvicorn ({err.name} is not installed): "
                "pip install 'leantune[serve]'"
            ) from None
        self.cfg = cfg
        self.api_key = cfg.api_key or os.environ.get("LEANTUNE_API_KEY") or None
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.rank = _rank_from_env() if rank is None else rank
        self.sock: socket.socket | None = bind(cfg.host, cfg.port) if self.rank == 0 else None
        self.port: int | None = self.sock.getsockname()[1] if self.sock is not None else None
        self.lock = StepLock()
        self.engine: Engine | None = None
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.held = False  # whether the training thread holds the lock now
        self.loss: float | None = None
        self.training = False
        self.trainer: Trainer | None = None

    @property
    def url(self) -> str | None:
        """The server's base URL (None on the ranks that do not serve)."""
        if self.port is None:
            return None
        host = self.cfg.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def status(self) -> dict[str, Any]:
        """The live facts of ``/v1/leantune/info``: the step whose weights answer, the loss of the
        last step, and whether the run is still training."""
        t = self.trainer
        return {
            "training": self.training,
            "step": t.step if t is not None else None,
            "total_steps": getattr(t, "total_steps", None),
            "loss": self.loss,
        }

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.world_size > 1 and trainer.cfg.dist.strategy == "fsdp":
            # a torchrun started by hand can get here with dist.nproc=1, past Config.validate
            raise ConfigError(
                "serve.port does not work with dist.strategy=fsdp on more than one rank: a forward "
                "pass on the sharded weights needs every rank, and they are busy training"
            )
        if not trainer.is_main:
            if self.sock is not None:  # $RANK said 0 but the process group says otherwise
                self.sock.close()
                self.sock = None
            return
        import uvicorn

        from leantune.serve.app import create_app
        from leantune.serve.engine import Engine

        if self.sock is None:
            self.sock = bind(self.cfg.host, self.cfg.port or 0)
            self.port = self.sock.getsockname()[1]
        self.trainer = trainer
        self.training = True
        run_dir = trainer.run_dir
        name = self.model_name or (run_dir.name if run_dir is not None else "leantune")
        self.engine = Engine(
            trainer.model,
            trainer.tokenizer,
            name,
            device=trainer.device,
            max_tokens_limit=self.max_tokens_limit,
            info={"path": str(run_dir) if run_dir is not None else None},
            lock=self.lock,  # type: ignore[arg-type]  # acquire/release/context manager, like a Lock
            status=self.status,
        )
        app = create_app(self.engine, api_key=self.api_key)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        # not the main thread: uvicorn installs no signal handlers, the trainer's SIGINT/SIGTERM
        # handling (save a checkpoint, then stop) stays as it is
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="leantune-serve"
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"serve.port: the server at {self.url} did not start")
            time.sleep(0.01)
        key = ", API key required" if self.api_key else ""
        trainer.monitor.print(
            f"chat with the model as it trains: {self.url}/  (OpenAI API: {self.url}/v1{key}; "
            "answers come from the weights of the latest step, between steps)"
        )
        if not _is_loopback(self.cfg.host) and self.api_key is None:
            trainer.monitor.print(
                f"warning: serving on {self.cfg.host} without an API key: anyone who can reach this "
                "port can use the model (set LEANTUNE_API_KEY or serve.api_key)"
            )

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        if self.engine is None or self.held:
            return
        # let the requests that waited during the last step (or the evaluation) go first
        self.lock.yield_to_waiting()
        self.lock.acquire()
        self.held = True

    def on_step_end(self, trainer: Trainer, step: int, result: StepResult) -> None:
        self.loss = float(result.loss) if math.isfinite(result.loss) else None  # JSON has no NaN
        if self.engine is None or not self.held:
            return
        every = trainer.cfg.eval.every
        # Keep the lock through an evaluation (it sets eval mode and back, which a generation
        # restoring train mode in the middle would undo) and after the last step (the final
        # evaluation, save and export follow; on_train_end releases it).
        if step >= trainer.total_steps or (every and step % every == 0):
            return
        self.lock.release()
        self.held = False

    def on_train_end(self, trainer: Trainer) -> None:
        self.training = False
        if self.held:
            self.held = False
            self.lock.release()
        self.close()

    def close(self) -> None:
        """Stop the server (a generation in flight gets ``timeout_graceful_shutdown`` to end)."""
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
