"""Shared helpers of the training tests: tiny, fast training options and a model-output comparison."""

from __future__ import annotations

import torch

from moraft.train import TrainOptions

TINY = {
    "model": {"builtin_hidden_size": 32, "builtin_num_layers": 2},
    "data": {"num_pairs": 8},
    "optimization": {"batch_size": 4, "max_steps": 3, "learning_rate": 1e-2},
    "output": {"logging_steps": 1, "save_steps": 0},
}


def tiny_options(output_dir, **groups: dict) -> TrainOptions:
    """Options for a run of a few seconds: a 2-layer, 32-wide built-in model on 8 UUID pairs. ``groups`` override
    options by group, e.g. ``tiny_options(tmp, adapter={"method": "lora"}, optimization={"max_steps": 2})``."""
    return TrainOptions.from_dict(TINY).replace(output={"dir": str(output_dir)}).replace(**groups)


def tiny_flags(output_dir) -> list[str]:
    """`tiny_options` as ``moraft train`` flags."""
    flags = [f"--{group}.{key}={value}" for group, values in TINY.items() for key, value in values.items()]
    return flags + ["--output.dir", str(output_dir)]


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=input_ids).logits
    model.train(was_training)
    return out
