"""An httpx transport that loses one answer: the server acts, the caller hears nothing."""

from __future__ import annotations

from collections.abc import Callable

import httpx


class DropFirstResponse(httpx.HTTPTransport):
    """Sends the request, lets the server answer, then loses the answer (a dropped connection):
    once, for the first request ``which`` picks."""

    def __init__(self, which: Callable[[httpx.Request], bool]) -> None:
        super().__init__()
        self.which = which
        self.dropped = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if self.which(request) and not self.dropped:
            response.read()
            response.close()
            self.dropped += 1
            raise httpx.ReadError("connection dropped", request=request)
        return response
