"""The supervisor side of the group (``worker.group``) without starting one."""

from __future__ import annotations

import pytest
import torch

from worker.group.supervisor import Group, GroupFailed, GroupState, IllegalTransition
from worker.group.torchrun_log import root_cause


def test_a_group_with_more_ranks_than_gpus_is_refused_before_torchrun_starts(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    group = Group(models={"wan2.2-s2v-14b": str(tmp_path)}, world_size=8, device="auto", log_dir=tmp_path)

    with pytest.raises(
        GroupFailed, match=r"8 ranks \(FLEET_GROUP_WORLD_SIZE\), one per GPU, and this machine has 4 GPUs"
    ):
        group.start()

    assert group.proc is None and group.starts == 0 and not list(tmp_path.glob("group-*.log"))


def test_torchruns_failure_summary_names_the_rank_and_its_signal():
    # torch.distributed.elastic's failure template, as torchrun prints it.
    summary = """
Root Cause (first observed failure):
[0]:
  time      : 2026-11-27_12:10:38
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 7694)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 7694
"""
    assert root_cause(summary) == "rank 1 exited with -9 (SIGKILL)"
    assert (
        root_cause(summary.replace("-9 (pid: 7694)  (SIGKILL)", "1 (pid: 7694) ")) == "rank 1 exited with 1"
    )
    assert root_cause("no summary here") is None


def test_the_lifecycle_refuses_a_transition_its_state_does_not_lead_to(tmp_path):
    group = Group(models={"wan2.2-s2v-14b": str(tmp_path)}, world_size=1, device="cpu", log_dir=tmp_path)
    assert group.state is GroupState.CLOSED

    # A job only runs on a group that is ready; a closed one must be started first.
    with pytest.raises(IllegalTransition, match="cannot go from closed to running"):
        group._become(GroupState.RUNNING)

    assert group.state is GroupState.CLOSED
    assert not GroupState.BROKEN.can_become(GroupState.READY)
    assert all(state.can_become(GroupState.CLOSED) for state in GroupState)  # killing always works
