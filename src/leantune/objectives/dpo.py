"""The preference objectives in the training loop: ``train.objective=dpo|ipo|simpo|orpo``.

Chosen and rejected go through the model in one forward (a batch of ``2B`` rows, see
:mod:`leantune.data.pairs`); each side's log-prob is summed over its completion tokens with the
run's loss (chunked: the logits are never whole), and :func:`~.preference.preference_loss` turns
them into the loss. DPO and IPO also need the reference model's log-probs (``dpo.reference``):

``precompute``  one pass over every pair before the first step, with the initial model, stored in
                ``RUN_DIR/reference/`` (atomic, SHA-256 manifest, checked against the data on
                resume); no reference weights are resident during training.
``live``        a frozen copy of the initial model, run on each batch (twice the weights).
``adapter``     peft runs: the model itself with its adapter disabled (no copy).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from leantune import checkpoint as ckpt
from leantune.config import ConfigError
from leantune.data.pairs import PairStream, dropped_pairs, pair_batches
from leantune.loss import ChunkedLMLoss, training_loss
from leantune.objectives.preference import NEEDS_REFERENCE, completion_logps, preference_loss

__all__ = ["REFERENCE_DIR", "PreferenceObjective", "resolve_reference", "score_pairs"]

REFERENCE_DIR = "reference"
_FILE = "logps.safetensors"


def resolve_reference(cfg: Any) -> str | None:
    """The reference mode of ``cfg`` (``None`` for the reference-free SimPO and ORPO)."""
    if not NEEDS_REFERENCE[cfg.train.objective]:
        return None
    if cfg.dpo.reference == "auto":
        return "adapter" if cfg.peft.method != "none" else "precompute"
    return cfg.dpo.reference


def _fingerprint(pairs: list[Any]) -> str:
    """A digest of every pair's tokens and labels, in order: the stored reference belongs to them."""
    h = hashlib.sha256()
    for p in pairs:
        for s in (p.chosen, p.rejected):
            h.update(json.dumps([s.input_ids, s.labels]).encode())
    return h.hexdigest()


