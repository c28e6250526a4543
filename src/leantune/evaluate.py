"""Evaluation: token-weighted loss and perplexity, and exact-match accuracy by greedy generation."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from leantune.data.encode import IGNORE_INDEX, Sample
from leantune.data.loader import eval_batches

if TYPE_CHECKING:
    from leantune.loss import ChunkedLMLoss

__all__ = ["eval_loss", "exact_match", "generate_texts"]


def _reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    max_batches: int = 0,
    rank: int = 0,
    world_size: int = 1,
    loss: ChunkedLMLoss | None = None,
    replicas: int = 1,
) -> dict[str, float]:
    """Mean cross-entropy per target token over ``samples`` and its perplexity (all ranks).

    With ``loss`` (a :class:`leantune.loss.ChunkedLMLoss` on ``model``) the logits are computed a
    chunk of tokens at a time, as in training; the same figures otherwise. ``replicas``: how many
    ranks evaluate each data shard alike (the tensor-parallel degree), counted once."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of nll, tokens)
    for i, batch in enumerate(eval_batches(samples, batch_size, pad_id, rank=rank, world_size=world_size)):
        if max_batches and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        if loss is not None:
            nll, n = loss.nll(model, batch)
            total[0] += nll.double()
            total[1] += n
            continue
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # peft prompt tuning returns logits for its virtual tokens too, in front: keep the last L.
        logits = logits[:, -batch["input_ids"].shape[1] :]
        targets = batch["labels"][:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total[0] += nll.double()
        total[1] += (targets != IGNORE_INDEX).sum()
    _reduce_sum(total)
    if replicas > 1:
        total /= replicas
    model.train(was_training)
    nll_sum, count = total.tolist()
    loss = nll_sum / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    device: torch.device,
    max_new_tokens: int,
    batch_size: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    kv: Any = None,
) -> list[str]:
    """Continue each prompt (token ids) and return the decoded continuations, cut at eos.

    ``kv``: a :class:`leantune.kvcache.KVPolicy`; any policy but ``full`` generates the prompts one
    at a time (no padding), under that KV-cache policy.
    """
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs: list[str] = []
    if kv is not None and kv.policy != "full":
        from leantune.kvcache.generation import kv_generate

        kwargs: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        try:
            for p in prompts:
                gen = kv_generate(
                    model,
                    torch.tensor([p], device=device),
                    kv,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                    **kwargs,
                )
                row = gen[0, len(p) :].tolist()
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                outs.append(tokenizer.decode(row, skip_special_tokens=True))
        finally:
            model.train(was_training)
        return outs
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        # Left padding keeps every prompt's last token at the end, where generation continues.
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        kwargs: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        for row in gen[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            outs.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return outs


def exact_match(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: Sequence[Sample],
    *,
    device: torch.device,
    max_new_tokens: int,
    limit: int = 0,
    batch_size: int = 64,
    texts_fn: Any = None,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers, overall and per task (``acc/<task>``).

    Only samples with a checkable answer (instruction data) are scored; the first ``limit`` of them
    (0 = all), spread evenly over tasks by the data order. ``texts_fn(prompts) -> texts`` replaces
    :func:`generate_texts` (e.g. greedy speculative decoding, :mod:`leantune.speculative.text`).
    """
    scored = [s for s in samples if s.answer is not None and s.prompt_ids is not None]
    if limit:
        scored = scored[:limit]
    if not scored:
        return {}
    if texts_fn is not None:
        texts = texts_fn([s.prompt_ids for s in scored])
    else:
        texts = generate_texts(
            model,
            tokenizer,
            [s.prompt_ids for s in scored],
            device=device,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s, text in zip(scored, texts):
        ok = int(text.strip() == s.answer.strip())
        for key in ("all", s.task or "data"):
            hits[key][0] += ok
            hits[key][1] += 1
    out = {f"acc/{k}": c / n for k, (c, n) in sorted(hits.items()) if k != "all"}
    out["acc"] = hits["all"][0] / hits["all"][1]
    out["acc_samples"] = hits["all"][1]
    return out
