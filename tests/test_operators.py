"""MoRA's operators against an independent reference built entry by entry from the spec's definitions.

For every operator and shape the reference writes down the compression matrix C, the block-diagonal core and the
decompression matrix D with explicit Python loops (slow, obviously right), and checks the layer math
(`MoraOperator.apply`, `delta_weight`, the custom backward) against ΔW = D · blockdiag(...) · C.
"""

from __future__ import annotations

import math

import pytest
import torch

from moraft.mora.operators import MoraOperator, block_matmul, fold, mora_rank, resize, tile

# (out d, in k, r̂): square, d > k, k > d, widths not multiples of r̂, r̂ larger than one or both sides
SHAPES = [
    (80, 80, 36),
    (216, 80, 48),
    (80, 216, 48),
    (64, 64, 16),
    (24, 300, 10),
    (300, 24, 10),
    (12, 20, 30),
    (20, 12, 30),
    (7, 5, 4),
]
OPERATORS = [
    ("sharing", "strided", "strided"),
    ("sharing", "contiguous", "contiguous"),
    ("sharing", "contiguous", "strided"),
    ("sharing", "strided", "contiguous"),
    ("decouple", "strided", "strided"),
    ("rotation", "strided", "strided"),
    ("truncation", "strided", "strided"),
]


def groups(n: int, rank: int) -> list[int]:
    """Contiguous groups: the first n mod r̂ groups one member larger (spec, peft-mora types 2-4)."""
    out = []
    for g in range(rank):
        size = n // rank + (1 if g < n % rank else 0)
        out += [g] * size
    return out


def rotation_matrix(i: int, rank: int) -> torch.Tensor:
    """R_i: 2×2 rotations of the pairs (j, j + r̂/2) by angle i·θ_j, θ_j = 10000^(-2j/r̂)."""
    h = rank // 2
    rot = torch.zeros(rank, rank, dtype=torch.float64)
    for j in range(h):
        angle = i * 10000 ** (-2 * j / rank)
        c, s = math.cos(angle), math.sin(angle)
        rot[j, j], rot[j, j + h], rot[j + h, j], rot[j + h, j + h] = c, -s, s, c
    return rot


def reference_delta(d: int, k: int, rank: int, comp: str, gin: str, gout: str, m: torch.Tensor, compat: bool):
    m = m.double()
    if comp == "truncation":
        c = torch.zeros(rank, k, dtype=torch.float64)
        dec = torch.zeros(d, rank, dtype=torch.float64)
        for i in range(min(rank, k)):
            c[i, i] = 1
        for i in range(min(rank, d)):
            dec[i, i] = 1
        return dec @ m @ c
    if comp == "sharing":
        c = torch.zeros(rank, k, dtype=torch.float64)
        if gin == "strided":  # cyclic padding to a multiple of r̂, chunks summed
            padded = math.ceil(k / rank) * rank
            for p in range(padded):
                c[p % rank, p % k] += 1
        else:
            for i, g in enumerate(groups(k, rank)):
                c[g, i] = 1
        dec = torch.zeros(d, rank, dtype=torch.float64)
        if gout == "contiguous":
            for j, g in enumerate(groups(d, rank)):
                dec[j, g] = 1
        elif compat:  # tile, truncating when r̂ > d
            for p in range(d):
                dec[p, p % rank] = 1
        else:  # tile when r̂ <= d, fold (sum wrapped rows) when r̂ > d
            for p in range(max(d, rank)):
                dec[p % d, p % rank] += 1
        return dec @ m @ c
    # decouple / rotation: cyclic padding to nb blocks, block-diagonal core, concatenated outputs
    nb = math.ceil(k / rank)
    padded = nb * rank
    pad = torch.zeros(padded, k, dtype=torch.float64)
    for p in range(padded):
        pad[p, p % k] = 1
    core = torch.zeros(padded, padded, dtype=torch.float64)
    for i in range(nb):
        block = m @ rotation_matrix(i, rank) if comp == "rotation" else m
        core[i * rank : (i + 1) * rank, i * rank : (i + 1) * rank] = block
    dec = torch.zeros(d, padded, dtype=torch.float64)
    if compat:  # peft-mora: tile, or truncate to d (drops block outputs past d)
        for p in range(d):
            dec[p, p % padded] = 1
    else:  # tile when shorter, fold when longer: every block reaches the output
        for p in range(max(d, padded)):
            dec[p % d, p % padded] += 1
    return dec @ core @ pad


CASES = [
    pytest.param(d, k, rank, comp, gin, gout, id=f"{comp}-{gin[0]}{gout[0]}-{d}x{k}-r{rank}")
    for d, k, rank in SHAPES
    for comp, gin, gout in OPERATORS
    if not (comp == "rotation" and rank % 2)
]


@pytest.mark.parametrize("compat", [False, True], ids=["new", "compat"])
@pytest.mark.parametrize("d,k,rank,comp,gin,gout", CASES)
def test_against_reference(d, k, rank, comp, gin, gout, compat):
    torch.manual_seed(0)
    op = MoraOperator(k, d, rank, comp, gin, gout, peft_mora_compat=compat)
    m = torch.randn(rank, rank, dtype=torch.float64)
    expected = reference_delta(d, k, rank, comp, gin, gout, m, compat)
    torch.testing.assert_close(op.delta_weight(m), expected)
    torch.testing.assert_close(op.delta_weight(m, block_elements=50), expected)  # from identity rows, in blocks
    x = torch.randn(3, 5, k, dtype=torch.float64)
    torch.testing.assert_close(op.apply(x, m), x @ expected.T)
    if op.is_low_rank:
        assert torch.linalg.matrix_rank(expected) <= rank


