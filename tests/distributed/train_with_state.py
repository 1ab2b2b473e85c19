"""``moraft.train.train`` with a known final state: after training, every trainable parameter is set to seeded random
values (under DeepSpeed ZeRO-3 through ``GatheredParameters``, which writes them back into each rank's partition), so
a run under torchrun and a single process save the same adapter if, and only if, the save is right.
argv: the run's `TrainOptions` as JSON (one mapping per group)."""

from __future__ import annotations

import contextlib
import json
import sys

import torch
from transformers import TrainerCallback

from moraft.train import TrainOptions, train


class SetState(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        params = [param for _, param in sorted(model.named_parameters()) if param.requires_grad]
        partitioned = all(hasattr(param, "ds_shape") for param in params)
        gather = contextlib.nullcontext()
        if partitioned:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        generator = torch.Generator().manual_seed(1)
        with gather, torch.no_grad():
            for param in params:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


if __name__ == "__main__":
    train(TrainOptions.from_dict(json.loads(sys.argv[1])), callbacks=[SetState()])
