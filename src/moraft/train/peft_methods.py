"""The methods of ``moraft train --method``: one table (`METHODS`), and how ``--adapter.r`` becomes each method's size.

Every row is a PEFT 0.21 method that adapts ``nn.Linear`` layers and trains on the built-in tiny LLaMA (or moraft's
own MoRA, or full fine-tuning). A row says which PEFT config field the moraft options map onto (dropout, init_weights,
lora_alpha, rank_pattern; a method without such a field refuses the option), which integer field ``adapter.r``
sets (the *knob*) and how, and what ``moraft eval``, ``merge``, ``serve`` and ``export-lora`` can do with the adapter.

**A comparable budget.** ``adapter.r`` means "the trainable parameters of LoRA at rank r on the same target
modules": B = Σ r·(d_in + d_out) over the adapted layers. A method's knob is then

- ``same``: r itself, because the method's count at knob r is already B (LoRA, HiRA: A and B of rank r; SHiRA: a
  sparse mask of r·(d_in + d_out) entries; GraLoRA: k² blocks of rank r/k; DoRA and DeLoRA add a vector or a scalar
  per layer);
- ``search``: the value whose trainable count, measured by building the PEFT model on a ``torch.device("meta")``
  copy of the base (no memory, no weights), is closest to B; a bisection over the valid values, as every such count
  is monotone in its knob (RandLoRA's falls as r grows);
- ``r``: r passed as the method's r, whose count is not LoRA's (VeRA: d_out + r per layer; not comparable);
- ``none``: the method has no size knob (IA³: one vector per layer) or one that is not a budget; not comparable.

An explicit ``adapter.method_options`` value of the knob wins over the derived one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from ..adapters import Use
from ..errors import UserError, first_line

Budget = Literal["same", "search", "r", "none"]


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    Attributes:
        name: the lower-case name ``--method`` takes (PEFT's ``PeftType`` in lower case, but for dora and full).
        peft_type: the PEFT type its config is (None for full).
        budget: how ``adapter.r`` sets the knob (see the module docstring).
        knob: the config field ``adapter.r`` sets (None when ``budget`` is none).
        candidates: for ``search``: the valid knob values, from the adapted layers' (d_in, d_out).
        dropout, init, alpha, rank_pattern: the config field each moraft option maps onto (None: the method lacks it
            and the option is refused). ``dropout`` maps only onto a dropout of the adapter's input (LoHa's, LoKr's
            and OFT's module_dropout and rank_dropout drop other things; they are method_options).
        alternative: a second size field of the method that, given in method_options, replaces the knob (BOFT's
            boft_block_num for boft_block_size); else it is set to 0, as PEFT wants exactly one of the two.
        fixed: config values moraft always sets (e.g. ``use_dora``).
        defaults: config values moraft sets, from the adapted layers' (d_in, d_out), unless method_options gives them
            (sizes PEFT's defaults do not fit, e.g. a block larger than the layer).
        uses: what moraft can do with its saved adapter besides training it (eval, merge, serve, export).
        no_merge: why ``moraft merge`` refuses it (for the docs; empty where it merges).
        restart: whether ReMoRA/ReLoRA's merge_every can merge and restart it.
        options: its main options, for the docs (``method_options`` takes any field of its PEFT config).
        note: how r maps and why (for the docs).
    """

    name: str
    peft_type: Optional[str]
    budget: Budget
    knob: Optional[str] = "r"
    candidates: Optional[Callable[[list[tuple[int, int]]], list[int]]] = None
    dropout: Optional[str] = None
    init: Optional[str] = "init_weights"
    alpha: Optional[str] = None
    rank_pattern: Optional[str] = None
    alternative: Optional[str] = None
    fixed: dict[str, Any] = field(default_factory=dict)
    defaults: Optional[Callable[[list[tuple[int, int]]], dict[str, Any]]] = None
    no_merge: str = ""
    uses: tuple[Use, ...] = ("eval", "merge")
    restart: bool = False
    options: str = ""
    note: str = ""


def _up_to_width(shapes: list[tuple[int, int]]) -> list[int]:
    """1 .. the widest adapted dimension: the range of a rank-like knob."""
    return list(range(1, max(max(shape) for shape in shapes) + 1))


def _up_to_narrowest(shapes: list[tuple[int, int]]) -> list[int]:
    """1 .. the narrowest adapted dimension (a rank no layer can exceed)."""
    return list(range(1, min(min(shape) for shape in shapes) + 1))


