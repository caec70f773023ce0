"""Preprocessing's progress out of the official code, which reports none.

Its work is reached where it goes frame by frame or video by video:

* ``detect`` and ``pose``: ``Pose2d`` calls its detector and its pose model once a frame
  (``preprocess`` wraps the two, per job);
* ``mask`` and ``retarget``: SAM2's propagation through the video and the retargeting loop go
  through ``tqdm``, which ``official.PATCHES`` replace with ``bar``;
* ``encode``: each video written (``standins``' moviepy calls ``video_written``).

Each report goes to the hook of the job preprocessing now (``reporting_to``), which may raise
``JobCanceled``: the work ends at that frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from worker.adapters.base import ProgressCallback

STAGES = ("detect", "pose", "mask", "retarget", "encode")


@dataclass
class _Job:
    hook: ProgressCallback
    videos: int  # the videos the job writes
    frames: int = 0  # the video's frames, once the pose model is given them
    done: dict[str, int] = field(default_factory=dict)  # by stage


_job: ContextVar[_Job | None] = ContextVar("animate_preprocess_job", default=None)


@contextmanager
def reporting_to(hook: ProgressCallback, videos: int) -> Iterator[None]:
    """Reports go to ``hook`` while the block runs; the job writes ``videos`` videos."""
    token = _job.set(_Job(hook, videos))
    try:
        yield
    finally:
        _job.reset(token)


def report(stage: str, done: int, total: int) -> None:
    job = _job.get()
    if job is not None:
        job.hook(stage, done, total)


def frames_are(count: int) -> None:
    """The video has ``count`` frames: the total of the stages that go through them."""
    job = _job.get()
    if job is not None:
        job.frames = count


def one_more(stage: str) -> None:
    """One more frame of ``stage`` is done (one more video, for ``encode``), counted over all
    the loops of the stage (SAM2 goes through a long video in chunks)."""
    job = _job.get()
    if job is None:
        return
    done = job.done[stage] = job.done.get(stage, 0) + 1
    total = job.videos if stage == "encode" else job.frames
    job.hook(stage, done, max(total, done))


def video_written() -> None:
    one_more("encode")


def bar(stage: str) -> Callable[..., Iterator[Any]]:
    """``tqdm(iterable, ...)`` that reports each item as done in ``stage`` once its turn of the
    loop ends."""

    def counting(iterable: Iterable[Any], *_: Any, **__: Any) -> Iterator[Any]:
        for item in iterable:
            yield item
            one_more(stage)

    return counting
