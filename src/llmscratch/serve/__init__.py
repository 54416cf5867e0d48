"""Serving a checkpoint: the continuous-batching engine (`engine.py`), the OpenAI-compatible HTTP API (`app.py`,
FastAPI + uvicorn, the `serve` extra) and its web chat page (`static/index.html`)."""
