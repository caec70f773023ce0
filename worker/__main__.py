"""Start a GPU worker of the configured class: ``python -m worker [extra celery worker args]``."""

from __future__ import annotations

import sys

from routing.classes import consumed_queues


def main(argv: list[str]) -> None:
    from worker.celery_app import app, vram_class

    # One pool child per GPU: it holds the models; the parent stays free to talk to the broker
    # and to Flower while a long job runs.
    app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(consumed_queues(vram_class)),
            "--concurrency",
            "1",
            "--pool",
            "prefork",
            "--hostname",
            f"{vram_class.value}@%h",
            "--loglevel",
            "INFO",
            *argv,
        ]
    )


if __name__ == "__main__":
    main(sys.argv[1:])
