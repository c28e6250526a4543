"""The ``--kv-*`` options shared by ``generate`` and ``eval`` (not a sub-command)."""

from __future__ import annotations

import argparse

__all__ = ["add_kv_options", "kv_policy_from_args"]


def _budget(text: str):
    from leantune.kvcache.policy import parse_budget

    try:
        return parse_budget(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--kv-budget ")) from None


def add_kv_options(p: argparse.ArgumentParser) -> None:
    """Add the KV-cache policy options to ``p`` (see docs/kv-cache.md)."""
    from leantune.kvcache.policy import POLICIES

    g = p.add_argument_group("KV cache (docs/kv-cache.md)")
    g.add_argument(
        "--kv-policy",
        choices=POLICIES,
        default="full",
        help="full: keep every token; nacl / streaming / random: evict at prefill to --kv-budget per head; "
        "longcache: attend beyond the training length",
    )
    g.add_argument(
        "--kv-budget",
        type=_budget,
        help="tokens kept per head (e.g. 512) or a fraction of the prompt (e.g. 0.2)",
    )
    g.add_argument("--kv-sink", type=int, default=4, help="first prompt tokens always kept (default 4)")
    g.add_argument("--kv-recent", type=int, default=16, help="last prompt tokens always kept (default 16)")
    g.add_argument("--kv-proxies", type=int, default=16, help="nacl: last positions whose attention scores")
    g.add_argument(
        "--kv-random-fraction",
        type=float,
        default=0.37,
        help="nacl: share of the middle budget sampled (0.37)",
    )
    g.add_argument("--kv-global", type=int, default=4, help="longcache: first tokens always attended (4)")
    g.add_argument("--kv-local", type=int, default=128, help="longcache: last tokens always attended (128)")
    g.add_argument("--kv-span", type=int, default=8, help="longcache: tokens around each selected key (8)")
    g.add_argument("--kv-topk", type=int, default=2, help="longcache: keys chosen per query and head (2)")
    g.add_argument("--kv-clip", type=int, default=15, help="longcache: at most this many chosen keys (15)")
    g.add_argument("--kv-chunk", type=int, default=64, help="longcache: prefill block size (64)")
    g.add_argument(
        "--kv-train-length", type=int, help="longcache: training length (default: the model config's)"
    )


def kv_policy_from_args(args: argparse.Namespace):
    """The :class:`~leantune.kvcache.policy.KVPolicy` of parsed options. Raises ``ValueError``."""
    from leantune.kvcache.policy import KVPolicy

    longcache = None
    if args.kv_policy == "longcache":
        from leantune.kvcache.longcache import LongCacheConfig

        longcache = LongCacheConfig(
            global_size=args.kv_global,
            local_size=args.kv_local,
            span=args.kv_span,
            topk=args.kv_topk,
            clip=args.kv_clip,
            chunk=args.kv_chunk,
        )
    return KVPolicy(
        policy=args.kv_policy,
        budget=args.kv_budget,
        sink=args.kv_sink,
        recent=args.kv_recent,
        proxies=args.kv_proxies,
        random_fraction=args.kv_random_fraction,
        seed=args.seed,
        longcache=longcache,
        train_length=args.kv_train_length,
    )