def _up_to_narrowest_input(shapes: list[tuple[int, int]]) -> list[int]:
    """1 .. the narrowest adapted d_in (MiSS: r <= in_features). A range past it would cost one meta copy of the
    model per invalid value, as `closest` drops them one at a time (960 on SmolLM2's MLP: a minute)."""
    return list(range(1, min(d_in for d_in, _ in shapes) + 1))


def _common_divisors(shapes: list[tuple[int, int]], of_output: bool = False) -> list[int]:
    """The divisors of every adapted layer's d_in (and d_out): the valid block sizes."""
    g = 0
    for d_in, d_out in shapes:
        g = math.gcd(g, d_in)
        if of_output:
            g = math.gcd(g, d_out)
    return [k for k in range(1, g + 1) if g % k == 0]


def _largest_divisor(shapes: list[tuple[int, int]], at_most: int, of_output: bool = True) -> int:
    """The largest common divisor of every adapted dimension that is at most ``at_most``."""
    return max(k for k in _common_divisors(shapes, of_output) if k <= at_most)


def _frequencies(shapes: list[tuple[int, int]]) -> list[int]:
    """1 .. the smallest layer's d_in·d_out: the spectral coefficients a layer can have."""
    return list(range(1, min(d_in * d_out for d_in, d_out in shapes) + 1))


