"""leantune: full-parameter LLM training on limited hardware."""

__version__ = "0.1.0"
