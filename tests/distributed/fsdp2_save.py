"""Run under torchrun (2 processes, gloo): a moraft MoRA model sharded with torch FSDP2 (``fully_shard``) computes
what the unsharded model computes, and the gather ``Trainer.save_model`` makes under FSDP2 writes exactly the adapter
a single process writes from the same state. argv: the directory for the adapters and results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from moraft.testing import input_ids, randomize_adapter
from moraft.train import AdapterOptions
from moraft.train.builtin import BUILTIN_MODEL
from moraft.train.methods import apply_method, load_base

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
base, _ = load_base(BUILTIN_MODEL, hidden_size=64, num_layers=2)
model = randomize_adapter(apply_method(base, AdapterOptions(method="mora", r=8)), seed=1)  # the same on every rank
ids = input_ids(rows=2, length=12)
with torch.no_grad():
    expected = model(input_ids=ids).logits
if rank == 0:
    model.save_pretrained(out / "single")
dist.barrier()

for layer in model.base_model.model.model.layers:  # what accelerate's fsdp2_prepare_model does
    fully_shard(layer)
fully_shard(model)
sharded = [name for name, param in model.named_parameters() if param.requires_grad and hasattr(param, "full_tensor")]
with torch.no_grad():
    got = model(input_ids=ids).logits
try:  # the runner's old save: save_pretrained on the main process reads the local shards
    model.save_pretrained(out / f"plain-{rank}")
    plain = "wrote"
except Exception as error:  # noqa: BLE001 - which error torch raises is not the point
    plain = type(error).__name__
# Trainer.save_model under FSDP2 (FULL_STATE_DICT): accelerate's get_state_dict gathers on every rank, the main
# process saves it with save_pretrained(state_dict=...)
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                cpu_offload=True))
if rank == 0:
    model.save_pretrained(out / "gathered", state_dict=state)
    (out / "result.json").write_text(json.dumps({
        "sharded_trainable": len(sharded),
        "max_logit_difference": (got - expected).abs().max().item(),
        "plain_save": plain,
    }))
dist.barrier()
# destroyed here, as moraft's CLI does: left to interpreter exit, gloo's threads have aborted a finished rank
dist.destroy_process_group()
