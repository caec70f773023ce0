"""How the suite runs in parallel processes (pytest-xdist), and what keeps them apart.

``python -m pytest`` starts several xdist workers (``addopts`` in pyproject.toml). Most of a
test's time is spent waiting (on Celery worker processes, HTTP, Redis polling), so more
processes than cores pay off. Each xdist worker gets things of its own:

* a Redis database: counting down from the one in ``FLEET_TEST_REDIS_URL`` (gw0 -> 15,
  gw1 -> 14, ..., never below 2: 0 is the demo's, 1 the benchmarks'), so a worker's
  ``FLUSHDB``, its unprefixed queues (``gpu16``, ``webhooks``...) and the fleet-wide streams
  are never another's (``redis_url``);
* ports: every server a test starts binds a free port (moto, the API, Flower, metrics,
  webhook receivers, the fault suite's redis-server, torchrun's rendezvous);
* folders: pytest's ``tmp_path`` is per worker; the one shared folder, ``var/small-models``,
  is built under a file lock (``small_models``).

Scheduling (``--dist=loadgroup``):

* ``@pytest.mark.alone``: the test must have the CPU whenever it wants it: it measures time, or
  its faults would not be its own under load (the soak, time-limit, SIGTERM and overlap tests).
  While it runs, every other process of the run (the other xdist workers and whatever they
  started) is set to nice 19, and set back when it ends: the kernel's scheduler then gives the
  ``alone`` test's processes nearly all of a core they ask for, and the other tests the time
  they leave idle (these tests mostly wait on sleeps and kills). Setting a nice value back down
  takes root; elsewhere an ``alone`` test runs with no other test beside it: every test holds a
  shared lock on a file of the run while it runs (setup, call and teardown), an ``alone`` test
  holds it exclusively, and a turnstile lock in front of it keeps new tests from slipping in while
  it waits for the running ones to end. The ``alone`` tests also form one xdist group, so one
  xdist worker runs them one after another.
* ``@pytest.mark.heavy``: the test keeps both cores busy for a while (a torchrun group of two
  CPU ranks, a thread each): other tests run beside it, but it is in the
  ``alone`` group, so no two heavy tests run at once and an ``alone`` test never waits on one
  (a heavy test lasts up to a minute and a half; every other test would wait with it).
* A module whose tests share a module-scoped fixture (a model built once, a server started
  once) is one xdist group: built once, not once per xdist worker.
* The groups are handed out first, the largest first; then the other tests, each module's spread
  evenly over the run and the unit tests last (``spread``), so that no module's tests, all
  waiting on the same kind of thing, run on every worker at once.
* ``-n0`` runs everything in this process, one test at a time (``-p no:xdist`` also needs
  ``-o addopts=`` to drop the ``-n`` it does not know); the locks are then not taken.
* ``FLEET_TEST_PROCESSES=N`` (or ``-n N``) sets how many processes ``-n auto`` starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ALONE = "alone"
HEAVY = "heavy"
# The two-rank CPU group modules (S2V, A14B): heavy, and a hang guard with the room another suite
# beside this one needs (the eviction test: about 28 s alone; it took up to 304 s so when the small
# S2V checkpoint's VAE was wider). The group's whole life in test_group.py, about 48 s alone, has
# 900 s of its own.
CPU_GROUP_MARKS = (pytest.mark.heavy, pytest.mark.timeout(600))
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
PROCESSES_ENV = "FLEET_TEST_PROCESSES"
# The tests mostly wait (worker processes, HTTP, Redis), so more processes than cores pay off.
PROCESSES_PER_CORE = 2
# The nice value of every other process of the run while an ``alone`` test runs.
LOWEST_PRIORITY = 19
# The unit tests' folder: ``spread`` leaves them last, in file order.
UNIT_TESTS = "tests/unit/"
# Below it: the demo's database (0) and the benchmarks' (1).
LOWEST_DATABASE = 2
_RUN_DIR = "fleet_parallel_dir"  # workerinput key: the run's folder (lock files, groups)
_GROUPS_FILE = "groups.json"


def worker_index() -> int:
    """0 for gw0 (and for a run without xdist), 1 for gw1, ..."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name.removeprefix("gw"))


