"""A tenant's webhook endpoint for the tests: a real HTTP server on 127.0.0.2 (the test settings
allow that address; all other loopback stays refused) that verifies each delivery with
``standardwebhooks`` and applies each event once by webhook-id, as a tenant's receiver must."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook as Signer
from standardwebhooks.webhooks import WebhookVerificationError


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() on arrival
    verified: bool


class Receiver:
    """A tenant's endpoint: verifies each delivery, answers from a per-path plan (200 when the plan
    is empty), and applies each event once however often it arrives."""

    def __init__(self, secret: str) -> None:
        self.signer = Signer(secret)
        self.plans: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.deliveries: list[Delivery] = []
        self.applied: dict[str, dict] = {}  # webhook-id -> payload: the receiver's side effects
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                verified = receiver.verify(body, headers)
                with receiver.lock:
                    receiver.deliveries.append(Delivery(self.path, headers, body, time.monotonic(), verified))
                    plan = receiver.plans.get(self.path) or []
                    status, extra = plan.pop(0) if plan else (200, {})
                    if not verified:
                        status, extra = 401, {}
                    elif 200 <= status < 300:
                        receiver.applied.setdefault(headers["webhook-id"], json.loads(body))
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def verify(self, body: bytes, headers: dict[str, str]) -> bool:
        try:
            self.signer.verify(body, headers)
            return True
        except WebhookVerificationError:
            return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.2:{self.port}{path}"

    def plan(self, path: str, *answers: int | tuple[int, dict[str, str]]) -> None:
        self.plans[path] = [a if isinstance(a, tuple) else (a, {}) for a in answers]

    def hits(self, path: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path == path]

    @property
    def unverified(self) -> int:
        """Deliveries whose signature did not verify (answered 401)."""
        with self.lock:
            return sum(not d.verified for d in self.deliveries)

    def events(self, event_type: str) -> dict[str, dict]:
        """webhook-id -> payload of the distinct events of one type applied."""
        with self.lock:
            return {k: v for k, v in self.applied.items() if v["type"] == event_type}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
