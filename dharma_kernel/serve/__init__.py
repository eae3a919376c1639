"""``dharma serve``: an OpenAI-compatible HTTP server with continuous batching and a chat page.

``models``: the served models (loading, naming, chat template, stop ids); ``batch_cache``: the
batched KV and module cache; ``scheduler``: one decode loop per model; ``schemas``: request
bodies; ``errors``: OpenAI's error JSON; ``app``: the routes; ``server``: uvicorn's server, with
SIGTERM's grace ended by the decode loops; ``page.html``: the chat page.
Needs the ``serve`` extra (FastAPI, uvicorn).
"""