def _database(url: str) -> str:
    tail = url.rpartition("/")[2]
    return tail if tail.isdigit() else "0"


def redis_url(base_url: str) -> str:
    """``base_url`` with its database counted down by the xdist worker's index (gw0 and a run
    without xdist: ``base_url`` itself)."""
    db = _database(base_url)
    head = base_url.rpartition("/")[0] if base_url.endswith(f"/{db}") else base_url.rstrip("/")
    own = int(db) - worker_index()
    if worker_index() and own < LOWEST_DATABASE:
        raise pytest.UsageError(
            f"{base_url}: xdist worker {worker_index()} would need database {own}; start from a higher "
            f"database or run fewer processes (-n, {PROCESSES_ENV})"
        )
    return f"{head}/{own}"


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def small_models(out: Path, models: list[str] | None = None) -> Path:
    """Build the small models into ``out`` (a no-op when present): the xdist workers, the soak
    and the demo may all ask at once; the builder holds a file lock beside ``out`` and replaces
    a model's folder only whole (``testkit.small_models.build``)."""
    from testkit.small_models import build

    build(out, models)
    return out


# --- What tests/conftest.py's hooks call -----------------------------------------------------


def processes() -> int:
    """``-n auto``: FLEET_TEST_PROCESSES, else PROCESSES_PER_CORE per core, at most one per Redis
    database from the suite's down to LOWEST_DATABASE."""
    if os.environ.get(PROCESSES_ENV):
        return int(os.environ[PROCESSES_ENV])
    databases = (
        int(_database(os.environ.get("FLEET_TEST_REDIS_URL", DEFAULT_REDIS_URL))) - LOWEST_DATABASE + 1
    )
    return max(1, min(PROCESSES_PER_CORE * (os.cpu_count() or 1), databases))


def share_run_dir(node) -> None:
    """On the xdist controller, for each worker it starts: one folder for the run."""
    config = node.config
    if not hasattr(config, "_fleet_parallel_dir"):
        config._fleet_parallel_dir = tempfile.mkdtemp(prefix="fleet-tests-")
    node.workerinput[_RUN_DIR] = config._fleet_parallel_dir


def remove_run_dir(config: pytest.Config) -> None:
    run_dir = getattr(config, "_fleet_parallel_dir", None)
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)


