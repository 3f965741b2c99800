"""The engine: a model loaded onto a device, served by :class:`EngineCore`'s continuous batching."""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from shoal.engine.cost_model import instance_cost_model
from shoal.engine.step_budget import PrefillStretch, StepTimeBudget
from shoal.engine.block_manager import BlockManager
from shoal.engine.config import EngineConfig, resolve_device, resolve_dtype
from shoal.engine.core import EngineCore
from shoal.engine.executor import ModelExecutor
from shoal.engine.kv_tier import PrefixTier, TierCost
from shoal.engine.model_runner import KVCache, ModelRunner
from shoal.engine.preemption import PreemptionCost, PreemptionMode
from shoal.engine.sampler import Sampler
from shoal.engine.scheduler import SchedulerConfig
from shoal.model.config import ModelConfig
from shoal.model.linear import can_pack, pack_linears
from shoal.model.llama import LlamaModel
from shoal.model.loader import default_model_path, load_checkpoint, load_tokenizer

log = logging.getLogger(__name__)

GiB = 1 << 30


class Engine(EngineCore):
    """One model on one device, serving many requests with continuous batching."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        model: LlamaModel | None = None,
        tokenizer=None,
    ) -> None:
        """Load ``config.model`` (or use an already built ``model`` + ``tokenizer``, as tests do).
        ``clock`` is the only time source; the scheduler only sees the values it returns."""
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        packing = can_pack(self.device, self.dtype)
        if model is None:
            path = config.model or default_model_path()
            log.info("loading %s (%s on %s)", path, self.dtype, self.device)
            # Packing needs full-precision weights (to find exactly-4-bit ones); cast afterwards.
            model_config, state = load_checkpoint(path, dtype=torch.float32 if packing else self.dtype)
            model = LlamaModel.from_state_dict(model_config, state)
            del state
            if tokenizer is None and not config.skip_tokenizer:
                tokenizer = load_tokenizer(path)
        num_params = sum(p.numel() for p in model.parameters())
        if packing:
            n4 = pack_linears(model, self.dtype, config.int4_small_batch and self.dtype == torch.bfloat16)
            log.info("packed linear weights for oneDNN; %d layers also kept in exact int4", n4)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model_config: ModelConfig = model.config

        bs = config.block_size
        block_bytes = KVCache.bytes_per_block(self.model_config, bs, self.dtype)
        num_blocks = config.num_blocks or self._default_num_blocks(block_bytes)
        num_swap = config.num_swap_blocks
        if num_swap is None:
            num_swap = int(config.swap_space_gb * GiB // block_bytes)
        num_tier = config.num_tier_blocks
        if num_tier is None:
            num_tier = int(config.kv_tier_gb * GiB // block_bytes)
        max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings, num_blocks * bs)
        self.kv = KVCache(self.model_config, num_blocks, bs, num_swap, self.dtype, self.device, num_tier,
                          config.kv_tier_path)
        host_bytes_per_s = 20e9 if self.device.type == "cuda" else 5e9
        preemption_cost = PreemptionCost(
            recompute_s_per_token=2.0 * num_params / 400e9,
            swap_s_per_block=2 * block_bytes / host_bytes_per_s,
            force=None if config.preemption_mode == "auto" else PreemptionMode(config.preemption_mode),
        )
        tier = None if not num_tier else PrefixTier(num_tier, TierCost(
            load_s_per_block=block_bytes / (1e9 if config.kv_tier_path else host_bytes_per_s),
            recompute_s_per_token=preemption_cost.recompute_s_per_token))
        timed = config.step_time_limit_s is not None or config.fair_prefill_stretch is not None
        profile = instance_cost_model(config.cost_model, config.num_threads or torch.get_num_threads()) if timed else None
        sched_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            preemption_cost=preemption_cost,
            priority_aging_s=config.priority_aging_s,
            admission=config.admission,
            policy=config.scheduling_policy,
            fair_preempt_tokens=config.fair_preempt_tokens,
            urgent_slack_s=config.urgent_slack_s,
            resident_swap=config.resident_swap,
            fair_first_token=config.fair_first_token,
            fair_prefill_tokens=config.fair_prefill_tokens,
            fair_prefill_stretch=None if config.fair_prefill_stretch is None else PrefillStretch(
                profile, config.fair_prefill_stretch),
            programs=config.programs,
            step_time_budget=None if config.step_time_limit_s is None else StepTimeBudget(
                profile, config.step_time_limit_s),
        )
        self.runner = ModelRunner(self.model, self.kv, bs, self.device)
        super().__init__(
            ModelExecutor(self.runner, Sampler()),
            BlockManager(num_blocks, bs, num_swap, config.enable_prefix_caching, tier),
            sched_config,
            max_model_len=max_model_len,
            vocab_size=self.model_config.vocab_size,
            eos_token_ids=set(self.model_config.eos_token_ids),
            tokenizer=tokenizer,
            clock=clock,
            speculative_config=config.speculative_config,
        )
        log.info(
            "engine ready: %s on %s (%s), %d KV blocks of %d tokens, %d swap blocks, %d tier blocks%s, max_model_len %d",
            self.model_config.name, self.device, self.dtype, num_blocks, bs, num_swap, num_tier,
            f" in {config.kv_tier_path}" if config.kv_tier_path and num_tier else "", max_model_len,
        )

    def _default_num_blocks(self, block_bytes: int) -> int:
        gb = self.config.kv_cache_gb
        if gb is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(0.6 * free // block_bytes))
        return max(1, int((gb or 1.0) * GiB // block_bytes))
