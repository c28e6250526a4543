"""Typed configuration: dataclasses with documented fields, loaded from YAML and ``key=value``.

Every field has an attribute docstring (shown by ``leantune config``). Loading is strict: an
unknown or misspelt key is an error that suggests the nearest valid key, a value of the wrong
type names the field, and :meth:`Config.validate` checks ranges and incompatible options.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DistConfig",
    "EvalConfig",
    "LogConfig",
    "ModelConfig",
    "OptimConfig",
    "PeftConfig",
    "RlConfig",
    "ServeConfig",
    "TrainConfig",
    "load_config",
    "field_docs",
    "render_config",
]


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type or invalid value."""


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Size preset for a from-scratch model with random init (tiny, test, 0.1b, 0.37b, 0.5b, 1b, 3b,
    7b, 8b, 13b, 70b; see `leantune.models.PRESETS`). Ignored when `path` is set."""
    path: str | None = None
    """Local Hugging Face model directory (config.json + safetensors weights) to fine-tune."""
    tokenizer: str | None = None
    """Tokenizer directory. Default: `path` if set, else the built-in byte-level tokenizer."""
    dtype: str = "fp32"
    """Weight dtype: fp32, bf16 or fp16 (fp16 needs `optim.loss_scale`)."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped with `path` (runs code from that directory)."""
    attn_implementation: str = "auto"
    """Attention kernel: auto (sdpa where the model family supports it, else eager; the choice is
    logged), sdpa or eager. An explicit sdpa for a family without it is an error."""
    gradient_checkpointing: bool = False
    """Activation checkpointing (non-reentrant): recompute each layer in backward to save memory."""
    rope_theta: float | None = None
    """Override the rotary base (context extension), e.g. 500000."""
    rope_scaling: dict[str, Any] | None = None
    """Passed to the model config as `rope_scaling`, e.g. {rope_type: linear, factor: 2.0}."""


@dataclass
class DataConfig:
    train: str | list[str] = "builtin"
    """Training data: `builtin` (generated instruction tasks), a local .jsonl/.json/.parquet file, a
    directory (every such file in it, or a `datasets.save_to_disk` directory), or a list of these
    to mix: [a.jsonl, b.parquet, dir/]."""
    weights: list[float] | None = None
    """Sampling weights of the `train` sources, e.g. [0.7, 0.3] (normalised). Default: every
    sample equally likely (sources in proportion to their size)."""
    streaming: bool | None = None
    """Read JSON-lines training files on the fly instead of loading them: constant memory, a
    shuffle buffer, exact resume. Default (null): for files above 1 GiB."""
    shuffle_buffer: int = 1000
    """Samples in the shuffle buffer when streaming."""
    cache_dir: str | None = None
    """Directory of tokenised datasets: a repeated run, or the other ranks, read the samples
    instead of tokenising again (keyed by the data settings, files and tokenizer)."""
    eval: str | None = None
    """Evaluation data file. Default: generated held-out tasks for `builtin`, else a split of `train`."""
    format: str = "auto"
    """Record format: auto (from the fields), text (`text`), instruction (`prompt`/`response`),
    chat (OpenAI `messages`), alpaca (`instruction`/`input`/`output`), sharegpt (`conversations`)
    or preference (`prompt`/`chosen`/`rejected`). Chat-like formats use the tokenizer's chat
    template; loss is computed on the response / assistant turns only."""
    columns: dict[str, str] = field(default_factory=dict)
    """Field names of your data for the ones a format reads, e.g. {prompt: question, response: answer}."""
    max_length: int = 64
    """Maximum sequence length in tokens."""
    overlong: str = "truncate"
    """What to do with samples longer than `max_length`: truncate or drop (both are counted)."""
    pack: bool | None = None
    """Several samples per sequence. Text: documents concatenated and cut into full `max_length`
    sequences. Instruction and chat formats: padding-free packing, each sample attending only to
    itself (position ids restart per sample), the same loss as unpacked, a batch is
    `train.batch_size` packed sequences. Default (null): text packed, the others not."""
    tasks: list[str] = field(default_factory=lambda: ["add", "reverse", "sort", "count"])
    """Built-in task families: add, reverse, sort, count; opt-in (never in the default mix): recall
    (multi-query associative recall in 64 characters of filler, the long-context task of
    docs/kv-cache.md; set data.max_length >= 72)."""
    task_weights: list[float] | None = None
    """Share of each of `tasks` in the generated training set, e.g. [1, 1, 1, 1] for balanced.
    Default: add 3, reverse 2, sort 2, count 2 (`leantune.data.tasks.TASK_WEIGHTS`: add needs the
    most samples to be learnt in the default job). Evaluation sets are always balanced."""
    num_train: int = 20000
    """Number of generated training examples (builtin)."""
    num_eval: int = 400
    """Number of generated evaluation examples (builtin), or held out from `train` for files."""
    seed: int = 1234
    """Seed of the built-in data generator and of the train/eval split."""


# leantune.data.tasks.TASKS and OPT_IN_TASKS, repeated so that the config imports without torch
# (a unit test keeps them equal)
BUILTIN_TASKS = ("add", "reverse", "sort", "count", "recall", "copy")

# leantune.data.formats.FORMATS and COLUMN_FIELDS, repeated so that the config imports without
# torch (a unit test keeps them equal)
DATA_FORMATS = ("text", "instruction", "chat", "alpaca", "sharegpt", "preference")
DATA_COLUMNS = ("text", "prompt", "response", "messages", "instruction", "input", "output", "system",
                "history", "conversations", "chosen", "rejected", "tools")  # fmt: skip