class PreferenceObjective:
    """DPO, IPO, SimPO or ORPO on a trainer's model (built by :func:`leantune.objectives.build_objective`)."""

    def __init__(self, trainer: Any) -> None:
        cfg = trainer.cfg
        self.kind = cfg.train.objective
        self.hyper = {
            "beta": cfg.dpo.beta,
            "label_smoothing": cfg.dpo.label_smoothing,
            "gamma": cfg.dpo.gamma,
            "orpo_lambda": cfg.dpo.orpo_lambda,
        }
        self.chunked = trainer.loss_fn if isinstance(trainer.loss_fn, ChunkedLMLoss) else None
        self.reference = resolve_reference(cfg)
        self.batch_size, self.pad_id = cfg.train.batch_size, trainer.tokenizer.pad_token_id
        self.n_train = len(trainer.data.train)
        self.reference_note: str | None = None
        self.table: Tensor | None = None  # precompute: (pairs, 2) reference log-probs, chosen and rejected
        self.ref_model: nn.Module | None = None
        self.ref_loss: ChunkedLMLoss | None = None
        if self.reference == "adapter" and cfg.peft.method == "none":
            raise ConfigError("dpo.reference=adapter needs a peft run")
        if self.reference == "live":
            self.ref_model = copy.deepcopy(trainer.model).requires_grad_(False).eval()
            head = (
                self.ref_model.get_output_embeddings()
                if hasattr(self.ref_model, "get_output_embeddings")
                else None
            )
            if head is not None:
                head.__dict__.pop(
                    "forward", None
                )  # the copy's head: its own forward, not the policy's chunked one
            if self.chunked is not None:
                self.ref_loss, _ = training_loss(self.ref_model, self.chunked.chunk)
                if not isinstance(self.ref_loss, ChunkedLMLoss):
                    self.ref_loss = None
        how = {
            "precompute": "reference log-probs precomputed before training",
            "live": "a live frozen reference copy",
            "adapter": "the base model (adapter disabled) as reference",
            None: "no reference",
        }[self.reference]
        what = "sums of completion log-probs" if self.kind == "dpo" else "completion log-probs per token"
        self.description = f"{self.kind} on {what} ({how}) through {trainer.loss_fn.description}"
        self._data = trainer.data

    # ------------------------------------------------------------ the loop's seam
    def build_stream(self, trainer: Any) -> PairStream:
        return PairStream(
            trainer.data.train, self.batch_size, self.pad_id,
            seed=trainer.cfg.train.seed, rank=trainer.rank, world_size=trainer.world_size,
        )  # fmt: skip

    def data_notes(self) -> list[str]:
        notes = [f"{self.n_train} training pairs, {len(self._data.eval)} evaluation pairs"]
        for what, stats in (("train", self._data.train_stats), ("eval", self._data.eval_stats)):
            dropped = dropped_pairs(stats) if stats is not None else None
            if dropped:
                notes.append(f"{what}: {dropped}")
        if self.reference_note:
            notes.append(self.reference_note)
        return notes

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        index = batch.pop("pair_index")
        out = self._pairs(model, batch, index, self.chunked)
        loss = out.loss.mean()
        return loss, self._metrics(out, "")

    def _metrics(self, out: Any, prefix: str) -> dict[str, Tensor]:
        return {
            f"{prefix}rewards/chosen": out.chosen_rewards.mean(),
            f"{prefix}rewards/rejected": out.rejected_rewards.mean(),
            f"{prefix}rewards/margins": out.margins.mean(),
            f"{prefix}rewards/accuracy": out.accuracy.mean(),
        }

    def _pairs(self, model: nn.Module, batch: dict[str, Tensor], index: Tensor, chunked: Any) -> Any:
        logps, tokens = completion_logps(model, batch, chunked)
        b = index.numel()
        ref_c = ref_r = None
        if self.reference is not None:
            ref = self._reference_logps(model, batch, index)
            ref_c, ref_r = ref[:b], ref[b:]
        return preference_loss(
            self.kind, logps[:b], logps[b:], ref_c, ref_r,
            chosen_tokens=tokens[:b], rejected_tokens=tokens[b:], **self.hyper,
        )  # fmt: skip

    @torch.no_grad()
    def _reference_logps(self, model: nn.Module, batch: dict[str, Tensor], index: Tensor) -> Tensor:
        """The reference's summed completion log-probs of the batch's ``2B`` rows."""
        if self.reference == "precompute":
            if self.table is None:
                raise RuntimeError(
                    "the reference log-probs are not computed yet (PreferenceObjective.prepare)"
                )
            rows = self.table[index.cpu()]
            return torch.cat([rows[:, 0], rows[:, 1]]).to(batch["input_ids"].device)
        if self.reference == "live":
            return completion_logps(self.ref_model, batch, self.ref_loss)[0]
        base = model.module if hasattr(model, "module") else model  # under a DDP wrapper
        with base.disable_adapter():
            return completion_logps(base, batch, self.chunked)[0]

    # ------------------------------------------------------------ the reference pass
    def prepare(self, trainer: Any, resume_from: Path | None) -> None:
        """``precompute``: read the run's stored reference log-probs, or compute them now with the
        initial model (every rank runs every batch in step: FSDP's forward is collective; rank 0
        writes).

        Raises:
            leantune.checkpoint.CheckpointError: a resumed run whose stored reference is missing,
                corrupt or belongs to other data.
        """
        if self.reference != "precompute":
            return
        pairs = list(trainer.data.train) + list(trainer.data.eval)
        digest = _fingerprint(pairs)
        where = trainer.run_dir / REFERENCE_DIR
        if (where / ckpt.MANIFEST).is_file():
            self.table = self._read(where, digest, len(pairs))
            self.reference_note = f"reference log-probs read from {where}"
            return
        if resume_from is not None:
            raise ckpt.CheckpointError(
                f"cannot resume {resume_from}: {where} (the reference log-probs of the initial model) is "
                "missing, and the resumed weights are not the initial model's; start a new run"
            )
        table = self._compute(trainer, pairs)

        def write(tmp: Path) -> None:
            if trainer.is_main:
                from safetensors.torch import save_file

                save_file(
                    {"logps": table}, str(tmp / _FILE), metadata={"pairs": digest, "objective": self.kind}
                )

        ckpt.atomic_directory(where, write, meta={"pairs": digest, "count": len(pairs)})
        self.table = table
        self.reference_note = f"reference log-probs of {len(pairs)} pairs computed and stored in {where}"

    def _compute(self, trainer: Any, pairs: list[Any]) -> Tensor:
        model, device = trainer.model, trainer.device
        was_training = model.training
        model.eval()
        rows = []
        with torch.no_grad():
            for batch in pair_batches(pairs, self.batch_size, self.pad_id):
                index = batch.pop("pair_index")
                batch = {k: v.to(device) for k, v in batch.items()}
                logps = completion_logps(model, batch, self.chunked)[0].float().cpu()
                b = index.numel()
                rows.append(torch.stack([logps[:b], logps[b:]], dim=1))
        model.train(was_training)
        return torch.cat(rows) if rows else torch.zeros(0, 2)

    @staticmethod
    def _read(where: Path, digest: str, count: int) -> Tensor:
        from safetensors.torch import load_file

        ckpt.verify_checkpoint(where)
        meta = json.loads((where / ckpt.MANIFEST).read_text()).get("meta", {})
        if meta.get("pairs") != digest or meta.get("count") != count:
            raise ckpt.CheckpointError(
                f"{where}: the stored reference log-probs belong to other data (data.* changed since they "
                "were computed); start a new run, or delete the directory to recompute them from the "
                "current weights (which are then the reference)"
            )
        return load_file(str(where / _FILE))["logps"]

    # ------------------------------------------------------------ evaluation
    def evaluate(self, trainer: Any) -> dict[str, Any]:
        """On the evaluation pairs: the loss, the implicit rewards and their accuracy (the share of
        pairs whose chosen completion gets the higher reward). Every rank evaluates every pair."""
        pairs = trainer.data.eval
        if not pairs:
            return {}
        model, device = trainer.model, trainer.device
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        n = 0
        with torch.no_grad():
            for batch in pair_batches(list(pairs), self.batch_size, self.pad_id, offset=self.n_train):
                index = batch.pop("pair_index")
                batch = {k: v.to(device) for k, v in batch.items()}
                out = self._pairs(model, batch, index, self.chunked)
                b = index.numel()
                values = {"loss": out.loss.mean(), **self._metrics(out, "")}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * b
                n += b
        model.train(was_training)
        mean = {k: v / n for k, v in sums.items()}
        return {
            "eval_loss": mean.pop("loss"),
            "eval_reward_accuracy": mean.pop("rewards/accuracy"),
            **{f"eval_{k}": v for k, v in mean.items()},
            "eval_pairs": n,
        }


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    pairs: list[Any],
    *,
    kind: str,
    reference: nn.Module | str | None,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    loss: ChunkedLMLoss | None = None,
    **hyper: float,
) -> dict[str, float]:
    """``leantune eval --task preference``: on ``pairs``, the implicit-reward accuracy and mean
    margin of the objective ``kind`` (against ``reference``: a model, ``"adapter"`` for the peft
    ``model`` with its adapter disabled, or ``None`` for SimPO/ORPO), and the win rate of the chosen
    completion under the model alone: the share of pairs whose chosen completion has the higher
    log-prob, summed (``win_rate``) and per token (``win_rate_per_token``)."""
    if not pairs:
        raise ValueError("no preference pairs to score")
    if NEEDS_REFERENCE[kind] and reference is None:
        raise ValueError(f"{kind}'s implicit reward needs a reference model")
    sums = {"reward_accuracy": 0.0, "margin": 0.0, "win_rate": 0.0, "win_rate_per_token": 0.0}
    for batch in pair_batches(list(pairs), batch_size, pad_id):
        index = batch.pop("pair_index")
        batch = {k: v.to(device) for k, v in batch.items()}
        b = index.numel()
        logps, tokens = completion_logps(model, batch, loss)
        ref_c = ref_r = None
        if NEEDS_REFERENCE[kind]:
            if reference == "adapter":
                with model.disable_adapter():
                    ref = completion_logps(model, batch, loss)[0]
            else:
                ref = completion_logps(reference, batch, None)[0]
            ref_c, ref_r = ref[:b], ref[b:]
        out = preference_loss(kind, logps[:b], logps[b:], ref_c, ref_r, chosen_tokens=tokens[:b],
                              rejected_tokens=tokens[b:], **hyper)  # fmt: skip
        per_token = logps / tokens.clamp(min=1)
        sums["reward_accuracy"] += float(out.accuracy.sum())
        sums["margin"] += float(out.margins.sum())
        sums["win_rate"] += float((logps[:b] > logps[b:]).float().sum())
        sums["win_rate_per_token"] += float((per_token[:b] > per_token[b:]).float().sum())
    return {**{k: v / len(pairs) for k, v in sums.items()}, "pairs": len(pairs)}
