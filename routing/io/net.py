"""Outbound HTTP to addresses a caller chose: input media URLs and webhook endpoints.

This is the server-side-request-forgery surface of the fleet: whoever submits a request chooses
the URL, and our servers make the request from inside our network. So every request resolves the
host once, refuses unless every address is public (no loopback, private, link-local -- which
holds the cloud metadata endpoint --, carrier-grade NAT, multicast or reserved addresses, nor IPv6
forms that carry them), connects to the checked address (no second lookup that a rebinding DNS
server could answer differently), and checks each redirect the same way (webhook posts follow
none). Only ports 80 and 443 are allowed unless the policy names more. One wall-clock deadline
covers connect, TLS, headers and body: a server that sends a byte now and then cannot hold a
fetch past it. Proxy settings in the environment are never used. Every refusal is a ``UrlError``.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from routing.settings import Settings

MAX_REDIRECTS = 5
DEFAULT_PORTS = (80, 443)


class UrlError(Exception):
    """A URL may not be used or could not be reached; the message says why."""


class UrlLookupError(UrlError):
    """The host name could not be resolved: maybe for now only (a caller may retry)."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Sink(Protocol):
    """Where a fetched body goes (a file, or anything that writes and counts like one)."""

    def write(self, chunk: bytes, /) -> int: ...
    def tell(self) -> int: ...


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the default ``UrlPolicy.resolver``)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class UrlPolicy:
    """Where ``fetch_url`` may connect. Production uses the defaults."""

    resolver: Callable[[str, int], list[str]] = resolve_host
    # Networks allowed despite the address rules; empty in production (tests allow a loopback
    # address of their own).
    allow_cidrs: tuple[str, ...] = ()
    # Ports a URL may name on a public host. Addresses in allow_cidrs are exempt (tests run
    # their servers on ephemeral ports).
    allow_ports: tuple[int, ...] = DEFAULT_PORTS
    # The longest URL a request may give to be fetched or posted to (FLEET_MAX_URL_CHARS),
    # checked at submit; redirects the fleet follows are held to it too.
    max_chars: int = 4096
    _allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allowed", tuple(ipaddress.ip_network(c) for c in self.allow_cidrs))

    @classmethod
    def of(cls, settings: Settings) -> UrlPolicy:
        """The policy ``settings`` give (``FLEET_URL_ALLOW_CIDRS``, ``FLEET_URL_ALLOW_PORTS``,
        ``FLEET_MAX_URL_CHARS``)."""
        return cls(
            allow_cidrs=tuple(settings.url_allow_cidrs),
            allow_ports=tuple(settings.url_allow_ports),
            max_chars=settings.max_url_chars,
        )

    def check_length(self, url: str) -> None:
        """Raise ``UrlError`` for a URL longer than ``max_chars``."""
        if len(url) > self.max_chars:
            raise UrlError(f"an http(s) url has at most {self.max_chars} characters (got {len(url)})")

    def allowed_network(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self._allowed)

    def refusal(self, ip: IPAddress) -> str | None:
        """Why ``ip`` may not be connected to, or None when it may."""
        if self.allowed_network(ip):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            # An IPv6 address that carries an IPv4 one reaches that IPv4 host.
            embedded = ip.ipv4_mapped or ip.sixtofour
            if embedded is not None:
                reason = self.refusal(embedded)
                return f"{reason} (via {ip})" if reason else None
        return _address_class(ip)


_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# IETF protocol assignments (RFC 6890): Python 3.11 calls most of this /24 global.
_IETF = ipaddress.ip_network("192.0.0.0/24")
# Deprecated site-local IPv6 (RFC 3879): still routed inside some networks, and Python's
# is_private/is_global do not flag it.
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")


def _address_class(ip: IPAddress) -> str | None:
    # Order matters only for the message: the most specific class an address is in comes first.
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_link_local:
        return "a link-local address (includes cloud metadata endpoints)"
    if ip.is_multicast:
        return "a multicast address"
    if ip in _CGNAT:
        return "a carrier-grade NAT address"
    if ip in _IETF:
        return "an IETF protocol assignment address"
    if ip in _SITE_LOCAL:
        return "a site-local address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "a non-public address"
    return None


