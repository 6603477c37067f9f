"""Request-head limits for uvicorn's httptools protocol (`python -m service`, every mode).

uvicorn caps a request's head only with its h11 protocol (`h11_max_incomplete_event_size`);
with httptools (the faster parser, uvicorn's default here) a 4 MB header or 5,000 headers were
read and served (issue 33). This protocol keeps httptools and refuses, with 431 and a closed
connection, a head over `h11_max_incomplete_event_size` bytes (the same setting, so either
parser gets the same limit) or with more than MAX_HEADERS header lines. Bytes are counted as
they arrive, so an endless header is cut off at the limit, not buffered.

Imported by uvicorn in each worker process (config `http="service.http_limits:..."`): keep it
light (no numpy, faiss, onnxruntime).
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Header lines one request may carry (hyper's, so granian's, limit too).
MAX_HEADERS = 100
DEFAULT_MAX_HEAD_BYTES = 16 * 1024


class HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a refused request."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.max_head_bytes: int = (config.h11_max_incomplete_event_size
                                    or DEFAULT_MAX_HEAD_BYTES)
        self._head_open = False  # a request began and its head is not complete yet
        self._head_bytes = 0
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._head_open and not self._refused:
            # The whole chunk went into an unfinished head (at most one chunk of a previous
            # body is counted with it: the limit is never looser than stated).
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._head_open = False
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if len(self.headers) > MAX_HEADERS or size > self.max_head_bytes:
            self._refuse()
            raise HeadTooLarge  # the parser stops; its 400 is not sent (send_400_response)
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            super().send_400_response(msg)

    def _refuse(self) -> None:
        self._refused = True
        body = json.dumps({"detail": f"request headers over the limit: at most {MAX_HEADERS} "
                                     f"headers and {self.max_head_bytes} bytes"}).encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"content-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n"
                             b"connection: close\r\n\r\n" + body)
        self.transport.close()
