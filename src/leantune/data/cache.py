"""A cache of tokenised datasets (``data.cache_dir``): a repeated run, or every rank of a
multi-rank run, reads the samples instead of tokenising the data again.

An entry is named by a digest of everything the samples depend on: the data settings, each source
file's path, size and modification time, and the tokenizer (its vocabulary and rules, special
tokens and chat template). It is written as safetensors (the token ids, labels and positions of all
samples, flattened, with their offsets) plus a JSON file (formats, counts, statistics): nothing
executable is read back. Entries are written to a temporary name and renamed, so a crash leaves no
half entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from leantune.data.encode import EncodeStats, Sample
from leantune.data.mixture import expand_source
from leantune.data.packing import PackStats

__all__ = ["cache_key", "load_cached", "save_cached"]

VERSION = 2  # 2: the built-in add and count renderings changed, task_weights
# the settings samples depend on (not streaming: streamed data is not cached)
_FIELDS = ("train", "weights", "eval", "format", "columns", "max_length", "overlong", "pack", "tasks",
           "task_weights", "num_train", "num_eval", "seed")  # fmt: skip


def _tokenizer_digest(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        (backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode()
    )
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()


def cache_key(cfg: Any, tokenizer: Any) -> str:
    """The digest naming the cache entry of ``build_datasets(cfg, tokenizer)``."""
    settings = {f: getattr(cfg, f) for f in _FIELDS}
    specs = cfg.train if isinstance(cfg.train, list) else [cfg.train]
    files = []
    for path in [p for s in specs for p in expand_source(s)] + ([cfg.eval] if cfg.eval else []):
        if path == "builtin":
            continue
        p = Path(path)
        parts = sorted(p.rglob("*")) if p.is_dir() else [p]
        files += [(str(x), x.stat().st_size, x.stat().st_mtime_ns) for x in parts if x.is_file()]
    what = {"v": VERSION, "settings": settings, "files": files, "tok": _tokenizer_digest(tokenizer)}
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _flatten(samples: list[Sample]) -> dict[str, torch.Tensor]:
    lengths = [len(s.input_ids) for s in samples]
    positions = [p for s in samples for p in (s.position_ids or [])]
    prompts = [p for s in samples for p in (s.prompt_ids or [])]
    return {
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "ids": torch.tensor([t for s in samples for t in s.input_ids], dtype=torch.int64),
        "labels": torch.tensor([t for s in samples for t in s.labels], dtype=torch.int64),
        "positions": torch.tensor(positions, dtype=torch.int64),
        "has_positions": torch.tensor([s.position_ids is not None for s in samples], dtype=torch.bool),
        "prompt_lengths": torch.tensor([-1 if s.prompt_ids is None else len(s.prompt_ids) for s in samples]),
        "prompts": torch.tensor(prompts, dtype=torch.int64),
    }


def _unflatten(t: dict[str, torch.Tensor], meta: list[dict[str, Any]]) -> list[Sample]:
    ids, labels, positions, prompts = (t[k].tolist() for k in ("ids", "labels", "positions", "prompts"))
    out, at, pat, qat = [], 0, 0, 0
    for n, has_pos, plen, m in zip(t["lengths"].tolist(), t["has_positions"].tolist(),
                                   t["prompt_lengths"].tolist(), meta):  # fmt: skip
        pos = None
        if has_pos:
            pos, pat = positions[pat : pat + n], pat + n
        prompt = None
        if plen >= 0:
            prompt, qat = prompts[qat : qat + plen], qat + plen
        out.append(Sample(ids[at : at + n], labels[at : at + n], task=m.get("task"), prompt_ids=prompt,
                          answer=m.get("answer"), position_ids=pos))  # fmt: skip
        at += n
    return out


def save_cached(cache_dir: str | Path, key: str, data: Any) -> Path:
    """Write ``data`` (a :class:`leantune.data.Datasets`) as the entry ``key``."""
    from safetensors.torch import save_file

    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    parts = {"train": data.train, "eval": data.eval}
    parts |= {f"source{i}": s for i, s in enumerate((data.sources or {}).values())}
    tensors = {
        f"{name}.{k}": v for name, samples in parts.items() for k, v in _flatten(list(samples)).items()
    }
    meta = {
        "version": VERSION,
        "format": data.format,
        "train_stats": dataclasses.asdict(data.train_stats),
        "eval_stats": dataclasses.asdict(data.eval_stats) if data.eval_stats else None,
        "pack_stats": dataclasses.asdict(data.pack_stats) if data.pack_stats else None,
        "sources": list(data.sources or {}),
        "weights": data.weights,
        "samples": {
            name: [{"task": s.task, "answer": s.answer} for s in samples] for name, samples in parts.items()
        },
    }
    tmp = root / f".{key}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp) + ".safetensors")
    (Path(str(tmp) + ".json")).write_text(json.dumps(meta))
    os.replace(str(tmp) + ".safetensors", root / f"{key}.safetensors")
    os.replace(str(tmp) + ".json", root / f"{key}.json")  # written last: its presence marks the entry
    return root / f"{key}.json"


def load_cached(cache_dir: str | Path, key: str) -> Any | None:
    """The entry ``key``, or ``None`` when there is none (or it is unreadable: then it is rebuilt)."""
    from safetensors.torch import load_file

    from leantune.data import Datasets

    root = Path(cache_dir)
    meta_path, tensor_path = root / f"{key}.json", root / f"{key}.safetensors"
    if not (meta_path.is_file() and tensor_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        flat = load_file(str(tensor_path))
    except Exception:  # an unreadable entry (truncated, foreign): rebuilt, never trusted
        return None
    if meta.get("version") != VERSION:
        return None

    def part(name: str) -> list[Sample]:
        return _unflatten({k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(name + ".")},
                          meta["samples"][name])  # fmt: skip

    sources = {n: part(f"source{i}") for i, n in enumerate(meta["sources"])} or None
    stats = meta["eval_stats"]
    return Datasets(
        train=part("train"),
        eval=part("eval"),
        format=meta["format"],
        train_stats=EncodeStats(**meta["train_stats"]),
        eval_stats=EncodeStats(**stats) if stats else None,
        pack_stats=PackStats(**meta["pack_stats"]) if meta["pack_stats"] else None,
        sources=sources,
        weights=meta["weights"],
    )
