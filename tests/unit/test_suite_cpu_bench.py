"""bench/suite_cpu.py charges each process's CPU to the test its xdist worker ran: read from this
process's own /proc, and charged from samples of a made-up run."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("suite_cpu", ROOT / "bench" / "suite_cpu.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up as they are made
    spec.loader.exec_module(module)
    return module


def test_cpu_is_charged_to_the_test_its_xdist_worker_ran_and_the_rest_only_by_kind(bench):
    P = bench.Process
    # gw0's own process (it learns its name after it starts), its fork server, a fork of it (a
    # fleet worker: no name of its own), and the machine's kernel thread.
    worker = P(100, 1, "python -c import sys;exec(eval(sys.stdin.readline()))", "")
    forkserver = P(101, 100, "python -m localfleet.forkserver", "gw0")
    fork = P(102, 101, "python -m localfleet.forkserver", "")
    kernel = P(2, 0, "[kdamond.0]", "")
    samples = bench.Samples(processes={(p.pid, "1"): p for p in (worker, forkserver, fork, kernel)})
    samples.seconds = [
        (11.0, [((102, "1"), 1.0), ((2, "1"), 3.0)]),
        (15.0, [((100, "1"), 2.0)]),
        (20.5, [((101, "1"), 0.5)]),  # test B ended within the second before the sample
        (30.0, [((101, "1"), 0.25)]),  # between tests
    ]
    timeline = [
        {"worker": "gw0", "event": "start", "test": "tests/a.py::test_a", "t": 10.0},
        {"worker": "gw0", "event": "end", "test": "tests/a.py::test_a", "t": 12.0},
        {"worker": "gw0", "event": "start", "test": "tests/b.py::test_b", "t": 12.0},
        {"worker": "gw0", "event": "end", "test": "tests/b.py::test_b", "t": 20.0},
    ]
    report = bench.charge(samples, timeline, top=10)
    assert "CPU-seconds in all: 7" in report
    tests = [line.strip() for line in report.split("by test:\n", 1)[1].splitlines()]
    assert "1.0  tests/a.py::test_a" in tests
    assert "2.5  tests/b.py::test_b" in tests  # 2.0 and the 0.5 just after its end
    assert any(
        line.endswith("(between tests: start-up, collection, fixtures of no one test)") for line in tests
    )
    assert "3.0  [kdamond.0]" in report.split("by test file", 1)[0]
    assert "tests/a.py" in report.split("by test file", 1)[1]
    assert "[kdamond.0]" not in report.split("by test file", 1)[1]


def test_the_sampler_reads_this_process_and_charges_nothing_it_ran_before(bench):
    samples, stop = bench.Samples(), threading.Event()
    sampler = threading.Thread(target=bench.sample, args=(samples, stop, 0.2))
    sampler.start()
    deadline = time.monotonic() + 30
    while len(samples.seconds) < 3 and time.monotonic() < deadline:  # CPU for the sampler to see
        sum(range(200_000))
    stop.set()
    sampler.join()
    ours = [key for key, process in samples.processes.items() if process.pid == os.getpid()]
    assert len(ours) == 1 and "python" in samples.processes[ours[0]].command
    assert samples.seconds[0][1] == []  # what every process used before the sampler started is not counted
    charged = sum(seconds for _, row in samples.seconds[1:] for key, seconds in row if key in ours)
    assert charged > 0
    assert samples.busy and all(0 <= share <= 1 for _, share in samples.busy)
