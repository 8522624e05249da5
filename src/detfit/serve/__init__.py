"""``detfit serve``: the model behind an HTTP API (FastAPI + uvicorn) and a web page, with
batching of concurrent requests, limits on what is accepted, and Prometheus metrics.

Needs the ``serve`` extra (``pip install 'detfit[serve]'``); ``detfit.serve.runner`` says so in
one line when it is missing, so nothing here is imported before that check."""

from detfit.serve.settings import ServeSettings

__all__ = ["ServeSettings"]
