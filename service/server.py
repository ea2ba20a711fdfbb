"""Running the app under uvicorn with bounds on slow clients and a shutdown that fits a container's grace period.

    serve(app, settings)     # what `captioner serve` does; blocks until SIGTERM / Ctrl-C, then drains

- Bounds on what a connection may cost that the ASGI app cannot enforce (a slow request head, a request trickled in
  tiny pieces, a body still arriving past the request timeout, the unread rest of a refused upload): a small
  subclass of uvicorn's HTTP protocol (bounded_protocol).
- On SIGTERM the service starts draining at once (ServiceState.begin_drain: 503 for new requests, uploads cut after
  ``shutdown_timeout_s``), uvicorn stops accepting connections and waits for the requests in flight, and the
  process exits 0. uvicorn's own graceful-shutdown timeout stays as a backstop after every request's deadline.
"""
from __future__ import annotations

import asyncio
import json
import logging

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .settings import Settings

log = logging.getLogger("service")


# A request may arrive in at most PIECES + bytes / BYTES_PER_PIECE reads. Clients send what they have in large
# writes (a 10 MB upload over loopback: ~200 reads; over a 1400-byte MSS link: ~7,000, allowed 40,000); a client
# sending one byte per packet makes the event loop parse, wake and schedule per byte, which costs every other
# connection (bench/abuse.py --only trickle measures it), and is cut after ~1,000 reads.
PIECES, BYTES_PER_PIECE = 1024, 256
_TOO_SLOW = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n%s")


def bounded_protocol(head_timeout_s: float, body_timeout_s: float, base: type = AutoHTTPProtocol) -> type:
    """uvicorn's HTTP protocol class (h11 or httptools) with bounds that an ASGI app cannot set, because they
    concern bytes the app never reads or reads only later:
    - a connection whose request head is not complete ``head_timeout_s`` after it opened (or after its previous
      response, on a kept-alive connection) is closed: uvicorn has no header timeout of its own;
    - a request that arrives in too many small reads, or whose body is still arriving ``body_timeout_s`` after the
      request began, gets a 408 (if no response started) and the connection is closed, checked on every read;
    - a response sent before its request's body was read whole (401, 404, 405, 413, 415, 408, ...) closes the
      connection instead of reading and discarding the rest (a refused 2 GB upload costs nothing more)."""

    class BoundedProtocol(base):
        _head_timer = _timed_cycle = None
        _pieces = _bytes = 0
        _t0 = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._start_request()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._pieces += 1
            self._bytes += len(data)
            if self._pieces > PIECES + self._bytes // BYTES_PER_PIECE:
                return self._refuse(f"the request arrived in {self._pieces} pieces of {self._bytes // self._pieces} "
                                    "bytes on average: send it in larger writes")
            cycle = self.cycle
            if cycle is not None and cycle is self._timed_cycle and not cycle.response_complete \
                    and cycle.more_body and self.loop.time() - self._t0 > body_timeout_s:
                return self._refuse(f"the body was not complete {body_timeout_s:g} s after the request began")
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._timed_cycle:  # this read completed a head
                self._timed_cycle, self._t0 = self.cycle, self.loop.time()
                names = {name for name, _ in self.cycle.scope["headers"]}
                if b"content-length" in names and b"transfer-encoding" in names:
                    self.cycle.keep_alive = False  # RFC 9112 6.1: close the connection after responding to it

        def on_response_complete(self) -> None:
            body_unread = self.cycle is not None and self.cycle.more_body
            super().on_response_complete()
            if body_unread and not self.transport.is_closing():
                self.transport.close()  # after the response is written; the rest of the body is never read
                return
            self._start_request()  # the next request on this kept-alive connection gets the same bounds

        def _start_request(self) -> None:
            self._pieces = self._bytes = 0
            self._cancel_head_timer()
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timeout)

        def _refuse(self, why: str) -> None:
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is None or not cycle.response_started:
                body = json.dumps({"detail": [{"loc": ["body"], "type": "timeout",
                                               "msg": f"request too slow: {why}"}]}).encode()
                self.transport.write(_TOO_SLOW % (len(body), body))
            log.info("closing a connection: %s", why)
            self.transport.close()
            if cycle is not None:  # the app, if it is reading the body, sees the client gone
                cycle.disconnected = True
                cycle.message_event.set()

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            # no request began since the timer was armed, and none is in progress: the head is too slow
            idle = self.cycle is self._head_cycle and (self.cycle is None or self.cycle.response_complete)
            if idle and not self.transport.is_closing():
                log.debug("closing a connection that sent no complete request head in %g s", head_timeout_s)
                self.transport.close()

    return BoundedProtocol


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
                            http=bounded_protocol(settings.client_timeout_s, settings.request_timeout_s),
                            timeout_keep_alive=min(5, settings.client_timeout_s), timeout_graceful_shutdown=backstop,
                            access_log=False,  # ours (service.access) has the request id and the batch size
                            log_config=None)  # uvicorn's loggers reach service.logs' handler (text or JSON)
    server = Server(config, svc.begin_drain)

    def fatal(msg: str) -> None:
        server.should_exit = True  # uvicorn checks this every tick and shuts down cleanly

    svc.on_fatal = fatal
    server.run()
