"""Sub-commands of the ``leantune`` CLI; each module has ``register(subparsers)``."""

import argparse


def positive_int(text: str) -> int:
    """argparse ``type`` for counts: an int >= 1, else a usage error naming the text."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
