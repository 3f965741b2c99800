"""Hardware we do not have: a catalog of accelerators and a roofline cost model derived from it.

A step's time is the larger of its arithmetic time and its memory time at fixed efficiencies,
plus a fixed per-step overhead — enough to compare "4 x L4 vs 1 x H100" on a trace, not to
predict a kernel's speed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Sequence

from shoal.engine.cost_model import FEATURES, plan_features
from shoal.engine.scheduler import StepPlan

_F = {f: i for i, f in enumerate(FEATURES)}


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    bandwidth_gbs: float
    bf16_tflops: float
    price_per_hour: float
    source: str = ""


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float
    embedding_params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_model_len: int

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16

    @property
    def weight_bytes(self) -> float:
        return self.params * 2


@cache
def _load(path: str | None) -> dict:
    if path is None:
        return json.loads(resources.files("shoal.sim").joinpath("gpus.json").read_text())
    return json.loads(Path(path).read_text())


def gpus(path: str | None = None) -> dict[str, GPU]:
    return {name: GPU(name, **spec) for name, spec in _load(path)["gpus"].items()}


def model_shape(name: str, path: str | None = None) -> ModelShape:
    models = _load(path)["models"]
    if name not in models:
        raise ValueError(f"unknown model {name!r}; the catalog has {', '.join(models)}")
    return ModelShape(name, **models[name])


@dataclass(frozen=True)
class RooflineCostModel:
    """Step time of ``model`` on ``gpu`` from FLOPs and bytes moved."""

    gpu: GPU
    model: ModelShape
    compute_efficiency: float = 0.5  # fraction of peak FLOP/s reached (MFU)
    memory_efficiency: float = 0.7  # fraction of peak bandwidth reached
    step_overhead_s: float = 0.003  # scheduling, launches, sampling

    def step_time(self, plan: StepPlan) -> float:
        return self.time(plan_features(plan))

    def time(self, f: Sequence[float]) -> float:
        m = self.model
        tokens, sampled = f[_F["tokens"]], f[_F["sampled"]]
        attended = f[_F["decode_context"]] + f[_F["prefill_attention"]]
        body = m.params - m.embedding_params
        flops = 2 * body * tokens + 2 * m.embedding_params * sampled + 4 * m.layers * m.hidden * attended
        kv_read = m.kv_bytes_per_token * (f[_F["decode_context"]] + f[_F["prefill_attention"]] / max(tokens, 1))
        bytes_moved = m.weight_bytes + kv_read + m.kv_bytes_per_token * tokens
        t_compute = flops / (self.gpu.bf16_tflops * 1e12 * self.compute_efficiency)
        t_memory = bytes_moved / (self.gpu.bandwidth_gbs * 1e9 * self.memory_efficiency)
        return self.step_overhead_s + max(t_compute, t_memory)

    def kv_blocks(self, block_size: int = 16, reserve_gb: float = 2.0) -> int:
        """KV blocks that fit beside the weights (``reserve_gb`` kept for activations)."""
        free = self.gpu.memory_gb * 1e9 - self.model.weight_bytes - reserve_gb * 1e9
        return max(0, int(free // (self.model.kv_bytes_per_token * block_size)))
