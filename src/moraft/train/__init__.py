"""Training and evaluation: ``moraft train`` (MoRA, LoRA, DoRA or full fine-tuning through TRL's trainers on
🤗 datasets), ``moraft eval`` and ``moraft demo``, and the pieces benchmarks reuse.

    from moraft.train import AdapterOptions, OptimizationOptions, OutputOptions, TrainOptions, train
    result = train(TrainOptions(
        adapter=AdapterOptions(method="lora", r=8),
        optimization=OptimizationOptions(max_steps=400),
        output=OutputOptions(dir="runs/lora"),
    ))
    result.curve("char_accuracy")   # [(step, accuracy), ...]
"""

from .builtin import BUILTIN_MODEL, char_tokenizer, tiny_llama
from .data import UUID_MEMORY, load_data, uuid_dataset, uuid_pairs
from .evaluate import load_trained, mean_loss, perplexity, uuid_accuracy
from .methods import apply_method, load_base, merge_and_restart, peft_config
from .options import (
    AdapterOptions,
    DataOptions,
    DistributedOptions,
    ModelOptions,
    OptimizationOptions,
    OutputOptions,
    TrainOptions,
)
from .runner import TrainResult, train

__all__ = [
    "AdapterOptions",
    "BUILTIN_MODEL",
    "UUID_MEMORY",
    "DataOptions",
    "DistributedOptions",
    "ModelOptions",
    "OptimizationOptions",
    "OutputOptions",
    "TrainOptions",
    "TrainResult",
    "apply_method",
    "char_tokenizer",
    "load_base",
    "load_data",
    "load_trained",
    "mean_loss",
    "merge_and_restart",
    "peft_config",
    "perplexity",
    "tiny_llama",
    "train",
    "uuid_accuracy",
    "uuid_dataset",
    "uuid_pairs",
]
