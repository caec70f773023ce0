"""The CLI's flags for two-expert models make the request fields the schema checks."""

from __future__ import annotations

from producer.cli import build_parser, build_request
from routing.schemas import parse_request


def test_lora_flags_name_their_expert_and_guidance_2_is_passed_on():
    args = build_parser().parse_args(
        [
            "submit", "wan2.2-t2v-a14b", "--prompt", "a fox", "--guidance-scale-2", "2.5",
            "--lora", "loras/a@0.5", "--lora-high", "loras/b", "--lora-low", "loras/c@2",
        ]
    )  # fmt: skip
    request = build_request(args, lambda path: {"key": "unused"})
    assert request["guidance_scale_2"] == 2.5
    assert request["loras"] == [
        {"source": "loras/a", "scale": 0.5},
        {"source": "loras/b", "expert": "high"},
        {"source": "loras/c", "scale": 2.0, "expert": "low"},
    ]
    parsed = parse_request(request)
    assert [lora.expert for lora in parsed.loras] == ["both", "high", "low"]
