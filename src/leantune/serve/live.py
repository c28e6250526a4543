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
ranks wait for it at the next step's gradient all-reduce.

Under ``dist.strategy=fsdp`` on more than one rank each rank holds a shard of every weight, so a
forward pass is collective (every layer's all-gather needs every rank, in the same order), and the
generation is too (:class:`CollectiveEngine`):

* rank 0 runs the server; its worker thread does not generate but queues the request and waits;
* at the end of every step (:meth:`LiveServer.on_step_end`, in the training thread of every rank)
  rank 0 broadcasts one int: whether it has a request. That is the whole cost of a step without
  requests. With one, it broadcasts the request (prompt ids, sampling settings, a seed it drew if the
  client gave none, max tokens) and all ranks run the engine's decode loop on the same inputs
  through the sharded model, so their all-gathers match;
* per token, rank 0 broadcasts its sampled token and whether to stop (the client went away): every
  rank continues with rank 0's token, so a tie broken differently on another rank cannot make the
  ranks diverge, and all stop at the same token (eos, a stop string and the length limit follow from
  the tokens, a disconnect from the flag). Only rank 0 streams to the client;
* the generation runs between the optimizer step and the next step's forward (also after the last
  step, on the final weights), in inference mode and eval mode like any other, so the training is
  unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

from leantune.commands.serve import _is_loopback
from leantune.config import ConfigError, ServeConfig
from leantune.serve.engine import Engine, Job, JobResult, RequestError
from leantune.trainer import TrainerHook

if TYPE_CHECKING:
    from leantune.trainer import StepResult, Trainer

__all__ = ["CollectiveEngine", "LiveServer", "StepLock", "bind", "check_port"]


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


