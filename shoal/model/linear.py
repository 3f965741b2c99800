"""CPU fast paths for linear layers.

* Weights are reordered once into oneDNN's blocked layout (``PackedLinear``): no step pays for it,
  and small-batch matmuls run ~1.5-2x faster than ``F.linear`` on a plain weight.
* Weights that already are 4-bit (a Q4_0 / Q4_1 GGUF dequantizes to exactly 16 levels per group of
  32) are also kept as int4 for steps of few rows. Decode at small batch is bound by reading the
  weights from memory, so reading 4 bits instead of 16 is the win; at larger batches the bf16
  oneDNN kernel is faster and is used instead. The int4 copy is lossless: it is only made when the
  weight is exactly representable.
"""

from __future__ import annotations

import torch
from torch import nn

INT4_GROUP = 32
INT4_MAX_ROWS = 4  # at more rows per step the bf16 kernel wins (measured on AVX-512 CPUs)


def int4_pack(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Pack ``weight`` [N, K] as asymmetric int4 with groups of 32 along K, if that is exact."""
    n, k = weight.shape
    if k % INT4_GROUP or n % 8:
        return None
    w = weight.detach().float().view(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = (w - lo[..., None]) / scale[..., None]
    levels = q.round()
    if (q - levels).abs().max() > 1e-2:  # not a 4-bit weight: quantizing would change the model
        return None
    q = levels.clamp(0, 15).to(torch.int32).view(n, k)
    # torch's int4 kernels compute (q - 8) * scale + zero
    scales_zeros = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous()
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros.to(dtype)


class PackedLinear(nn.Module):
    """A bias-free linear layer with a oneDNN-packed weight and, where exact, an int4 copy."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, allow_int4: bool) -> None:
        """``linear`` should still hold full-precision weights: the int4 check needs them."""
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear supports bias-free layers only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), None)
        self.int4 = int4_pack(weight, dtype) if allow_int4 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4 is not None and x.shape[0] <= INT4_MAX_ROWS:
            w, scales_zeros = self.int4
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, INT4_GROUP, scales_zeros)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack linears in ``dtype`` here (bf16 needs a CPU with native bf16)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_bf16())


def cpu_has_bf16() -> bool:
    """Whether oneDNN computes bf16 on this CPU (AVX512-BF16 / AMX / AVX-NE-CONVERT)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pack_linears(module: nn.Module, dtype: torch.dtype, allow_int4: bool) -> int:
    """Replace every bias-free ``nn.Linear`` under ``module`` with a :class:`PackedLinear` computing
    in ``dtype``. Returns how many also got an exact int4 copy."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and child.bias is None:
            packed = PackedLinear(child, dtype, allow_int4)
            setattr(module, name, packed)
            count += packed.int4 is not None
        else:
            count += pack_linears(child, dtype, allow_int4)
    return count
