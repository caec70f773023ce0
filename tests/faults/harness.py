"""What the fault tests and the soak share: a Redis of their own (AOF, restartable), waiting,
killing workers, reading a job's events, and a webhook receiver on 127.0.0.2.

Everything here talks to loopback only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from localfleet.process import ServiceProcess
from producer.client import Client, Job
from routing.jobs.record import JobStatus

# Workers load it over the built-in Z-Image adapter through settings.adapters.
FAULT_ADAPTER = "tests.faults.adapters:FaultAdapter"
SMALL = {"model": "z-image-turbo", "width": 64, "height": 64, "steps": 2}


def small_request(prompt: str = "a small one", **extra: object) -> dict[str, object]:
    return {**SMALL, "prompt": prompt, **extra}


_HANDED_OUT: set[int] = set()


def _free_port() -> int:
    """A port nothing listens on now, and not one this process handed out before: the servers
    of a replicated set are given theirs before any of them binds, and the kernel can offer a
    port again until it is bound."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass(frozen=True)
class TlsFiles:
    """A certificate authority of the test's own, and a server certificate it signed for
    127.0.0.1, in PEM files."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        def name(text: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

        def signed(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer, ca: bool):
            now = dt.datetime.now(dt.UTC)
            builder = (
                x509.CertificateBuilder()
                .subject_name(name(subject))
                .issuer_name(name(issuer))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            )
            if not ca:
                address = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
                builder = builder.add_extension(x509.SubjectAlternativeName([address]), critical=False)
            return builder.sign(signer, hashes.SHA256())

        directory.mkdir(parents=True, exist_ok=True)
        ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        files = cls(directory / "ca.pem", directory / "redis.pem", directory / "redis.key")
        pem = serialization.Encoding.PEM
        files.ca.write_bytes(signed("fleet test CA", ca_key, "fleet test CA", ca_key, True).public_bytes(pem))
        server = signed("127.0.0.1", server_key, "fleet test CA", ca_key, False)
        files.cert.write_bytes(server.public_bytes(pem))
        files.key.write_bytes(
            server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return files


class RedisServer:
    """A ``redis-server`` of the suite's own on 127.0.0.1: append-only file fsynced on every
    write, no RDB snapshots, so a restart loses nothing that was acknowledged."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        args: tuple[str, ...] = (),
        tls: TlsFiles | None = None,
    ):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        # More of redis-server's command line (``--replicaof 127.0.0.1 <port>``).
        self.args = args
        # Only TLS on the port, with this server certificate; clients trust its CA.
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={self.tls.ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        if self.tls:
            return redis.Redis.from_url(self.url, socket_connect_timeout=2)
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2)

    def start(self, timeout_s: float = 20) -> None:
        for _ in range(3):  # the free port can be taken before redis binds it: try another
            log = open(self.dir / "redis.log", "ab")
            options = {
                "bind": "127.0.0.1",
                "port": str(self.port),
                "dir": str(self.dir),
                "appendonly": "yes",
                "appendfsync": "always",
                "save": "",
                "protected-mode": "yes",
            }
            if self.tls:
                options |= {
                    "port": "0",
                    "tls-port": str(self.port),
                    "tls-cert-file": str(self.tls.cert),
                    "tls-key-file": str(self.tls.key),
                    "tls-ca-cert-file": str(self.tls.ca),
                    "tls-auth-clients": "no",
                }
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    *(arg for name, value in options.items() for arg in (f"--{name}", value)),
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            if self._wait_up(timeout_s):
                return
            self._reap()
            if self.restarts:  # a restart must come back on the same port: no second guess
                break
            self.port = _free_port()
        raise RuntimeError(f"redis-server did not start:\n{self.log()[-2000:]}")

    def _wait_up(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    return False
                try:
                    # Answers PING while still loading the AOF; wait until it is loaded. The
                    # server that answers must be this one: another on the port (it was taken
                    # before this one bound it, which then exits) would pass for it.
                    info = client.info()
                    ours = self.proc is None or info.get("process_id") == self.proc.pid
                    if ours and info.get("loading") == 0:
                        return True
                except redis.RedisError:
                    pass
                time.sleep(0.05)
            return False
        finally:
            client.close()

    def is_up(self) -> bool:
        client = self.client()
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self, how: str = "shutdown") -> None:
        """``shutdown``: SHUTDOWN NOSAVE (the AOF is already fsynced); ``sigterm``: what a
        supervisor sends; ``sigkill``: a crash (still nothing lost with appendfsync always)."""
        if self.proc is None:
            return
        if how == "shutdown" and self.tls:
            how = "sigterm"  # the same clean shutdown; the bare socket below speaks no TLS
        if how == "shutdown":
            # Over a bare socket: a client library would retry the connection that SHUTDOWN
            # closes, for seconds.
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
                conn.sendall(b"*2\r\n$8\r\nSHUTDOWN\r\n$6\r\nNOSAVE\r\n")
                try:
                    conn.recv(1024)
                except OSError:
                    pass
        elif self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, how: str = "shutdown", down_s: float = 0.0) -> float:
        """Stop it, stay down ``down_s``, start it on the same port and directory; returns the
        seconds it was unreachable."""
        started = time.monotonic()
        self.stop(how)
        time.sleep(down_s)
        self.restarts += 1
        self.start()
        return time.monotonic() - started

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


