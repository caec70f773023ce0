"""The capacity planner: its arithmetic against hand calculations, its tables, its command line."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from routing.catalog import CATALOG, TaskKind
from routing.classes import VramClass
from routing.decision import route
from routing.jobs.keys import Keys
from routing.planning.plan import (
    BASES,
    DEFAULT_BUSY_SHARE,
    Instance,
    JobCost,
    PlanError,
    choose_instances,
    home_class,
    load_instances,
    load_job_costs,
    load_rates,
    measured_busy_shares,
    parse_rate,
    plan,
)
from routing.schemas import REQUEST_TYPES

ROOT = Path(__file__).resolve().parents[2]


def _instance(vram_class: VramClass, gpus: int, usd_per_hour: float) -> Instance:
    return Instance(
        f"test.{vram_class}", vram_class, gpus, "test GPU", usd_per_hour, "now", "estimate", True, ""
    )


def _cost(model: str, kind: TaskKind, vram_class: VramClass, gpu_seconds: float) -> JobCost:
    return JobCost(model, kind, vram_class, gpu_seconds, "estimate", "")


Z = ("z-image-turbo", TaskKind.TEXT_TO_IMAGE, VramClass.GPU16)
S2V = ("wan2.2-s2v-14b", TaskKind.SPEECH_TO_VIDEO, VramClass.H100X8)


def test_small_case_matches_the_hand_calculation() -> None:
    # 120 Z-Image jobs an hour at 10 GPU-seconds each on a one-GPU $0.80/hour instance, 70% target:
    #   GPU-seconds per hour = 120 x 10 = 1,200
    #   capacity per instance at 70% = 1 GPU x 3,600 s x 0.7 = 2,520 GPU-seconds an hour
    #   instances = ceil(1,200 / 2,520) = 1
    #   utilisation = 1,200 / (1 x 3,600) = 1/3
    #   $/hour = 1 x 0.80 = 0.80; $/output = 0.80 / 120 = 0.00666...
    result = plan(
        [parse_rate("z-image-turbo=120/h")],
        {Z: _cost(*Z, 10)},
        {VramClass.GPU16: _instance(VramClass.GPU16, 1, 0.80)},
        target_utilisation=0.7,
        busy_share=1.0,
    )
    (gpu16,) = result.classes
    assert gpu16.gpu_seconds_per_hour == 1200
    assert gpu16.instances == 1
    assert gpu16.utilisation == pytest.approx(1 / 3)
    assert gpu16.usd_per_hour == pytest.approx(0.80)
    assert gpu16.usd_per_job == pytest.approx(0.80 / 120)


def test_rates_past_one_instance_round_up() -> None:
    # 600/h x 10 = 6,000 GPU-s/h; 6,000 / 2,520 = 2.38 -> 3 instances; 6,000 / 10,800 = 0.5556;
    # 3 x 0.80 = 2.40 $/h; 2.40 / 600 = 0.004 $/output. The same rate given per minute.
    result = plan(
        [parse_rate("z-image-turbo=10/min")],
        {Z: _cost(*Z, 10)},
        {VramClass.GPU16: _instance(VramClass.GPU16, 1, 0.80)},
        busy_share=1.0,
    )
    (gpu16,) = result.classes
    assert gpu16.jobs_per_hour == pytest.approx(600)
    assert gpu16.instances == 3
    assert gpu16.utilisation == pytest.approx(6000 / 10800)
    assert gpu16.usd_per_hour == pytest.approx(2.40)
    assert gpu16.usd_per_job == pytest.approx(0.004)


def test_an_eight_gpu_job_holds_the_whole_instance_and_classes_add_up() -> None:
    # S2V: 10/h x 1,440 GPU-s (8 GPUs x 180 s) = 14,400 GPU-s/h on an 8-GPU $50/h instance:
    # capacity at 70% = 8 x 3,600 x 0.7 = 20,160 -> 1 instance, utilisation 14,400 / 28,800 = 0.5,
    # $50/h, $5/output. With 120 Z-Image on gpu16 ($0.80/h) the total is $50.80/h.
    result = plan(
        [parse_rate("z-image-turbo=120/h"), parse_rate("wan2.2-s2v-14b=10/h")],
        {Z: _cost(*Z, 10), S2V: _cost(*S2V, 1440)},
        {
            VramClass.GPU16: _instance(VramClass.GPU16, 1, 0.80),
            VramClass.H100X8: _instance(VramClass.H100X8, 8, 50.0),
        },
        busy_share=1.0,
    )
    gpu16, h100x8 = result.classes
    assert h100x8.vram_class is VramClass.H100X8
    assert h100x8.instances == 1
    assert h100x8.utilisation == pytest.approx(0.5)
    assert h100x8.usd_per_job == pytest.approx(5.0)
    assert result.usd_per_hour == pytest.approx(50.80)
    assert _cost(*S2V, 1440).wall_seconds == 180


def test_the_gpu_busy_share_sizes_the_fleet_for_the_time_outside_pipeline_calls() -> None:
    # 600/h x 10 = 6,000 pipeline GPU-s/h at busy 0.5: 12,000 s of GPU time an hour;
    # ceil(12,000 / 2,520) = 5 instances at 12,000 / 18,000 = 2/3; $/output 5 x 0.80 / 600.
    rates, costs = [parse_rate("z-image-turbo=600/h")], {Z: _cost(*Z, 10)}
    instances = {VramClass.GPU16: _instance(VramClass.GPU16, 1, 0.80)}
    (gpu16,) = plan(rates, costs, instances, busy_share=0.5).classes
    assert (gpu16.instances, gpu16.busy_share, gpu16.busy_basis) == (5, 0.5, "given")
    assert gpu16.utilisation == pytest.approx(2 / 3)
    assert gpu16.usd_per_job == pytest.approx(5 * 0.80 / 600)
    # Measured shares are by class; a class without one gets the default, as with none given.
    (gpu16,) = plan(rates, costs, instances).classes
    assert (gpu16.busy_share, gpu16.busy_basis) == (DEFAULT_BUSY_SHARE, "default")
    (gpu16,) = plan(rates, costs, instances, busy_share={VramClass.GPU80: 0.5}).classes
    assert (gpu16.busy_share, gpu16.busy_basis) == (DEFAULT_BUSY_SHARE, "default")
    (gpu16,) = plan(rates, costs, instances, busy_share={VramClass.GPU16: 0.8}).classes
    assert (gpu16.busy_share, gpu16.busy_basis) == (0.8, "measured")
    with pytest.raises(PlanError, match="busy share"):
        plan(rates, costs, instances, busy_share=0)


def test_measured_busy_shares_are_each_class_totals_with_enough_work(redis_client) -> None:
    keys = Keys(f"plan-{uuid.uuid4().hex[:8]}")
    redis_client.hset(
        keys.metrics("gpu_busy"),
        mapping={"gpu16|busy_s": 900, "gpu16|work_s": 1000, "gpu80|busy_s": 50, "gpu80|work_s": 60},
    )
    try:
        assert measured_busy_shares(redis_client, keys) == {VramClass.GPU16: 0.9}
        assert measured_busy_shares(redis_client, keys, min_work_s=10)[VramClass.GPU80] == pytest.approx(
            50 / 60
        )
    finally:
        redis_client.delete(keys.metrics("gpu_busy"))


def test_dollars_per_output_split_a_class_by_gpu_time() -> None:
    ti2v = ("wan2.2-ti2v-5b", TaskKind.TEXT_TO_VIDEO, VramClass.GPU16)
    result = plan(
        [parse_rate("z-image-turbo=120/h"), parse_rate("wan2.2-ti2v-5b:text-to-video=2/h")],
        {Z: _cost(*Z, 10), ti2v: _cost(*ti2v, 1100)},
        {VramClass.GPU16: _instance(VramClass.GPU16, 1, 1.0)},
        busy_share=1.0,
    )
    (gpu16,) = result.classes
    # 1,200 + 2,200 = 3,400 GPU-s/h -> ceil(3,400 / 2,520) = 2 instances, $2/h.
    assert gpu16.instances == 2
    z_line, video_line = gpu16.lines
    assert z_line.usd_per_job == pytest.approx(10 * 2.0 / 3400)
    assert video_line.usd_per_job == pytest.approx(1100 * 2.0 / 3400)
    assert 120 * z_line.usd_per_job + 2 * video_line.usd_per_job == pytest.approx(gpu16.usd_per_hour)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope=1/h", "unknown model"),
        ("wan2.2-ti2v-5b=1/h", "name one"),
        ("z-image-turbo:edit=1/h", "does not do edit"),
        ("z-image-turbo=fast", "want a number"),
        ("z-image-turbo=0/h", "above zero"),
        ("z-image-turbo", r"want MODEL\[:KIND\]=N/UNIT"),
    ],
)
def test_bad_rates_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_rate(text)


def test_rates_file(tmp_path: Path) -> None:
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"z-image-turbo": "2/min", "wan2.2-ti2v-5b:image-to-video": 3}))
    rates = load_rates(path)
    assert [(r.model, r.kind, r.jobs_per_hour) for r in rates] == [
        ("z-image-turbo", TaskKind.TEXT_TO_IMAGE, 120.0),
        ("wan2.2-ti2v-5b", TaskKind.IMAGE_TO_VIDEO, 3.0),
    ]


def test_target_utilisation_must_be_a_share() -> None:
    with pytest.raises(PlanError, match="target utilisation"):
        plan(
            [parse_rate("z-image-turbo=1/h")],
            {Z: _cost(*Z, 10)},
            {VramClass.GPU16: _instance(VramClass.GPU16, 1, 1.0)},
            target_utilisation=1.5,
        )


# --- the tables --------------------------------------------------------------------------------


def test_every_catalog_job_has_a_figure_on_its_home_class() -> None:
    costs = load_job_costs()
    for spec in CATALOG.values():
        for kind in spec.task_kinds:
            cost = costs[(spec.key, kind, home_class(spec.key))]
            assert cost.gpu_seconds > 0
            assert cost.basis in BASES
            assert cost.source, f"{spec.key}:{kind} has no source"


def test_home_class_is_where_a_default_request_is_routed() -> None:
    for spec in CATALOG.values():
        for kind in spec.task_kinds:
            request_type = REQUEST_TYPES.get(kind)
            if request_type is None:
                continue
            fields = {
                "model": spec.key,
                "kind": kind,
                "prompt": "x",
                "width": spec.size.default_width,
                "height": spec.size.default_height,
            }
            if spec.video is not None and "frames" in request_type.model_fields:
                fields["frames"] = spec.video.default_frames
            assert route(request_type.model_construct(**fields)).vram_class is home_class(spec.key)


def test_each_class_has_one_default_instance_with_a_dated_price() -> None:
    instances = load_instances()
    chosen = choose_instances(instances)
    assert set(chosen) == set(VramClass)
    assert chosen[VramClass.H100X8].instance_type == "p5.48xlarge"
    for instance in instances:
        assert instance.usd_per_hour > 0 and instance.as_of and instance.source
    assert sum(i.default for i in instances) == len(VramClass)
    assert choose_instances(instances, {VramClass.GPU80: "p4de.24xlarge"})[VramClass.GPU80].gpus == 8
    with pytest.raises(PlanError, match="no 'p9.huge' instance"):
        choose_instances(instances, {VramClass.GPU80: "p9.huge"})


def test_command_line_prints_the_plan() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "routing",
            "plan",
            "--rate",
            "z-image-turbo=600/h",
            "--instance",
            "gpu16=g5.xlarge",
            "--price",
            "g5.xlarge=1.00",
            "--busy-share",
            "0.5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    costs = load_job_costs()
    gpu_s = 600 * costs[Z].gpu_seconds
    instances = -(-gpu_s / 0.5 // (3600 * 0.7))
    row = next(line for line in result.stdout.splitlines() if line.startswith("gpu16"))
    assert f"{gpu_s:,.0f}" in row and f"{instances * 1.00:,.2f}" in row and "0.50 given" in row
    assert "g5.xlarge: $1/hour, given" in result.stdout


def test_command_line_refuses_a_bad_rate() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "routing", "plan", "--rate", "nope=1/h"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown model 'nope'" in result.stderr
