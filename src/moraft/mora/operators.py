"""MoRA's fixed compression and decompression operators: the whole of MoRA's math, written once.

MoRA (Jiang et al., 2024, https://arxiv.org/abs/2405.12130) replaces LoRA's B·A with one trainable square
matrix M (r̂ × r̂) between two fixed, parameter-free linear maps:

    h = W0·x + f_decomp(M · f_comp(x))          x: (..., k)   h: (..., d)   M: (r̂, r̂)

Because f_comp and f_decomp are linear, ΔW = D·M·C is a fixed matrix that merges into W0.

Every operator below is expressed as

    compress(x)     (..., k)       -> (..., nb, r̂)     nb "blocks" of r̂ features
    block weights   M              -> (nb or 1, r̂, r̂)  block i is multiplied by W_i (rotation: W_i = M·R_i)
    decompress(y)   (..., nb, r̂)   -> (..., d)

together with the exact transposes of compress and decompress.  `MoraFunction` (the training forward and
its backward), `MoraOperator.apply` and `MoraOperator.delta_weight` (merging, export, checkpoint import) use
only these pieces, so no other part of moraft re-derives the math.

All reshaping is built from three length-changing primitives on the last dimension, each the transpose of
another (so backward passes need no extra code):

    tile(v, n)   out[p] = v[p mod len(v)]                  (repeats, or truncates when n < len)
    fold(v, n)   out[q] = Σ_{p mod n = q} v[p]             (sums wrapped chunks, or zero-pads when n > len)
    crop(v, n)   first n entries, zero-padded               (its own transpose)

tile(·, n) and fold(·, len) are transposes of each other; `resize` (tile when growing, fold when shrinking)
is the decompression that lets every block output reach the layer output.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from ..errors import UserError

Compression = Literal["sharing", "rotation", "decouple", "truncation"]
Grouping = Literal["strided", "contiguous"]
COMPRESSIONS: tuple[str, ...] = ("sharing", "rotation", "decouple", "truncation")
GROUPINGS: tuple[str, ...] = ("strided", "contiguous")


class MoraSettings(Protocol):
    """What `MoraOperator.from_config` reads from a config (`MoraConfig` has it all)."""

    r: int
    compression: str
    input_grouping: str
    output_grouping: str
    peft_mora_compat: bool


# ----------------------------------------------------------------------------------------------------------------
# length-changing primitives on the last dimension


def _zeros_along(v: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    shape = list(v.shape)
    shape[dim] = n
    return v.new_zeros(shape)


def tile(v: torch.Tensor, n: int, dim: int = -1) -> torch.Tensor:
    """``out[p] = v[p mod L]`` for ``p < n`` along ``dim``: cyclic repetition (or truncation when ``n < L``)."""
    length = v.shape[dim]
    if n == length:
        return v
    if n < length:
        return v.narrow(dim, 0, n)
    full, rem = divmod(n, length)
    return torch.cat([v] * full + ([v.narrow(dim, 0, rem)] if rem else []), dim=dim)  # writes exactly n


def fold(v: torch.Tensor, n: int, dim: int = -1) -> torch.Tensor:
    """``out[q] = Σ_{p mod n = q} v[p]`` along ``dim``: sums wrapped chunks (or zero-pads when ``n > L``)."""
    length = v.shape[dim]
    if n == length:
        return v
    if n > length:
        return torch.cat([v, _zeros_along(v, dim, n - length)], dim=dim)
    full, rem = divmod(length, n)
    if full <= 4:  # a few chunks: chained adds beat a strided reduction
        out = v.narrow(dim, 0, n) + v.narrow(dim, n, n) if full > 1 else v.narrow(dim, 0, n).clone()
        for i in range(2, full):
            out += v.narrow(dim, i * n, n)
    else:
        axis = dim % v.dim()
        out = v.narrow(dim, 0, full * n).unflatten(axis, (full, n)).sum(axis)
    if rem:  # out is a new tensor: safe to add into in place
        out.narrow(dim, 0, rem).add_(v.narrow(dim, full * n, rem))
    return out


def resize(v: torch.Tensor, n: int, dim: int = -1) -> torch.Tensor:
    """Tile up to ``n`` when shorter, fold down to ``n`` when longer. Its transpose is ``resize(·, L)``."""
    return tile(v, n, dim) if v.shape[dim] <= n else fold(v, n, dim)


def crop(v: torch.Tensor, n: int, dim: int = -1) -> torch.Tensor:
    """The first ``n`` entries along ``dim``, zero-padded when ``n > L``. Its transpose is ``crop(·, L)``."""
    length = v.shape[dim]
    if n == length:
        return v
    return v.narrow(dim, 0, n) if n < length else torch.cat([v, _zeros_along(v, dim, n - length)], dim=dim)


def contiguous_groups(n: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Group index of each of ``n`` features split into ``rank`` contiguous groups.

    The first ``n mod rank`` groups have ``n // rank + 1`` members, the rest ``n // rank`` (peft-mora's types 2-4,
    used by ReMoRA). When ``n < rank`` the last ``rank - n`` groups are empty.
    """
    base, extra = divmod(n, rank)
    sizes = torch.full((rank,), base, dtype=torch.long)
    sizes[:extra] += 1
    return torch.repeat_interleave(torch.arange(rank), sizes).to(device)


