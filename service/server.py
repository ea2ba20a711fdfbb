"""Running the app under uvicorn with bounds on slow clients and a shutdown that fits a container's grace period.

    serve(app, settings)     # what `captioner serve` does; blocks until SIGTERM / Ctrl-C, then drains

- A connection whose request headers are not complete ``client_timeout_s`` after it opened (or after its previous
  response, on a kept-alive connection) is closed: uvicorn has no header timeout of its own, and headers arrive
  before the ASGI app sees anything, so this is a small subclass of uvicorn's HTTP protocol.
- On SIGTERM the service starts draining at once (ServiceState.begin_drain: 503 for new requests, uploads cut after
  ``shutdown_timeout_s``), uvicorn stops accepting connections and waits for the requests in flight, and the
  process exits 0. uvicorn's own graceful-shutdown timeout stays as a backstop after every request's deadline.
"""
from __future__ import annotations

import asyncio
import logging

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .settings import Settings

log = logging.getLogger("service")


def header_timeout_protocol(timeout_s: float, base: type = AutoHTTPProtocol) -> type:
    """uvicorn's HTTP protocol class (h11 or httptools) that closes connections slow to send a request head."""

    class HeaderTimeoutProtocol(base):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()  # the next request on this kept-alive connection gets the same bound

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(timeout_s, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            # no request began since the timer was armed, and none is in progress: the head is too slow
            idle = self.cycle is self._head_cycle and (self.cycle is None or self.cycle.response_complete)
            if idle and not self.transport.is_closing():
                log.debug("closing a connection that sent no complete request head in %g s", timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit_signal) -> None:
        super().__init__(config)
        self._on_exit_signal = on_exit_signal

    def handle_exit(self, sig, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after its shutdown, so the process would die of it (status -15): a
        # graceful stop is a normal exit
        getattr(self, "_captured_signals", []).clear()
        if first:
            try:
                asyncio.get_running_loop().call_soon_threadsafe(self._on_exit_signal)
            except RuntimeError:  # the loop is not running yet or any more
                pass


def serve(app, settings: Settings) -> None:
    svc = app.state.svc
    backstop = settings.shutdown_timeout_s + settings.request_timeout_s + 5
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            http=header_timeout_protocol(settings.client_timeout_s),
                            timeout_keep_alive=min(5, settings.client_timeout_s), timeout_graceful_shutdown=backstop,
                            access_log=False,  # ours (service.access) has the request id and the batch size
                            log_config=None)  # uvicorn's loggers reach service.logs' handler (text or JSON)
    server = Server(config, svc.begin_drain)

    def fatal(msg: str) -> None:
        server.should_exit = True  # uvicorn checks this every tick and shuts down cleanly

    svc.on_fatal = fatal
    server.run()
