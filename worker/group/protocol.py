"""The messages between the supervisor (in the Celery pool child) and the group's rank 0.

Each is a dataclass named by its ``type``; on the connection it travels as a plain dict
(``encode``), and the receiver turns it back with ``decode``, which refuses an unknown type or a
missing field with a ``ProtocolError`` that names it.

    supervisor -> rank 0:  Job, Continue, Stop, Shutdown
    rank 0 -> supervisor:  Ready, Step, then one of VideoResult, ImagesResult, Canceled, JobFailed
                           per job; Broken when the group cannot go on
    rank 0 -> every rank:  Idle (a heartbeat while no job comes), and the supervisor's messages
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar


class ProtocolError(ValueError):
    """A message that is not one of the protocol's, or lacks a field its type needs."""


@dataclass(frozen=True)
class Ready:
    type: ClassVar[str] = "ready"
    world_size: int
    pids: list[int]
    models: list[str]


@dataclass(frozen=True)
class Job:
    type: ClassVar[str] = "job"
    job_id: str
    model: str
    request: dict[str, Any]  # the request as JSON, its seed filled in
    inputs: dict[str, Any]  # field -> path of the stored bytes (a list of paths for a list)
    workdir: str  # the job's directory, which every rank reads and writes


@dataclass(frozen=True)
class Step:
    type: ClassVar[str] = "step"
    job_id: str
    step: int
    total: int


@dataclass(frozen=True)
class Continue:
    type: ClassVar[str] = "continue"


@dataclass(frozen=True)
class Stop:
    type: ClassVar[str] = "stop"


@dataclass(frozen=True)
class Shutdown:
    type: ClassVar[str] = "shutdown"


@dataclass(frozen=True)
class Idle:
    type: ClassVar[str] = "idle"


@dataclass(frozen=True)
class VideoResult:
    type: ClassVar[str] = "video"
    job_id: str
    path: str  # the MP4 rank 0 encoded
    width: int
    height: int
    frame_count: int
    fps: int
    seed: int | None = None
    cache: str | None = None  # the step-caching method it was made with
    timings: dict[str, float] = field(default_factory=dict)  # the model's own figures of the job


@dataclass(frozen=True)
class ImagesResult:
    type: ClassVar[str] = "images"
    job_id: str
    paths: list[str]  # one PNG per image (lossless: the runner encodes the requested format)
    seed: int | None = None
    seeds: list[int] = field(default_factory=list)  # one per image when a job makes several
    cache: str | None = None


@dataclass(frozen=True)
class Canceled:
    type: ClassVar[str] = "canceled"
    job_id: str
    steps: list[int] = field(default_factory=list)  # where each rank stopped


@dataclass(frozen=True)
class JobFailed:
    type: ClassVar[str] = "error"
    job_id: str
    message: str


@dataclass(frozen=True)
class Broken:
    type: ClassVar[str] = "group_broken"
    message: str = ""


Message = (
    Ready
    | Job
    | Step
    | Continue
    | Stop
    | Shutdown
    | Idle
    | VideoResult
    | ImagesResult
    | Canceled
    | JobFailed
    | Broken
)
Result = VideoResult | ImagesResult
# What ends a job, as rank 0 answers it.
JOB_ENDS = (VideoResult, ImagesResult, Canceled, JobFailed)

_TYPES: dict[str, type[Any]] = {
    cls.type: cls
    for cls in (
        Ready,
        Job,
        Step,
        Continue,
        Stop,
        Shutdown,
        Idle,
        VideoResult,
        ImagesResult,
        Canceled,
        JobFailed,
        Broken,
    )
}


def encode(message: Message) -> dict[str, Any]:
    return {"type": message.type} | {f.name: getattr(message, f.name) for f in fields(message)}


def decode(data: Any) -> Message:
    """The message ``data`` carries; ``ProtocolError`` naming what is wrong with it."""
    if not isinstance(data, dict):
        raise ProtocolError(f"a message is a dict with a 'type', not {type(data).__name__}: {data!r:.200}")
    kind = data.get("type")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r} (known: {', '.join(sorted(_TYPES))})")
    names = [f.name for f in fields(cls)]
    missing = [
        f.name
        for f in fields(cls)
        if f.name not in data and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ProtocolError(f"{kind!r} message lacks {', '.join(missing)}")
    return cls(**{name: data[name] for name in names if name in data})
