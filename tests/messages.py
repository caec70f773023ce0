"""Run messages for state-machine tests that use a real store and no worker."""

from __future__ import annotations

from routing.celery_config import make_celery
from routing.jobs.messages import TaskMessages
from routing.settings import Settings


class ListMessages(TaskMessages):
    """The fleet's run messages, pushed onto ``list_key`` rather than the list a worker of the
    queue's class reads: no worker takes them."""

    def __init__(self, list_key: str):
        super().__init__(make_celery(Settings(redis_url="redis://127.0.0.1:1/0")))
        self.list_key = list_key

    def run_job(self, job_id: str, queue: str) -> tuple[str, str]:
        return self.list_key, super().run_job(job_id, queue)[1]
