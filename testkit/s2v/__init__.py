"""S2V on the small checkpoint, on a CPU: ``SmallS2VGroupModel``, the group model the tests and
the demo name in ``settings.group_adapters`` (``GROUP_MODEL``).

The fleet's ``worker.adapters.s2v.S2VGroupModel`` runs the official code on CUDA at the size a
job asks for. This one adds, through its three seams:

* ``_config``: on a CPU, the official code's CUDA device, FSDP device and bfloat16 casts named for
  the CPU (``cpu.PATCHES``) and a float32 config (``cpu.config_for``);
* ``_loading``: T5 and the VAE built at the small checkpoint's sizes (``small.patches``);
* ``_max_area``: the frame capped at the checkpoint's ``max_area`` (128*64: a CPU job takes
  seconds).

A real checkpoint has no ``small.SMALL_MODEL_FILE``: it loads and renders as the fleet's own.
"""

from __future__ import annotations

import json
import types
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from testkit.s2v import cpu, small
from worker.adapters.s2v import S2VGroupModel
from worker.adapters.wan_s2v.patch import OfficialCodeMismatch, missing

GROUP_MODEL = "testkit.s2v:SmallS2VGroupModel"


class SmallS2VGroupModel(S2VGroupModel):
    def _config(self, modules: dict[str, types.ModuleType], device: str) -> Any:
        absent = missing(cpu.PATCHES + small.patches({}))
        if absent:
            raise OfficialCodeMismatch(
                f"the installed wan22 has no {', '.join(absent)}, which testkit replaces"
            )
        device_type = device.split(":")[0]
        if device_type == "cuda":
            return super()._config(modules, device)
        if device_type != "cpu":
            raise ValueError(f"Wan2.2-S2V runs on CUDA or the CPU, not {device}")
        cpu.run_on_cpu(modules["speech2video"])
        return cpu.config_for(modules["configs"].WAN_CONFIGS["s2v-14B"], device_type)

    def _loading(self, weights: str) -> AbstractContextManager[object]:
        path = Path(weights) / small.SMALL_MODEL_FILE
        self._small_area: int | None = (
            json.loads(path.read_text()).get("max_area") if path.is_file() else None
        )
        return small.small_model_sizes(weights)

    def _max_area(self, request: Any) -> int:
        asked = super()._max_area(request)
        return min(asked, self._small_area) if self._small_area else asked
