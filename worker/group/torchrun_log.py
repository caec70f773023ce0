"""What torchrun's output says about a group that failed."""

from __future__ import annotations

import re
from pathlib import Path

_ROOT_CAUSE = re.compile(
    r"Root Cause.*?rank\s*:\s*(?P<rank>\d+).*?exitcode\s*:\s*(?P<code>-?\d+)[^\n]*?(?:\((?P<signal>SIG\w+)\))?\s*$",
    re.S | re.M,
)


def root_cause(torchrun_output: str) -> str | None:
    """'rank 1 exited with -9 (SIGKILL)' from torchrun's failure summary, or None."""
    matches = list(_ROOT_CAUSE.finditer(torchrun_output))
    if not matches:
        return None
    found = matches[-1]  # the last summary is this group's latest failure
    signal_name = f" ({found['signal']})" if found["signal"] else ""
    return f"rank {found['rank']} exited with {found['code']}{signal_name}"


def describe_failure(log_path: Path | None, exit_code: int | None, started: bool) -> str:
    """Which rank failed and how (torchrun's summary), else torchrun's state and last log lines;
    ``exit_code`` is torchrun's (None while it runs), ``started`` whether there is a torchrun."""
    text = log_path.read_text(errors="replace") if log_path and log_path.exists() else ""
    cause = root_cause(text)
    if cause:
        return cause + (f"; torchrun exited with {exit_code}" if exit_code is not None else "")
    if exit_code is None and started:
        return "torchrun is still running (it was killed)"
    tail = " | ".join(line.strip() for line in text.strip().splitlines()[-5:])
    if exit_code is None:
        return f"torchrun is still running; last log lines: {tail}"
    return f"torchrun exited with {exit_code}; last log lines: {tail}"