@dataclass
class OptimConfig:
    name: str = "adalomo"
    """Optimizer (see `leantune.optim.optimizer_names()`): adalomo, lomo, adamw, sgd, adafactor,
    lion, adan, sophia, or `<name>_in_backward` to free gradients early; from other packages
    (`pip install 'leantune[competitors]'`): galore, apollo, adam_mini, badam, adamw8bit, adamw4bit
    (their own options in `kwargs`, e.g. {rank: 128} for galore; dist.strategy=none only)."""
    lr: float = 0.02
    """Peak learning rate. AdaLomo's is relative to each tensor's RMS: 0.02-0.05 from scratch, 1e-3 to
    5e-4 for fine-tuning; AdamW ~3e-4; LOMO 1e-2 .. 3e-2 with clipping."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    clip_grad_norm: float | None = None
    """Global gradient-norm clipping. Exact for fused optimizers, at the cost of a second backward.
    May be switched on when resuming (e.g. to get past loss spikes), as may `clip_grad_value`."""
    clip_grad_value: float | None = None
    """Clamp each gradient element to [-v, v]."""
    loss_scale: str | None = None
    """Loss scaling for fp16 weights: `dynamic` or a number (as a string, e.g. "1024")."""
    rounding: str = "auto"
    """How updates are written to bf16/fp16 weights by fused optimizers: nearest, stochastic or
    kahan. `auto` = stochastic for bf16/fp16 weights (small updates are not rounded away),
    nearest for fp32 (where it makes no difference)."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warmup: constant, linear or cosine."""
    warmup_steps: int = 30
    """Linear warmup from 0 to `lr` over this many optimizer steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` (linear and cosine)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra optimizer keyword arguments, e.g. {betas: [0.9, 0.95]}."""


@dataclass
class TrainConfig:
    max_steps: int = 900
    """Number of optimizer steps (0 = derive from `epochs`)."""
    epochs: float = 0.0
    """Number of passes over the training data when `max_steps` is 0."""
    batch_size: int = 64
    """Micro-batch size (sequences per forward/backward)."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step (gradients averaged)."""
    loss_chunk: int = 256
    """Tokens per chunk of the chunked linear cross-entropy: the head and the loss are computed that
    many tokens at a time, so the full logits (tokens x vocabulary, 2.9 GiB at 2048 tokens of a
    128K vocabulary in fp32) never exist; same loss and gradients (`leantune.loss`). 0 = the family's
    standard loss on full logits. Families whose logits leantune cannot reproduce fall back to the
    standard loss with a warning."""
    fix_mmap_threshold: bool = True
    """`leantune train` fixes glibc's mmap threshold at 1 MiB at start-up, so that freed tensors go
    back to the OS and peak RSS is the live tensors, what `leantune estimate` predicts (glibc's
    adaptive default kept 1.3-1.4x that on a 1B bf16 step). It costs time when training on the
    CPU (1.47x the step time of that step, 0.87x the default job's tokens/s; on a GPU the tensors
    are not malloc's): false = glibc's defaults (docs/memory.md). An `MALLOC_MMAP_THRESHOLD_` you
    set is left alone."""
    seed: int = 0
    """Seed of model initialisation and data order."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    output_dir: str = "runs"
    """Directory that holds run directories."""
    run_name: str | None = None
    """Run directory name under `output_dir` (default: a timestamp)."""
    resume: str | None = None
    """Resume from a run directory, or `auto` for the newest checkpoint of `run_name` (or of the
    most recent run in `output_dir`)."""
    save_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Resumable checkpoints to keep (the newest valid one is never deleted)."""
    max_nonfinite: int = 5
    """Stop the run after this many consecutive steps with a non-finite loss or gradient."""
    hft: bool = False
    """Half Fine-Tuning: per block freeze 2 of q/k/v/o and 1-2 of gate/up/down at random, and the
    input embeddings (head and norms train); see `leantune.hft`. Frozen tensors get no gradient,
    no optimizer state and no fused-optimizer hook."""
    hft_seed: int = 0
    """Seed of the HFT draw (with the stage index, and the epoch under `hft_redraw=epoch`)."""
    hft_redraw: str = "stage"
    """When HFT draws a new mask: stage (once per run; a run from `model.path` of an HFT run is the
    next stage) or epoch (also at each new epoch). A resumed run keeps its saved mask."""
    objective: str = "sft"
    """What is optimised: sft (next-token prediction on the labelled tokens), or a preference loss
    on prompt/chosen/rejected data (`data.format=preference`): dpo, ipo, simpo or orpo (settings in
    the `dpo:` section); or ppo (reinforcement learning from a reward on the model's own
    completions of prompts, settings in the `rl:` section)."""


@dataclass
class EvalConfig:
    every: int = 200
    """Evaluate every N optimizer steps (0 = only at the end)."""
    max_batches: int = 0
    """Cap on evaluation batches for loss/perplexity (0 = the whole eval set)."""
    accuracy_samples: int = 200
    """Examples (with answers) scored by exact match after greedy generation (0 = skip)."""
    max_new_tokens: int = 16
    """Generation budget for exact-match scoring."""


@dataclass
class LogConfig:
    every: int = 10
    """Log metrics every N optimizer steps."""
    progress: bool = True
    """Show a live progress bar (plain log lines when output is not a terminal)."""
    tensorboard: bool = True
    """Write TensorBoard event files to the run directory (`tensorboard --logdir runs`)."""
    plot: bool = True
    """Write `plot.png` (loss, eval, lr, tokens/s) to the run directory at the end."""


@dataclass
class DistConfig:
    strategy: str = "none"
    """none (one process), ddp (replicated weights, gradients averaged in the backward hooks) or
    fsdp (FSDP2 `fully_shard`: weights, gradients and optimizer state sharded)."""
    nproc: int = 1
    """With `leantune train dist.nproc=N`, leantune starts torchrun with N processes for you."""
    tp: int = 1
    """Tensor-parallel degree: each decoder layer's attention heads and MLP features are split over
    this many ranks (the model's own transformers plan, DTensor); the ranks divide into
    world_size / tp data-parallel groups, to which dist.strategy applies. Fused optimizers only."""
    pp: int = 1
    """Pipeline-parallel stages: each rank (or tensor-parallel group, with dist.tp) runs a contiguous
    part of the decoder layers (LLaMA family; torch.distributed.pipelining); more ranks replicate
    the pipeline with dist.strategy=ddp. Fused optimizers."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: 1f1b (needs at least dist.pp micro-batches) or gpipe."""
    pp_microbatches: int = 0
    """Micro-batches per step under dist.pp (they are the gradient accumulation); 0 = dist.pp.
    train.batch_size must be a multiple of it."""
    mixed_precision: str | None = None
    """FSDP2 MixedPrecisionPolicy param dtype (bf16/fp16/fp32), None = weights' dtype."""
    cpu_offload: bool = False
    """FSDP2: keep sharded parameters on the CPU (CUDA only)."""