@pytest.mark.parametrize("d,k,rank,comp,gin,gout", CASES)
def test_transposes(d, k, rank, comp, gin, gout):
    """compress_t and decompress_t are the exact transposes the custom backward relies on."""
    torch.manual_seed(1)
    for compat in (False, True):
        op = MoraOperator(k, d, rank, comp, gin, gout, peft_mora_compat=compat)
        x = torch.randn(4, k, dtype=torch.float64)
        z = torch.randn(4, op.num_blocks, rank, dtype=torch.float64)
        g = torch.randn(4, d, dtype=torch.float64)
        torch.testing.assert_close((op.compress(x) * z).sum(), (x * op.compress_t(z)).sum())
        torch.testing.assert_close((op.decompress(z) * g).sum(), (z * op.decompress_t(g)).sum())


@pytest.mark.parametrize("d,k,rank,comp,gin,gout", CASES)
def test_custom_backward_matches_autograd(d, k, rank, comp, gin, gout):
    """The memory-saving backward (recomputes compress(x)) equals autograd through the plain operators."""
    torch.manual_seed(2)
    op = MoraOperator(k, d, rank, comp, gin, gout)
    x = torch.randn(2, 3, k, dtype=torch.float64, requires_grad=True)
    m = torch.randn(rank, rank, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, d, dtype=torch.float64)
    custom = torch.autograd.grad((op.apply(x, m) * g).sum(), (x, m))
    plain = op.decompress(block_matmul(op.compress(x), op.block_weights(m)))
    expected = torch.autograd.grad((plain * g).sum(), (x, m))
    for got, want in zip(custom, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("comp", ["sharing", "rotation"])
def test_gradcheck_small(comp):
    op = MoraOperator(10, 7, 4, comp)
    x = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    m = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, m: op.apply(x, m), (x, m))


def test_tile_fold_resize():
    v = torch.arange(5.0)
    assert tile(v, 12).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert tile(v, 3).tolist() == [0, 1, 2]
    assert fold(v, 2).tolist() == [0 + 2 + 4, 1 + 3]
    assert fold(v, 7).tolist() == [0, 1, 2, 3, 4, 0, 0]
    assert resize(v, 3).tolist() == [0 + 3, 1 + 4, 2]
    assert resize(v, 7).tolist() == [0, 1, 2, 3, 4, 0, 1]


def test_mora_rank_matches_spec_examples():
    assert mora_rank(4096, 4096, 8, "sharing") == 256
    assert mora_rank(4096, 4096, 128, "sharing") == 1024
    assert mora_rank(4096, 4096, 256, "sharing") == 1448
    assert mora_rank(4096, 11008, 8, "sharing") == 348
    # the fixture's shapes: 36 for 80x80, 49 / 48 (rotation: even) for 80 <-> 216
    assert mora_rank(80, 80, 8, "sharing") == 36
    assert mora_rank(80, 216, 8, "sharing") == 49
    assert mora_rank(80, 216, 8, "rotation") == 48


def test_rotation_lets_every_input_reach_the_output_when_k_exceeds_d():
    """peft-mora truncates the block outputs to d, so inputs past the first ceil(d/r̂) blocks are dropped."""
    torch.manual_seed(3)
    d, k, rank = 80, 216, 48
    m = torch.randn(rank, rank)
    new = MoraOperator(k, d, rank, "rotation").delta_weight(m)
    compat = MoraOperator(k, d, rank, "rotation", peft_mora_compat=True).delta_weight(m)
    assert (new.abs().sum(0) > 0).all(), "every input column reaches the output"
    dead = (compat.abs().sum(0) == 0).sum().item()
    assert dead == k - math.ceil(d / rank) * rank, "compat mode keeps peft-mora's dropped inputs"
    assert torch.linalg.matrix_rank(new) == d


def test_rotation_is_full_rank_where_sharing_is_not():
    torch.manual_seed(4)
    d = k = 64
    rank = 16
    m = torch.randn(rank, rank)
    assert torch.linalg.matrix_rank(MoraOperator(k, d, rank, "sharing").delta_weight(m)) == rank
    assert torch.linalg.matrix_rank(MoraOperator(k, d, rank, "rotation").delta_weight(m)) == d


def test_invalid_operator_arguments():
    with pytest.raises(ValueError, match="compression='lora'"):
        MoraOperator(8, 8, 4, "lora")
    with pytest.raises(ValueError, match="even"):
        MoraOperator(8, 8, 5, "rotation")
    with pytest.raises(ValueError, match="input_grouping='interleaved'"):
        MoraOperator(8, 8, 4, "sharing", input_grouping="interleaved")


def test_operators_compare_by_value_and_build_from_a_config():
    from moraft import MoraConfig

    config = MoraConfig(r=8, compression="sharing", input_grouping="contiguous", target_modules=["q"])
    op = MoraOperator.from_config(config, 64, 48)
    assert op == MoraOperator(64, 48, mora_rank(64, 48, 8, "sharing"), "sharing", "contiguous", "strided")
    op.apply(torch.randn(2, 64), torch.randn(op.rank, op.rank))  # fills op's cache: equality ignores it
    assert hash(op) == hash(MoraOperator.from_config(config, 64, 48))
    assert op != MoraOperator.from_config(config, 64, 48, rank=op.rank + 1)
    assert MoraOperator.from_config(config, 64, 48, r=2) == MoraOperator.from_config(config, 64, 48,
                                                                                     rank=mora_rank(64, 48, 2, "sharing"))
    assert len({op, MoraOperator.from_config(config, 64, 48), MoraOperator(64, 48, op.rank)}) == 2