DEFAULT_POLICY = UrlPolicy()


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII (IDNA) form, no brackets: what goes in Host and SNI
    port: int
    path: str  # path and query, percent-encoded

    @classmethod
    def parse(cls, url: str) -> _Target:
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise UrlError(f"malformed URL: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise UrlError(f"only http and https URLs can be fetched, not {scheme or 'no scheme'!r}")
        if parts.username is not None or parts.password is not None:
            raise UrlError("URLs with credentials (user@host) are not accepted")
        if not parts.hostname:
            raise UrlError("URL has no host")
        try:
            host = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise UrlError(f"invalid host name {parts.hostname!r}") from None
        path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
        if parts.query:
            path += "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
        return cls(scheme, host, port or (443 if scheme == "https" else 80), path)


def _checked_addresses(target: _Target, policy: UrlPolicy) -> list[str]:
    literal = True
    try:
        addresses = [ipaddress.ip_address(target.host)]  # a literal needs no lookup
    except ValueError:
        literal = False
        try:
            addresses = [ipaddress.ip_address(a) for a in policy.resolver(target.host, target.port)]
        except (OSError, UnicodeError) as e:
            raise UrlLookupError(f"cannot resolve {target.host}: {e}") from None
        except ValueError as e:
            raise UrlError(f"{target.host} resolved to an invalid address: {e}") from None
    if not addresses:
        raise UrlError(f"{target.host} resolves to no address")
    # One bad address refuses the whole host: which one a connection would use is not ours to
    # choose once a second lookup could be involved. A name's refusal says nothing of where it
    # points: that would map internal DNS for whoever asks.
    for ip in addresses:
        reason = policy.refusal(ip)
        if reason and literal:
            raise UrlError(f"{ip} is {reason}; only public addresses can be fetched")
        if reason:
            raise UrlError(
                f"{target.host} is refused: only hosts whose addresses are all public can be fetched"
            )
    if target.port not in policy.allow_ports and not all(policy.allowed_network(ip) for ip in addresses):
        allowed = ", ".join(str(p) for p in policy.allow_ports)
        raise UrlError(f"port {target.port} is not allowed; only {allowed}")
    return [str(ip) for ip in addresses]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address checked beforehand; Host (and SNI) still name the URL's host.

    Socket timeouts bound each read, not the request: a server that drips a byte now and then
    resets them forever. So at ``deadline`` (``time.monotonic()``) a timer shuts the socket down,
    which wakes whatever read or write is blocked on it, TLS handshake included.
    """

    def __init__(self, host: str, port: int, ip: str, deadline: float) -> None:
        super().__init__(host, port, timeout=_remaining(deadline))
        self.pinned_ip = ip
        self.deadline = deadline
        self.expired = False
        self._watchdog: threading.Timer | None = None
        self._handle: socket.socket | None = None  # a dup of the TCP socket: TLS wrapping detaches it

    def connect(self) -> None:
        # Replaces HTTPConnection.connect, which would resolve self.host again.
        self.sock = socket.create_connection((self.pinned_ip, self.port), _remaining(self.deadline))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._handle = self.sock.dup()
        self._watchdog = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        self.expired = True
        if self._handle is not None:
            try:
                self._handle.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def close(self) -> None:
        super().close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443  # so the Host header leaves out ":443"

    def __init__(self, host: str, port: int, ip: str, deadline: float) -> None:
        super().__init__(host, port, ip, deadline)
        self.tls = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        # The certificate is checked against the URL's host, not the address we dialled.
        self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.host)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise UrlError("timed out fetching the URL")
    return left


def _connect(target: _Target, addresses: list[str], deadline: float) -> _PinnedHTTPConnection:
    cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    error: Exception | None = None
    for ip in addresses:
        conn = cls(target.host, target.port, ip, deadline)
        try:
            conn.connect()
            return conn
        except OSError as e:
            conn.close()
            if conn.expired:
                raise UrlError(f"timed out connecting to {target.host}:{target.port}") from None
            error = e
    raise UrlError(f"cannot connect to {target.host}:{target.port}: {error}")


def _get(target: _Target, addresses: list[str], deadline: float, max_bytes: int, out: Sink) -> str | None:
    """One GET: the body of a 200 written to ``out`` (None returned), or the Location of a
    redirect (nothing written)."""
    conn = _connect(target, addresses, deadline)
    # http.client drops conn.sock once it knows the server will close, while the body is still
    # read from the socket: keep a reference to set timeouts on.
    sock = conn.sock
    assert sock is not None
    try:
        conn.request("GET", target.path, headers={"Accept-Encoding": "identity", "User-Agent": "gpu-fleet"})
        response = conn.getresponse()
        if conn.expired:  # the watchdog's shutdown can read as the end of the headers
            raise UrlError(f"timed out fetching from {target.host}")
        if response.status in (301, 302, 303, 307, 308):
            location = response.getheader("Location")
            if not location:
                raise UrlError(f"HTTP {response.status} redirect without a Location")
            return location
        if response.status != 200:
            raise UrlError(f"the server answered HTTP {response.status} {response.reason}")
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise UrlError(f"the file is {int(length)} bytes, over the limit of {max_bytes}")
        size = 0
        # The response closes its file (and so the socket) once the body is all read.
        while not response.isclosed():
            sock.settimeout(_remaining(deadline))  # bounds each read by the time left
            chunk = response.read(min(1 << 16, max_bytes + 1 - size))
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise UrlError(f"the file is over the limit of {max_bytes} bytes")
            out.write(chunk)
        if conn.expired:  # the watchdog's shutdown reads as the end of the body
            raise UrlError(f"timed out fetching from {target.host}")
        return None
    except (OSError, http.client.HTTPException) as e:
        if conn.expired:
            raise UrlError(f"timed out fetching from {target.host}") from None
        raise UrlError(f"fetching from {target.host} failed: {type(e).__name__}: {e}") from None
    finally:
        conn.close()


def fetch_url(
    url: str, *, max_bytes: int, timeout_s: float = 15, policy: UrlPolicy = DEFAULT_POLICY
) -> bytes:
    """The body of ``url`` (http/https only, public addresses only, at most ``max_bytes``).

    ``timeout_s`` bounds the whole fetch, redirects included, however slowly the server sends
    (name resolution aside: the system resolver takes no timeout). Proxy settings in the environment are not used.
    """
    out = io.BytesIO()
    fetch_into(url, out, max_bytes=max_bytes, deadline=time.monotonic() + timeout_s, policy=policy)
    return out.getvalue()


def fetch_into(
    url: str, out: Sink, *, max_bytes: int, deadline: float, policy: UrlPolicy = DEFAULT_POLICY
) -> int:
    """``fetch_url``, writing the body to ``out`` as it arrives (a file: nothing of it is held
    in memory) by ``deadline`` (``time.monotonic()``), which one request's fetches may share;
    returns the body's size. On a ``UrlError``, ``out`` may hold part of a body."""
    for _ in range(MAX_REDIRECTS + 1):
        _remaining(deadline)
        policy.check_length(url)
        target = _Target.parse(url)
        location = _get(target, _checked_addresses(target, policy), deadline, max_bytes, out)
        if location is None:
            return out.tell()
        url = urllib.parse.urljoin(url, location)
    raise UrlError(f"more than {MAX_REDIRECTS} redirects")


def check_url(url: str, policy: UrlPolicy = DEFAULT_POLICY) -> list[str]:
    """The checked addresses of ``url``'s host; raises ``UrlError`` if it may not be used."""
    policy.check_length(url)
    target = _Target.parse(url)
    return _checked_addresses(target, policy)


@dataclass(frozen=True)
class PostResult:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes  # at most the first 4 KiB: for the delivery log, not for parsing


def post_url(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout_s: float = 15,
    policy: UrlPolicy = DEFAULT_POLICY,
) -> PostResult:
    """POST ``body`` to ``url`` under the same address rules as ``fetch_url``, all within
    ``timeout_s``. Redirects are not followed: a 3xx comes back as the result, like any other
    status."""
    deadline = time.monotonic() + timeout_s
    target = _Target.parse(url)
    conn = _connect(target, _checked_addresses(target, policy), deadline)
    sock = conn.sock
    assert sock is not None
    try:
        conn.request("POST", target.path, body=body, headers={"User-Agent": "gpu-fleet", **headers})
        sock.settimeout(_remaining(deadline))
        response = conn.getresponse()
        result = PostResult(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read(4096)
        )
        if conn.expired:  # the watchdog's shutdown can read as a short answer
            raise UrlError(f"timed out posting to {target.host}")
        return result
    except (OSError, http.client.HTTPException) as e:
        if conn.expired:
            raise UrlError(f"timed out posting to {target.host}") from None
        raise UrlError(f"posting to {target.host} failed: {type(e).__name__}: {e}") from None
    finally:
        conn.close()
