"""``dharma serve``: models behind an OpenAI-compatible HTTP API, with a chat page at ``/``.

Registered on :data:`dharma_kernel.cli.app`.
"""

from __future__ import annotations

import os
import signal
from typing import Annotated

import typer

from ..errors import DharmaError
from .output import _quiet_transformers, out


def serve(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Model, run (its best) or application directories, as PATH or NAME=PATH.", show_default=False
        ),
    ],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; other machines need 0.0.0.0.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="DHARMA_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/."
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Sequences decoded together.")] = 16,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=0, help="Requests waiting for a batch slot before 429.")
    ] = 64,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="Torch CPU threads (default: torch's). 1 suits tiny models "
            "and busy machines, where threads wait on each other.",
        ),
    ] = None,
    grace: Annotated[
        float, typer.Option("--grace", min=0.0, help="Seconds in-flight requests get after SIGTERM.")
    ] = 10.0,
) -> None:
    """Serve models over the OpenAI API (/v1/models, /v1/chat/completions, /v1/completions, /v1/predict)
    with continuous batching, and a chat page at /. Stops on SIGTERM or Ctrl-C."""
    try:
        import uvicorn

        from ..serve.app import create_app
        from ..serve.server import Server
    except ImportError as error:
        raise DharmaError(
            f"dharma serve needs FastAPI and uvicorn ({error.name} is missing)",
            hint="pip install 'dharma-kernel[serve]'",
        ) from None
    from ..serve.models import load_served

    _check_address(host, port)  # before the models load: a taken port should not cost that wait
    _quiet_transformers()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    served = load_served(models, max_batch, max_queue)
    server = Server(
        uvicorn.Config(
            create_app(served, api_key),
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=grace,
            access_log=False,
        )
    )
    names = ", ".join(f"{name} ({m.path})" for name, m in served.items())
    out.print(
        f"serving {names} on http://{host}:{port} (chat page at /, API at /v1)"
        + ("; API key required" if api_key else "")
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # uvicorn re-raises SIGTERM to the handler it found once it has shut down; with Python's default
    # there, a clean shutdown would still end the process as killed. A stop asked for is a success.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()


def _check_address(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(infos[0][4])
    except OSError as error:
        raise DharmaError(
            f"cannot listen on {host}:{port}: {error.strerror or error}",
            hint="Pick another --port or --host, or stop what uses it.",
        ) from None
