"""Serving many adapters from one base model (``moraft serve``).

    adapters.py   the adapter folder: load on first use, least-recently-used eviction under a memory bound
    layers.py     per-row adapters in one forward: each Linear/Conv1D adds each row's MoRA or LoRA delta
    engine.py     continuous batching: requests join and leave the running batch between decoding steps
    sampling.py   greedy / temperature / top-p sampling, stop strings, incremental detokenization
    api.py        the OpenAI-shaped HTTP API (FastAPI), /health and /metrics
    metrics.py    Prometheus text metrics
    server.py     the ``moraft serve`` command: load the base, build all of the above, run uvicorn

The HTTP modules (api, server) need the ``serve`` extra: ``pip install moraft[serve]``.
"""

from .adapters import AdapterStore, LoadedAdapter
from .engine import Engine, Request
from .layers import RowAdapters, ServedLinear, wrap_model
from .sampling import SamplingParams

__all__ = ["AdapterStore", "Engine", "LoadedAdapter", "Request", "RowAdapters", "SamplingParams", "ServedLinear",
           "wrap_model"]