_LORA_OPTIONS = "r, lora_alpha, use_rslora, init_lora_weights (gaussian, pissa, olora, ...), bias"
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("mora", "MORA", "same", uses=("eval", "merge", "serve", "export"), restart=True,
               dropout="dropout", rank_pattern="rank_pattern",
               options="compression, mora_rank, input_grouping, output_grouping (moraft's own adapter options)",
               note="MoRA's square M of r̂ = round(sqrt((d_in + d_out)·r)) per layer: r̂² ≈ r·(d_in + d_out)"),
        Method("lora", "LORA", "same", dropout="lora_dropout", init="init_lora_weights", alpha="lora_alpha",
               rank_pattern="rank_pattern", uses=("eval", "merge", "serve"), restart=True, options=_LORA_OPTIONS,
               note="rank r: r·(d_in + d_out) per layer, the budget itself"),
        Method("dora", "LORA", "same", dropout="lora_dropout", init="init_lora_weights", alpha="lora_alpha",
               rank_pattern="rank_pattern", fixed={"use_dora": True}, options=_LORA_OPTIONS,
               note="LoRA's rank r plus a magnitude vector of d_out per layer"),
        Method("full", None, "none", knob=None, init=None, uses=("eval",),
               no_merge="the run saves the whole model (nothing to merge)",
               note="every weight of the model trains; no budget"),
        Method("hira", "HIRA", "same", dropout="hira_dropout", rank_pattern="rank_pattern",
               options="r (rank of the Hadamard factor A·B applied to W0)",
               note="A and B of rank r, multiplied elementwise with W0: r·(d_in + d_out) per layer"),
        Method("miss", "MISS", "search", candidates=_up_to_narrowest_input, dropout="miss_dropout",
               options="r, mini_r, init_weights (True, 'bat' or 'mini')",
               note="one r × d_out block per layer: r ≈ B / Σ d_out"),
        Method("gralora", "GRALORA", "same", dropout="gralora_dropout", alpha="alpha",
               options="r, gralora_k (blocks per side; r must divide by it), hybrid_r, alpha",
               note="k × k blocks of rank r/k: r·(d_in + d_out) per layer; gralora_k is 2 where r is even, else 1"),
        Method("shira", "SHIRA", "same",
               no_merge="its sparse mask's layer cannot be built on an empty (meta) copy of the base (torch.nonzero)",
               uses=("eval",), options="r, mask_type (random, or a custom mask function), random_seed",
               note="a sparse update with r·(d_in + d_out) trainable entries per layer"),
        Method("randlora", "RANDLORA", "search", candidates=_up_to_narrowest, dropout="randlora_dropout",
               alpha="randlora_alpha", options="r (rank of the shared random bases), randlora_alpha, sparse",
               note="trainable scalings of shared random bases of rank r: the count falls as r grows, so the "
                    "search goes the other way"),
        Method("vera", "VERA", "r", dropout="vera_dropout",
               options="r (rank of the shared random projections), d_initial, projection_prng_key",
               note="not comparable: two vectors per layer, d_out + r trainable, whatever the LoRA rank; r is "
                    "VeRA's shared projection rank"),
        Method("loha", "LOHA", "search", candidates=_up_to_width, alpha="alpha", rank_pattern="rank_pattern",
               options="r, alpha, rank_dropout, module_dropout",
               note="two rank-r Hadamard factors: 2·r·(d_in + d_out) per layer, so about r/2"),
        Method("lokr", "LOKR", "search", candidates=_up_to_width, alpha="alpha", rank_pattern="rank_pattern",
               defaults=lambda shapes: {"decompose_factor": 2},
               options="r, alpha, decompose_factor, decompose_both, rank_dropout, module_dropout",
               note="a Kronecker product of a small factor and a rank-r one. PEFT's default factorization "
                    "(decompose_factor=-1, the most square) caps the count far below LoRA's at any r, so moraft "
                    "sets decompose_factor=2 (a 2 × 2 factor and a rank-r factor of d/2) unless method_options "
                    "gives one, then searches r"),
        Method("boft", "BOFT", "search", knob="boft_block_size", candidates=_common_divisors,
               dropout="boft_dropout", alternative="boft_block_num",
               options="boft_block_size or boft_block_num, boft_n_butterfly_factor, boft_dropout",
               note="orthogonal butterfly blocks: the block size (a divisor of every d_in) whose count is closest"),
        Method("ia3", "IA3", "none", knob=None, init="init_ia3_weights",
               options="feedforward_modules (scaled at the input; the others at the output)",
               note="not comparable: one learned vector per layer (d_out, or d_in for feedforward_modules), no size "
                    "knob"),
        Method("oft", "OFT", "search",
               no_merge="its block indices are computed when it wraps a real model and never saved", uses=("eval",),
               knob="oft_block_size", candidates=_common_divisors, alternative="r",
               options="oft_block_size (or r: the number of blocks), coft, eps, block_share, module_dropout",
               note="block-diagonal orthogonal rotation of the input: the block size (a divisor of every d_in) whose "
                    "count is closest"),
        Method("hra", "HRA", "search", candidates=_up_to_narrowest,
               options="r (Householder reflections; even unless apply_GS), apply_GS",
               note="r Householder vectors of d_in per layer"),
        Method("fourierft", "FOURIERFT", "search", knob="n_frequency", candidates=_frequencies,
               options="n_frequency, scaling, random_loc_seed",
               note="n_frequency learned spectral coefficients per layer: n ≈ B / layers"),
        Method("waveft", "WAVEFT", "search", knob="n_frequency", candidates=_frequencies,
               options="n_frequency, scaling, wavelet_family",
               note="n_frequency learned wavelet coefficients per layer"),
        Method("vblora", "VBLORA", "search", knob="num_vectors", candidates=_up_to_width, dropout="vblora_dropout",
               init=None,
               defaults=lambda shapes: {"vector_length": _largest_divisor(shapes, 256)},
               options="r, num_vectors, vector_length (here: the largest divisor of every d_in and d_out up to 256), "
                       "topk",
               note="a shared bank of num_vectors × vector_length plus per-layer logits: the bank size whose count "
                    "is closest"),
        Method("c3a", "C3A", "search", knob="block_size", candidates=_common_divisors,
               options="block_size (a divisor of every d_in and d_out), init_weights",
               note="circular convolution blocks: d_in·d_out / block_size per layer, so the count falls as the block "
                    "grows"),
        Method("road", "ROAD", "none", knob=None, defaults=lambda shapes: {"group_size": _largest_divisor(shapes, 64)},
               options="variant (road_1, road_2, road_4), group_size (here at most 64, a divisor of every d_out)",
               note="not comparable: 2D rotations of the outputs, a fixed count per variant (road_1: d_out per layer; "
                    "road_2 and road_4 more)"),
        Method("delora", "DELORA", "same", rank_pattern="rank_pattern", options="r, delora_lambda, module_dropout",
               note="LoRA's rank r with a normalized update and a scalar per layer"),
        Method("lily", "LILY", "search",
               no_merge="PEFT 0.21 does not implement merging for Lily", uses=("eval",),
               candidates=_up_to_narrowest,
               options="r, stride_A, num_B, scaling",
               note="Lily's r (its count is not r·(d_in + d_out)): the value whose count is closest"),
        Method("tinylora", "TINYLORA", "none", knob=None, dropout="tinylora_dropout",
               options="r (SVD rank), u (trainable vector size), weight_tying",
               note="not comparable: a small vector u per (tied) layer, set by u, not by a rank"),
        Method("glora", "GLORA", "search", candidates=_up_to_width, options="r, config_A_B, config_C, config_D_E",
               note="generalized LoRA: the rank whose count is closest"),
        Method("deft", "DEFT", "search", candidates=_up_to_width, dropout="deft_dropout", alpha="alpha",
               options="r, decomposition_method, alpha",
               note="the rank whose count is closest"),
        Method("psoft", "PSOFT", "search",
               no_merge="its principal-subspace cache is computed from the base weights when it wraps the model and "
                        "never saved",
               uses=("eval",), candidates=_up_to_narrowest, dropout="psoft_dropout", alpha="psoft_alpha",
               options="r, psoft_alpha, psoft_orth, use_cayley_neumann",
               note="an r × r orthogonal (Cayley) rotation in W0's principal subspace, r(r − 1)/2 free entries, and "
                    "two magnitude vectors of r per layer: the rank whose count is closest"),
        Method("peanut", "PEANUT", "search", candidates=_up_to_width, options="r, depth, act_fn, scaling",
               note="the rank whose count is closest"),
        Method("beft", "BEFT", "none", knob=None, uses=("eval",),
               no_merge="PEFT merges its bias only into a layer that has a bias (LLaMA's have none)",
               note="not comparable: a bias vector per layer; PEFT cannot merge it into a layer without a bias"),
        Method("pvera", "PVERA", "r", dropout="pvera_dropout", options="r, d_initial, sample_at_inference",
               note="not comparable: as VeRA, two vectors per layer (d_out plus a small multiple of r)"),
        Method("unilora", "UNILORA", "none",
               no_merge="its index buffers are computed when it wraps a real model and never saved", uses=("eval",),
               knob=None, dropout="unilora_dropout",
               options="r, theta_d_length (the one shared trainable vector)",
               note="not comparable: one shared vector of theta_d_length for the whole model"),
    )
}

