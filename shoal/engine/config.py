"""Engine configuration and the device / dtype defaults."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.engine.programs import ProgramConfig
from shoal.engine.scheduler import ADMISSION_ORDERS, SCHEDULING_POLICIES
from shoal.engine.speculative import SpeculativeConfig
from shoal.model.linear import cpu_has_bf16


@dataclass
class EngineConfig:
    """How one engine instance runs. ``None`` means "pick a sensible default for this machine"."""

    model: str | None = None  # GGUF file or Hugging Face folder; None = built-in SmolLM2
    dtype: str = "auto"  # auto | bfloat16 | float32 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    block_size: int = 16
    kv_cache_gb: float | None = None  # device memory for KV blocks (default 1 GiB CPU, 60% free CUDA)
    num_blocks: int | None = None  # overrides kv_cache_gb
    swap_space_gb: float = 1.0  # host memory for preempted requests' KV
    num_swap_blocks: int | None = None  # overrides swap_space_gb
    kv_tier_gb: float = 0.0  # the second prefix tier: evicted prefix blocks kept here (0: none)
    num_tier_blocks: int | None = None  # overrides kv_tier_gb
    kv_tier_path: str | None = None  # the tier in this file on local disk (memory-mapped) instead of host memory
    max_model_len: int | None = None  # default: the model's context, bounded by the KV size
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    priority_aging_s: float | None = None
    preemption_mode: str = "auto"  # auto (by cost) | swap | recompute
    int4_small_batch: bool = True  # CPU bf16: run steps of few rows on 4-bit weights when exact
    skip_tokenizer: bool = False  # token ids in, token ids out (no text)
    num_threads: int | None = None  # torch CPU threads; None = torch's default
    admission: str = "fcfs"  # fcfs | deadline (SchedulerConfig.admission)
    scheduling_policy: str = "vtc"  # fcfs | priority | vtc (SchedulerConfig.policy)
    fair_preempt_tokens: float | None = 2048  # SchedulerConfig.fair_preempt_tokens
    urgent_slack_s: float | None = None  # SchedulerConfig.urgent_slack_s (deadline admission)
    resident_swap: bool = True  # SchedulerConfig.resident_swap
    fair_first_token: bool = True  # SchedulerConfig.fair_first_token
    fair_prefill_tokens: int | None = None  # SchedulerConfig.fair_prefill_tokens
    fair_prefill_stretch: float | None = None  # SchedulerConfig.fair_prefill_stretch, under cost_model
    step_time_limit_s: float | None = None  # SLO-sized steps: a step with decodes stays within this
    cost_model: str | None = None  # the profile JSON that times steps (default: the committed one)
    speculative_config: SpeculativeConfig | None = None  # n-gram drafting for every request (a dict is parsed)
    programs: ProgramConfig = ProgramConfig()  # agent programs: continuum (program FCFS + KV TTL) or none (a dict is parsed)

    def __post_init__(self) -> None:
        if self.speculative_config is not None:
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if isinstance(self.programs, dict):
            self.programs = ProgramConfig.from_dict(self.programs)
        if self.block_size <= 0 or self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.num_threads is not None and (isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int)
                                             or self.num_threads < 1):
            raise ValueError(f"num_threads must be None or an integer >= 1, got {self.num_threads!r}")
        if self.admission not in ADMISSION_ORDERS:
            raise ValueError(f"admission must be one of {', '.join(ADMISSION_ORDERS)}, got {self.admission!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.scheduling_policy!r}")
        if self.step_time_limit_s is not None and not self.step_time_limit_s > 0:
            raise ValueError(f"step_time_limit_s must be positive, got {self.step_time_limit_s}")
        if not self.kv_tier_gb >= 0 or (self.num_tier_blocks is not None and self.num_tier_blocks < 0):
            raise ValueError("kv_tier_gb and num_tier_blocks must be >= 0")
        if self.preemption_mode not in ("auto", "swap", "recompute"):
            raise ValueError(f"preemption_mode must be auto, swap or recompute, not {self.preemption_mode!r}")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; ValueError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; choose auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    return dev


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
           "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the device computes it natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if torch.backends.mkldnn.is_available() and cpu_has_bf16() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]
