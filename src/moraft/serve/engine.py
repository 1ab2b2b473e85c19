"""The decoding engine of ``moraft serve``: continuous batching of requests for many adapters over one base model.

One background thread owns the model. Each iteration:

1. **join**: requests waiting in the queue (up to ``max_batch_size`` rows and ``max_prefill_tokens`` padded prompt
   tokens) are prefilled together, left-padded, each row with its own adapter; each gets its first token.
2. **decode**: every running row advances one token in one forward pass, rows with different adapters side by
   side (``layers.RowAdapters``). Rows that finish (end-of-sequence, a stop string, ``max_tokens``) or whose client
   went away leave the batch at once.

A request's own settings and results stay its own: a request whose sampling cannot start (its seed, say), whose
logits are not finite, whose draw fails or whose text cannot be decoded fails alone, and the rest of the batch goes
on. Only a failed forward pass, which every row of the step shares, fails the requests in that step.

The KV cache (a transformers ``DynamicCache``) holds the running rows right-aligned: row i's real tokens are the last
``len_i`` positions, earlier positions are padding that the attention mask hides and whose keys/values are zeroed.
Each row passes its own ``position_ids`` (its real length), so a row's attention and positions are those of a batch of
one. A joining group's cache is left-padded to the longer of the two lengths and concatenated on the batch axis; rows
that leave are dropped with ``batch_select_indices`` and leading columns that only padding uses are cut, so the cache
never grows past the longest running sequence.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .adapters import LoadedAdapter
from .layers import RowAdapters
from .metrics import ServeMetrics
from .sampling import SamplingError, SamplingParams, TextTracker, sample

logger = logging.getLogger("moraft.serve")


@dataclass
class Delta:
    """New text of a request."""

    text: str


@dataclass
class Finished:
    """The request is done; its last event."""

    reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    """The request could not be completed; its last event."""

    message: str


Event = Union[Delta, Finished, Failed]
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request handed to the engine.

    Args:
        prompt_ids: the tokenized prompt.
        params: how to decode.
        adapter: the adapter (pinned in the store; the engine releases it when the request ends), None for the base.
        on_event: called from the engine thread with each ``Delta`` and finally one ``Finished`` or ``Failed``.
    """

    prompt_ids: list[int]
    params: SamplingParams
    adapter: Optional[LoadedAdapter]
    on_event: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: bool = False

    def cancel(self) -> None:
        """Stop decoding this request at the next step (its client went away)."""
        self.cancelled = True


class _Sequence:
    """A request while it is in the batch."""

    def __init__(self, engine: "Engine", request: Request) -> None:
        self.engine = engine
        self.request = request
        self.params = request.params
        self.tracker = TextTracker(engine.tokenizer, request.params.stop)
        self.generator = request.params.generator(engine.device)
        self.cache_len = len(request.prompt_ids)  # real tokens in the KV cache
        self.pending = -1  # the last token sampled, fed in the next decoding step
        self.count = 0

    def accept(self, token: int) -> bool:
        """Take the next token; emit new text; return whether the request is finished."""
        engine, params = self.engine, self.params
        self.count += 1
        self.pending = token
        if self.count == 1:
            engine.metrics.first_token.observe(time.monotonic() - self.request.arrived)
        reason = None
        if token in engine.eos_ids and not params.ignore_eos:
            reason = "stop"
        else:
            self.tracker.add(token)
            if self.tracker.stopped:
                reason = "stop"
            elif self.count >= params.max_tokens or self.cache_len + 1 >= engine.context_length:
                reason = "length"
        if reason is None:
            self._emit(self.tracker.take())
            return False
        self.tracker.flush()
        self._emit(self.tracker.take(final=True))
        engine._finish(self.request, Finished(reason, len(self.request.prompt_ids), self.count))
        return True

    def _emit(self, text: str) -> None:
        if not text:
            return
        try:
            self.request.on_event(Delta(text))
        except Exception:  # a consumer that fails is dropped at the next step; the rest of the batch goes on
            logger.exception("delivering text of request %s failed", self.request.id)
            self.request.cancel()


