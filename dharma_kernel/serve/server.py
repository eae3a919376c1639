"""uvicorn's server, with SIGTERM's grace ended by the decode loops rather than by uvicorn.

On SIGTERM uvicorn stops accepting connections and waits ``timeout_graceful_shutdown`` seconds
for the requests in flight. Left to itself it then cancels their tasks: a stream is cut in the
middle of its chunked body (the client reads a broken response) and the log gets a traceback
per request. Here, when the grace is over, every sequence still running or waiting ends with
``server_shutdown``: a stream gets an error event and ``data: [DONE]``, a whole reply a 503, and
the connections close by themselves. uvicorn's own cut-off stays, a few seconds later, as a
backstop.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn

BACKSTOP = 5.0  # seconds after the grace before uvicorn cancels what is still open


class Server(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        grace = self.config.timeout_graceful_shutdown
        if grace is None:  # uvicorn waits without end; so do we
            return await super().shutdown(sockets)

        def end_all() -> None:
            for model in self.config.app.state.served.values():
                model.scheduler.end("shutdown")

        timer = asyncio.get_running_loop().call_later(grace, end_all)
        self.config.timeout_graceful_shutdown = grace + BACKSTOP
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
            self.config.timeout_graceful_shutdown = grace