def record_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On each xdist worker, after collection: write the run's groups (node id -> group) where
    the controller's scheduler reads them. An ``xdist_group`` mark names a group too.

    xdist's own way, a group appended to the node id, is lost on pytest 9.2 (its structured
    node ids ignore the assignment; pytest-xdist issue 1386), so the groups travel in a file."""
    run_dir = getattr(config, "workerinput", {}).get(_RUN_DIR)
    if run_dir is None:
        return
    # A module with an alone or heavy test and a module-scoped fixture goes to the alone group
    # whole: its fixture is then set up once, and only its alone tests hold the lock exclusively.
    alone_modules = {
        _module(item.nodeid) for item in items if any(item.get_closest_marker(m) for m in (ALONE, HEAVY))
    }
    groups = {item.nodeid: name for item in items if (name := _group_of(item, alone_modules)) is not None}
    path = Path(run_dir) / _GROUPS_FILE
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(groups))
    os.replace(partial, path)  # every worker writes the same: the last one stays, whole


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _group_of(item: pytest.Item, alone_modules: set[str]) -> str | None:
    if any(item.get_closest_marker(mark) is not None for mark in (ALONE, HEAVY)):
        return ALONE
    if (mark := item.get_closest_marker("xdist_group")) is not None:
        return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    if _shares_module_fixture(item):
        return ALONE if _module(item.nodeid) in alone_modules else _module(item.nodeid)
    return None


def _shares_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(defs and defs[-1].scope in ("module", "package") for defs in info.name2fixturedefs.values())


def scheduler(config: pytest.Config, log):
    """``--dist=loadgroup``: xdist's scope scheduling (a group goes to one worker whole, the
    groups with the most tests first) over the groups ``record_groups`` wrote; other tests are
    handed out one by one, in the order ``spread`` gives them."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    run_dir = Path(config._fleet_parallel_dir)

    class GroupScheduling(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # called once every worker has collected (and written)
                self.groups = json.loads((run_dir / _GROUPS_FILE).read_text())
            return self.groups.get(nodeid, nodeid)

        spread_out = False

        def _assign_work_unit(self, node) -> None:
            if not self.spread_out:  # the queue is whole once the first unit is handed out
                self.spread_out = True
                queue = dict(self.workqueue)
                tests = [scope for scope, unit in queue.items() if list(unit) == [scope]]  # no group
                ungrouped = set(tests)
                groups = [scope for scope in queue if scope not in ungrouped]
                self.workqueue.clear()
                self.workqueue.update((scope, queue[scope]) for scope in groups + spread(tests))
            # xdist's own sends the first item of each node id: items that share one (the fuzz
            # test's, one per API operation) would all but one go unrun. Send every item.
            scope, work_unit = self.workqueue.popitem(last=False)
            self.assigned_work.setdefault(node, {})[scope] = work_unit
            pending = {nodeid for nodeid, completed in work_unit.items() if not completed}
            collection = self.registered_collections[node]
            node.send_runtest_some([i for i, nodeid in enumerate(collection) if nodeid in pending])

    return GroupScheduling(config, log)


def spread(tests: list[str]) -> list[str]:
    """The tests that are no group, each module's spread evenly over the run instead of one after
    another. Handed out in file order, a module's tests ran on every worker at once: the Redis
    failover and restart tests, which mostly wait on Redis and the Sentinels, then left both
    cores three-quarters idle for a minute. The unit tests, short, stay last, in file order: spread
    too, a long test came last and the run ended on one worker waiting for it."""
    by_module: dict[str, list[str]] = {}
    for nodeid in tests:
        by_module.setdefault(_module(nodeid), []).append(nodeid)
    placed = []
    for order, (module, module_tests) in enumerate(by_module.items()):
        unit = module.startswith(UNIT_TESTS)
        for index, nodeid in enumerate(module_tests):
            share = 0.0 if unit else (index + 0.5) / len(module_tests)
            placed.append((unit, share, order, index, nodeid))
    return [nodeid for *_, nodeid in sorted(placed)]


@contextlib.contextmanager
def turn(item: pytest.Item) -> Iterator[None]:
    """While ``item`` runs: for an ``alone`` test, every other process of the run at nice 19 (as
    root) or the run's lock held exclusively; for any other test, the lock held shared. Outside
    an xdist run, nothing runs beside the test: no lock."""
    run_dir = getattr(item.config, "workerinput", {}).get(_RUN_DIR)
    if run_dir is None:
        yield
        return
    turnstile, running = Path(run_dir) / "turnstile.lock", Path(run_dir) / "running.lock"
    alone = item.get_closest_marker(ALONE) is not None
    if alone and os.geteuid() == 0:  # root may set the others' nice value back down
        own = os.getpriority(os.PRIO_PROCESS, 0)
        _renice_others(LOWEST_PRIORITY)
        try:
            yield
        finally:
            _renice_others(own)
        return
    if alone:
        with _flock(turnstile, fcntl.LOCK_EX), _flock(running, fcntl.LOCK_EX):
            yield
        return
    with _flock(turnstile, fcntl.LOCK_EX):
        pass  # wait here while an alone test runs or waits to
    with _flock(running, fcntl.LOCK_SH):
        yield


_WORKER_VAR = b"PYTEST_XDIST_WORKER="


def _renice_others(value: int) -> None:
    """Set the nice value of every other xdist worker of the run (this one's siblings) and of every
    process started under one (``PYTEST_XDIST_WORKER`` in its environment names another worker);
    processes they start meanwhile inherit it. A process gone meanwhile is skipped."""
    me = os.environ.get("PYTEST_XDIST_WORKER", "")
    parent = os.getppid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            ppid = int(stat.rsplit(") ", 1)[1].split()[1])
            environ = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        worker = next((e.partition(b"=")[2].decode() for e in environ if e.startswith(_WORKER_VAR)), me)
        if ppid == parent or worker != me:
            try:
                os.setpriority(os.PRIO_PROCESS, int(name), value)
            except OSError:
                pass
