"""Step-time cost models: how long an engine step takes, from its plan alone.

``LinearCostModel`` is fitted to measurements of the real engine (``shoal profile``), like the
estimators of DistServe and Vidur: time is linear in a few features of the plan. The roofline
model in ``shoal/sim/catalog.py`` derives one for hardware we do not have from its datasheet.

A cost model is an instance's *profile*: the simulator runs steps on it, the engine scheduler
sizes each step's prefill chunks from it (an SLO time budget), and the global scheduler predicts
a request's latency on each instance from it. All of them call :meth:`CostModel.time` on
:func:`step_features` or :func:`plan_features`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from shoal.model.linear import INT4_MAX_ROWS

if TYPE_CHECKING:
    from shoal.engine.scheduler import StepPlan

FEATURES = ("intercept", "large_step", "tokens", "decodes", "decode_context", "decode_span", "prefill_attention",
            "sampled", "prefill_chunks", "swapped_blocks")
"""``large_step``: 1 for a step of more rows than the small-batch path takes (on CPU, more than
``INT4_MAX_ROWS``: the bf16 weights are read instead of the int4 copy, a fixed extra cost that a
non-negative fit can price, where the discount of a small step could not be).

``decode_context`` sums the decodes' contexts (what paged attention reads: the roofline prices
it); ``decode_span`` is the decodes times the longest of them (what Shoal's own decode attention
reads: every decode's K/V padded to the longest). Profiles of Shoal's engine price the span."""
_UNFITTED = {"decode_span"}  # features added since some profiles were fitted: 0 in those
_RENAMED = {"small_step": "large_step"}  # profiles fitted before 2026-12-07: small_step = 1 - large_step


def plan_features(plan: StepPlan, small_rows: int = INT4_MAX_ROWS) -> list[float]:
    """The plan's features, in :data:`FEATURES` order."""
    tokens = decodes = decode_ctx = longest = attn = sampled = chunks = 0
    for c in plan.chunks:
        n = len(c.token_ids)
        tokens += n
        if c.sample:
            sampled += 1
        if n == 1 and c.sample:
            decodes += 1
            decode_ctx += c.start + 1
            longest = max(longest, c.start + 1)
        else:
            chunks += 1
            attn += n * (c.start + n)
    return step_features(tokens, decodes, decode_ctx, attn, sampled, chunks, len(plan.swap_in) + len(plan.swap_out),
                         small_rows, decode_span=decodes * longest)


def step_features(tokens: float = 0, decodes: float = 0, decode_context: float = 0, prefill_attention: float = 0,
                  sampled: float = 0, prefill_chunks: float = 0, swapped_blocks: float = 0,
                  small_rows: int = INT4_MAX_ROWS, decode_span: float | None = None) -> list[float]:
    """The features of a step described by its totals, in :data:`FEATURES` order (what a
    predictor uses for a step it has not planned). ``decode_span`` defaults to ``decode_context``
    (decodes of one context)."""
    span = decode_context if decode_span is None else decode_span
    return [1.0, float(tokens > small_rows), float(tokens), float(decodes), float(decode_context), float(span),
            float(prefill_attention), float(sampled), float(prefill_chunks), float(swapped_blocks)]


def with_chunk(features: Sequence[float], start: int, n: int, small_rows: int = INT4_MAX_ROWS) -> list[float]:
    """``features`` of a step plus one sampled prefill chunk of ``n`` tokens from position ``start``."""
    if n <= 0:
        return list(features)
    f = dict(zip(FEATURES, features))
    return step_features(tokens=f["tokens"] + n, decodes=f["decodes"], decode_context=f["decode_context"],
                         prefill_attention=f["prefill_attention"] + n * (start + n), sampled=f["sampled"] + 1,
                         prefill_chunks=f["prefill_chunks"] + 1, swapped_blocks=f["swapped_blocks"],
                         small_rows=small_rows, decode_span=f["decode_span"])


class CostModel(Protocol):
    def time(self, features: Sequence[float]) -> float:
        """Seconds a step with these features (:data:`FEATURES` order) takes."""
        ...

    def step_time(self, plan: StepPlan) -> float:
        """Seconds the step takes."""
        ...


@dataclass(frozen=True)
class ScaledCostModel:
    """Another instance's profile at ``speed`` times its pace (0.5: every step takes twice as
    long), for heterogeneous fleets."""

    base: CostModel
    speed: float = 1.0

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError(f"speed must be positive, got {self.speed}")

    def time(self, features: Sequence[float]) -> float:
        return self.base.time(features) / self.speed

    def step_time(self, plan: StepPlan) -> float:
        return self.time(plan_features(plan))


@dataclass
class LinearCostModel:
    """Seconds = coefficients . features(plan)."""

    coefficients: list[float]
    device: str = "unknown"
    model: str = "unknown"
    dtype: str = "unknown"
    fit: dict = field(default_factory=dict)  # error statistics of the fit

    def time(self, features: Sequence[float]) -> float:
        return max(1e-6, float(np.dot(self.coefficients, features)))

    def step_time(self, plan: StepPlan) -> float:
        return self.time(plan_features(plan))

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

    def to_dict(self) -> dict:
        """What :meth:`save` writes and :meth:`load` reads."""
        return {"kind": "linear", "features": list(FEATURES), **asdict(self)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "LinearCostModel":
        return cls.from_dict(json.loads(Path(path).read_text()), str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "cost model") -> "LinearCostModel":
        """The inverse of :meth:`to_dict`, also for profiles saved with older feature lists (by name; a
        feature they lack costs 0); ValueError if ``data`` is not a linear model of these features."""
        names, values = list(data.get("features", [])), list(data.get("coefficients", []))
        known = [_RENAMED.get(n, n) for n in names]
        if (data.get("kind") != "linear" or len(values) != len(names) or len(set(known)) != len(known)
                or set(FEATURES) - set(known) - _UNFITTED or set(known) - set(FEATURES)):
            raise ValueError(f"{where}: not a linear cost model with features {FEATURES}")
        by_name = dict(zip(known, values))
        if "small_step" in names:  # small_step = 1 - large_step: the same times from an intercept and a (negative) large_step
            by_name["intercept"] += by_name["large_step"]
            by_name["large_step"] = -by_name["large_step"]
        coefficients = [by_name.get(n, 0.0) for n in FEATURES]
        return cls(coefficients=coefficients, device=data["device"], model=data["model"],
                   dtype=data["dtype"], fit=data.get("fit", {}))


def fitted_threads(cost_model: CostModel) -> int | None:
    """The CPU threads a fitted profile was measured with (its ``fit.against`` record, else its
    device string), if known."""
    import re

    against = getattr(cost_model, "fit", {}).get("against", {})
    if against.get("threads"):
        return int(against["threads"])
    m = re.search(r" x(\d+) threads", getattr(cost_model, "device", ""))
    return int(m.group(1)) if m else None


def instance_cost_model(path: str | Path | None = None, threads: int | None = None) -> CostModel:
    """An instance's profile: the fitted one at ``path`` (default: the committed one), scaled to
    ``threads`` CPU threads against those it was fitted with (CPU steps scale about linearly)."""
    cm = LinearCostModel.load(path or default_profile_path())
    fitted = fitted_threads(cm)
    return cm if threads is None or fitted is None or fitted == threads else ScaledCostModel(cm, threads / fitted)


def default_profile_path() -> Path:
    """The committed profile of SmolLM2-135M on a 2-core CPU."""
    from importlib import resources

    return Path(str(resources.files("shoal.engine").joinpath("profile_smollm2_cpu.json")))
