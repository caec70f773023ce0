"""fetch_url against real HTTP servers on loopback addresses.

One server listens on 127.0.0.2, which the tests' policy allows; another on 127.0.0.1, which it
does not (as in production, where all loopback is refused). Every other address class is tested
with the connection made impossible: the check must refuse before any connection, and no test
sends traffic anywhere but loopback.
"""

from __future__ import annotations

import io
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from routing.io.media import check_image
from routing.io.net import UrlError, UrlPolicy, fetch_url

pytestmark = pytest.mark.integration

POLICY = UrlPolicy(allow_cidrs=("127.0.0.2/32",))
Route = Callable[[BaseHTTPRequestHandler], None]


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def body(data: bytes, content_type: str = "application/octet-stream") -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return route


def redirect(location: str, status: int = 302) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


class Server:
    """An HTTP server in a thread that counts the requests it answers."""

    def __init__(self, host: str) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Host header)
        self.release = threading.Event()  # lets slow routes end at teardown
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Host")))
                route = server.routes.get(self.path)
                try:
                    route(self) if route else self.send_error(404)
                except OSError:
                    pass  # the client hung up on purpose (size limit, timeout)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.host = host
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def hits(self) -> int:
        return len(self.requests)

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def allowed() -> Iterator[Server]:
    server = Server("127.0.0.2")
    yield server
    server.close()


@pytest.fixture
def forbidden() -> Iterator[Server]:
    server = Server("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every connection attempt is recorded and fails: tests that use this must refuse first."""
    attempts: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        attempts.append(address)
        raise ConnectionRefusedError("test: no connection may be attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def resolver(table: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    return lambda host, port: table[host]


def test_fetches_png_from_allowed_server(allowed: Server) -> None:
    allowed.routes["/cat.png"] = body(png(), "image/png")
    data = fetch_url(allowed.url("/cat.png"), max_bytes=1 << 20, policy=POLICY)
    assert data == png()
    assert check_image(data, max_pixels=1000, max_side=100).format == "PNG"


def test_connects_to_the_checked_address_and_sends_the_original_host(
    allowed: Server, forbidden: Server
) -> None:
    # A rebinding resolver: the first answer passes the check, any later one is loopback.
    lookups: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.2"] if len(lookups) == 1 else ["127.0.0.1"]

    allowed.routes["/cat.png"] = body(png())
    url = f"http://media.test:{allowed.port}/cat.png"
    data = fetch_url(url, max_bytes=1 << 20, policy=UrlPolicy(rebinding, ("127.0.0.2/32",)))
    assert data == png()
    assert lookups == ["media.test"]
    assert allowed.requests == [("/cat.png", f"media.test:{allowed.port}")]
    assert forbidden.hits == 0


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command for a test certificate"
)
def test_https_sends_sni_and_checks_the_certificate_against_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=media.test",
         "-addext", "subjectAltName=DNS:media.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = Server("127.0.0.2")
    names: list[str | None] = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    tls.sni_callback = lambda sock, name, ctx: names.append(name)
    server.httpd.socket = tls.wrap_socket(server.httpd.socket, server_side=True)
    server.routes["/cat.png"] = body(png())
    # Trust the test certificate, as the system store trusts a real one.
    trusting = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda: trusting(cafile=str(cert)))
    policy = UrlPolicy(
        resolver({"media.test": ["127.0.0.2"], "other.test": ["127.0.0.2"]}), ("127.0.0.2/32",)
    )
    try:
        assert (
            fetch_url(f"https://media.test:{server.port}/cat.png", max_bytes=1 << 20, policy=policy) == png()
        )
        assert names == ["media.test"]
        assert server.requests == [("/cat.png", f"media.test:{server.port}")]
        # Same address, another name: the certificate does not match, whatever was dialled.
        with pytest.raises(UrlError, match="certificate"):
            fetch_url(f"https://other.test:{server.port}/", max_bytes=1000, policy=policy)
    finally:
        server.close()


