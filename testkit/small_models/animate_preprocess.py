"""Small stand-ins for Wan-Animate's preprocessing weights, in the formats the official code reads.

The real ``process_checkpoint`` folder holds a person detector (``det/yolov10m.onnx``), a
whole-body pose model (``pose2d/vitpose_h_wholebody.onnx``) and SAM2 (``sam2/sam2_hiera_large.pt``).
These are written in the same formats, shaped as ``pose2d.py`` reads them, so the official
readers load them and the whole preprocessing path runs:

* the detector takes ``[1, 3, 640, 640]`` and answers one box ``[x1, y1, x2, y2, score, class]``
  (class 0, a person) whose score is the image's mean brightness times four, capped at 1: a
  person is found in any ordinary picture and in no black one;
* the pose model takes ``[1, 3, 256, 192]`` and answers 133 heatmaps of ``64 x 48``, one peak each,
  drawn where a standing person's COCO-WholeBody keypoints are, whatever the input;
* SAM2 is the package's tiny config made smaller still (``SAM2_OVERRIDES``), random weights,
  saved as ``{"model": state_dict}``; ``sam2.json`` beside it names the config and overrides (the
  real folder has none: the official large config).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SAM2_CONFIG = "sam2_hiera_t.yaml"
SAM2_OVERRIDES = [
    "++model.image_size=128",
    "++model.image_encoder.trunk.embed_dim=16",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
    "++model.memory_attention.d_model=32",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32",
    "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.in_dim=32",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.mask_downsampler.embed_dim=32",
    "++model.memory_encoder.fuser.layer.dim=32",
    "++model.memory_encoder.fuser.num_layers=1",
]

# The detector's one box, in its 640 x 640 input: a standing person in the middle.
_BOX = (192.0, 48.0, 448.0, 608.0)
_HEATMAP = (64, 48)  # height, width: the pose model's output for its 256 x 192 input


def build_process_checkpoint(out: Path) -> None:
    """Write ``det/``, ``pose2d/`` and ``sam2/`` into ``out`` (a model's ``process_checkpoint``)."""
    (out / "det").mkdir(parents=True)
    (out / "pose2d").mkdir()
    (out / "sam2").mkdir()
    _detector(out / "det" / "yolov10m.onnx")
    _pose(out / "pose2d" / "vitpose_h_wholebody.onnx")
    _sam2(out / "sam2")


def _save(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what the onnxruntime releases the fleet installs read
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _detector(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    const = {
        "box": np.array([[list(_BOX)]], np.float32),  # [1, 1, 4]
        "gain": np.array(4.0, np.float32),
        "one": np.array(1.0, np.float32),
        "person": np.zeros((1, 1, 1), np.float32),
        "shape": np.array([1, 1, 1], np.int64),
    }
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "gain"], ["scaled"]),
        helper.make_node("Min", ["scaled", "one"], ["score0"]),
        helper.make_node("Reshape", ["score0", "shape"], ["score"]),
        helper.make_node("Concat", ["box", "score", "person"], ["output0"], axis=2),
    ]
    graph = helper.make_graph(
        nodes,
        "detector-standin",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 1, 6])],
        [numpy_helper.from_array(v, k) for k, v in const.items()],
    )
    _save(graph, path)


def _keypoints() -> np.ndarray:
    """133 COCO-WholeBody keypoints (x, y) in heatmap pixels: body 17, feet 6, face 68, hands 2 x 21."""
    body = [
        (24, 10), (23, 9), (25, 9), (21, 10), (27, 10),  # nose, eyes, ears
        (18, 18), (30, 18), (15, 27), (33, 27), (13, 35), (35, 35),  # shoulders, elbows, wrists
        (20, 36), (28, 36), (20, 47), (28, 47), (20, 57), (28, 57),  # hips, knees, ankles
    ]  # fmt: skip
    feet = [(19, 60), (18, 60), (21, 59), (29, 60), (30, 60), (27, 59)]
    angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    face = [(24 + 3 * np.cos(a), 10 + 4 * np.sin(a)) for a in angles]
    hands = [
        (x + dx, 38 + dy)
        for x in (13, 35)
        for dx, dy in zip(np.tile([-1, 0, 1], 7), np.repeat(range(7), 3) // 2, strict=True)
    ]
    return np.array(body + feet + face + hands, np.float32)


def _pose(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    height, width = _HEATMAP
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    points = _keypoints()
    heatmaps = np.exp(-((xs - points[:, 0, None, None]) ** 2 + (ys - points[:, 1, None, None]) ** 2) / 4.5)
    const = {"peaks": (heatmaps[None] + 1e-3).astype(np.float32), "zero": np.array(0.0, np.float32)}
    nodes = [
        # The peaks, plus the input times zero: the graph reads its input as a real model does.
        helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["peaks", "nothing"], ["heatmaps"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pose-standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 256, 192])],
        [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, [1, 133, height, width])],
        [numpy_helper.from_array(v, k) for k, v in const.items()],
    )
    _save(graph, path)


def _sam2(folder: Path) -> None:
    import sam2  # noqa: F401 - initializes hydra's config search path on the package
    import torch
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose(config_name=SAM2_CONFIG, overrides=SAM2_OVERRIDES)
    OmegaConf.resolve(cfg)
    torch.manual_seed(0)
    model = instantiate(cfg.model, _recursive_=True)
    torch.save({"model": model.state_dict()}, folder / "sam2_hiera_tiny.pt")
    (folder / "sam2.json").write_text(
        json.dumps({"config": SAM2_CONFIG, "overrides": SAM2_OVERRIDES}, indent=2)
    )
