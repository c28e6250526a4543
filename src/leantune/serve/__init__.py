"""``leantune serve``: an OpenAI-compatible HTTP server and a chat page for a trained model.

:mod:`leantune.serve.engine` (generation, no web dependencies) is importable without the ``serve``
extra; :mod:`leantune.serve.app` needs FastAPI (``pip install 'leantune[serve]'``).
"""

from leantune.serve.engine import Engine, RequestError, SamplingParams

__all__ = ["Engine", "RequestError", "SamplingParams"]
