"""Where the suite's CPU goes: every process's CPU time, charged to the test its xdist worker ran.

    python bench/suite_cpu.py [--top 30] [--out FILE] [-- PYTEST_ARGS...]

Runs ``python -m pytest`` (the suite as ``make test`` runs it, or the arguments after ``--``)
beside a sampler that reads every process's CPU ticks from /proc once a second. A process is
charged to the xdist worker it descends from (the worker's own processes: the ones whose child
has its ``PYTEST_XDIST_WORKER``), and each second of it to the test that worker was running then
(this file is also a pytest plugin, ``-p bench.suite_cpu``, that writes when each test starts
and ends; the environment is the suite's own: the fork server's starts stay warm). Printed:
CPU-seconds by kind of process (the machine's own too), by test file and by test, and how busy the
CPU was each minute. A process that lives less than a second is missed. Linux only.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMELINE_ENV = "FLEET_SUITE_CPU_TIMELINE"
TICKS = os.sysconf("SC_CLK_TCK")
# Kinds of process, by a piece of their command line (the first that matches).
KINDS = (
    ("redis-server", "redis"),
    ("exec(eval(", "pytest worker"),
    ("localfleet.forkserver", "fork server and its forks (fleet workers, APIs)"),
    ("torch.distributed.run", "torchrun launcher"),
    ("-m worker.group", "torchrun rank"),
    ("-m worker", "fleet worker (cold)"),
    ("uvicorn", "API (cold)"),
    ("moto", "S3 server"),
    ("flower", "Flower"),
    ("pytest", "pytest"),
)


# --- The plugin: loaded in each pytest process with -p bench.suite_cpu -----------------------


def _timeline(event: str, nodeid: str) -> None:
    path = os.environ.get(TIMELINE_ENV)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if path and worker:  # the xdist workers run the tests; the controller only reports them
        with open(path, "a") as out:
            out.write(json.dumps({"worker": worker, "event": event, "test": nodeid, "t": time.time()}) + "\n")


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    _timeline("start", nodeid)


def pytest_runtest_logfinish(nodeid: str, location: object) -> None:
    _timeline("end", nodeid)


# --- The sampler --------------------------------------------------------------------------------


@dataclass
class Process:
    pid: int
    ppid: int
    command: str
    xdist_worker: str


@dataclass
class Samples:
    processes: dict[tuple[int, str], Process] = field(default_factory=dict)
    # (time, [(process key, CPU seconds since the last sample)])
    seconds: list[tuple[float, list[tuple[tuple[int, str], float]]]] = field(default_factory=list)
    busy: list[tuple[float, float]] = field(default_factory=list)  # (time, share of all cores busy)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def sample(samples: Samples, stop: threading.Event, every_s: float = 1.0) -> None:
    last: dict[tuple[int, str], int] = {}
    last_cpu: tuple[int, int] | None = None
    first = True  # the processes already running: their CPU so far is not the run's
    while not stop.is_set():
        now = time.time()
        row = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            stat = _read(f"/proc/{name}/stat").decode(errors="replace")
            if not stat:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            key = (int(name), fields[19])  # pid and start time: a pid used again is another process
            ticks = int(fields[11]) + int(fields[12])
            if key not in samples.processes:
                command = _read(f"/proc/{name}/cmdline").replace(b"\0", b" ").decode(errors="replace")
                environ = _read(f"/proc/{name}/environ").split(b"\0")
                worker = next((e[20:].decode() for e in environ if e.startswith(b"PYTEST_XDIST_WORKER=")), "")
                comm = stat[stat.find("(") + 1 : stat.rfind(")")]
                samples.processes[key] = Process(
                    int(name), int(fields[1]), command[:300] or f"[{comm}]", worker
                )
            if ticks != last.get(key, 0):
                if not first:
                    row.append((key, (ticks - last.get(key, 0)) / TICKS))
                last[key] = ticks
        samples.seconds.append((now, row))
        first = False
        cpu = [int(v) for v in _read("/proc/stat").split(b"\n", 1)[0].split()[1:9]]
        idle, total = cpu[3] + cpu[4], sum(cpu)
        if last_cpu is not None and total > last_cpu[1]:
            samples.busy.append((now, 1 - (idle - last_cpu[0]) / (total - last_cpu[1])))
        last_cpu = (idle, total)
        stop.wait(every_s)


# --- Charging -----------------------------------------------------------------------------------


def kind(process: Process) -> str:
    for piece, name in KINDS:
        if piece in process.command:
            return name
    return process.command.split(" ", 1)[0].rsplit("/", 1)[-1] or "?"


def charge(samples: Samples, timeline: list[dict], top: int) -> str:
    by_pid: dict[int, Process] = {}
    children: dict[int, list[Process]] = collections.defaultdict(list)
    for process in samples.processes.values():
        by_pid[process.pid] = process
        children[process.ppid].append(process)

    def worker_of(process: Process | None, depth: int = 0) -> str | None:
        if process is None or depth > 40:
            return None
        if process.xdist_worker:
            return process.xdist_worker
        # An xdist worker gets its name after it starts; its fork server and children have it.
        if "exec(eval(" in process.command:
            return next((c.xdist_worker for c in children[process.pid] if c.xdist_worker), None)
        return worker_of(by_pid.get(process.ppid), depth + 1)

    runs: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    started: dict[tuple[str, str], float] = {}
    for event in timeline:
        key = (event["worker"], event["test"])
        if event["event"] == "start":
            started[key] = event["t"]
        elif key in started:
            runs[event["worker"]].append((started.pop(key), event["t"], event["test"]))
    for worker in runs:
        runs[worker].sort()
    starts = {worker: [run[0] for run in worker_runs] for worker, worker_runs in runs.items()}

    def test_at(worker: str, t: float) -> str:
        i = bisect.bisect_right(starts.get(worker, []), t) - 1
        # A sample covers the second before it: a test that ended within it is charged.
        if i >= 0 and runs[worker][i][1] >= t - 1.0:
            return runs[worker][i][2]
        return "(between tests: start-up, collection, fixtures of no one test)"

    kinds: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    tests: collections.Counter[str] = collections.Counter()
    total = 0.0
    for t, row in samples.seconds:
        for key, seconds in row:
            process = samples.processes[key]
            total += seconds
            kinds[kind(process)] += seconds
            worker = worker_of(process)
            if worker is None:
                continue
            test = test_at(worker, t)
            tests[test] += seconds
            files[test.split("::", 1)[0]] += seconds
    lines = [f"CPU-seconds in all: {total:,.0f}", "", "by kind of process:"]
    lines += [f"  {s:8.1f}  {name}" for name, s in kinds.most_common(top)]
    lines += ["", "by test file (the suite's processes):"]
    lines += [f"  {s:8.1f}  {name}" for name, s in files.most_common(top)]
    lines += ["", "by test:"]
    lines += [f"  {s:8.1f}  {name}" for name, s in tests.most_common(top)]
    if samples.busy:
        t0 = samples.busy[0][0]
        minutes: dict[int, list[float]] = collections.defaultdict(list)
        for t, share in samples.busy:
            minutes[int((t - t0) // 60)].append(share)
        shares = " ".join(f"{sum(v) / len(v):.2f}" for _, v in sorted(minutes.items()))
        lines += ["", f"share of the CPU busy, each minute: {shares}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=30, help="rows in each table")
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments (default: the suite)")
    args = parser.parse_args()

    samples, stop = Samples(), threading.Event()
    sampler = threading.Thread(target=sample, args=(samples, stop), daemon=True)
    with tempfile.TemporaryDirectory(prefix="suite-cpu-") as tmp:
        timeline_path = Path(tmp) / "timeline.jsonl"
        env = dict(os.environ)
        env[TIMELINE_ENV] = str(timeline_path)
        sampler.start()
        started = time.monotonic()
        code = subprocess.call(
            [sys.executable, "-m", "pytest", "-p", "bench.suite_cpu", *args.pytest_args], cwd=ROOT, env=env
        )
        wall = time.monotonic() - started
        stop.set()
        sampler.join()
        timeline = (
            [json.loads(line) for line in timeline_path.read_text().splitlines()]
            if timeline_path.exists()
            else []
        )
    report = f"pytest exited {code} after {wall:,.0f} s\n" + charge(samples, timeline, args.top)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