@dataclass
class PeftConfig:
    method: str = "none"
    """none, lora, ia3, prefix or prompt (through the peft library)."""
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha."""
    dropout: float = 0.0
    """LoRA dropout."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules to adapt, by name (e.g. [q_proj, v_proj]) or [all-linear]."""
    use_dora: bool = False
    """LoRA: weight-decomposed LoRA (DoRA)."""
    use_rslora: bool = False
    """LoRA: rank-stabilised scaling alpha/sqrt(r)."""
    init: str = "auto"
    """LoRA initialisation: default (peft's, B = 0), gaussian (B = 0), orthogonal (B != 0 but BA = 0,
    so the model is unchanged at step 0; needs an even r) or auto = orthogonal with an even r for
    optimizers whose step is relative to the tensor's RMS (adalomo, adafactor: they barely move a
    zero B), else default."""
    num_virtual_tokens: int = 16
    """Prefix / prompt tuning: number of virtual tokens."""


@dataclass
class DpoConfig:
    beta: float = 0.1
    """DPO/IPO: the KL coefficient; SimPO: the reward scale (the papers' defaults: DPO 0.1, SimPO 2.0)."""
    label_smoothing: float = 0.0
    """DPO/SimPO: probability that a preference label is flipped (conservative DPO), in [0, 0.5)."""
    gamma: float = 0.5
    """SimPO: the target reward margin."""
    orpo_lambda: float = 0.1
    """ORPO: weight of the odds-ratio term beside the chosen completion's NLL."""
    reference: str = "auto"
    """Where DPO/IPO's reference log-probs come from: precompute (one pass over the data before
    training, stored in the run directory; no reference weights resident), live (a frozen copy of
    the model: twice the weights, for comparison), adapter (peft runs: the base model with the
    adapter disabled, no copy) or auto (adapter for peft runs, else precompute)."""


@dataclass
class RlConfig:
    """PPO (`train.objective=ppo`): PPO-max's switches with the paper's defaults, and MA-RLHF's
    macro actions. `train.max_steps` counts PPO iterations (a rollout of `train.batch_size`
    prompts, then `ppo_epochs` passes over it in minibatches)."""

    reward: str = "leantune.rl.rewards:builtin_tasks"
    """The sequence reward: `module:function` (or `path/to/file.py:function`) called as
    `reward(prompts, completions) -> list[float]` (and `answers=` when it takes that argument and
    the data has reference answers), or a directory of a sequence-classification reward model."""
    critic: str = "auto"
    """The value model: auto (the reward model when there is one, as PPO-max does, else a copy of
    the policy's initial weights with a value head), shared (a value head on the policy itself: one
    model, one backward), a model directory, or a `model.preset` name (a fresh small critic)."""
    critic_lr: float | None = None
    """The critic's learning rate (null: optim.lr); same optimizer as the policy."""
    reference: str = "resident"
    """The frozen reference for the KL penalty: resident (kept on the device) or offload (kept in
    host memory, moved to the device for its one pass per rollout)."""
    ppo_epochs: int = 1
    """Passes over each rollout."""
    minibatch_size: int | None = None
    """Rollout rows per optimizer update (null: the whole rollout, one update per epoch)."""
    max_new_tokens: int = 16
    """Longest completion sampled per prompt."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (the log-probs are taken at the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts (1 = off)."""
    kl_coef: float = 0.02
    """Weight of the token-level KL penalty -kl_coef * (log pi - log pi_ref) in every token's reward."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    reward_norm: str = "norm"
    """Scores before they enter the rewards: norm ((r - mean) / std over running moments), scale
    (r / std) or none."""
    reward_clip: float | None = 10.0
    """Clip the (normalised) score to +-reward_clip (null: off)."""
    whiten_advantages: bool = True
    """Normalise the advantages over each rollout to mean 0, std 1."""
    advantage_clip: float | None = 0.5
    """Clip the (whitened) advantages to +-advantage_clip (null: off)."""
    clip_ratio: float | None = 0.2
    """PPO's policy ratio clip (null: the unclipped surrogate)."""
    value_clip: float | None = 0.2
    """Value clipping around the rollout's values (null: off)."""
    vf_coef: float = 1.0
    """Weight of the value loss (with critic=shared it is added to the policy loss)."""
    entropy_coef: float = 0.0
    """Entropy bonus: loss -= entropy_coef * mean token entropy."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the supervised loss on data.train's completions added to the policy
    loss (0 = off)."""
    macro_action: str = "none"
    """MA-RLHF termination: none (token-level PPO), ngram (every `ngram` tokens), random (lengths
    from 1, 2, 3, 5, 10, each `macro_repeat` times, shuffled) or ppl (a new macro action where the
    reference's per-token perplexity rises). The last token is always a macro action alone."""
    ngram: int = 3
    """Tokens per macro action for macro_action=ngram (1 = token-level PPO exactly)."""
    macro_repeat: int = 3
    """How often each length is in macro_action=random's list."""
    macro_value: str = "mean"
    """How values and rewards are pooled in a macro action: mean, position (weights 1/(i+1)) or
    last (its last token)."""