class Engine:
    """Continuous batching over a base model whose layers were wrapped by ``layers.wrap_model``.

    Args:
        model: the causal LM (eval mode), its Linear/Conv1D layers wrapped.
        tokenizer: its tokenizer (for stop strings and text).
        row_adapters: the shared row assignment returned by ``wrap_model``.
        release: called with a request's adapter when the request ends (``AdapterStore.release``).
        metrics: where to count steps and tokens.
        context_length: the model's context window in tokens.
        max_batch_size: the most rows decoded together.
        max_prefill_tokens: the most padded prompt tokens prefilled in one step (one request is always admitted).
        batch_window: seconds an idle engine waits after a request arrives for others to join its first step.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, row_adapters: RowAdapters,
                 release: Callable[[LoadedAdapter], None], metrics: ServeMetrics, context_length: int,
                 max_batch_size: int = 64, max_prefill_tokens: int = 8192, batch_window: float = 0.0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.row_adapters = row_adapters
        self.release = release
        self.metrics = metrics
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.batch_window = batch_window
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._rows: list[_Sequence] = []
        self._cache: Optional[DynamicCache] = None
        self._mask: Optional[torch.Tensor] = None  # (B, L) 1 = real token
        self._thread: Optional[threading.Thread] = None
        self._accepts_logits_to_keep = "logits_to_keep" in _forward_params(model)
        _check_cache(DynamicCache(config=model.config), model.config)

    # -- public ----------------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="moraft-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: Request) -> None:
        """Queue a request; its events arrive through ``request.on_event``."""
        with self._cond:
            if self._stopping or not self.alive:
                raise RuntimeError("the decoding engine is not running")
            self._waiting.append(request)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify_all()

    # -- the loop --------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            joiners = self._take_waiting()
            if joiners is None:
                break
            if joiners:
                self._admit(joiners)
            try:  # a failed forward (out of memory, say) fails the requests in it, not the server
                with torch.inference_mode():
                    self._drop_cancelled()
                    if self._rows:
                        self._decode()
            except Exception as err:
                self._fail([s.request for s in self._rows], "decoding", err)
            self.metrics.running.set(len(self._rows))
        for request in [*self._waiting, *(s.request for s in self._rows)]:
            self._finish(request, Failed("the server is shutting down"))

    def _admit(self, requests: list[Request]) -> None:
        """Prefill ``requests`` and add those not finished by their first token to the running batch."""
        started = self._start(requests)
        if not started:
            return
        try:
            with torch.inference_mode():
                sequences, cache, mask = self._prefill(started)
        except Exception as err:  # the running batch was not touched: only these requests fail
            self._fail([s.request for s in started], "prefill", err)
            return
        if sequences:
            try:
                with torch.inference_mode():
                    self._join(sequences, cache, mask)
            except Exception as err:
                joining = [s.request for s in (*sequences, *self._rows)]
                self._fail(joining, "joining the batch", err)

    def _start(self, requests: list[Request]) -> list["_Sequence"]:
        """A sequence per request; a request whose sampling cannot be set up fails alone."""
        sequences = []
        for request in requests:
            try:
                sequences.append(_Sequence(self, request))
            except Exception as err:
                logger.warning("request %s cannot start: %s: %s", request.id, type(err).__name__, err)
                self._finish(request, Failed(f"the request's sampling settings failed: {type(err).__name__}: {err}"))
        return sequences

    def _advance(self, rows: list["_Sequence"], tokens: list) -> list[int]:
        """Give each row its sampled token; return the indices of the rows that go on. A row that got a
        `SamplingError`, or whose text cannot be decoded, fails its own request and leaves."""
        keep = []
        for row, (sequence, token) in enumerate(zip(rows, tokens)):
            if isinstance(token, SamplingError):
                logger.warning("request %s failed: %s", sequence.request.id, token)
                self._finish(sequence.request, Failed(str(token)))
                continue
            try:
                finished = sequence.accept(token)
            except Exception as err:
                logger.exception("request %s failed taking its token", sequence.request.id)
                self._finish(sequence.request, Failed(f"decoding its text failed: {type(err).__name__}: {err}"))
                continue
            if not finished:
                keep.append(row)
        return keep

    def _fail(self, requests: list[Request], stage: str, err: Exception) -> None:
        logger.exception("%s failed", stage)
        for request in requests:
            self._finish(request, Failed(f"{stage} failed: {type(err).__name__}: {err}"))
        if any(s.request in requests for s in self._rows):
            self._rows, self._cache, self._mask = [], None, None

    def _take_waiting(self) -> Optional[list[Request]]:
        """Requests to prefill now (maybe none); None when stopping. Blocks while there is nothing to do."""
        with self._cond:
            while not self._stopping and not self._waiting and not self._rows:
                self._cond.wait()
            if self._stopping:
                return None
            if not self._rows and self._waiting and self.batch_window > 0:
                deadline = self._waiting[0].arrived + self.batch_window
                while not self._stopping and len(self._waiting) < self.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            joiners: list[Request] = []
            longest = 0
            cancelled = []
            while self._waiting and len(self._rows) + len(joiners) < self.max_batch_size:
                request = self._waiting[0]
                if request.cancelled:
                    cancelled.append(self._waiting.popleft())
                    continue
                padded = max(longest, len(request.prompt_ids)) * (len(joiners) + 1)
                if joiners and padded > self.max_prefill_tokens:
                    break
                longest = max(longest, len(request.prompt_ids))
                joiners.append(self._waiting.popleft())
            self.metrics.waiting.set(len(self._waiting))
        for request in cancelled:
            self._finish(request, None)
        return joiners

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache, adapters: list[Optional[LoadedAdapter]]) -> torch.Tensor:
        """Logits of the last position of each row: (B, V) in float32."""
        self.row_adapters.assign(adapters)
        kwargs = {"logits_to_keep": 1} if self._accepts_logits_to_keep else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, **kwargs)
        return out.logits[:, -1].float()

    def _prefill(self, sequences: list[_Sequence]) -> tuple[list[_Sequence], DynamicCache, torch.Tensor]:
        """Run the prompts (left-padded, one row each) and take each first token; return the rows that go on."""
        requests = [s.request for s in sequences]
        longest = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), longest), dtype=torch.long)
        for row, request in enumerate(requests):
            ids[row, longest - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, longest - len(request.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in requests])
        hidden = (mask == 0)[:, None, :, None]
        for layer in cache.layers:  # padding's keys/values are never attended to; zero them so they stay finite
            layer.keys.masked_fill_(hidden, 0)
            layer.values.masked_fill_(hidden, 0)
        self.metrics.prefill_size.observe(len(requests))
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in requests))
        tokens = sample(logits, [s.params for s in sequences], [s.generator for s in sequences])
        self.metrics.generation_tokens.inc(len(tokens))
        keep = self._advance(sequences, tokens)
        index = torch.tensor(keep, device=self.device, dtype=torch.long)
        if keep and len(keep) < len(requests):
            cache.batch_select_indices(index)
        return [sequences[i] for i in keep], cache, mask.index_select(0, index)

    def _join(self, sequences: list[_Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask = sequences, cache, mask
            self._trim()
            return
        length = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, length), _pad_left(new.keys, length)])
            old.values = torch.cat([_pad_left(old.values, length), _pad_left(new.values, length)])
        self._mask = torch.cat([_pad_left(self._mask, length, dim=1), _pad_left(mask, length, dim=1)])
        self._rows = self._rows + sequences

    def _decode(self) -> None:
        start = time.perf_counter()
        rows = self._rows
        ids = torch.tensor([[s.pending] for s in rows], device=self.device)
        positions = torch.tensor([[s.cache_len] for s in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        adapters = [s.request.adapter for s in rows]
        logits = self._forward(ids, self._mask, positions, self._cache, adapters)
        for s in rows:
            s.cache_len += 1
        tokens = sample(logits, [s.params for s in rows], [s.generator for s in rows])
        keep = self._advance(rows, tokens)
        self._select(keep)
        distinct = len({id(a) if a is not None else None for a in adapters})
        m = self.metrics
        m.generation_tokens.inc(len(rows))
        m.batch_size.observe(len(rows))
        m.batch_adapters.observe(distinct)
        m.batch_adapters_max.set_max(distinct)
        m.step_seconds.observe(time.perf_counter() - start)

    def _drop_cancelled(self) -> None:
        keep = [row for row, s in enumerate(self._rows) if not s.request.cancelled]
        for s in self._rows:
            if s.request.cancelled:
                self._finish(s.request, None)
        self._select(keep)

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows of the batch."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        self._rows = [self._rows[i] for i in keep]
        self._trim()

    def _trim(self) -> None:
        """Cut leading cache columns that are padding in every row."""
        used = self._mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
            self._mask = self._mask[:, first:]

    def _finish(self, request: Request, event: Optional[Event]) -> None:
        """Release the request's adapter, count it and send its last event (None: its client is gone)."""
        if request.done:
            return
        request.done = True
        if request.adapter is not None:
            self.release(request.adapter)
            request.adapter = None
        if isinstance(event, Finished):
            self.metrics.finished.inc(1, event.reason)
            self.metrics.latency.observe(time.monotonic() - request.arrived)
        elif event is None:
            self.metrics.finished.inc(1, "cancelled")
        else:
            self.metrics.finished.inc(1, "error")
        if event is not None:
            try:
                request.on_event(event)
            except Exception:  # a consumer that vanished must not stop the engine
                logger.exception("delivering the last event of request %s failed", request.id)


def _pad_left(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [missing, 0]
    return F.pad(t, pad)


def _check_cache(cache: DynamicCache, model_config) -> None:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"moraft serve batches full-attention KV caches only; a {type(model_config).__name__} model's "
                f"cache has {type(layer).__name__} layers (sliding-window attention)"
            )


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


def _forward_params(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
