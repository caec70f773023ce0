"""bench/gpu_speed.py end to end on the CPU's small models, the results file it keeps, and the
README's GPU table made from that file.

The CPU run takes every case with every row but Qwen-Image-Edit-2509's: that pipeline encodes
its two input images at a megapixel whatever the output's size, seconds a call here, half a minute
for the case's two cheapest rows (``--cpu --only qwen-image-edit-2509/1024/40`` runs it).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"key", "stock_s", "stock_compiled_s", "fleet_s", "spread", "lossless", "deviation"}


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "bench" / "gpu_speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_speed"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_case_runs_on_the_cpu_and_is_written_beside_not_into_the_results(
    small_models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bench = _bench()
    committed = bench.RESULTS.read_bytes()
    edit = "qwen-image-edit-2509/1024/40"
    cases = [case.key for case in bench.CASES if case.key != edit]

    assert bench.main(["--cpu", "--only", *cases[:2], "--out", str(tmp_path)]) == 0
    # A second run merges into the first's file, as GPU runs do into the committed one.
    assert bench.main(["--cpu", "--only", *cases[2:], "--out", str(tmp_path)]) == 0

    assert bench.RESULTS.read_bytes() == committed  # a CPU run never touches the GPU figures
    out = json.loads((tmp_path / "gpu-speed.json").read_text())
    assert out["device"] == "cpu" and out["torch"] and out["diffusers"] and out["date"]
    assert [case["key"] for case in out["cases"]] == cases
    for case in out["cases"]:
        assert FIELDS <= set(case) and case["device"] == "cpu" and case["goal_met"] is None
        rows = case["rows"]
        expected = bench.expand_rows(bench.BY_KEY[case["key"]], None, bench.CPU_ATTENTION)
        assert set(rows) == set(expected) - {"stock-kernel"}, case["key"]
        for name, row in rows.items():
            if row.get("skipped"):  # FP8 and CUDA graphs, and cuDNN attention: CUDA's
                assert "CUDA" in row["skipped"] and name in (
                    "fleet+fp8",
                    "fleet+cuda-graphs",
                    "cudnn",
                    "compile+tf32+cudnn",
                )
                continue
            assert row.get("error") is None, (case["key"], name, row)
            assert len(row["runs_s"]) == 2 and row["recompiles"] == 0 and row["median_s"] > 0
            if name != "stock":
                assert row["ratio_to_stock"] > 0 and row["deviation"], (case["key"], name)
        assert case["stock_s"] == rows["stock"]["median_s"] and case["fleet_s"] is not None
        assert case["deviation"] and case["lossless"] is not None
        assert case["floor"], case["key"]  # stock on a second kernel: the deviation's floor
    by_key = {case["key"]: case for case in out["cases"]}
    # The fleet's techniques, as its jobs' timings name them.
    assert by_key["z-image-turbo/1024/e2e"]["rows"]["fleet"]["techniques"]["attention_native"] == 1
    assert by_key["qwen-image/1024/lightning-8"]["rows"]["fleet"]["techniques"]["lora_slot"] == 1
    # FastWan's checkpoint swapped in, by the same sampler as stock with it loaded: the same video.
    fast = by_key["wan2.2-ti2v-5b/1280x704x121/fast-e2e"]["rows"]["fleet"]
    assert fast["techniques"]["variant_checkpoint"] == 1 and fast["deviation"]["identical"]
    # The fused QKV rows ran fused: Wan's attention, Qwen-Image's and Z-Image's through the
    # fleet's processors (FastWan's checkpoint swapped into the fused layers).
    fused_cases = [key for key, case in by_key.items() if "fleet+fused-qkv" in case["rows"]]
    assert len(fused_cases) == 4
    for key in fused_cases:
        assert by_key[key]["rows"]["fleet+fused-qkv"]["techniques"]["fused_qkv"] == 1, key
    assert by_key["wan2.2-ti2v-5b/1280x704x121/fast-e2e"]["rows"]["fleet+fused-qkv"]["deviation"]["identical"]
    # The cache changes the output: stock's uncached output is no longer matched bit for bit.
    assert by_key["qwen-image/1024/50/cache"]["rows"]["stock+cache"]["deviation"].get("psnr_db")
    assert "ERROR" not in capsys.readouterr().out

    # A CPU run's file is never merged into the GPU results.
    assert bench.main(["--merge", str(tmp_path / "gpu-speed.json")]) == 2
    assert bench.RESULTS.read_bytes() == committed


def test_a_deadline_stops_the_rounds_that_would_pass_it_and_starts_no_row_or_case_after_it(
    small_models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bench = _bench()
    import gpu_speed_rows as g

    device = g.Device(True)
    rows: list = []

    def sleeper(row):  # a row whose every call takes 0.1 s: a round of two takes 0.2 s
        return lambda index, size=None, steps=None: time.sleep(0.1)

    for name in ("stock", "fleet"):
        g.build_row(name, sleeper, rows, device, 1)
    deadline = time.monotonic() + 0.7
    done = g.time_rows(device, rows, 10, deadline)
    # Every round that ends before the deadline, by the last one's length (three here; two on a
    # machine slow enough to stretch them), and no more.
    assert 2 <= done <= 3 and all(len(row.times) == done for row in rows)
    assert time.monotonic() <= deadline + 0.2
    # Past it: one round still (a figure for each row), and a row not made yet is skipped.
    fresh: list = []
    g.build_row("stock", sleeper, fresh, device, 1)
    g.build_row("fleet", g.out_of_time, fresh, device, 1)
    assert fresh[1].skipped == "no time left before --deadline-s"
    assert g.time_rows(device, fresh, 5, time.monotonic() - 1) == 1 and len(fresh[0].times) == 1
    # A case that would start past it is not run, and nothing is written for it.
    assert (
        bench.main(["--cpu", "--only", bench.CASES[0].key, "--deadline-s", "0", "--out", str(tmp_path)]) == 0
    )
    assert "not run, no time left before --deadline-s" in capsys.readouterr().out
    assert not (tmp_path / "gpu-speed.json").exists()


def test_a_run_merged_in_keeps_the_rows_and_cases_it_did_not_run() -> None:
    bench = _bench()
    key = "z-image-turbo/1024/e2e"

    def case(device: str, rows: dict) -> dict:
        return {"key": key, "device": device, "torch": "t", "diffusers": "d", "date": "x", "rows": rows}

    row = {"median_s": 1.0, "spread": 0.01, "lossless": True, "deviation": {"psnr_db": 50.0}}
    first = {"device": "GPU A", "torch": "t", "diffusers": "d", "date": "x"}
    found = bench.merge({"cases": []}, first | {"cases": [case("GPU A", {"stock": row, "fleet": row})]})
    later = bench.merge(found, first | {"cases": [case("GPU A", {"stock-compile": row | {"median_s": 0.8}})]})
    (merged,) = later["cases"]
    assert set(merged["rows"]) == {"stock", "fleet", "stock-compile"}
    assert (merged["stock_s"], merged["stock_compiled_s"], merged["fleet_s"]) == (1.0, 0.8, 1.0)
    # Another card: the case is replaced whole, its rows never mixed across cards.
    other = bench.merge(later, first | {"device": "GPU B", "cases": [case("GPU B", {"stock": row})]})
    assert set(other["cases"][0]["rows"]) == {"stock"} and other["cases"][0]["fleet_s"] is None
    with pytest.raises(ValueError, match="CPU"):
        bench.merge(other, {"device": "cpu", "torch": "t", "diffusers": "d", "date": "x", "cases": []})
    # A fleet row of fewer runs than five (its run stopped at its deadline) says so in the table.
    for runs, shown in ((5, False), (3, True)):
        timed = row | {"runs_s": [1.0] * runs}
        results = bench.merge(
            {"cases": []}, first | {"cases": [case("GPU A", {"stock": timed, "fleet": timed})]}
        )
        assert ("3 runs (its run stopped at its deadline)" in bench.table(results)) is shown


def test_the_readme_table_is_made_from_the_results_file() -> None:
    bench = _bench()
    results = json.loads(bench.RESULTS.read_text())
    table = bench.table(results)
    assert table in (ROOT / "README.md").read_text()
    assert all(f"`{case.key}`" in table for case in bench.CASES)
    measured = {case["key"] for case in results["cases"]}
    for case in bench.CASES:
        if case.key not in measured:
            assert f"`{case.key}` | {case.anchor} |" in table and "not measured" in table


def test_the_docstring_names_every_run_of_the_plan() -> None:
    bench = _bench()
    runs = bench.plan(5, 480.0)
    for keys, rows, _ in runs:
        line = f"--only {' '.join(keys)}" + (f" --rows {' '.join(rows)}" if rows else "")
        assert line in bench.__doc__, line
    # Every row of every case (stock aside) is in one run, once: runs put together for two
    # models take no row of one case into the other's run.
    rows_run = [
        (key, row)
        for keys, rows, _ in runs
        for key in keys
        for row in bench.expand_rows(bench.BY_KEY[key], rows, ("_native_cudnn",))
        if row != "stock"
    ]
    every = [
        (case.key, row)
        for case in bench.CASES
        for row in bench.expand_rows(case, None, ("_native_cudnn",))
        if row != "stock"
    ]
    assert sorted(rows_run) == sorted(every)
    assert any(len({bench.BY_KEY[key].model for key in keys}) > 1 for keys, _, _ in runs)
    # The runs that give each case its figures come first, and the README and docstring count them.
    core = [bench._core(rows) for _, rows, _ in runs]
    first = core.index(False)
    assert not any(core[first:]) and {key for keys, _, _ in runs[:first] for key in keys} == set(bench.BY_KEY)
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"prints the {len(runs)} runs, the {first} that give every case its figures first" in readme
    assert f"The first {first} runs give every case its figures" in " ".join(bench.__doc__.split())