@dataclass
class ServeConfig:
    """Chat with the model while it trains: the server of `leantune serve` (OpenAI API + chat page)
    next to the training loop, answering with the current weights between optimizer steps (see
    docs/serve.md). Needs the serve extra: pip install 'leantune[serve]'."""

    port: int | None = None
    """Port of the live server (null = no server; 0 = any free port, printed at the start)."""
    host: str = "127.0.0.1"
    """Address to bind: localhost only unless you say otherwise (then set an API key)."""
    api_key: str | None = None
    """Bearer token the /v1 routes require (default: $LEANTUNE_API_KEY, else none). Prefer the
    environment variable: the key is not written into the run's config.yaml."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    rl: RlConfig = field(default_factory=RlConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Check ranges and combinations; raises :class:`ConfigError` naming the field."""
        from leantune.models import DTYPES, PRESETS

        if isinstance(self.data.train, str) and self.data.train.strip().startswith("["):
            self.data.train = _coerce("data.train", list[str], self.data.train, from_string=True)
        if isinstance(self.data.train, list) and len(self.data.train) == 1:
            self.data.train = self.data.train[0]  # one source: a plain path, as it always was
        sources = self.data.train if isinstance(self.data.train, list) else [self.data.train]
        weights = self.data.weights
        task_weights = self.data.task_weights
        checks: list[tuple[bool, str]] = [
            (
                bool(sources) and all(sources),
                f"data.train needs at least one source, got {self.data.train!r}",
            ),
            (
                weights is None or len(weights) == len(sources),
                f"data.weights has {len(weights or [])} entries for {len(sources)} data.train sources",
            ),
            (
                weights is None or (all(w >= 0 for w in weights) and sum(weights) > 0),
                f"data.weights must be >= 0 with a positive sum, got {weights}",
            ),
            (
                "builtin" not in sources
                or (bool(self.data.tasks) and all(t in BUILTIN_TASKS for t in self.data.tasks)),
                f"data.tasks must name built-in tasks ({', '.join(BUILTIN_TASKS)}), got {self.data.tasks}"
                + "".join(
                    _suggest(t, list(BUILTIN_TASKS)) for t in self.data.tasks if t not in BUILTIN_TASKS
                ),
            ),
            (
                task_weights is None or len(task_weights) == len(self.data.tasks),
                f"data.task_weights has {len(task_weights or [])} entries for {len(self.data.tasks)} "
                "data.tasks",
            ),
            (
                task_weights is None
                or (all(math.isfinite(w) and w >= 0 for w in task_weights) and sum(task_weights) > 0),
                f"data.task_weights must be finite, >= 0, with a positive sum, got {task_weights}",
            ),
            (
                self.model.dtype in DTYPES,
                f"model.dtype must be one of {', '.join(DTYPES)}, got {self.model.dtype!r}",
            ),
            (
                self.model.path is not None or self.model.preset in PRESETS,
                f"model.preset must be one of {', '.join(PRESETS)}, got {self.model.preset!r}"
                + _suggest(self.model.preset, list(PRESETS)),
            ),
            (
                self.model.attn_implementation in ("auto", "sdpa", "eager"),
                "model.attn_implementation must be auto, sdpa or eager, got "
                f"{self.model.attn_implementation!r}",
            ),
            (self.data.max_length >= 8, f"data.max_length must be >= 8, got {self.data.max_length}"),
            (
                self.data.overlong in ("truncate", "drop"),
                f"data.overlong must be truncate or drop, got {self.data.overlong!r}",
            ),
            (
                self.data.format in ("auto", *DATA_FORMATS),
                f"data.format must be auto, {', '.join(DATA_FORMATS)}, got {self.data.format!r}",
            ),
            (
                set(self.data.columns) <= set(DATA_COLUMNS)
                and all(isinstance(v, str) and v for v in self.data.columns.values()),
                "data.columns maps field names a format reads ("
                + ", ".join(DATA_COLUMNS)
                + f") to your data's field names, got {self.data.columns!r}",
            ),
            (self.data.num_train >= 1, f"data.num_train must be >= 1, got {self.data.num_train}"),
            (
                self.data.shuffle_buffer >= 1,
                f"data.shuffle_buffer must be >= 1, got {self.data.shuffle_buffer}",
            ),
            (self.data.num_eval >= 0, f"data.num_eval must be >= 0, got {self.data.num_eval}"),
            (self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}"),
            (self.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.optim.weight_decay}"),
            (
                self.optim.clip_grad_norm is None or self.optim.clip_grad_norm > 0,
                f"optim.clip_grad_norm must be > 0 or null, got {self.optim.clip_grad_norm}",
            ),
            (
                self.optim.clip_grad_value is None or self.optim.clip_grad_value > 0,
                f"optim.clip_grad_value must be > 0 or null, got {self.optim.clip_grad_value}",
            ),
            (
                self.optim.rounding in ("auto", "nearest", "stochastic", "kahan"),
                f"optim.rounding must be auto, nearest, stochastic or kahan, got {self.optim.rounding!r}",
            ),
            (
                self.optim.scheduler in ("constant", "linear", "cosine"),
                f"optim.scheduler must be constant, linear or cosine, got {self.optim.scheduler!r}",
            ),
            (self.optim.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps}"),
            (
                0 <= self.optim.min_lr_ratio <= 1,
                f"optim.min_lr_ratio must be in [0, 1], got {self.optim.min_lr_ratio}",
            ),
            (self.train.max_steps >= 0, f"train.max_steps must be >= 0, got {self.train.max_steps}"),
            (self.train.epochs >= 0, f"train.epochs must be >= 0, got {self.train.epochs}"),
            (
                self.train.max_steps > 0 or self.train.epochs > 0,
                "set train.max_steps or train.epochs to a positive number (both are 0)",
            ),
            (self.train.batch_size >= 1, f"train.batch_size must be >= 1, got {self.train.batch_size}"),
            (
                self.train.accumulation_steps >= 1,
                f"train.accumulation_steps must be >= 1, got {self.train.accumulation_steps}",
            ),
            (self.train.save_every >= 0, f"train.save_every must be >= 0, got {self.train.save_every}"),
            (self.train.keep_last >= 1, f"train.keep_last must be >= 1, got {self.train.keep_last}"),
            (
                self.train.max_nonfinite >= 1,
                f"train.max_nonfinite must be >= 1, got {self.train.max_nonfinite}",
            ),
            (self.eval.every >= 0, f"eval.every must be >= 0, got {self.eval.every}"),
            (
                self.eval.max_new_tokens >= 1,
                f"eval.max_new_tokens must be >= 1, got {self.eval.max_new_tokens}",
            ),
            (self.log.every >= 1, f"log.every must be >= 1, got {self.log.every}"),
            (
                self.dist.strategy in ("none", "ddp", "fsdp"),
                f"dist.strategy must be none, ddp or fsdp, got {self.dist.strategy!r}",
            ),
            (self.dist.nproc >= 1, f"dist.nproc must be >= 1, got {self.dist.nproc}"),
            (self.dist.tp >= 1, f"dist.tp must be >= 1, got {self.dist.tp}"),
            (self.dist.pp >= 1, f"dist.pp must be >= 1, got {self.dist.pp}"),
            (
                self.dist.pp_microbatches >= 0,
                f"dist.pp_microbatches must be >= 0, got {self.dist.pp_microbatches}",
            ),
            (
                self.dist.pp_schedule in ("1f1b", "gpipe"),
                f"dist.pp_schedule must be 1f1b or gpipe, got {self.dist.pp_schedule!r}",
            ),
            (
                self.dist.nproc == 1 or self.dist.nproc % self.dist.tp == 0,
                f"dist.nproc={self.dist.nproc} must be a multiple of dist.tp={self.dist.tp}",
            ),
            (
                self.peft.method in ("none", "lora", "ia3", "prefix", "prompt"),
                f"peft.method must be none, lora, ia3, prefix or prompt, got {self.peft.method!r}",
            ),
            (self.peft.r >= 1, f"peft.r must be >= 1, got {self.peft.r}"),
            (self.peft.alpha > 0, f"peft.alpha must be > 0, got {self.peft.alpha}"),
            (0 <= self.peft.dropout < 1, f"peft.dropout must be in [0, 1), got {self.peft.dropout}"),
            (bool(self.peft.target_modules), "peft.target_modules is empty: name modules or [all-linear]"),
            (
                self.peft.num_virtual_tokens >= 1,
                f"peft.num_virtual_tokens must be >= 1, got {self.peft.num_virtual_tokens}",
            ),
            (
                self.peft.method == "lora" or not (self.peft.use_dora or self.peft.use_rslora),
                f"peft.use_dora / peft.use_rslora apply to peft.method=lora, not {self.peft.method!r}",
            ),
            (
                self.peft.init in ("auto", "default", "gaussian", "orthogonal"),
                f"peft.init must be auto, default, gaussian or orthogonal, got {self.peft.init!r}",
            ),
            (
                self.peft.init != "orthogonal" or self.peft.r % 2 == 0,
                f"peft.init=orthogonal needs an even peft.r, got {self.peft.r}",
            ),
            (
                not (self.peft.method == "prefix" and self.model.gradient_checkpointing),
                "peft.method=prefix does not work with model.gradient_checkpointing (peft refuses it: the "
                "prefix is passed as a key/value cache); turn one of them off, or use peft.method=prompt",
            ),
            (
                not isinstance(self.train.loss_chunk, bool) and self.train.loss_chunk >= 0,
                f"train.loss_chunk must be >= 0 tokens (0 = the standard loss), got {self.train.loss_chunk}",
            ),
            (
                self.train.hft_redraw in ("stage", "epoch"),
                f"train.hft_redraw must be stage or epoch, got {self.train.hft_redraw!r}",
            ),
            (
                not (self.train.hft and self.peft.method != "none"),
                f"train.hft=true and peft.method={self.peft.method} exclude each other: HFT trains half of "
                "the model's own matrices, peft trains adapters on a frozen model; set one of them off",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._validate_objective()
        if self.optim.loss_scale is not None and self.optim.loss_scale != "dynamic":
            try:
                if not float(self.optim.loss_scale) > 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(
                    "optim.loss_scale must be null, 'dynamic' or a positive number, "
                    f"got {self.optim.loss_scale!r}"
                ) from None
        if self.model.dtype == "fp16" and self.optim.loss_scale is None:
            raise ConfigError(
                "model.dtype=fp16 needs loss scaling, or small gradients underflow to zero: set "
                "optim.loss_scale=dynamic (or use model.dtype=bf16, which needs none)"
            )
        from leantune.optim import is_fused

        try:
            is_fused(self.optim.name)  # validates the name
        except ValueError as err:
            raise ConfigError(f"optim.name: {err}") from None
        epoch_redraw = self.train.hft and self.train.hft_redraw == "epoch"
        if epoch_redraw and self.dist.strategy == "ddp" and not is_fused(self.optim.name):
            raise ConfigError(
                "train.hft_redraw=epoch with dist.strategy=ddp needs a fused optimizer (adalomo, "
                "lomo): DistributedDataParallel fixes the trainable parameters when it is built"
            )
        self._validate_combinations(is_fused(self.optim.name))
        self._validate_devices()
        self._validate_serve()
        return self

    def _validate_serve(self) -> None:
        """``serve.port``: a port, and a training loop with per-step hooks (not ppo)."""
        port = self.serve.port
        if port is None:
            return
        if not 0 <= port < 65536:
            raise ConfigError(
                f"serve.port must be a port in [0, 65535] (0 = any free one) or null, got {port}"
            )
        if not self.serve.host:
            raise ConfigError("serve.host is empty: give an address to bind, e.g. 127.0.0.1")
        if self.train.objective == "ppo":
            raise ConfigError(
                "serve.port works with the supervised and preference objectives (train.objective=sft, "
                "dpo, ipo, simpo, orpo), not with train.objective=ppo: its loop generates rollouts "
                "itself; serve a checkpoint with `leantune serve RUN` instead"
            )
        # dist.strategy=fsdp on several ranks: every rank takes part in each generation (a
        # collective decode loop between steps, leantune.serve.live.CollectiveEngine)

    def _validate_objective(self) -> None:
        """``train.objective`` and the ``dpo:`` settings, against the data and the model setup."""
        objectives = ("sft", "dpo", "ipo", "simpo", "orpo", "ppo")
        name, d = self.train.objective, self.dpo
        if name not in objectives:
            raise ConfigError(f"train.objective must be one of {', '.join(objectives)}, got {name!r}"
                              f"{_suggest(name, list(objectives))}")  # fmt: skip
        references = ("auto", "precompute", "live", "adapter")
        if d.reference not in references:
            raise ConfigError(f"dpo.reference must be one of {', '.join(references)}, got {d.reference!r}"
                              f"{_suggest(d.reference, list(references))}")  # fmt: skip
        if name == "ppo":
            self._validate_rl()
            return
        if name == "sft":
            if self.data.format == "preference":
                raise ConfigError(
                    "data.format=preference holds prompt/chosen/rejected pairs, which train.objective=sft "
                    "does not read: set train.objective=dpo (or ipo, simpo, orpo)"
                )
            return
        if not d.beta > 0:
            raise ConfigError(f"dpo.beta must be > 0, got {d.beta}")
        if not 0 <= d.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
        if not d.orpo_lambda >= 0:
            raise ConfigError(f"dpo.orpo_lambda must be >= 0, got {d.orpo_lambda}")
        if self.data.train == "builtin" or self.data.format not in ("auto", "preference"):
            raise ConfigError(
                f"train.objective={name} trains on preference pairs: set data.train to a file of "
                "prompt/chosen/rejected records (data.format=preference or auto)"
            )
        if isinstance(self.data.train, list) or self.data.streaming or self.data.pack or self.data.cache_dir:
            raise ConfigError(
                f"train.objective={name} reads one preference file, held in memory, unpacked and "
                "uncached: data.train a single file, data.streaming, data.pack and data.cache_dir unset"
            )
        if d.reference == "adapter" and self.peft.method == "none":
            raise ConfigError(
                "dpo.reference=adapter needs a peft run (peft.method=lora, ...): the reference is "
                "the base model with the adapter disabled; use precompute or live"
            )

    def _validate_rl(self) -> None:
        """The ``rl:`` settings and what PPO runs with."""
        from leantune.rl.advantages import AGGREGATIONS, MACRO_ACTIONS

        r = self.rl
        choices = [
            ("rl.macro_action", r.macro_action, MACRO_ACTIONS),
            ("rl.macro_value", r.macro_value, AGGREGATIONS),
            ("rl.reward_norm", r.reward_norm, ("norm", "scale", "none")),
            ("rl.reference", r.reference, ("resident", "offload")),
        ]
        for key, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}"
                                  f"{_suggest(value, list(allowed))}")  # fmt: skip
        positive = [("rl.ppo_epochs", r.ppo_epochs), ("rl.max_new_tokens", r.max_new_tokens),
                    ("rl.ngram", r.ngram), ("rl.macro_repeat", r.macro_repeat)]  # fmt: skip
        if r.minibatch_size is not None:
            positive.append(("rl.minibatch_size", r.minibatch_size))
        checks = [
            (type(v) is int and v >= 1, f"{k} must be an integer >= 1, got {v!r}")
            for k, v in positive
        ]
        checks += [
            (r.temperature > 0, f"rl.temperature must be > 0, got {r.temperature}"),
            (0 < r.top_p <= 1, f"rl.top_p must be in (0, 1], got {r.top_p}"),
            (r.kl_coef >= 0, f"rl.kl_coef must be >= 0, got {r.kl_coef}"),
            (0 <= r.gamma <= 1, f"rl.gamma must be in [0, 1], got {r.gamma}"),
            (0 <= r.lam <= 1, f"rl.lam must be in [0, 1], got {r.lam}"),
            (r.vf_coef >= 0 and r.entropy_coef >= 0 and r.ptx_coef >= 0,
             "rl.vf_coef, rl.entropy_coef and rl.ptx_coef must be >= 0"),  # fmt: skip
            (r.critic_lr is None or r.critic_lr > 0, f"rl.critic_lr must be > 0, got {r.critic_lr}"),
            (":" in r.reward or Path(r.reward).is_dir(),
             f"rl.reward {r.reward!r} is neither module:function nor a reward model directory"),  # fmt: skip
            (r.minibatch_size is None or r.minibatch_size <= self.train.batch_size,
             f"rl.minibatch_size ({r.minibatch_size}) is larger than the rollout (train.batch_size="
             f"{self.train.batch_size})"),  # fmt: skip
            (self.train.accumulation_steps == 1,
             "train.objective=ppo updates once per minibatch: set rl.minibatch_size instead of "
             "train.accumulation_steps"),  # fmt: skip
            (self.dist.strategy == "none" and self.dist.nproc == 1,
             "train.objective=ppo runs in one process for now (dist.strategy=none, dist.nproc=1)"),
            (self.peft.method == "none" and not self.train.hft,
             "train.objective=ppo trains the full policy: peft.method=none and train.hft=false"),
            (self.data.format != "preference", "train.objective=ppo reads prompts, not preference pairs"),
            (not self.data.streaming and not isinstance(self.data.train, list),
             "train.objective=ppo reads its prompts from one source held in memory (data.streaming off)"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for key in ("reward_clip", "advantage_clip", "clip_ratio", "value_clip"):
            value = getattr(r, key)
            if value is not None and not value > 0:
                raise ConfigError(f"rl.{key} must be > 0 or null (off), got {value}")

    def _validate_devices(self) -> None:
        """The device settings against this machine: refused here, before anything starts (also
        before ``dist.nproc`` starts its workers)."""
        import torch

        name = self.train.device
        if name != "auto":
            try:
                dev = torch.device(name)
            except (RuntimeError, ValueError):
                raise ConfigError(
                    f"train.device={name!r} is not a device: use auto, cpu, cuda or cuda:N"
                ) from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError(f"train.device={name} but CUDA is not available here; use train.device=cpu")
            if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ConfigError(
                    f"train.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)"
                )
            if dev.type not in ("cpu", "cuda"):
                raise ConfigError(f"train.device={name}: leantune trains on cpu or cuda")
        cuda = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
        if self.dist.cpu_offload and not cuda:
            raise ConfigError(
                "dist.cpu_offload=true needs CUDA (it keeps the sharded parameters in host memory "
                "while the GPU computes); on the CPU they are already there: set dist.cpu_offload=false"
            )

    def _validate_competitor(self) -> None:
        """The optimizers of other packages (leantune.optim.competitors) run on a whole model in one
        process; some of them rename, freeze or reshape parameters themselves."""
        name = self.optim.name.lower().replace("-", "_")
        if self.dist.strategy != "none":
            raise ConfigError(
                f"optim.name={name} runs with dist.strategy=none only: its package computes its "
                "statistics on whole tensors in one process (leantune has not validated it across ranks); "
                "use adalomo, lomo or adamw with ddp/fsdp"
            )
        if name in ("adamw8bit", "adamw4bit"):
            return
        if self.peft.method != "none":
            raise ConfigError(
                f"optim.name={name} chooses which tensors to project, group or freeze from the base "
                f"model's parameter names and shapes, which peft.method={self.peft.method} changes; "
                "use adamw, adamw8bit or adamw4bit with adapters"
            )
        if self.train.hft:
            raise ConfigError(
                f"optim.name={name} with train.hft: HFT freezes half of the tensors, which {name} reads "
                "once at start (badam also freezes tensors itself); use adalomo, adamw or adamw8bit with HFT"
            )

    def _validate_combinations(self, fused: bool) -> None:
        """Options that would be silently ignored or wrong together."""
        from leantune.optim import is_competitor, is_elementwise, needs_create_graph

        if is_competitor(self.optim.name):
            self._validate_competitor()
        own = {
            "lr": "optim.lr",
            "weight_decay": "optim.weight_decay",
            "clip_grad_norm": "optim.clip_grad_norm",
            "clip_grad_value": "optim.clip_grad_value",
            "loss_scale": "optim.loss_scale",
            "rounding": "optim.rounding",
            "accumulation_steps": "train.accumulation_steps",
            "seed": "train.seed",
        }
        for key, value in self.optim.kwargs.items():
            if key in own:
                raise ConfigError(
                    f"optim.kwargs.{key} is a setting of its own: use {own[key]}={value} instead"
                )
        if self.optim.rounding in ("stochastic", "kahan") and not fused:
            raise ConfigError(
                f"optim.rounding={self.optim.rounding} applies to optimizers fused into backward; "
                f"{self.optim.name} updates through torch (round to nearest). Use "
                f"optim.name={self.optim.name}_in_backward for {self.optim.rounding} rounding, or "
                "optim.rounding=auto"
            )
        if self.dist.strategy != "fsdp" and (self.dist.cpu_offload or self.dist.mixed_precision):
            key = "dist.cpu_offload" if self.dist.cpu_offload else "dist.mixed_precision"
            raise ConfigError(f"{key} applies to dist.strategy=fsdp only (now {self.dist.strategy!r})")
        if self.peft.method in ("prefix", "prompt") and self.dist.strategy == "fsdp":
            raise ConfigError(
                f"peft.method={self.peft.method} does not work with dist.strategy=fsdp: peft computes "
                "the virtual-token embeddings it saves from the sharded prompt encoder on one rank "
                "only, and the save hangs. Use dist.strategy=ddp, or peft.method=lora|ia3 with fsdp"
            )
        in_backward = self.optim.name.lower().replace("-", "_").endswith("_in_backward")
        if self.dist.strategy == "fsdp" and in_backward and not is_elementwise(self.optim.name):
            raise ConfigError(
                f"optim.name={self.optim.name} under dist.strategy=fsdp would compute its statistics on "
                "one shard of each tensor only; use adalomo or lomo (their statistics are summed over "
                "the shards), an elementwise optimizer in backward (adamw_in_backward, sgd_in_backward, "
                "lion_in_backward, adan_in_backward), or dist.strategy=ddp"
            )
        if self.dist.tp > 1:
            self._validate_tensor_parallel(fused, in_backward)
        if self.dist.pp > 1:
            self._validate_pipeline(fused, in_backward)
        if needs_create_graph(self.optim.name) and self.dist.strategy != "none":
            raise ConfigError(
                f"optim.name={self.optim.name} estimates the Hessian with torch.autograd.grad on the "
                f"graph of the gradients, which dist.strategy={self.dist.strategy} does not keep "
                "(DistributedDataParallel fails in a backward with create_graph=True; FSDP reduces the "
                "gradients without their graph): use dist.strategy=none"
            )


    def _validate_tensor_parallel(self, fused: bool, in_backward: bool) -> None:
        """What dist.tp > 1 has been validated with (tests/unit/test_tensor_parallel.py)."""
        from leantune.optim import is_elementwise

        tp = f"dist.tp={self.dist.tp}"
        if not fused or (in_backward and not is_elementwise(self.optim.name)):
            raise ConfigError(
                f"{tp} needs an optimizer whose update is exact on tensor-parallel shards: adalomo or "
                "lomo (statistics and norms summed over the right ranks), or an elementwise one in "
                f"backward (adamw_in_backward, sgd_in_backward, lion_in_backward, adan_in_backward); "
                f"{self.optim.name} would compute its statistics on one shard"
            )
        refusals = [
            (self.peft.method != "none", f"peft.method={self.peft.method}"),
            (bool(self.train.hft), "train.hft"),
            (self.train.objective != "sft", f"train.objective={self.train.objective}"),
            (self.serve.port is not None, "serve.port"),
        ]
        for refused, what in refusals:
            if refused:
                raise ConfigError(
                    f"{tp} with {what} is not supported yet: tensor parallelism is validated for "
                    "full-parameter SFT, with dist.strategy=ddp, fsdp or none across the "
                    "tensor-parallel groups"
                )


    def _validate_pipeline(self, fused: bool, in_backward: bool) -> None:
        """What dist.pp > 1 runs (tests/distributed/test_pipeline_cli.py)."""
        from leantune.optim import is_elementwise

        pp = f"dist.pp={self.dist.pp}"
        if not fused or (in_backward and not is_elementwise(self.optim.name)):
            raise ConfigError(
                f"{pp} needs an optimizer fused into backward (adalomo, lomo, or an elementwise "
                "*_in_backward): each stage updates its own parameters from its hooks; "
                f"{self.optim.name} does not"
            )
        n = self.dist.pp_microbatches or self.dist.pp
        refusals = [
            (self.dist.strategy == "fsdp", "dist.strategy=fsdp"),
            (self.peft.method != "none", f"peft.method={self.peft.method}"),
            (bool(self.train.hft), "train.hft"),
            (self.train.objective != "sft", f"train.objective={self.train.objective}"),
            (self.serve.port is not None, "serve.port"),
            (self.data.pack, "data.pack (no position ids cross the stages)"),
            (self.train.accumulation_steps != 1, "train.accumulation_steps (use dist.pp_microbatches)"),
        ]
        for refused, what in refusals:
            if refused:
                raise ConfigError(
                    f"{pp} with {what} is not supported yet: the pipeline runs full-parameter SFT of a "
                    "LLaMA-family model, one stage per rank, pipelines replicated with dist.strategy=ddp"
                )
        per_pipeline = self.dist.pp * self.dist.tp
        if self.dist.nproc > 1 and self.dist.nproc % per_pipeline:
            raise ConfigError(
                f"dist.nproc={self.dist.nproc} must be a multiple of dist.pp x dist.tp = {per_pipeline} "
                "(one stage per rank, or per tensor-parallel group; pipelines replicated with "
                "dist.strategy=ddp)"
            )
        if self.dist.nproc > per_pipeline and self.dist.strategy != "ddp":
            raise ConfigError(
                f"dist.nproc={self.dist.nproc} with dist.pp={self.dist.pp} makes "
                f"{self.dist.nproc // per_pipeline} pipelines: set dist.strategy=ddp"
            )
        if self.train.batch_size % n:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} must be a multiple of the {n} micro-batches"
            )
        if self.dist.pp_schedule == "1f1b" and n < self.dist.pp:
            raise ConfigError(
                f"dist.pp_schedule=1f1b needs at least dist.pp={self.dist.pp} micro-batches, got {n}"
            )