def test_refuses_loopback_server(forbidden: Server) -> None:
    forbidden.routes["/"] = body(b"secret")
    with pytest.raises(UrlError, match="loopback"):
        fetch_url(forbidden.url("/"), max_bytes=1000, policy=POLICY)
    assert forbidden.hits == 0


def test_refuses_metadata_address_without_connecting(connects: list[tuple[str, int]]) -> None:
    with pytest.raises(UrlError, match="169.254.169.254 is a link-local address"):
        fetch_url("http://169.254.169.254/latest/meta-data/", max_bytes=1000, timeout_s=0.5, policy=POLICY)
    assert connects == []  # refused before any connection (no time bound needed to show it)


def test_refuses_name_resolving_to_private_without_connecting(connects: list[tuple[str, int]]) -> None:
    policy = UrlPolicy(resolver({"internal.test": ["10.0.0.1"]}), POLICY.allow_cidrs)
    with pytest.raises(
        UrlError, match="internal.test is refused: only hosts whose addresses are all public"
    ) as e:
        fetch_url("https://internal.test/x.png", max_bytes=1000, policy=policy)
    # Where an internal name points is not the caller's to learn.
    assert "10.0.0.1" not in str(e.value) and "private" not in str(e.value)
    assert connects == []


@pytest.mark.parametrize("answers", [["93.184.216.34", "127.0.0.1"], ["127.0.0.1", "93.184.216.34"]])
def test_refuses_name_with_any_loopback_address(answers: list[str], connects: list[tuple[str, int]]) -> None:
    policy = UrlPolicy(resolver({"mixed.test": answers}), POLICY.allow_cidrs)
    with pytest.raises(UrlError, match="mixed.test is refused") as e:
        fetch_url("http://mixed.test/", max_bytes=1000, policy=policy)
    assert "127.0.0.1" not in str(e.value) and "loopback" not in str(e.value)
    assert connects == []


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("[::ffff:169.254.169.254]", "link-local"),
        ("[fd12:3456::1]", "private"),
        ("[fe80::1]", "link-local"),
        ("[2002:a00:1::]", "private"),  # 6to4 wrapping 10.0.0.1
        ("100.64.1.2", "carrier-grade NAT"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("224.0.0.251", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("192.0.0.9", "IETF protocol assignment"),  # global to Python 3.11's ipaddress
        ("192.0.0.255", "IETF protocol assignment"),
        # 127.0.0.1 spelled as names the system resolves: refused as names are, not saying where to.
        ("2130706433", "2130706433 is refused"),
        ("0x7f.1", "0x7f.1 is refused"),
        ("127.0.0.3", "loopback"),  # only the allowed /32 is allowed, not its neighbours
    ],
)
def test_refuses_address_classes_without_connecting(
    host: str, kind: str, connects: list[tuple[str, int]]
) -> None:
    with pytest.raises(UrlError, match=kind):
        fetch_url(f"http://{host}/", max_bytes=1000, policy=POLICY)
    assert connects == []


def test_redirect_to_loopback_is_refused(allowed: Server, forbidden: Server) -> None:
    forbidden.routes["/"] = body(b"secret")
    allowed.routes["/go"] = redirect(forbidden.url("/"))
    with pytest.raises(UrlError, match="127.0.0.1 is a loopback"):
        fetch_url(allowed.url("/go"), max_bytes=1000, policy=POLICY)
    assert allowed.hits == 1
    assert forbidden.hits == 0


def test_redirect_to_file_scheme_is_refused(allowed: Server) -> None:
    allowed.routes["/go"] = redirect("file:///etc/passwd")
    with pytest.raises(UrlError, match="only http and https"):
        fetch_url(allowed.url("/go"), max_bytes=1000, policy=POLICY)


def test_follows_five_redirects_but_not_six(allowed: Server) -> None:
    allowed.routes["/r0"] = body(b"arrived")
    for n in range(1, 7):
        allowed.routes[f"/r{n}"] = redirect(f"/r{n - 1}", status=(301, 302, 303, 307, 308)[n % 5])
    assert fetch_url(allowed.url("/r5"), max_bytes=1000, policy=POLICY) == b"arrived"
    with pytest.raises(UrlError, match="more than 5 redirects"):
        fetch_url(allowed.url("/r6"), max_bytes=1000, policy=POLICY)


