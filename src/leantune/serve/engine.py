"""The generation engine behind ``leantune serve``: one model, one request at a time.

The engine knows nothing about HTTP: it turns chat messages or prompts into token ids, checks that a
request fits (context, limits), and decodes token by token with a KV cache, calling back with each
new piece of text. The web layer (:mod:`leantune.serve.app`) runs :meth:`Engine.run` in a worker
thread.

With a draft model (:class:`Speculative`) it decodes with :mod:`leantune.speculative` instead (standard
speculative decoding or DuoDecoding, both lossless): each round commits one or more tokens, which go
through the same eos / stop-string / streaming logic as the plain loop's tokens (:class:`_Text`).

It is built from a live ``model`` + ``tokenizer`` (not a path) so that it can also serve a model
that is being trained: whoever owns the model holds :attr:`Engine.lock` while it changes the weights
(an optimizer step), and generation, which takes the same lock, runs between steps. :meth:`Engine.run`
restores the model's train/eval mode afterwards.

Sampling uses a ``torch.Generator`` of its own per request (seeded by the request's ``seed``), never
the global RNG, so that a request neither depends on nor disturbs the RNG state of anything else
(e.g. a training run's data order or dropout).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Choice",
    "Engine",
    "Job",
    "JobResult",
    "RequestError",
    "SamplingParams",
    "Speculative",
    "held_back",
]

# finish_reason values, as in the OpenAI API; "cancelled" never reaches a client (it went away).
STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"


class RequestError(ValueError):
    """A request that cannot be served as asked: becomes a 4xx with an OpenAI-style error body."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


@dataclass
class SamplingParams:
    """How to continue a prompt. ``temperature == 0`` is greedy decoding (``top_p`` then unused);
    ``max_tokens=None`` means as many as the context and the server's limit allow."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1


@dataclass
class Speculative:
    """Decode every request with a draft model (``leantune serve --draft``, docs/speculative.md).

    The output is the plain loop's: greedy token for token, sampling with the same distribution
    (temperature and top-p applied to draft and target alike), though not the same draws for a seed.
    """

    draft: torch.nn.Module
    """A small model with the target's tokenizer (checked by the caller:
    :func:`leantune.speculative.check_compatible`); its device may differ from the target's."""
    method: str = "duo"
    """``sd`` (standard speculative decoding) or ``duo`` (DuoDecoding)."""
    gamma: int = 5
    """Draft tokens per round (DuoDecoding: the budget over all its draft sequences)."""
    label: str | None = None
    """What ``/v1/leantune/info`` says the draft is (its path)."""
    on_stats: Callable[[dict[str, Any]], None] | None = None
    """Called after each choice with its statistics (``leantune serve --spec-stats`` prints them)."""

    def __post_init__(self) -> None:
        if self.method not in ("sd", "duo"):
            raise ValueError(f"Speculative.method must be 'sd' or 'duo', got {self.method!r}")
        if self.gamma < 1:
            raise ValueError(f"Speculative.gamma must be >= 1, got {self.gamma}")


@dataclass
class Job:
    """A checked request: the prompts (token ids) and the resolved number of new tokens for each."""

    prompts: list[list[int]]
    params: SamplingParams
    max_tokens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass
class Choice:
    """One continuation. ``completion_tokens`` counts every token the model produced for it (an eos
    or the tokens of a stop string included), which is what the request cost."""

    index: int
    text: str
    finish_reason: str
    completion_tokens: int


@dataclass
class JobResult:
    choices: list[Choice]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


