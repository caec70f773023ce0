"""Request bodies the HTTP API will read: refused before they are read, or cut off at the cap.

FastAPI reads and parses a JSON body before any dependency runs, the API key check included, so
without this anyone could make the API buffer a body of any size. ``BodyLimits`` wraps the app:

1. A request that carries a body to a route that needs a key, without a valid key: 401, nothing
   of the body read. The tenant found is kept in the request's state (``KEY_TENANT``), so the
   route does not look the key up again (a managed key is a Redis round trip).
2. ``Content-Length`` over the route's cap: 413, nothing read.
3. A body without a length (chunked) is counted as it is read and cut off with a 413 at the cap:
   no more than the cap plus one network read is ever held.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from routing.errors import Unavailable

# The request state's (key, tenant) of the bearer key checked here.
KEY_TENANT = "key_tenant"


class BodyLimits:
    def __init__(
        self,
        app: ASGIApp,
        *,
        tenant_of_key: Callable[[str], Awaitable[str | None]],
        json_max_bytes: int,
        upload_max_bytes: int,
        upload_paths: frozenset[str] = frozenset({"/v1/uploads"}),
        keyed_prefix: str = "/v1/",
    ) -> None:
        self.app = app
        # The key's tenant, None for a key of none; raises Unavailable when that cannot be told
        # now (the body is let through: the route answers 503 itself).
        self.tenant_of_key = tenant_of_key
        self.json_max_bytes = json_max_bytes
        self.upload_max_bytes = upload_max_bytes
        self.upload_paths = upload_paths
        self.keyed_prefix = keyed_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        has_body = "transfer-encoding" in headers or (length is not None and length.strip() not in ("", "0"))
        if not has_body:
            await self.app(scope, receive, send)
            return

        if scope["path"].startswith(self.keyed_prefix):
            scheme, _, key = headers.get("authorization", "").partition(" ")
            tenant = None
            if scheme.lower() == "bearer":
                try:
                    tenant = await self.tenant_of_key(key.strip())
                except Unavailable:
                    tenant = ""
            if tenant:
                scope.setdefault("state", {})[KEY_TENANT] = (key.strip(), tenant)
            elif tenant is None:
                refusal = JSONResponse(
                    {"detail": "send Authorization: Bearer <api key> of your tenant"},
                    401,
                    {"WWW-Authenticate": "Bearer", "Connection": "close"},
                )
                await refusal(scope, receive, send)
                return

        cap = self.upload_max_bytes if scope["path"] in self.upload_paths else self.json_max_bytes
        if length is not None and length.strip().isdigit() and int(length) > cap:
            await _too_large(cap)(scope, receive, send)
            return

        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    # Raised inside the route's body read: the app's handler answers it.
                    raise HTTPException(
                        413, f"the body is over the limit of {cap} bytes", {"Connection": "close"}
                    )
            return message

        await self.app(scope, counted, send)


def _too_large(cap: int) -> JSONResponse:
    return JSONResponse(
        {"detail": f"the body is over the limit of {cap} bytes"}, 413, {"Connection": "close"}
    )