def _suggest(value: Any, options: list[str]) -> str:
    close = difflib.get_close_matches(str(value), options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


SECTIONS: dict[str, type] = {f.name: f.default_factory().__class__ for f in dataclasses.fields(Config)}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal after each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, tp: Any, value: Any, *, from_string: bool) -> Any:
    """Convert ``value`` to the field type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~", ""))
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value, from_string=from_string)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = (
                _parse_inline(key, value)
                if value.strip().startswith("[")
                else [v.strip() for v in value.split(",") if v.strip()]
            )
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, args[0], v, from_string=from_string) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = _parse_inline(key, value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping like {{a: 1}}, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _parse_inline(key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse {text!r}: {err}") from None


def _unknown_key(key: str) -> ConfigError:
    keys = _all_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        # a misspelt section, or a field given without its section
        leaf = key.split(".")[-1]
        close = [k for k in keys if k.split(".")[-1] == leaf][:1] or difflib.get_close_matches(
            leaf, keys, n=1, cutoff=0.5
        )
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"Unknown config key {key!r}.{hint} Run `leantune config` to see every key.")


def _apply(cfg: Config, key: str, value: Any, *, from_string: bool) -> None:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise _unknown_key(key)
    section = getattr(cfg, parts[0])
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        raise _unknown_key(key)
    setattr(section, parts[1], _coerce(key, hints[parts[1]], value, from_string=from_string))


def _flatten(data: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown_key(str(section))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {values!r}")
        for k, v in values.items():
            flat[f"{section}.{k}"] = v
    return flat


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from an optional YAML file and ``key=value`` overrides.

    Raises:
        ConfigError: unknown key (with a suggestion), wrong type or invalid value.
        FileNotFoundError: the YAML file does not exist.
    """
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of sections (model:, data:, ...)")
        for key, value in _flatten(data, str(p)).items():
            _apply(cfg, key, value, from_string=False)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4)")
        key, value = item.split("=", 1)
        _apply(cfg, key.strip(), value, from_string=True)
    return cfg.validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a run directory)."""
    cfg = Config()
    for key, value in _flatten(data, "saved config").items():
        _apply(cfg, key, value, from_string=False)
    return cfg


def config_diff(a: Config, b: Config, keys: list[str] | None = None) -> list[tuple[str, Any, Any]]:
    """Fields that differ between two configs, as (key, a, b)."""
    da, db = a.to_dict(), b.to_dict()
    out = []
    for key in keys or _all_keys():
        s, f = key.split(".")
        if da[s][f] != db[s][f]:
            out.append((key, da[s][f], db[s][f]))
    return out


def render_config(cfg: Config | None = None, *, comments: bool = True) -> str:
    """The config as YAML; with ``comments`` every field is preceded by its documentation."""
    cfg = cfg or Config()
    lines: list[str] = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        docs = field_docs(cls)
        values = getattr(cfg, section)
        for f in dataclasses.fields(cls):
            if comments and f.name in docs:
                for line in textwrap.wrap(docs[f.name], 96):
                    lines.append(f"  # {line}")
            value = json.loads(json.dumps(getattr(values, f.name)))
            if section == "serve" and f.name == "api_key" and value is not None:
                value = "<hidden>"  # a secret: never in the printed config or the run's config.yaml
            dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1 << 20).strip()
            if dumped.startswith("{") and dumped.endswith("}"):
                dumped = dumped[1:-1]
            lines.append(f"  {dumped}")
        lines.append("")
    return "\n".join(lines)