class _Request:
    """A request rank 0's server thread hands to the training thread, and its outcome."""

    def __init__(self, job: Job, on_delta: Any, cancel: threading.Event):
        self.job = job
        self.on_delta = on_delta
        self.cancel = cancel
        self.done = threading.Event()
        self.result: JobResult | None = None
        self.error: BaseException | None = None

    def finish(self, result: JobResult | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class _Agreed:
    """The ``cancel`` an engine checks before each token, made collective: its value is what rank 0
    decided at the last token (set by :meth:`CollectiveEngine._pick`), the same on every rank."""

    def __init__(self) -> None:
        self.stopped = False

    def is_set(self) -> bool:
        return self.stopped

    def set(self) -> None:  # the engine never sets it; a local decision would split the ranks
        raise RuntimeError("a collective generation stops by rank 0's decision only")


class CollectiveEngine(Engine):
    """An :class:`~leantune.serve.engine.Engine` on a model sharded over ranks (FSDP2): every rank
    generates together, in its training thread, what rank 0's server asked for.

    On rank 0, :meth:`run` (called by the server's worker thread) only queues the job and waits.
    Every rank calls :meth:`serve_pending` at the same point of its training loop; it generates the
    job rank 0 had queued (if any) on every rank, with rank 0's token and stop decision at each step
    of the decode loop (:meth:`_pick`). Takes the arguments of :class:`Engine` plus:

    Args:
        rank: this process's rank in the default process group.
        comm_device: where the collectives' tensors live (the trainer's device: CUDA for NCCL).
    """

    def __init__(self, *args: Any, rank: int, comm_device: torch.device, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "speculative", None) is not None:
            # its loop commits several tokens per round, past the per-token agreement of _pick
            raise ValueError("a collective generation decodes token by token: no speculative decoding")
        self.rank = rank
        self.comm_device = comm_device
        self._queue: deque[_Request] = deque()
        self._queue_lock = threading.Lock()
        self._closed: str | None = None  # why no request is taken any more
        self._agreed: _Agreed | None = None  # set during a collective generation
        self._stop_local = threading.Event()  # rank 0: an on_delta failed, stop at the next token
        self._client_cancel: threading.Event | None = None  # rank 0: the client went away
        self.served: list[dict[str, Any]] = []  # per job: steps, tokens, finish reasons (every rank)

    # ------------------------------------------------------------------ rank 0, server thread

    def run(self, job: Job, *, on_delta: Any = None, cancel: threading.Event | None = None) -> JobResult:
        """Queue ``job`` for the next collective generation and wait for it (rank 0's server worker).

        Raises:
            RequestError: (503) the run has ended, or ends before the job's turn.
        """
        req = _Request(job, on_delta, cancel if cancel is not None else threading.Event())
        with self._queue_lock:
            if self._closed is not None:
                raise RequestError(self._closed, status=503, code="training_ended")
            self._queue.append(req)
        req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def pending(self) -> int:
        """Requests queued on this rank (rank 0), waiting for the next step's end."""
        with self._queue_lock:
            return len(self._queue)

    def close(self, why: str) -> None:
        """Take no more requests; the queued ones get a 503 saying ``why``."""
        with self._queue_lock:
            self._closed = why
            left = list(self._queue)
            self._queue.clear()
        for req in left:
            req.finish(error=RequestError(why, status=503, code="training_ended"))

    def _next(self) -> _Request | None:
        """Rank 0: the first queued request whose client is still there (the others end empty)."""
        while True:
            with self._queue_lock:
                if not self._queue:
                    return None
                req = self._queue.popleft()
            if not req.cancel.is_set():
                return req
            req.finish(JobResult([], req.job.prompt_tokens))

    # ------------------------------------------------------------------ every rank, training thread

    def serve_pending(self, step: int) -> bool:
        """Generate rank 0's next queued job on every rank (a collective: all ranks call it at the
        same point). Costs one broadcast of one int when nothing is queued. Returns whether a job
        was generated."""
        req = self._next() if self.rank == 0 else None
        try:
            return self._serve(req, step)
        except BaseException as err:
            if req is not None:  # its client gets a 500, not an endless wait
                req.finish(error=err)
            raise
        finally:
            self._agreed = self._client_cancel = None

    def _serve(self, req: _Request | None, step: int) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([0 if req is None else 1], dtype=torch.long, device=self.comm_device)
        dist.broadcast(flag, src=0)
        if not int(flag.item()):
            return False
        box: list[Any] = [None]
        if req is not None:
            params = req.job.params
            if params.seed is None:  # one draw for all ranks (the engine would seed each from its OS)
                params = dataclasses.replace(params, seed=secrets.randbits(63))
            box[0] = Job(req.job.prompts, params, req.job.max_tokens)
        dist.broadcast_object_list(box, src=0)  # pickled: ids, SamplingParams, budgets
        job: Job = box[0]
        self._agreed = _Agreed()
        self._stop_local.clear()
        self._client_cancel = req.cancel if req is not None else None
        on_delta = self._guarded(req) if req is not None else None
        result = super().run(job, on_delta=on_delta, cancel=self._agreed)  # type: ignore[arg-type]
        self.served.append(
            {
                "step": step,
                "finish": [c.finish_reason for c in result.choices],
                "completion_tokens": [c.completion_tokens for c in result.choices],
            }
        )
        if req is not None:
            req.finish(result)
        return True

    def _guarded(self, req: _Request) -> Any:
        """Rank 0's ``on_delta``: a client callback that fails (the server is stopping) must not
        leave the other ranks waiting for a token; it ends the generation at the next token."""
        if req.on_delta is None:
            return None

        def on_delta(index: int, text: str, finish: str | None) -> None:
            try:
                req.on_delta(index, text, finish)
            except Exception:
                self._stop_local.set()

        return on_delta

    def _pick(self, logits: torch.Tensor, params: Any, generator: torch.Generator) -> int:  # type: ignore[override]
        """The engine's pick (it calls ``self._pick`` once per token), then agreement: rank 0
        broadcasts its token and whether to stop; every rank goes on with those."""
        token = Engine._pick(logits, params, generator)
        agreed = self._agreed
        if agreed is None:  # not inside serve_pending
            return token
        import torch.distributed as dist

        stop = 0
        if self.rank == 0:
            cancel = self._client_cancel
            stop = int(self._stop_local.is_set() or (cancel is not None and cancel.is_set()))
        t = torch.tensor([token, stop], dtype=torch.long, device=self.comm_device)
        dist.broadcast(t, src=0)
        token, stop = (int(v) for v in t.tolist())
        # the engine checks cancel before the next token: every rank then returns at the same one
        agreed.stopped = agreed.stopped or bool(stop)
        return token


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
        self.collective = False  # fsdp on several ranks: every rank generates (CollectiveEngine)
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
        # sharded weights: every rank takes part in each generation (CollectiveEngine)
        self.collective = trainer.world_size > 1 and trainer.cfg.dist.strategy == "fsdp"
        self.trainer = trainer
        run_dir = trainer.run_dir
        name = self.model_name or (run_dir.name if run_dir is not None else "leantune")
        engine_args = (trainer.model, trainer.tokenizer, name)
        engine_kwargs: dict[str, Any] = {
            "device": trainer.device,
            "max_tokens_limit": self.max_tokens_limit,
            "info": {"path": str(run_dir) if run_dir is not None else None},
            "status": self.status,
        }
        if not trainer.is_main:
            if self.sock is not None:  # $RANK said 0 but the process group says otherwise
                self.sock.close()
                self.sock = None
            if self.collective:  # no server, but the same decode loop as rank 0's
                self.engine = CollectiveEngine(
                    *engine_args, rank=trainer.rank, comm_device=trainer.device, **engine_kwargs
                )
            return
        import uvicorn

        from leantune.serve.app import create_app

        if self.sock is None:
            self.sock = bind(self.cfg.host, self.cfg.port or 0)
            self.port = self.sock.getsockname()[1]
        self.training = True
        if self.collective:
            # generation runs in the training thread of every rank (on_step_end): no lock to share
            self.engine = CollectiveEngine(
                *engine_args, rank=trainer.rank, comm_device=trainer.device, **engine_kwargs
            )
        else:
            # acquire/release/context manager, like a Lock
            self.engine = Engine(*engine_args, lock=self.lock, **engine_kwargs)  # type: ignore[arg-type]
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
        how = (
            f"generated by all {trainer.world_size} fsdp ranks together at the end of a step"
            if self.collective
            else "between steps"
        )
        trainer.monitor.print(
            f"chat with the model as it trains: {self.url}/  (OpenAI API: {self.url}/v1{key}; "
            f"answers come from the weights of the latest step, {how})"
        )
        if not _is_loopback(self.cfg.host) and self.api_key is None:
            trainer.monitor.print(
                f"warning: serving on {self.cfg.host} without an API key: anyone who can reach this "
                "port can use the model (set LEANTUNE_API_KEY or serve.api_key)"
            )

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        if self.engine is None or self.held or self.collective:
            return
        # let the requests that waited during the last step (or the evaluation) go first
        self.lock.yield_to_waiting()
        self.lock.acquire()
        self.held = True

    def on_step_end(self, trainer: Trainer, step: int, result: StepResult) -> None:
        self.loss = float(result.loss) if math.isfinite(result.loss) else None  # JSON has no NaN
        if isinstance(self.engine, CollectiveEngine):
            # Every rank, same point of the loop: after the optimizer step, before the evaluation,
            # save or next forward (the last step too: the final weights answer). The generation
            # runs in this thread, so it cannot overlap training; no lock is needed.
            try:
                self.engine.serve_pending(step)
            except Exception as err:  # raised on every rank alike (same job, same tokens)
                trainer.monitor.print(f"serve.port: a generation failed at step {step}: {err!r}")
            return
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
        if isinstance(self.engine, CollectiveEngine):
            self.engine.close("the training run has ended; its server stops")
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