class ReplicatedRedis:
    """A Redis that outlives its master, of the suite's own on 127.0.0.1: a master, ``replicas``
    replicas of it (each a ``RedisServer``: AOF fsynced on every write) and ``sentinels``
    ``redis-server --sentinel`` processes that watch it under ``MASTER`` and agree by majority
    that it is down after ``DOWN_AFTER_MS``, as a production Sentinel set-up does, only faster."""

    MASTER = "fleet"
    DOWN_AFTER_MS = 1000

    def __init__(self, directory: Path, replicas: int = 2, sentinels: int = 3, tls: TlsFiles | None = None):
        self.dir = Path(directory)
        # With ``tls``, every node and Sentinel speaks only TLS, to clients and to each other.
        self.tls = tls
        self.replication = ("--tls-replication", "yes") if tls else ()
        # Each replica is told the master's port once the master has bound it: a free port can
        # be taken before redis binds it, and the master then starts on another.
        self.nodes = [
            RedisServer(self.dir / f"node-{i}", args=self.replication, tls=tls) for i in range(replicas + 1)
        ]
        self.sentinel_ports = [0] * sentinels  # chosen as each Sentinel starts, for the same reason
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """``FLEET_REDIS_URL``: the data nodes' database, and their TLS options."""
        return self.nodes[0].url

    def sentinel(self, port: int) -> redis.Redis:
        if self.tls:
            return redis.Redis(
                host="127.0.0.1",
                port=port,
                socket_timeout=2,
                decode_responses=True,
                ssl=True,
                ssl_ca_certs=str(self.tls.ca),
            )
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True)

    @property
    def addresses(self) -> list[str]:
        """``FLEET_REDIS_SENTINELS``."""
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def start(self) -> None:
        master, *replicas = self.nodes
        master.start()
        for replica in replicas:
            replica.args = ("--replicaof", "127.0.0.1", str(master.port), *self.replication)
            replica.start()
        try:
            wait_for(lambda: self.online_replicas() == len(self.nodes) - 1, 30, "replicas in sync")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}:\n{self.node_logs()}") from None
        for index in range(len(self.sentinel_ports)):
            self._start_sentinel(index)
        # Every Sentinel knows every replica and the other Sentinels: ready to fail over.
        try:
            wait_for(
                self._sentinels_ready, 30, "Sentinels aware of each other and of the replicas", every_s=0.2
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {self._views()}\n{self.logs()}") from None

    def _start_sentinel(self, index: int) -> None:
        """Start Sentinel ``index`` on a free port, and on another if that one was taken first."""
        directory = self.dir / f"sentinel-{index}"
        directory.mkdir(parents=True, exist_ok=True)
        quorum = len(self.sentinel_ports) // 2 + 1
        for _ in range(3):
            port = self.sentinel_ports[index] = _free_port()
            config = directory / "sentinel.conf"  # Sentinel rewrites it as it learns the set-up
            listen = f"port {port}\n"
            if self.tls:
                listen = (
                    f"port 0\ntls-port {port}\ntls-cert-file {self.tls.cert}\ntls-key-file {self.tls.key}\n"
                    f"tls-ca-cert-file {self.tls.ca}\ntls-auth-clients no\ntls-replication yes\n"
                )
            config.write_text(
                f"{listen}bind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.nodes[0].port} {quorum}\n"
                f"sentinel down-after-milliseconds {self.MASTER} {self.DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.MASTER} 10000\n"
                f"sentinel parallel-syncs {self.MASTER} 2\n"
            )
            log = open(directory / "sentinel.log", "ab")
            proc = subprocess.Popen(
                ["redis-server", str(config), "--sentinel"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            if self._sentinel_up(proc, port):
                self.sentinels.append(proc)
                return
            proc.kill()
            proc.wait()
        raise RuntimeError(f"Sentinel {index} did not start:\n{self.logs()}")

    def _sentinel_up(self, proc: subprocess.Popen[bytes], port: int, timeout_s: float = 20) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with self.sentinel(port) as sentinel:
                    # Only a Sentinel knows the command, and only this one has its pid: not
                    # another server or Sentinel that had the port first.
                    sentinel.sentinel_master(self.MASTER)
                    if sentinel.info("server")["process_id"] == proc.pid:
                        return True
            except redis.RedisError:
                pass
            time.sleep(0.05)
        return False

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            try:
                with self.sentinel(port) as sentinel:
                    master = sentinel.sentinel_master(self.MASTER)
            except redis.RedisError:
                return False
            if master["num-other-sentinels"] < len(self.sentinel_ports) - 1:
                return False
            if master["num-slaves"] < len(self.nodes) - 1:
                return False
        return True

    def master(self) -> RedisServer:
        """The node the Sentinels name master now."""
        with self.sentinel(self.sentinel_ports[0]) as sentinel:
            _host, port = sentinel.sentinel_get_master_addr_by_name(self.MASTER)
        return next(node for node in self.nodes if node.port == int(port))

    def online_replicas(self) -> int:
        """Replicas in sync with the master the Sentinels name (or with the first node, before
        the Sentinels start)."""
        node = self.master() if self.sentinels else self.nodes[0]
        with node.client() as client:
            info = client.info("replication")
        return sum(
            1
            for name, value in info.items()
            if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
        )

    def tilted(self) -> list[int]:
        """The ports of the Sentinels in TILT mode: one whose timer ran more than 2 s late (the
        machine stalled, or its clock jumped) acts on nothing for 30 s."""
        tilted = []
        for port in self.sentinel_ports:
            with self.sentinel(port) as sentinel:
                if sentinel.info("sentinel")["sentinel_tilt"]:
                    tilted.append(port)
        return tilted

    def _out_of_tilt(self) -> None:
        """Wait until no Sentinel is in TILT. A master lost during one is noticed only when it
        ends, up to 30 s later; the replicas have then been cut off from it for longer than ten
        down-after periods (``DOWN_AFTER_MS``), and the Sentinels promote none of them ("no good
        slave"), then or ever. Production's longer down-after period covers a TILT; here each
        fault waits one out instead."""
        wait_for(lambda: not self.tilted(), 40, "Sentinels out of TILT", every_s=0.2)

    def kill_master(self) -> tuple[RedisServer, RedisServer]:
        """SIGKILL the master (a lost machine), and wait until the Sentinels have promoted a
        replica and the other replicas follow it. Returns the old master and the new one."""
        self._out_of_tilt()
        old = self.master()
        old.stop("sigkill")
        return old, self._promoted(old)

    def pause_master(self) -> tuple[RedisServer, RedisServer]:
        """SIGSTOP the master until the Sentinels have promoted a replica, then SIGCONT it: a
        master split off, or one failed over on a false alarm. It is back with the connections it
        had, a master in its own eyes until the Sentinels turn it into a replica (ten seconds and
        more). Returns the old master and the new one."""
        self._out_of_tilt()
        old = self.master()
        assert old.proc is not None
        old.proc.send_signal(signal.SIGSTOP)
        try:
            return old, self._promoted(old)
        finally:
            old.proc.send_signal(signal.SIGCONT)

    def cut_off_master(self) -> tuple[RedisServer, RedisServer]:
        """SIGSTOP the master and leave it so: a master cut off from the network for good, whose
        connections neither answer nor close. Returns it and the replica promoted in its place
        (``stop`` ends it)."""
        self._out_of_tilt()
        old = self.master()
        assert old.proc is not None
        old.proc.send_signal(signal.SIGSTOP)
        return old, self._promoted(old)

    def _promoted(self, old: RedisServer) -> RedisServer:
        try:
            wait_for(lambda: self.master() is not old, 60, "a replica promoted", every_s=0.1)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {self._views()}\n{self.logs()}") from None
        new = self.master()
        # Every Sentinel names it, up, as a master: what a client asking any of them accepts
        # (redis-py's discover_master: a master, neither subjectively nor objectively down).
        try:
            wait_for(lambda: self._all_name(new), 60, "every Sentinel naming the new master", every_s=0.1)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {self._views()}") from None
        wait_for(
            lambda: self.online_replicas() >= len(self.nodes) - 2, 60, "replicas following the new master"
        )
        return new

    def _views(self) -> list[dict[str, object] | None]:
        """What each Sentinel says of the master (None: it does not answer)."""
        views: list[dict[str, object] | None] = []
        for port in self.sentinel_ports:
            try:
                with self.sentinel(port) as sentinel:
                    views.append(sentinel.sentinel_master(self.MASTER))
            except redis.RedisError:
                views.append(None)
        return views

    def _all_name(self, node: RedisServer) -> bool:
        return all(
            view is not None
            and int(view["port"]) == node.port
            and view["role-reported"] == "master"
            and not {"s_down", "o_down"} & set(str(view["flags"]).split(","))
            for view in self._views()
        )

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait()
        self.sentinels = []
        for node in self.nodes:
            node.stop("sigkill")

    def logs(self) -> str:
        sentinel_logs = [
            (self.dir / f"sentinel-{i}" / "sentinel.log") for i in range(len(self.sentinel_ports))
        ]
        return "\n".join(path.read_text(errors="replace")[-3000:] for path in sentinel_logs if path.exists())

    def node_logs(self) -> str:
        return "\n".join(f"node {node.port}:\n{node.log()[-2000:]}" for node in self.nodes)


def wait_for(check: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.05) -> object:
    """Poll ``check`` until it returns something true; that value, or TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(every_s)


def wait_running_and_queued(
    client: Client, jobs: list[Job], running: int = 2, queued: int = 4
) -> list[JobStatus]:
    """Until ``running`` of ``jobs`` are past their first step and ``queued`` more wait: the moment
    a fault test strikes. Returns every job's status then."""
    wait_for(
        lambda: (
            sum((r := client.get(j.id)).status is JobStatus.RUNNING and r.step >= 1 for j in jobs) >= running
            and sum(client.get(j.id).status is JobStatus.QUEUED for j in jobs) >= queued
        ),
        60,
        "some jobs running, more queued",
    )
    return [client.get(j.id).status for j in jobs]


def broker_idle(client: redis.Redis, queues: tuple[str, ...] = ("gpu16",), unacked: str = "unacked") -> bool:
    """No message waits in ``queues`` and none is held unacknowledged. Messages are acknowledged
    late (after their task ends), so every message taken so far has run to its end: what a test
    waits for before asserting that something did not happen (a second run, a redelivery)."""
    return not any(client.llen(queue) for queue in queues) and client.hlen(unacked) == 0


def wait_broker_idle(client: redis.Redis, timeout_s: float = 30, **where: object) -> None:
    wait_for(
        lambda: broker_idle(client, **where),
        timeout_s,
        "broker idle (queues drained, nothing unacknowledged)",
    )


def log_count(worker: ServiceProcess, text: str) -> int:
    return worker.log().count(text)


def wait_log(worker: ServiceProcess, text: str, count: int = 1, timeout_s: float = 60) -> None:
    wait_for(lambda: log_count(worker, text) >= count, timeout_s, f"{text!r} x{count} in {worker.log_path}")


def wait_warm(worker: ServiceProcess, count: int = 1, timeout_s: float = 120) -> None:
    """Until the worker's pool child has loaded the small model (``warm_models``) ``count``
    times: it takes a job at once from then on."""
    wait_log(worker, "loaded z-image-turbo", count, timeout_s)


def kill_group(worker: ServiceProcess) -> None:
    """SIGKILL the worker's whole process group (main process and pool child): a lost machine."""
    try:
        os.killpg(worker.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    worker.proc.wait()


def event_types(store, job_id: str, *, progress: bool = False) -> list[str]:
    return [e["type"] for e in store.events(job_id) if progress or e["type"] != "job.progress"]
