"""The strings one process writes into Redis and another parses, each written and read here.

Metric labels: the fields of the fleet's metric hashes (``Keys.metrics``) and of the run-time
averages (``Keys.durations``) are label values joined by ``LABEL_SEP``: ``<model>|<class>``
(jobs submitted, ETA), ``<model>|<class>|<status>`` (jobs finished), ``<model>|<class>|<phase>``
(model loads), ``<class>|busy_s`` (GPU-busy seconds). The store's Lua scripts write some of them
(``routing.jobs.scripts`` cuts ``LABEL_SEP`` into its text), workers others; the metrics endpoint
(``producer.metrics``), the ETA and the capacity planner parse them.

The other formats that cross layers have their codec beside their builder: queue names
(``routing.classes.queue_name`` / ``parse_queue``), the Celery envelope
(``routing.jobs.messages``: ``TaskMessages.build`` / ``task_id``, ``task_args``), the paging cursor
(``routing.jobs.store.Cursor``) and the request limits a job keeps (``routing.limits``).
"""

from __future__ import annotations

LABEL_SEP = "|"


def encode_label(*values: str) -> str:
    """``values`` as one metric label. Raises ``ValueError`` for no value, an empty one, or one
    holding ``LABEL_SEP`` (its parse would split it)."""
    if not values:
        raise ValueError("a metric label has at least one value")
    for value in values:
        if not value or LABEL_SEP in value:
            raise ValueError(f"a metric label value is non-empty and holds no {LABEL_SEP!r}: {value!r}")
    return LABEL_SEP.join(values)


def parse_label(label: str, count: int | None = None) -> tuple[str, ...]:
    """The values of a label ``encode_label`` wrote; with ``count``, exactly that many. Raises
    ``ValueError`` for an empty value or another count."""
    values = tuple(label.split(LABEL_SEP))
    if not all(values):
        raise ValueError(f"metric label {label!r} has an empty value")
    if count is not None and len(values) != count:
        raise ValueError(f"metric label {label!r} has {len(values)} values, not {count}")
    return values
