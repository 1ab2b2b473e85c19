"""``moraft.train.train`` with a known final state: after training, every adapter weight is set to seeded random
values (under DeepSpeed ZeRO-3 through ``GatheredParameters``, which writes them back into each rank's partition), so
a run under torchrun and a single process save the same adapter if, and only if, the save is right.
argv: the run's `TrainOptions` as JSON (one mapping per group)."""

from __future__ import annotations

import contextlib
import json
import sys

import torch
from transformers import TrainerCallback

from moraft.testing import adapter_parameters, randomize_adapter
from moraft.train import TrainOptions, train


class SetState(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        params = list(adapter_parameters(model).values())
        gather = contextlib.nullcontext()
        if all(hasattr(param, "ds_shape") for param in params):  # partitioned
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        with gather:
            randomize_adapter(model, seed=1)


if __name__ == "__main__":
    train(TrainOptions.from_dict(json.loads(sys.argv[1])), callbacks=[SetState()])
    if torch.distributed.is_initialized():  # as moraft's CLI ends a run: see moraft.cli
        torch.distributed.destroy_process_group()