# on_delta(choice_index, new_text, finish_reason_or_None): called from the generating thread.
DeltaCallback = Callable[[int, str, "str | None"], None]


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` a stream must hold back: the longest suffix that
    is the start of a stop string (the next token may complete it, and the client must never see a
    stop string), and a trailing U+FFFD (a multi-byte character whose remaining bytes are still to
    come, for byte-level tokenizers)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


def _first_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


class _Ended(Exception):  # noqa: N818  (a signal, not an error)
    """Raised from a speculative loop's ``on_round`` to end the choice (eos, stop string, cancel)."""


class _Text:
    """One choice's tokens and text as they arrive, from either decoding loop: an eos token or a stop
    string ends it (:meth:`push`), :meth:`flush` passes on the text that is safe to show (no part of
    a stop string, no half character), :meth:`close` makes the :class:`Choice`."""

    def __init__(self, index: int, engine: Engine, stops: list[str], on_delta: DeltaCallback | None):
        self.index = index
        self.tokenizer = engine.tokenizer
        self.eos_ids = engine.eos_ids
        self.stops = stops
        self.on_delta = on_delta
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of the text already passed to on_delta
        self.finish: str | None = None  # STOP once an eos or a stop string ended it

    def push(self, token: int) -> bool:
        """Add a generated token; True when it ended the choice (then push no more)."""
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish = STOP
            return True
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = _first_stop(self.text, self.stops)
        if cut >= 0:
            self.text, self.finish = self.text[:cut], STOP
            return True
        return False

    def flush(self) -> None:
        if self.on_delta is not None:
            safe = len(self.text) - held_back(self.text, self.stops)
            if safe > self.sent:
                self.on_delta(self.index, self.text[self.sent : safe], None)
                self.sent = safe

    def close(self, cancel: threading.Event) -> Choice:
        """The choice; its finish reason is ``length`` when neither eos nor a stop string ended it
        (``cancelled`` when ``cancel`` is set: then ``on_delta`` hears nothing more)."""
        finish = self.finish or (CANCELLED if cancel.is_set() else LENGTH)
        text = self.text
        if finish != CANCELLED:
            # the full decode of what was kept: eos dropped; at the length limit a held-back stop
            # prefix or an unfinished character is part of the answer after all.
            kept = [t for t in self.tokens if t not in self.eos_ids]
            if finish == LENGTH or (self.tokens and self.tokens[-1] in self.eos_ids):
                text = self.tokenizer.decode(kept, skip_special_tokens=True)
            if self.on_delta is not None:
                if len(text) > self.sent:
                    self.on_delta(self.index, text[self.sent :], None)
                self.on_delta(self.index, "", finish)
        return Choice(self.index, text, finish, len(self.tokens))


class Engine:
    """Serves one model: prepares requests (:meth:`prepare_chat`, :meth:`prepare_completion`) and
    runs them (:meth:`run`) one at a time.

    Args:
        model: a causal LM (``transformers`` model or ``peft`` model) on ``device``.
        tokenizer: its tokenizer (a chat template is needed for chat requests).
        model_name: the id clients see in ``/v1/models`` and in responses.
        device: where the model is (default: the device of its first parameter).
        max_tokens_limit: the most new tokens one choice may ask for.
        max_n: the most choices (``n`` times the number of prompts) one request may ask for.
        max_prompts: the most prompts one completions request may hold.
        info: extra facts for ``/v1/leantune/info`` (e.g. the run and its step).
        lock: the lock generation holds; share it with a training loop to interleave the two.
        status: called by :meth:`info` for facts that change (a live run's step and loss).
        speculative: decode with this draft model (speculative decoding) instead of token by token.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        model_name: str,
        *,
        device: torch.device | None = None,
        max_tokens_limit: int = 2048,
        max_n: int = 8,
        max_prompts: int = 8,
        info: dict[str, Any] | None = None,
        lock: threading.Lock | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        speculative: Speculative | None = None,
    ):
        if max_tokens_limit < 1 or max_n < 1 or max_prompts < 1:
            raise ValueError("max_tokens_limit, max_n and max_prompts must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = device if device is not None else next(model.parameters()).device
        self.max_tokens_limit = max_tokens_limit
        self.max_n = max_n
        self.max_prompts = max_prompts
        self.extra_info = dict(info or {})
        self.lock = lock if lock is not None else threading.Lock()
        self.status = status
        self.created = int(time.time())
        config = getattr(model, "config", None)
        ctx = getattr(config, "max_position_embeddings", None)
        # None: the config does not say (then only max_tokens_limit bounds a request).
        self.context_length: int | None = int(ctx) if ctx else None
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        # Chat models often end a turn with a token of their own (Llama 3's <|eot_id|>), listed in
        # their generation config; the tokenizer's eos alone would let them ramble on.
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            eos.update(int(t) for t in gen_eos)
        self.eos_ids = frozenset(eos)
        # peft's prefix tuning feeds its virtual keys/values as the cache of every forward pass, so
        # a cache of ours would replace them: such models re-read the whole sequence per token.
        peft_type = getattr(getattr(model, "active_peft_config", None), "peft_type", None)
        self.reuse_cache = str(getattr(peft_type, "value", peft_type)) != "PREFIX_TUNING"
        if speculative is not None and not self.reuse_cache:
            raise ValueError("speculative decoding needs the model's KV cache, which prefix tuning replaces")
        self.speculative = speculative
        # what the speculative decoding did so far (info: tokens per target forward)
        self.spec_totals = {"tokens": 0, "rounds": 0, "target_forwards": 0, "draft_forwards": 0}

    @property
    def decoding(self) -> str:
        """``ar`` (one forward per token), ``sd`` or ``duo``."""
        return self.speculative.method if self.speculative is not None else "ar"

    # ------------------------------------------------------------------ requests

    def info(self) -> dict[str, Any]:
        """What ``/v1/leantune/info`` returns."""
        return {
            "model": self.model_name,
            "context_length": self.context_length,
            "max_tokens_limit": self.max_tokens_limit,
            "max_n": self.max_n,
            "device": str(self.device),
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "decoding": self.decoding,
            **({"speculative": self._spec_info()} if self.speculative is not None else {}),
            **self.extra_info,
            **(self.status() if self.status is not None else {}),
        }

    def _spec_info(self) -> dict[str, Any]:
        spec = self.speculative
        assert spec is not None
        totals = dict(self.spec_totals)
        forwards = totals["target_forwards"]
        return {
            "draft": spec.label,
            "draft_device": str(next(spec.draft.parameters()).device),
            "gamma": spec.gamma,
            **totals,
            "tokens_per_target_forward": round(totals["tokens"] / forwards, 3) if forwards else None,
        }

    def prepare_chat(self, messages: list[dict[str, Any]], params: SamplingParams) -> Job:
        """A job for chat ``messages`` (``{"role", "content"}`` dicts) rendered by the tokenizer's
        chat template, as in training (:func:`leantune.data.chat_prompt_ids`)."""
        from leantune.data import chat_prompt_ids

        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(
                f"the tokenizer of {self.model_name} has no chat template: use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        if not messages:
            raise RequestError("messages must not be empty", param="messages")
        try:
            ids = chat_prompt_ids(self.tokenizer, messages)
        except Exception as err:  # a template may refuse a conversation (e.g. roles out of order)
            raise RequestError(f"the chat template refused these messages: {err}", param="messages") from None
        return self._job([ids], params, "messages")

    def prepare_completion(self, prompt: str | list[str] | list[int], params: SamplingParams) -> Job:
        """A job for a raw prompt: a string, a list of strings (one prompt each) or token ids. Strings
        are tokenized as ``leantune generate`` does (the tokenizer's special tokens, e.g. bos, added)."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            vocab = len(self.tokenizer)
            if any(not 0 <= p < vocab for p in prompt):  # type: ignore[operator]
                raise RequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
            return self._job([list(prompt)], params, "prompt")  # type: ignore[arg-type]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise RequestError("prompt must not be empty", param="prompt")
        if len(prompts) > self.max_prompts:
            raise RequestError(
                f"{len(prompts)} prompts in one request; this server takes at most {self.max_prompts}",
                param="prompt",
            )
        ids = [list(self.tokenizer(p)["input_ids"]) for p in prompts]
        return self._job(ids, params, "prompt")

    def _job(self, prompts: list[list[int]], params: SamplingParams, what: str) -> Job:
        if params.temperature < 0:
            raise RequestError("temperature must be >= 0", param="temperature")
        if not 0 < params.top_p <= 1:
            raise RequestError("top_p must be in (0, 1]", param="top_p")
        if params.n < 1:
            raise RequestError("n must be >= 1", param="n")
        if params.n * len(prompts) > self.max_n:
            raise RequestError(
                f"{params.n * len(prompts)} choices asked for (n={params.n} x {len(prompts)} prompts); "
                f"this server makes at most {self.max_n} per request",
                param="n",
            )
        if params.seed is not None and not -(2**63) <= params.seed < 2**64:  # what torch takes
            raise RequestError("seed must fit in 64 bits", param="seed")
        if any(not s for s in params.stop):
            raise RequestError("stop strings must not be empty", param="stop")
        if params.max_tokens is not None:
            if params.max_tokens < 1:
                raise RequestError("max_tokens must be >= 1", param="max_tokens")
            if params.max_tokens > self.max_tokens_limit:
                raise RequestError(
                    f"max_tokens={params.max_tokens} is over this server's limit of "
                    f"{self.max_tokens_limit} (leantune serve --max-tokens-limit)",
                    param="max_tokens",
                )
        budgets = []
        for ids in prompts:
            if not ids:
                raise RequestError(f"the {what} encode to no tokens at all", param=what)
            room = self.max_tokens_limit
            if self.context_length is not None:
                if len(ids) >= self.context_length:
                    raise RequestError(
                        f"the prompt has {len(ids)} tokens; this model's context is {self.context_length} "
                        "tokens, which must hold the prompt and at least one new token",
                        param=what,
                        code="context_length_exceeded",
                    )
                room = min(room, self.context_length - len(ids))
                if params.max_tokens is not None and len(ids) + params.max_tokens > self.context_length:
                    raise RequestError(
                        f"the prompt ({len(ids)} tokens) plus max_tokens={params.max_tokens} is over this "
                        f"model's context of {self.context_length} tokens; ask for at most {room}",
                        param="max_tokens",
                        code="context_length_exceeded",
                    )
            budgets.append(params.max_tokens if params.max_tokens is not None else room)
        return Job(prompts, params, budgets)

    # ------------------------------------------------------------------ generation

    def run(
        self,
        job: Job,
        *,
        on_delta: DeltaCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> JobResult:
        """Generate every choice of ``job`` (``n`` per prompt, one after the other), holding
        :attr:`lock`. ``on_delta`` gets the text as it grows (stop strings never in it) and, last,
        each choice's finish reason; ``cancel`` set stops the job before the next token (with a
        draft: before the next round).

        Raises:
            leantune.speculative.DraftError: the draft model failed; the job ends, the engine stays
                usable.
        """
        cancel = cancel if cancel is not None else threading.Event()
        # the speculative loops sample on the CPU (their probabilities live there)
        generator = torch.Generator(device="cpu" if self.speculative is not None else self.device)
        if job.params.seed is not None:
            generator.manual_seed(job.params.seed)
        else:
            generator.seed()
        choices: list[Choice] = []
        models = [self.model] + ([self.speculative.draft] if self.speculative is not None else [])
        with self.lock:
            was_training = [m.training for m in models]
            for m in models:
                m.eval()
            try:
                for p, (ids, budget) in enumerate(zip(job.prompts, job.max_tokens)):
                    for k in range(job.params.n):
                        if cancel.is_set():
                            return JobResult(choices, job.prompt_tokens)
                        index = p * job.params.n + k
                        choices.append(
                            self._choice(index, ids, budget, job.params, generator, on_delta, cancel)
                        )
            finally:
                for m, was in zip(models, was_training):
                    m.train(was)
        return JobResult(choices, job.prompt_tokens)

    def _choice(
        self,
        index: int,
        prompt: list[int],
        budget: int,
        params: SamplingParams,
        generator: torch.Generator,
        on_delta: DeltaCallback | None,
        cancel: threading.Event,
    ) -> Choice:
        """One continuation of ``prompt``, token by token or with the draft."""
        text = _Text(index, self, params.stop, on_delta)
        if self.speculative is not None:
            self._speculative(text, prompt, budget, params, generator, cancel)
        else:
            for token in self._tokens(prompt, budget, params, generator, cancel):
                if text.push(token):
                    break
                text.flush()
        return text.close(cancel)

    def _speculative(
        self,
        text: _Text,
        prompt: list[int],
        budget: int,
        params: SamplingParams,
        generator: torch.Generator,
        cancel: threading.Event,
    ) -> None:
        """One choice with the draft: the speculative loop of :mod:`leantune.speculative` commits
        tokens round by round; ``on_round`` passes them to ``text`` and ends the loop (by raising
        :class:`_Ended`) at eos, a stop string or ``cancel``."""
        from leantune.speculative import generate
        from leantune.speculative.sampling import Sampling

        spec = self.speculative
        assert spec is not None
        sampling = Sampling(True, params.temperature, params.top_p) if params.temperature > 0 else Sampling()
        rounds, first = 0, None
        runners: list[Any] = []

        def on_round(seq: list[int], tail: list[int], target: Any, draft: Any) -> None:
            nonlocal rounds, first
            rounds += 1
            first = first if first is not None else time.perf_counter() - t0
            runners[:] = [target, draft]
            # a round may commit past the budget: the loop cuts its own result there, and so do we
            for token in seq[len(prompt) + len(text.tokens) : len(prompt) + budget]:
                if text.push(token):
                    raise _Ended
            text.flush()
            if cancel.is_set():
                raise _Ended

        t0 = time.perf_counter()
        try:
            # eos_id=None: eos (every id in eos_ids, not only the tokenizer's) ends it in on_round
            generate(
                spec.method,
                self.model,
                spec.draft,
                list(prompt),
                max_new_tokens=budget,
                gamma=spec.gamma,
                sampling=sampling,
                eos_id=None,
                generator=generator,
                on_round=on_round,
            )
        except _Ended:
            pass
        finally:
            stats = {
                "decoding": spec.method,
                "gamma": spec.gamma,
                "tokens": len(text.tokens),
                "rounds": rounds,
                "target_forwards": runners[0].forwards if runners else 0,
                "draft_forwards": runners[1].forwards if runners else 0,
                "seconds": time.perf_counter() - t0,
                "ttft_s": first,
            }
            for key in self.spec_totals:
                self.spec_totals[key] += stats[key]
            if spec.on_stats is not None:
                spec.on_stats(stats)

    @torch.inference_mode()
    def _tokens(
        self,
        prompt: list[int],
        budget: int,
        params: SamplingParams,
        generator: torch.Generator,
        cancel: threading.Event,
    ) -> Iterator[int]:
        """Up to ``budget`` new token ids after ``prompt``: one forward pass over the prompt, then
        one per token on the KV cache (the ``transformers`` cache object the model returns)."""
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        # logits_to_keep=1: the prompt's last position is the only one sampled from, and the full
        # (prompt x vocab) logits of a long prompt would cost more memory than the cache
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        for i in range(budget):
            if cancel.is_set():
                return
            token = self._pick(out.logits[0, -1], params, generator)
            yield token
            if i + 1 == budget or token in self.eos_ids:
                return
            if self.reuse_cache:
                step = torch.tensor([[token]], dtype=torch.long, device=self.device)
                out = self.model(input_ids=step, cache=out.cache, use_cache=True)
            else:
                ids = torch.cat([ids, torch.tensor([[token]], dtype=torch.long, device=self.device)], dim=1)
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)

    @staticmethod
    def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
        """Greedy at temperature 0 (what ``model.generate`` does without sampling); else sample from
        the temperature-scaled distribution cut to its top-p nucleus."""
        if params.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            # drop a token when the tokens before it already hold top_p (the first always stays)
            drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= params.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            pick = torch.multinomial(sorted_p, 1, generator=generator)
            return int(order[pick])
        return int(torch.multinomial(probs, 1, generator=generator))
