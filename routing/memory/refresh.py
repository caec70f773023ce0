"""Refreshes the activation coefficients from a GPU run of ``bench/gpu_memory.py``.

    python -m routing.memory.refresh OUT/gpu_memory.json [--out routing/memory/activations.json]

For every model the run measured, each phase's coefficient becomes the largest the run shows:
denoise, GiB per thousand tokens of one pass above the weights on the GPU; decode, GiB per
decoded megapixel above the weights and the decoded clip; encode, GiB above the encoders'
weights. Each becomes ``measured`` and names the run (device, versions, date), which is added to
``runs``; phases the run did not measure keep what they had. A CPU run has no GPU figures and
is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from routing.memory.model import HERE

SOURCE = (
    "bench/gpu_memory.py: torch.cuda.max_memory_allocated per phase, the process capped at the class's card"
)


def refresh(bench: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (activations.json's content) with the coefficients ``bench`` measured."""
    if bench["device"] == "cpu":
        raise ValueError("a CPU run has no GPU memory figures: run bench/gpu_memory.py on a GPU")
    run_id = re.sub(r"[^a-z0-9]+", "-", f"{bench['device']} {bench['date']}".lower()).strip("-")
    points = [p for p in bench["points"] if p.get("error") is None and p.get("measured_gib")]
    data = json.loads(json.dumps(data))  # a copy
    data["runs"][run_id] = {
        "device": bench["device"],
        "versions": bench["versions"],
        "date": bench["date"],
        "source": SOURCE,
        "points": [
            {
                k: p[k]
                for k in ("model", "vram_class", "placement", "width", "height", "frames", "measured_gib")
            }
            for p in points
        ],
    }
    found: dict[tuple[str, str], float] = {}
    for point in points:
        for phase, figure in point["phases"].items():
            above = figure["peak_gib"] - figure["weights_gib"]
            if figure["peak_gib"] <= 0:
                continue  # not reached in this call
            if phase == "denoise":
                value = above / figure["ktokens"]
            elif phase == "decode":
                value = (above - figure["clip_gib"]) / figure["decoded_mpx"]
            else:
                value = above
            key = (point["model"], phase)
            found[key] = max(found.get(key, 0.0), value)
    for (model, phase), value in found.items():
        entry = data["models"][model]
        name = {"denoise": "gib_per_ktoken", "decode": "gib_per_mpx", "encode": "value"}[phase]
        field = "encode_gib" if phase == "encode" else phase
        # Rounded up: the figure must cover every call it came from.
        entry[field] = {name: math.ceil(max(value, 0.0) * 1000) / 1000, "basis": "measured", "run": run_id}
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m routing.memory.refresh", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("bench", type=Path, help="gpu_memory.json of a GPU run")
    parser.add_argument("--out", type=Path, default=HERE / "activations.json")
    args = parser.parse_args(argv)
    data = json.loads((HERE / "activations.json").read_text())
    try:
        updated = refresh(json.loads(args.bench.read_text()), data)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(updated, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
