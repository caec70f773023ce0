"""The official code's group models on the small checkpoints, on a CPU: ``SmallS2VGroupModel`` and
``SmallA14BGroupModel``, the group models the tests and the demo name in
``settings.group_adapters`` (``GROUP_MODEL``, ``A14B_GROUP_MODEL``).

The fleet's ``worker.adapters.s2v.S2VGroupModel`` and ``worker.adapters.a14b.A14BGroupModel`` run
the official code on CUDA at the size a job asks for. These add, through their seams
(``worker.adapters.official_group``):

* ``_config``: on a CPU, the official code's CUDA device, FSDP device and bfloat16 casts named for
  the CPU (``cpu.PATCHES``) and a float32 config (``cpu.config_for``);
* ``_loading``: T5 and the VAE built at the small checkpoint's sizes (``small.patches``);
* S2V's ``_max_area``: the frame capped at the checkpoint's ``max_area`` (128*64: a CPU job takes
  seconds; A14B takes the small sizes a test asks for).

A real checkpoint has no ``small.SMALL_MODEL_FILE``: it loads and renders as the fleet's own.
"""

from __future__ import annotations

import json
import types
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from testkit.s2v import cpu, small
from worker.adapters.a14b import A14BGroupModel
from worker.adapters.s2v import S2VGroupModel
from worker.adapters.wan_s2v.patch import OfficialCodeMismatch, missing

GROUP_MODEL = "testkit.s2v:SmallS2VGroupModel"
A14B_GROUP_MODEL = "testkit.s2v:SmallA14BGroupModel"


class OnCpu:
    """The seams of an official group model, for the small checkpoints on a CPU as on CUDA."""

    task: str

    def _config(self, modules: dict[str, types.ModuleType], device: str) -> Any:
        absent = missing(cpu.PATCHES + small.patches({}))
        if absent:
            raise OfficialCodeMismatch(
                f"the installed wan22 has no {', '.join(absent)}, which testkit replaces"
            )
        device_type = device.split(":")[0]
        if device_type == "cuda":
            return super()._config(modules, device)  # type: ignore[misc]
        if device_type != "cpu":
            raise ValueError(f"the official {self.task} runs on CUDA or the CPU, not {device}")
        cpu.run_on_cpu()
        return cpu.config_for(modules["configs"].WAN_CONFIGS[self.task], device_type)

    def _loading(self, weights: str) -> AbstractContextManager[object]:
        return small.small_model_sizes(weights)


class SmallS2VGroupModel(OnCpu, S2VGroupModel):
    def _loading(self, weights: str) -> AbstractContextManager[object]:
        path = Path(weights) / small.SMALL_MODEL_FILE
        self._small_area: int | None = (
            json.loads(path.read_text()).get("max_area") if path.is_file() else None
        )
        return super()._loading(weights)

    def _max_area(self, request: Any) -> int:
        asked = super()._max_area(request)
        return min(asked, self._small_area) if self._small_area else asked


class SmallA14BGroupModel(OnCpu, A14BGroupModel):
    pass
