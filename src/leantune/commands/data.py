"""``leantune data inspect``: what a run would make of data files, without training; ``score``,
``classify`` and ``mix`` (long-text quality) come from :mod:`leantune.commands.data_quality`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

MARK_OPEN, MARK_CLOSE = "\u27e6", "\u27e7"  # around the tokens the loss is computed on


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="inspect data files (format, counts, lengths, loss mask); score, classify and mix long texts",
        description="Inspect data files the way a run would read them; score, classify and mix long "
        "documents by their quality (LongWanjuan: docs/data-quality.md).",
    )
    inner = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = inner.add_parser(
        "inspect",
        help="detected format, counts, token lengths, truncation, examples with the loss mask",
        description="For each file: the detected format, record and token counts, a histogram of "
        "token lengths, how many samples data.max_length truncates or drops, and rendered examples "
        f"with the tokens the loss is computed on between {MARK_OPEN} and {MARK_CLOSE}. The data "
        "settings (data.format, data.columns, data.max_length, data.overlong, data.pack) and the "
        "tokenizer (model.tokenizer or model.path, else the built-in one) come from the same config "
        "and overrides as `leantune train`.",
    )
    q.add_argument("files", nargs="+", metavar="FILE", help="local .jsonl / .json / .parquet files")
    q.add_argument("--config", metavar="CONFIG.yaml", help="a run config to read the data settings from")
    q.add_argument("--set", nargs="*", default=[], metavar="key=value", help="config overrides")
    q.add_argument("--examples", type=int, default=3, help="rendered examples per file (default 3)")
    q.set_defaults(func=run)
    from leantune.commands import data_quality

    data_quality.register(inner)


def histogram(lengths: list[int], limit: int, bins: int = 8, width: int = 40) -> list[str]:
    """Text histogram of ``lengths`` in ``bins`` equal-width bins up to the longest; the bin that
    holds ``limit`` (max_length) is marked."""
    top = max(lengths)
    step = max(1, -(-top // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min((n - 1) // step, bins - 1)] += 1
    peak = max(counts)
    lines = []
    for i, c in enumerate(counts):
        lo, hi = i * step + 1, (i + 1) * step
        flag = "  <- max_length" if lo <= limit <= hi else ""
        bar = "#" * round(width * c / peak) if peak else ""
        lines.append(f"  {lo:>6}-{hi:<6} {c:>7}  {bar}{flag}".rstrip())
    return lines


def render(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """The sample's text with the trained spans marked."""
    from leantune.data import IGNORE_INDEX

    out, span, trained = [], [], False
    for tok, lab in zip(ids, labels):
        now = lab != IGNORE_INDEX
        if now != trained and span:
            text = tokenizer.decode(span)
            out.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if trained else text)
            span = []
        span.append(tok)
        trained = now
    if span:
        text = tokenizer.decode(span)
        out.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if trained else text)
    return "".join(out)


def inspect_file(path: str, cfg: Any, tokenizer: Any, examples: int) -> list[str]:
    from leantune.data import DataError, encode_records, pack_samples, read_records
    from leantune.data.formats import KINDS

    d = cfg.data
    records, where, fmt = read_records(path, d.format, d.columns)
    kind = KINDS[fmt]
    trained_as = f" (trained as {kind})" if kind != fmt else ""
    lines = [f"{path}: {len(records)} records, format {fmt}{trained_as}"]
    if kind == "preference":
        chosen = sum(len(r["chosen"]) for r in records)
        lines.append(f"  preference pairs: {len(records)} ({chosen} chosen messages); not trained by SFT")
        return lines
    pack = d.pack is not False
    # full lengths first (nothing truncated), then what the run's max_length makes of them
    full, _ = encode_records(records, where, fmt, tokenizer, max_length=1 << 30, pack=False)
    lengths = [len(s.input_ids) for s in full]
    try:
        samples, stats = encode_records(records, where, fmt, tokenizer, max_length=d.max_length,
                                        overlong=d.overlong, pack=pack)  # fmt: skip
    except DataError as err:
        lines.append(f"  under data.max_length={d.max_length}: {err}")
        samples, stats = [], None
    total = sum(lengths)
    trained = sum(sum(1 for x in s.labels[1:] if x != -100) for s in full)
    lines.append(
        f"  tokens: {total} ({trained} trained, {trained / total:.0%}); per sample min {min(lengths)}, "
        f"median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}"
    )
    lines.append(f"  token lengths (data.max_length={d.max_length}):")
    lines += histogram(lengths, d.max_length)
    if stats is not None:
        lines.append(f"  under the current config: {stats.summary()}")
        if d.pack is True and kind in ("instruction", "chat"):
            _, packed = pack_samples(samples, d.max_length, seed=d.seed)
            lines.append(f"  {packed.summary()}")
    for i, s in enumerate(full[:examples]):
        lines.append(f"  example {i + 1} ({where[i]}, {len(s.input_ids)} tokens):")
        lines += ["    " + x for x in render(tokenizer, s.input_ids, s.labels).splitlines() or [""]]
    return lines


def run(args: argparse.Namespace) -> int:
    from leantune.config import ConfigError, load_config
    from leantune.data import DataError, load_tokenizer

    try:
        cfg = load_config(args.config, args.set)
        source = cfg.model.tokenizer or cfg.model.path
        tok = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
        for path in args.files:
            print("\n".join(inspect_file(path, cfg, tok, args.examples)))
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        print(f"leantune data inspect: {err}", file=sys.stderr)
        return 2
    return 0