def test_redirect_loop_is_capped(allowed: Server) -> None:
    allowed.routes["/loop"] = redirect("/loop")
    with pytest.raises(UrlError, match="more than 5 redirects"):
        fetch_url(allowed.url("/loop"), max_bytes=1000, policy=POLICY)
    assert allowed.hits == 6  # the request and five redirects followed


def test_body_at_the_limit_is_accepted_and_one_byte_more_refused(allowed: Server) -> None:
    allowed.routes["/ok"] = body(b"x" * 1000)
    allowed.routes["/big"] = body(b"x" * 1001)
    assert len(fetch_url(allowed.url("/ok"), max_bytes=1000, policy=POLICY)) == 1000
    with pytest.raises(UrlError, match="1001 bytes, over the limit of 1000"):
        fetch_url(allowed.url("/big"), max_bytes=1000, policy=POLICY)


def test_body_without_length_is_cut_off_at_the_limit(allowed: Server) -> None:
    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()  # HTTP/1.0, no Content-Length: the body ends when the server closes
        for _ in range(1600):  # 100 MiB, far more than the client may take
            h.wfile.write(b"x" * 65536)

    allowed.routes["/stream"] = endless
    started = time.monotonic()
    with pytest.raises(UrlError, match="over the limit of 100000 bytes"):
        fetch_url(allowed.url("/stream"), max_bytes=100_000, policy=POLICY)
    assert time.monotonic() - started < 5


def test_slow_server_times_out(allowed: Server) -> None:
    allowed.routes["/slow"] = lambda h: allowed.release.wait(10) and None
    started = time.monotonic()
    with pytest.raises(UrlError, match="(?i)timed out"):
        fetch_url(allowed.url("/slow"), max_bytes=1000, timeout_s=0.5, policy=POLICY)
    assert time.monotonic() - started < 2


def drip(release: threading.Event, *, in_headers: bool) -> Route:
    """Sends a byte every 0.2 s, for up to 10 s: every read gets data well within any timeout."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        if not in_headers:
            h.wfile.write(b"Content-Length: 100\r\n\r\n")
        h.wfile.flush()
        for _ in range(50):
            if release.wait(0.2):
                return
            h.wfile.write(b"X" if in_headers else b"x")
            h.wfile.flush()

    return route


@pytest.mark.parametrize("in_headers", [False, True], ids=["body", "headers"])
def test_a_server_that_drips_bytes_is_held_to_one_deadline(allowed: Server, in_headers: bool) -> None:
    allowed.routes["/drip"] = drip(allowed.release, in_headers=in_headers)
    started = time.monotonic()
    with pytest.raises(UrlError, match="(?i)timed out"):
        fetch_url(allowed.url("/drip"), max_bytes=1000, timeout_s=1, policy=POLICY)
    assert time.monotonic() - started < 2.5


def test_http_error_status_is_refused(allowed: Server) -> None:
    with pytest.raises(UrlError, match="HTTP 404"):
        fetch_url(allowed.url("/missing"), max_bytes=1000, policy=POLICY)


@pytest.mark.parametrize(
    "url",
    ["ftp://127.0.0.2/x.png", "file:///etc/passwd", "gopher://127.0.0.2/", "//127.0.0.2/x", "127.0.0.2/x"],
)
def test_refuses_other_schemes(url: str, connects: list[tuple[str, int]]) -> None:
    with pytest.raises(UrlError, match="only http and https"):
        fetch_url(url, max_bytes=1000, policy=POLICY)
    assert connects == []


def test_refuses_credentials_in_url(connects: list[tuple[str, int]]) -> None:
    with pytest.raises(UrlError, match="credentials"):
        fetch_url("http://user:pw@127.0.0.2/", max_bytes=1000, policy=POLICY)
    assert connects == []
