"""``python -m tests.faults.dies_on_take [celery worker args]``: the fleet's GPU worker (``python
-m worker``), whose main process SIGKILLs its process group (itself and its pool child: a lost
machine) as it takes its first message, at the instant ``FAULT_DIE_ON_TAKE`` names:

    before-unacked  BRPOP has taken the message off its queue; Kombu has not written it into its
                    unacknowledged set (worker.lost)
    after-unacked   Kombu's write of it into its unacknowledged set has returned; nothing else of
                    the worker has seen it (worker.held: before the holder's record was written in
                    that same transaction, it was not recorded yet here)

The kill goes on the ``append`` of the QoS class of whichever transport the worker's app names,
so the tests that use it run against any version of the worker.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

MODULE = "tests.faults.dies_on_take"
WHERE = ("before-unacked", "after-unacked")


def _die(where: str, message: Any) -> None:
    os.write(2, f"fault: dying as it takes {message.headers.get('id')} ({where})\n".encode())
    if os.getpgid(0) == os.getpid():  # its own group, as the tests start it
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    from kombu.transport import resolve_transport

    from worker import __main__ as worker_main
    from worker import celery_app

    where = os.environ["FAULT_DIE_ON_TAKE"]
    if where not in WHERE:
        raise SystemExit(f"FAULT_DIE_ON_TAKE must be one of {', '.join(WHERE)}, not {where!r}")
    qos = resolve_transport(celery_app.app.conf.broker_transport or "redis").Channel.QoS
    append = qos.append

    def dying_append(self: Any, message: Any, delivery_tag: str) -> None:
        if where == "before-unacked":
            _die(where, message)
        append(self, message, delivery_tag)
        _die(where, message)

    qos.append = dying_append
    worker_main.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
