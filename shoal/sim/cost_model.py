"""Step-time cost models: how long an engine step takes, from its plan alone.

``LinearCostModel`` is fitted to measurements of the real engine (``shoal profile``), like the
estimators of DistServe and Vidur: time is linear in a few features of the plan. ``Roofline``
derives a cost model for hardware we do not have from its datasheet (see ``catalog.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from shoal.engine.scheduler import StepPlan

FEATURES = ("intercept", "small_step", "tokens", "decodes", "decode_context", "prefill_attention",
            "sampled", "prefill_chunks", "swapped_blocks")


def plan_features(plan: StepPlan, small_rows: int = 4) -> list[float]:
    """The plan's features, in :data:`FEATURES` order."""
    tokens = decodes = decode_ctx = attn = sampled = chunks = 0
    for c in plan.chunks:
        n = len(c.token_ids)
        tokens += n
        if c.sample:
            sampled += 1
        if n == 1 and c.sample:
            decodes += 1
            decode_ctx += c.start + 1
        else:
            chunks += 1
            attn += n * (c.start + n)
    return [1.0, float(tokens <= small_rows), float(tokens), float(decodes), float(decode_ctx),
            float(attn), float(sampled), float(chunks), float(len(plan.swap_in) + len(plan.swap_out))]


class CostModel(Protocol):
    def step_time(self, plan: StepPlan) -> float:
        """Seconds the step takes."""
        ...


@dataclass
class LinearCostModel:
    """Seconds = coefficients . features(plan)."""

    coefficients: list[float]
    device: str = "unknown"
    model: str = "unknown"
    dtype: str = "unknown"
    fit: dict = field(default_factory=dict)  # error statistics of the fit

    def step_time(self, plan: StepPlan) -> float:
        return max(1e-6, float(np.dot(self.coefficients, plan_features(plan))))

    @classmethod
    def fit_samples(cls, features: np.ndarray, seconds: np.ndarray, **meta) -> "LinearCostModel":
        """Non-negative least squares on relative error (each sample weighted by 1/time), so short
        decode steps are fitted as well as long prefills."""
        from scipy.optimize import nnls

        w = 1.0 / seconds
        coef, _ = nnls(features * w[:, None], seconds * w)
        pred = features @ coef
        rel = np.abs(pred - seconds) / seconds
        fit = {"samples": int(len(seconds)), "mape": float(rel.mean()), "p90_rel_error": float(np.percentile(rel, 90)),
               "max_rel_error": float(rel.max())}
        return cls(coefficients=coef.tolist(), fit=fit, **meta)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"kind": "linear", "features": list(FEATURES), **asdict(self)}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "LinearCostModel":
        data = json.loads(Path(path).read_text())
        if data.get("kind") != "linear" or data.get("features") != list(FEATURES):
            raise ValueError(f"{path}: not a linear cost model with features {FEATURES}")
        return cls(coefficients=data["coefficients"], device=data["device"], model=data["model"],
                   dtype=data["dtype"], fit=data.get("fit", {}))


def default_profile_path() -> Path:
    """The committed profile of SmolLM2-135M on a 2-core CPU."""
    from importlib import resources

    return Path(str(resources.files("shoal.sim").joinpath("profile_smollm2_cpu.json")))
