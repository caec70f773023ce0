"""``python -m testkit.slow_worker [celery worker args]``: the fleet's GPU worker (``python -m
worker``), its object store behind ``testkit.storage.SlowStorage``."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from testkit.storage import slow_storage
    from worker import __main__ as worker_main
    from worker import celery_app

    celery_app.storage_factory = slow_storage
    worker_main.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
