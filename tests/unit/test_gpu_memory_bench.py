"""bench/gpu_memory.py end to end on the CPU's small models, and the refresh of the memory data
from a run's figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from routing.catalog import get_model
from routing.classes import VramClass
from routing.memory import Work, predict
from routing.memory.model import GIB, activations, tokens, weights
from routing.memory.refresh import main as refresh_main
from routing.memory.refresh import refresh

ROOT = Path(__file__).resolve().parents[2]


def test_the_bench_runs_each_placement_on_the_cpu_and_writes_what_refresh_reads(
    small_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    spec = importlib.util.spec_from_file_location("gpu_memory_bench", ROOT / "bench" / "gpu_memory.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["gpu_memory.py", "--cpu", "--only", "z-image-turbo", "wan2.2-ti2v-5b", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)

    assert bench.main() == 0

    out = json.loads((tmp_path / "gpu_memory.json").read_text())
    assert out["device"] == "cpu" and out["not_run"] == []
    rows = {(p["model"], p["vram_class"]): p for p in out["points"]}
    # Once per placement: offloaded on gpu16 (the video decoded in tiles), resident on gpu80.
    assert {key: row["placement"] for key, row in rows.items()} == {
        ("z-image-turbo", "gpu16"): "model-offload",
        ("z-image-turbo", "gpu80"): "resident",
        ("wan2.2-ti2v-5b", "gpu16"): "model-offload + VAE tiling",
        ("wan2.2-ti2v-5b", "gpu80"): "resident",
    }
    for row in rows.values():
        assert row["pass"] and row["error"] is None and row["measured_gib"] is None
        assert row["phases_seen"][0] == "encode" and row["phases_seen"][-1] == "decode", row["phases_seen"]
        assert "denoise" in row["phases_seen"]
        assert row["predicted_gib"] <= row["budget_gib"] < row["card_gib"]
    assert "4 of 4 rows pass" in capsys.readouterr().out
    # A CPU run holds no GPU figure: refresh refuses it rather than write zeros.
    assert refresh_main([str(tmp_path / "gpu_memory.json"), "--out", str(tmp_path / "a.json")]) == 2
    assert not (tmp_path / "a.json").exists()


def test_refresh_turns_the_measured_points_into_the_coefficients_kept() -> None:
    """The H200 points, as the bench writes them, give back the figures activations.json holds."""
    data = activations()
    run = data["runs"]["h200-2026-12-04"]
    points = []
    for point in run["points"]:
        model = data["models"][point["model"]]
        work = Work(point["width"], point["height"], point["frames"])
        resident = sum(weights()[point["model"]][c]["bytes"] for c in point["resident"]) / GIB
        phase = point["phases"][-1]  # the whole call's peak is the decode's where it ran
        figure = {
            "peak_gib": point["peak_gib"],
            "weights_gib": resident,
            "ktokens": tokens(model, work) / 1000,
            "decoded_mpx": work.megapixels,
            "clip_gib": 0.0,
        }
        points.append(
            {
                **point,
                "vram_class": "gpu80",
                "placement": "resident",
                "measured_gib": point["peak_gib"],
                "error": None,
                "phases": {phase: figure},
            }
        )
    bench = {"device": run["device"], "versions": run["versions"], "date": run["date"], "points": points}

    updated = refresh(bench, data)

    assert "nvidia-h200-2026-12-04" in updated["runs"]
    for name in ("z-image-turbo", "qwen-image"):
        kept, new = data["models"][name]["decode"]["gib_per_mpx"], updated["models"][name]["decode"]
        assert new["basis"] == "measured" and new["run"] == "nvidia-h200-2026-12-04"
        assert 0 <= kept - new["gib_per_mpx"] < 0.01
    kept = data["models"]["wan2.2-ti2v-5b"]["denoise"]["gib_per_ktoken"]
    assert abs(updated["models"]["wan2.2-ti2v-5b"]["denoise"]["gib_per_ktoken"] - kept) < 0.001
    # What the run did not measure stays as it was, estimates included.
    assert updated["models"]["z-image-turbo"]["denoise"] == data["models"]["z-image-turbo"]["denoise"]
    assert updated["models"]["wan2.2-animate-14b"] == data["models"]["wan2.2-animate-14b"]
    # And the prediction at a measured point is the measured peak.
    z = get_model("z-image-turbo")
    found = predict(z, VramClass.GPU80, Work(2048, 2048))
    assert found is not None and found.measured