def rope_rotate(v: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation in half-split layout: pairs (j, j + r̂/2) turned by the angles behind ``cos``/``signed_sin``
    (see ``MoraOperator._rope``); with the sine negated it is the inverse (transposed) rotation."""
    return torch.addcmul(v * cos, v.roll(v.shape[-1] // 2, -1), signed_sin)


def rope_angles(num_blocks: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE-style angles i·θ_j (θ_j = 10000^(-2j/r̂)) in half-split layout: (nb, r̂) each."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rank, 2, dtype=torch.float64) / rank))
    angles = torch.outer(torch.arange(num_blocks, dtype=torch.float64), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


# ----------------------------------------------------------------------------------------------------------------
# the rank r̂ of a layer


def mora_rank(in_features: int, out_features: int, r: int, compression: str) -> int:
    """r̂ with the parameter budget of a LoRA of rank ``r``: round(sqrt((d + k)·r)), even for rotation.

    Rounding follows peft-mora (int(x + 0.5)); rotation pairs features, so r̂ is rounded down to even there.
    """
    rank = int(math.sqrt((in_features + out_features) * r) + 0.5)
    if compression == "rotation":
        rank = max(2, rank - rank % 2)
    return rank


# ----------------------------------------------------------------------------------------------------------------
# the operator


@dataclass(frozen=True)
class MoraOperator:
    """The fixed maps of one MoRA layer: ``h = W0 x + decompress(W · compress(x))``.

    Operators compare and hash by value (shape, r̂ and options; not their cached index and angle tensors), so two
    layers or two adapters with equal operators can share compress and decompress: ``moraft serve`` groups the rows
    of a mixed-adapter batch by the operator itself. Build one from a config with `from_config`.

    Args:
        in_features: k, the layer's input width.
        out_features: d, the layer's output width.
        rank: r̂, the side of the square matrix M.
        compression: ``sharing``, ``rotation``, ``decouple`` or ``truncation``.
        input_grouping: for ``sharing``, how input features are summed into r̂ groups: ``strided`` (feature i goes
            to group i mod r̂; peft-mora type 1) or ``contiguous`` (consecutive features share a group).
        output_grouping: for ``sharing``, how the r̂ outputs fill d: ``strided`` (tiled) or ``contiguous``
            (each output repeated in place).
        peft_mora_compat: reproduce peft-mora exactly where it differs: when the block outputs are longer than d
            (rotation with k > d), truncate them to d instead of folding them in, and truncate sharing's r̂ outputs
            when r̂ > d. Only set for checkpoints converted from peft-mora.
    """

    in_features: int
    out_features: int
    rank: int
    compression: str = "sharing"
    input_grouping: str = "strided"
    output_grouping: str = "strided"
    peft_mora_compat: bool = False
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise UserError(f"compression={self.compression!r} is not one of {', '.join(COMPRESSIONS)}")
        for name in ("input_grouping", "output_grouping"):
            if getattr(self, name) not in GROUPINGS:
                raise UserError(f"{name}={getattr(self, name)!r} is not one of {', '.join(GROUPINGS)}")
        if self.rank < 1 or (self.compression == "rotation" and self.rank % 2):
            kind = "an even integer >= 2" if self.compression == "rotation" else "an integer >= 1"
            raise UserError(f"r̂={self.rank} is invalid for compression={self.compression!r}: it must be {kind}")

    @classmethod
    def from_config(
        cls, config: MoraSettings, in_features: int, out_features: int, *, r: int | None = None,
        rank: int | None = None,
    ) -> MoraOperator:
        """The operator of a ``in_features -> out_features`` layer under ``config`` (a `MoraConfig`, or anything with
        its ``compression``, ``input_grouping``, ``output_grouping``, ``peft_mora_compat`` and ``r``).

        r̂ is ``rank`` when given (an explicit ``mora_rank``, a per-module override, or the side of a saved M), else
        derived from ``r`` (default ``config.r``) by `mora_rank`. The one place an operator is built from settings:
        the tuner layer, ReMoRA's restart and ``moraft serve`` all call it.
        """
        if rank is None:
            rank = mora_rank(in_features, out_features, config.r if r is None else r, config.compression)
        return cls(
            in_features,
            out_features,
            rank,
            compression=config.compression,
            input_grouping=config.input_grouping,
            output_grouping=config.output_grouping,
            peft_mora_compat=config.peft_mora_compat,
        )

    # -- shape facts ----------------------------------------------------------------------------------------------

    @property
    def padded_in(self) -> int:
        """The input length after cyclic padding to whole blocks of r̂."""
        return -(-self.in_features // self.rank) * self.rank

    @property
    def blockwise(self) -> bool:
        """Whether the input is cut into blocks that are multiplied separately (decouple, rotation)."""
        return self.compression in ("decouple", "rotation")

    @property
    def num_blocks(self) -> int:
        """nb: how many r̂-blocks ``compress`` returns."""
        return self.padded_in // self.rank if self.blockwise else 1

    @property
    def is_low_rank(self) -> bool:
        """Whether ΔW = D·M·C with C: r̂×k, D: d×r̂ (an exact LoRA of rank r̂)."""
        return self.num_blocks == 1

    # -- the pieces ------------------------------------------------------------------------------------------------

    def _index(self, name: str, n: int, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = contiguous_groups(n, self.rank, device)
        return self._cache[key]

    def _rope(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (nb, r̂) with ``R_i z = z·cos_i + roll(z, r̂/2)·signed_sin_i``."""
        key = ("rope", device, dtype)
        if key not in self._cache:
            cos, sin = rope_angles(self.num_blocks, self.rank)
            half = self.rank // 2
            # rotate_half(z)·sin = [-z[h:], z[:h]]·sin = roll(z, h)·[-sin[:h], sin[h:]]: one copy, no cat
            signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
            self._cache[key] = (cos.to(device, dtype), signed_sin.to(device, dtype))
        return self._cache[key]

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """f_comp: (..., k) -> (..., nb, r̂)."""
        rank = self.rank
        if self.compression == "truncation":
            z = crop(x, rank)
        elif self.blockwise:
            return tile(x, self.padded_in).unflatten(-1, (self.num_blocks, rank))
        elif self.input_grouping == "strided":
            z = self._strided_sum(x)
        else:
            index = self._index("in", self.in_features, x.device)
            z = x.new_zeros(*x.shape[:-1], rank).index_add_(-1, index, x)
        return z.unsqueeze(-2)

    def _strided_sum(self, x: torch.Tensor) -> torch.Tensor:
        """fold(tile(x, padded_in), r̂) without materializing the padded input: the whole chunks are summed as a
        view of x, and only the last, wrapped chunk (r̂ features) is built."""
        rank = self.rank
        full = self.in_features // rank
        if full * rank == self.in_features:
            return x.unflatten(-1, (full, rank)).sum(-2)
        last = tile(torch.cat((x[..., full * rank :], x[..., :rank]), dim=-1), rank)
        if full == 0:
            return last
        return x[..., : full * rank].unflatten(-1, (full, rank)).sum(-2) + last

    def _strided_sum_t(self, z: torch.Tensor) -> torch.Tensor:
        """The transpose of ``_strided_sum``, fold(tile(z, padded_in), k), in one pass when r̂ <= k: feature i gets
        z[i mod r̂], and the first features, which the cyclic padding repeats, also get the last chunk's tail."""
        k, rank = self.in_features, self.rank
        if rank > k:
            return fold(tile(z, self.padded_in), k)
        rem = k % rank
        out = tile(z, k)
        if rem:  # k > r̂ here, so tile made a copy that can be added into
            out[..., : rank - rem] += z[..., rem:]
        return out

    def compress_t(self, z: torch.Tensor) -> torch.Tensor:
        """The transpose of ``compress``: (..., nb, r̂) -> (..., k)."""
        k = self.in_features
        if self.blockwise:
            return fold(z.flatten(-2), k)
        z = z.squeeze(-2)
        if self.compression == "truncation":
            return crop(z, k)
        if self.input_grouping == "strided":
            return self._strided_sum_t(z)
        return z.index_select(-1, self._index("in", k, z.device))

    def decompress(self, y: torch.Tensor) -> torch.Tensor:
        """f_decomp: (..., nb, r̂) -> (..., d)."""
        return self._decompress(y.flatten(-2), dim=-1)

    def _decompress(self, y: torch.Tensor, dim: int) -> torch.Tensor:
        """f_decomp on the nb·r̂ outputs laid along ``dim`` (the last one, or the rows of a matrix for ΔW)."""
        d = self.out_features
        if self.compression == "truncation":
            return crop(y, d, dim)
        if not self.blockwise and self.output_grouping == "contiguous":
            return y.index_select(dim, self._index("out", d, y.device))
        return tile(y, d, dim) if self.peft_mora_compat else resize(y, d, dim)

    def decompress_t(self, g: torch.Tensor) -> torch.Tensor:
        """The transpose of ``decompress``: (..., d) -> (..., nb, r̂)."""
        rank, length = self.rank, self.num_blocks * self.rank
        if self.compression == "truncation":
            y = crop(g, rank)
        elif not self.blockwise and self.output_grouping == "contiguous":
            index = self._index("out", self.out_features, g.device)
            y = g.new_zeros(*g.shape[:-1], rank).index_add_(-1, index, g)
        else:
            y = fold(g, length) if self.peft_mora_compat else resize(g, length)
        return y.unflatten(-1, (self.num_blocks, rank))

    def block_weights(self, m: torch.Tensor) -> torch.Tensor:
        """The matrices applied to each block: (1, r̂, r̂) when shared, (nb, r̂, r̂) for rotation (W_i = M·R_i).

        Rotating the input block by R_i and then multiplying by M equals multiplying the unrotated block by M·R_i,
        so in training the rotation costs r̂² work per block on the weights instead of a pass over every
        activation. Row a of M·R_i is R_iᵀ applied to row a of M, and R_iᵀ is R_i with the sine negated.
        """
        if self.compression != "rotation":
            return m.unsqueeze(0)
        cos, signed_sin = self._rope(m.device, m.dtype)  # (nb, r̂)
        return rope_rotate(m.unsqueeze(0), cos.unsqueeze(1), -signed_sin.unsqueeze(1))  # (nb, r̂, r̂)

    def rotate_blocks(self, z: torch.Tensor) -> torch.Tensor:
        """R_i z_i for every block of z (..., nb, r̂): the rotation that ``block_weights`` folds into M (identity
        unless compression is rotation), so ``block_matmul(z, block_weights(M)) == rotate_blocks(z) @ Mᵀ``.

        Rows with different M can then share one elementwise rotation (``moraft serve``'s mixed-adapter batches)
        instead of each needing its own (nb, r̂, r̂) block weights.
        """
        if self.compression != "rotation":
            return z
        cos, signed_sin = self._rope(z.device, z.dtype)  # (nb, r̂)
        return rope_rotate(z, cos, signed_sin)

    # -- what the layer uses -------------------------------------------------------------------------------------

    def apply(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``decompress(W · compress(x))`` for x: (..., k), M: (r̂, r̂). Differentiable in x and M.

        Saves only x and M for the backward pass (the compressed activations and the block weights are
        recomputed), so training memory matches LoRA's.
        """
        if torch.is_grad_enabled() and (x.requires_grad or m.requires_grad):
            return MoraFunction.apply(x, m, self)
        return self.forward(x, m)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The composition itself, ``decompress(block_matmul(compress(x), block_weights(M)))``, as plain torch ops
        (autograd through it would keep the compressed activations: `apply` is what the layer calls)."""
        return self.decompress(block_matmul(self.compress(x), self.block_weights(m)))

    @torch.no_grad()
    def delta_weight(self, m: torch.Tensor, block_elements: int = 1 << 26) -> torch.Tensor:
        """ΔW = D · (W·C), (d, k) and contiguous, with ``W0 + ΔW`` equal to the adapted layer, in M's dtype.

        W·C is built by ``compress_t`` from W's rows (row (i, s) of the block-diagonal W is block i's row s), and D
        is ``decompress`` applied along the rows: both come from the operators above, ΔW is written in the base
        weight's layout in about one pass, and nothing loops over rows or columns. The block-diagonal W of rotation
        and decouple has (nb·r̂)² entries; past ``block_elements`` of them ΔW is built instead from identity rows
        pushed through the transposed operators, in bounded blocks (slower, less memory).
        """
        weights = self.block_weights(m)  # (1 or nb, r̂, r̂)
        nb, rank = self.num_blocks, self.rank
        if nb == 1:
            rows = weights[0].unsqueeze(1)  # (r̂, 1, r̂): row s of W
        elif (nb * rank) ** 2 <= block_elements:
            rows = m.new_zeros(nb, rank, nb, rank)
            rows.diagonal(dim1=0, dim2=2).copy_(weights.expand(nb, rank, rank).permute(1, 2, 0))
            rows = rows.reshape(nb * rank, nb, rank)  # block i's row s, placed in block i
        else:
            return self._delta_weight_from_identity(weights, block_elements)
        return self._decompress(self.compress_t(rows), dim=0).contiguous()

    def _delta_weight_from_identity(self, weights: torch.Tensor, block_elements: int) -> torch.Tensor:
        """Row a of ΔW is ``compress_t(Wᵀ · decompress_t(e_a))``, in blocks of rows of at most ``block_elements``."""
        d = self.out_features
        rows = max(1, block_elements // max(d, self.padded_in) // 4)
        blocks = []
        for start in range(0, d, rows):
            n = min(rows, d - start)
            eye = weights.new_zeros(n, d)
            eye.diagonal(offset=start).fill_(1)  # rows start .. start + n of the d×d identity
            blocks.append(self.compress_t(block_matmul_t(self.decompress_t(eye), weights)))
        return torch.cat(blocks)

    def warn_if_wasteful(self, module_name: str = "") -> None:
        """Warn when training the layer fully would take no more parameters than M (r̂² >= d·k)."""
        if self.rank * self.rank >= self.in_features * self.out_features:
            where = f" for {module_name}" if module_name else ""
            warnings.warn(
                f"MoRA r̂={self.rank}{where}: M has {self.rank**2} parameters, at least as many as the full "
                f"{self.out_features}x{self.in_features} weight ({self.out_features * self.in_features}); "
                "training that layer fully (modules_to_save) or a smaller r would take fewer parameters.",
                stacklevel=3,
            )


# ----------------------------------------------------------------------------------------------------------------
# block matmuls and the autograd function


def block_matmul(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y_i = W_i z_i for every block: z (..., nb, r̂), W (1 or nb, r̂, r̂) -> (..., nb, r̂)."""
    lead, (nb, rank) = z.shape[:-2], z.shape[-2:]
    if weights.shape[0] == 1:  # one 2-D GEMM over every token and block (same kernel on every path)
        return F.linear(z.reshape(-1, rank), weights[0]).reshape(*lead, nb, rank)
    zt = z.reshape(-1, nb, rank).transpose(0, 1)  # (nb, T, r̂)
    y = torch.bmm(zt, weights.transpose(1, 2))  # (nb, T, r̂)
    return y.transpose(0, 1).reshape(*lead, nb, rank)


def block_matmul_t(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z_i = W_iᵀ y_i, the transpose of ``block_matmul`` in z."""
    return block_matmul(y, weights.transpose(1, 2))


def block_weight_grad(gy: torch.Tensor, z: torch.Tensor, shared: bool) -> torch.Tensor:
    """dL/dW from gy, z (..., nb, r̂): Σ_tokens gy_i z_iᵀ per block, also summed over blocks when shared."""
    rank = z.shape[-1]
    if shared:
        return (gy.reshape(-1, rank).T @ z.reshape(-1, rank)).unsqueeze(0)
    nb = z.shape[-2]
    gyt = gy.reshape(-1, nb, rank).permute(1, 2, 0)  # (nb, r̂, T)
    zt = z.reshape(-1, nb, rank).transpose(0, 1)  # (nb, T, r̂)
    return torch.bmm(gyt, zt)


class MoraFunction(torch.autograd.Function):
    """decompress(W(M) · compress(x)) that saves only x and M: compress(x) and the block weights W(M) are
    recomputed in backward (both cheap), so nothing activation-sized is kept beyond the input the base layer keeps."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor, op: MoraOperator) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, m)
        ctx.op = op
        return op.forward(x, m)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, m = ctx.saved_tensors
        op: MoraOperator = ctx.op
        # under autocast (Trainer's bf16/fp16) the forward ran in half precision but backward runs outside autocast:
        # compute it in the dtype of the saved x and M, so the matmuls below never mix dtypes
        gy = op.decompress_t(grad_out.to(x.dtype))
        grad_x = grad_m = None
        with torch.enable_grad():
            m_ = m.detach().requires_grad_(ctx.needs_input_grad[1])
            weights = op.block_weights(m_)
        if ctx.needs_input_grad[1]:
            grad_w = block_weight_grad(gy, op.compress(x), shared=weights.shape[0] == 1)
            # through W(M): the identity for shared weights, the rotation's transpose otherwise
            (grad_m,) = torch.autograd.grad(weights, m_, grad_w.to(weights.dtype))
        if ctx.needs_input_grad[0]:
            grad_x = op.compress_t(block_matmul_t(gy, weights.detach()))
        return grad_x, grad_m, None
