"""Shared helpers of the training tests: tiny, fast training options and a model-output comparison."""

from __future__ import annotations

import torch

from moraft.train import TrainOptions

TINY = dict(
    builtin_hidden_size=32,
    builtin_num_layers=2,
    num_pairs=8,
    batch_size=4,
    max_steps=3,
    logging_steps=1,
    save_steps=0,
    learning_rate=1e-2,
)


def tiny_options(output_dir, **overrides) -> TrainOptions:
    """Options for a run of a few seconds: a 2-layer, 32-wide built-in model on 8 UUID pairs."""
    return TrainOptions(**{**TINY, "output_dir": str(output_dir), **overrides})


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=input_ids).logits
    model.train(was_training)
    return out