# PEFT 0.21 methods left out, and why (the docs list them)
LEFT_OUT: dict[str, str] = {
    "adalora": "needs total_step and its own rank-allocation step after every optimizer step "
               "(update_and_allocate), which the Trainer does not call",
    "xlora": "a mixture of LoRA experts: it needs already trained LoRA adapters to route between",
    "poly": "multi-task routing: every batch needs task_ids",
    "adamss": "its count cannot be measured on a meta copy and its adaptive subspace schedule (use_asa) needs "
              "a callback the Trainer does not run",
    "frod": "its joint decomposition of every layer runs at wrapping time, and cannot run on a meta copy",
    "osf": "orthogonal subspace fine-tuning for continual learning; its count is the width of the SVD subspace, "
           "with no rank to match",
    "supertuning": "selects its trainable weights from gradients computed at wrapping time (sparsity), not a "
                   "budget",
    "shadow": "fails on the tiny LLaMA in PEFT 0.21 ('ShadowCarrier' object has no attribute 'view')",
    "ln_tuning": "adapts LayerNorms, not linear layers",
    "trainable_tokens": "adapts token embeddings, not linear layers",
    "adaption_prompt": "a prompt method (learned prefixes in attention), not linear layers",
    "prompt_tuning, p_tuning, prefix_tuning, multitask_prompt_tuning, cpt, cartridge": "prompt learning: learned "
    "virtual tokens, no linear layer adapted",
}

MOD_OPTIONS = ("dropout", "init_weights", "lora_alpha", "rank_pattern")  # moraft options each method maps or refuses


