"""The CPU linear fast paths compute the same function as a plain matmul."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shoal.model.linear import INT4_GROUP, INT4_MAX_ROWS, PackedLinear, can_pack, cpu_has_bf16, int4_pack, pack_linears

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="oneDNN bf16 needs AVX512-BF16 / AMX / AVX-NE-CONVERT")


def q4_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A weight with exactly 16 levels per group of 32 along K, like a dequantized Q4_1 tensor."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // INT4_GROUP, INT4_GROUP), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every group uses its full range, as Q4_1's quantizer does
    scale = torch.rand(n, k // INT4_GROUP, 1, generator=g) * 0.02 + 0.001
    low = torch.randn(n, k // INT4_GROUP, 1, generator=g) * 0.05
    return (q * scale + low).view(n, k)


def test_int4_pack_only_for_exactly_4bit_weights():
    assert int4_pack(q4_weight(64, 128), torch.bfloat16) is not None
    assert int4_pack(torch.randn(64, 128), torch.bfloat16) is None
    assert int4_pack(q4_weight(64, 96)[:, :80], torch.bfloat16) is None  # K not a multiple of 32


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
@pytest.mark.parametrize("rows", [1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1, 33])
def test_packed_linear_matches_plain_matmul(dtype, rows):
    lin = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(q4_weight(64, 128))
    packed = PackedLinear(lin, dtype, allow_int4=dtype == torch.bfloat16)
    assert (packed.int4 is not None) == (dtype == torch.bfloat16)
    x = torch.randn(rows, 128)
    ref = x @ lin.weight.t()
    out = packed(x.to(dtype)).float()
    tol = 1e-4 if dtype == torch.float32 else 0.02 * ref.abs().max().item()
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < tol


@needs_bf16
def test_pack_linears_replaces_every_bias_free_linear():
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Sequential(nn.Linear(64, 32, bias=False)), nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight.copy_(q4_weight(64, 64))
    n4 = pack_linears(model, torch.bfloat16, allow_int4=True)
    assert n4 == 1
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert isinstance(model[2], nn.Linear)  # has a bias: left alone


def test_bf16_is_packed_only_where_the_cpu_computes_it():
    cpu = torch.device("cpu")
    assert can_pack(cpu, torch.float32) == torch.backends.mkldnn.is_available()
    assert can_pack(cpu, torch.bfloat16) == (torch.backends.mkldnn.is_available() and cpu_has_bf16())
    assert not can_pack(cpu, torch.float16)
