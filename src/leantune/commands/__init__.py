"""Sub-commands of the ``leantune`` CLI; each module has ``register(subparsers)``."""