def method(name: str) -> Method:
    """The row of ``name``; `UserError` listing every method when there is none."""
    if name not in METHODS:
        raise UserError(f"adapter.method={name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def config_class(row: Method) -> type:
    """The PEFT config class of ``row`` (moraft's MoraConfig for mora)."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from ..mora import MoraConfig

    if row.peft_type == "MORA":
        return MoraConfig
    return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(row.peft_type)]


# -- from moraft options to a PEFT config ---------------------------------------------------------------------------


def fields_of(cls: type) -> set[str]:
    """The init fields of a PEFT config class."""
    return {f.name for f in dataclasses.fields(cls) if f.init}


def mapped_options(row: Method, options: Any, common: dict[str, Any]) -> dict[str, Any]:
    """The PEFT config keywords of ``row`` from moraft's adapter ``options``: ``common`` (targets, layers, ...) as
    far as the config has them, moraft's own options under the method's field names, ``options.method_options``,
    then the row's fixed values. A moraft option set to something else than its default that the method has no field
    for is refused (a silently ignored option would be a silently different run)."""
    cls = config_class(row)
    accepted = fields_of(cls)
    kwargs: dict[str, Any] = {}
    for name, value in common.items():
        if name in accepted:
            kwargs[name] = value
        elif value not in (None, [], {}, "all-linear"):
            raise UserError(f"adapter.{name}={value!r}: method {row.name!r} ({cls.__name__}) has no {name}")
    moraft_values = {
        "dropout": (row.dropout, options.dropout, options.dropout != 0.0),
        "init_weights": (row.init, options.init_weights, options.init_weights is not True),
        "lora_alpha": (row.alpha, options.lora_alpha, options.lora_alpha is not None),
        "rank_pattern": (row.rank_pattern, dict(options.rank_pattern), bool(options.rank_pattern)),
    }
    for name, (target, value, set_) in moraft_values.items():
        if not set_:
            continue
        if target is None or target not in accepted:
            raise UserError(
                f"adapter.{name}={value!r}: method {row.name!r} has no such option; set its own in "
                f"adapter.method_options (its fields: {', '.join(sorted(accepted - _GENERIC))})"
            )
        kwargs[target] = value
    unknown = sorted(set(options.method_options) - accepted)
    if unknown:
        raise UserError(
            f"adapter.method_options key {unknown[0]!r} is not an option of method {row.name!r} ({cls.__name__}); "
            f"accepted: {', '.join(sorted(accepted - _GENERIC))}"
        )
    kwargs.update(options.method_options)
    kwargs.update(row.fixed)
    return kwargs


# set by moraft itself, never through method_options
_GENERIC = {"peft_type", "peft_version", "task_type", "inference_mode", "base_model_name_or_path", "revision",
            "auto_mapping", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
            "modules_to_save"}


def build_config(cls: type, kwargs: dict[str, Any], method_name: str) -> Any:
    """``cls(**kwargs)``, PEFT's own ValueError (its checks of the values) as a one-line `UserError`."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(f"adapter.method={method_name!r}: {first_line(err)}") from None


# -- the budget -----------------------------------------------------------------------------------------------------


def meta_copy(model: nn.Module) -> Optional[nn.Module]:
    """An empty copy of ``model`` on the meta device (its architecture, no weights), or None where transformers
    cannot make one from its config."""
    from transformers import AutoModelForCausalLM

    config = getattr(model, "config", None)
    if config is None:
        return None
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the layer shapes are the unquantized ones
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture transformers cannot build from its config alone
        return None


def trainable_count(model: nn.Module, config: Any) -> Optional[int]:
    """Trainable parameters of ``config`` on a meta copy of ``model``; None where PEFT refuses the config there (a
    knob value that does not fit a layer) or cannot build it on meta."""
    from peft import get_peft_model

    from .._peft_hook import quiet_peft_deprecation

    copy = meta_copy(model)
    if copy is None:
        return None
    try:
        with quiet_peft_deprecation():
            wrapped = get_peft_model(copy, config)
    except Exception:  # a knob value PEFT refuses for some layer, or an init that needs real weights
        return None
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def lora_shapes(model: nn.Module, common: dict[str, Any]) -> list[tuple[int, int]]:
    """(d_in, d_out) of each layer LoRA adapts with these targets, found by PEFT itself on a meta copy."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .._peft_hook import quiet_peft_deprecation

    copy = meta_copy(model)
    if copy is None:
        return []
    with quiet_peft_deprecation():
        wrapped = get_peft_model(copy, LoraConfig(r=1, task_type="CAUSAL_LM", **common))
    return [
        (m.in_features, m.out_features) for m in wrapped.modules()
        if isinstance(m, BaseTunerLayer) and hasattr(m, "in_features")
    ]


def closest(count: Callable[[int], Optional[int]], candidates: list[int], target: int) -> Optional[int]:
    """The candidate whose ``count`` is closest to ``target``, for a count monotone in the candidate (rising or
    falling), by bisection; a candidate whose count is None (invalid) is dropped. None when none is valid."""
    cands = list(candidates)
    seen: dict[int, int] = {}

    def value(i: int) -> Optional[int]:
        if cands[i] not in seen:
            c = count(cands[i])
            if c is None:
                return None
            seen[cands[i]] = c
        return seen[cands[i]]

    while cands:
        first, last = value(0), value(len(cands) - 1)
        if first is None:
            cands.pop(0)
            continue
        if last is None:
            cands.pop()
            continue
        rising = last >= first
        lo, hi = 0, len(cands) - 1  # invariant: the crossing of target lies in [lo, hi]
        invalid = None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            v = value(mid)
            if v is None:
                invalid = mid
                break
            if (v < target) == rising:
                lo = mid
            else:
                hi = mid
        if invalid is not None:
            cands.pop(invalid)
            continue
        return min((cands[lo], cands[hi]), key=lambda k: (abs(seen[k] - target), k))
    return None


def derive_knob(row: Method, model: nn.Module, r: int, common: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """Set ``kwargs[row.knob]`` from ``r`` (unless method_options set it) so that the method's trainable count on
    ``model`` is closest to LoRA's at rank r on the same targets (``common``), and the row's size defaults."""
    needs_search = row.budget == "search" and row.knob not in kwargs
    shapes: list[tuple[int, int]] = []
    if row.defaults is not None or needs_search:
        shapes = lora_shapes(model, {k: v for k, v in common.items() if k != "modules_to_save"})
    if row.defaults is not None and shapes:
        for name, value in row.defaults(shapes).items():
            kwargs.setdefault(name, value)
    if row.knob is None or row.knob in kwargs or kwargs.get(row.alternative):
        return
    if row.alternative is not None:
        kwargs[row.alternative] = 0
    if row.budget in ("same", "r") or not shapes:  # no meta copy of this architecture: nothing to measure on
        kwargs[row.knob] = r
        if row.name == "gralora" and "gralora_k" not in kwargs and r % 2:
            kwargs["gralora_k"] = 1  # r must divide by k, 2 by default
        return
    cls = config_class(row)

    def count(value: int) -> Optional[int]:
        try:
            config = cls(**{**kwargs, row.knob: value, "task_type": "CAUSAL_LM"})
        except (ValueError, TypeError):
            return None
        return trainable_count(model, config)

    found = closest(count, row.candidates(shapes), r * sum(d_in + d_out for d_in, d_out in shapes))
    if found is None:
        raise UserError(
            f"adapter.method={row.name!r}: no value of {row.knob} fits every adapted layer of this model; set "
            f"adapter.method_options {{{row.knob!r}: ...}} yourself"
        )
    kwargs[row.knob] = found


def size_report(model: nn.Module, method_name: str, r: int) -> dict[str, Any]:
    """The run's size, the same way for every method: its trainable parameters (``requires_grad`` after wrapping;
    for full, every parameter), the LoRA budget r·Σ(d_in + d_out) over the layers the method adapted, their ratio,
    and the knob moraft set from r. Budget and ratio are None for full and where the budget is not comparable."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    row = method(method_name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shapes = [
        (m.in_features, m.out_features) for m in model.modules()
        if isinstance(m, BaseTunerLayer) and isinstance(getattr(m, "in_features", None), int)
    ]
    budget = r * sum(d_in + d_out for d_in, d_out in shapes) if shapes else None
    config = getattr(model, "peft_config", {}).get("default")
    knob = {row.knob: getattr(config, row.knob)} if row.knob and config is not None else {}
    comparable = row.budget in ("same", "search") and budget is not None
    return {
        "trainable_parameters": trainable,
        "lora_budget": budget,
        "budget_ratio": round(trainable / budget, 4) if comparable else None,
        "comparable": comparable,
        "knob": knob,
    }


def describe_size(method_name: str, size: dict[str, Any]) -> str:
    """One line for the run's log: ``lora r=8 ...: 69,632 trainable parameters = 1.00 × the LoRA budget 69,632``."""
    knob = ", ".join(f"{k}={v}" for k, v in size["knob"].items())
    head = f"method {method_name}{f' ({knob})' if knob else ''}: {size['trainable_parameters']:,} trainable parameters"
    if size["comparable"]:
        return f"{head} = {size['budget_ratio']:.2f} × the LoRA budget at the same r ({size['lora_budget']:,})"
    if size["lora_budget"] is not None:
        return f"{head} (not comparable with the LoRA budget at the same r, {size['lora_budget']:,})"
    return head


__all__ = [
    "LEFT_OUT",
    "METHODS",
    "Method",
    "closest",
    "describe_size",
    "method",
    "size_report",
]
