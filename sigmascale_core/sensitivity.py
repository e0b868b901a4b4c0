"""The sensitivity table: per matrix, a metric measured with only that matrix truncated, at each probed
rank. `probing` fills it (perplexity probe, or the loss-curve proxy), `allocation` spends a parameter
budget on it, and it is saved as versioned JSON beside the probe cache and in probe runs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sigmascale_core.artifacts import write_json_atomic
from sigmascale_core.methods import METHODS
from sigmascale_core.metrics import check_retention, rank_for_retention

TABLE_VERSION = 1
METRICS = ("perplexity", "relative_loss")


@dataclass(frozen=True)
class SensitivityTable:
    """Per matrix: the metric measured with only that matrix truncated, at each probed rank."""

    metric: str  # "perplexity" (probe_sensitivity) or "relative_loss" (proxy_sensitivity)
    dense: float  # the metric of the untouched model: its probing perplexity, 0.0 for the proxy
    retentions: tuple[float, ...]  # the retention grid asked for
    shapes: dict[str, tuple[int, int]]  # matrix name -> (m, n) = (out, in)
    ranks: dict[str, tuple[int, ...]]  # matrix name -> probed ranks, ascending, all below break-even
    values: dict[str, tuple[float, ...]]  # matrix name -> the metric at each of those ranks
    method: str  # the decomposition that truncated the matrices (one of METHODS)
    options: dict[str, object]  # its options
    model_fingerprint: str  # model_fingerprint() of the model probed
    info: dict[str, Any] = field(default_factory=dict)  # how it was made: text, tokens, seconds, ...
    version: int = TABLE_VERSION

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {METRICS}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if not (math.isfinite(self.dense) and self.dense >= 0) or (
            self.metric == "perplexity" and self.dense <= 0
        ):
            raise ValueError(f"dense {self.metric} must be finite and positive, got {self.dense!r}")
        for r in self.retentions:
            check_retention(r)
        if set(self.ranks) != set(self.shapes) or set(self.values) != set(self.shapes):
            raise ValueError("shapes, ranks and values must name the same matrices")
        for name, (m, n) in self.shapes.items():
            ranks, values = self.ranks[name], self.values[name]
            if len(ranks) != len(values):
                raise ValueError(f"{name}: {len(ranks)} ranks but {len(values)} values")
            if list(ranks) != sorted(set(ranks)) or any(not 1 <= k < m * n / (m + n) for k in ranks):
                raise ValueError(f"{name}: ranks must ascend, without repeats, in [1, break-even): {ranks}")
            if not all(math.isfinite(v) and v >= 0 for v in values):
                raise ValueError(f"{name}: values must be finite and non-negative")

    def damage(self, name: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(ranks, damage) of one matrix; damage is additive over matrices to first order:
        perplexity -> log(ppl / dense ppl), the rise in mean NLL per token (nats); relative_loss -> as is."""
        values = self.values[name]
        if self.metric == "perplexity":
            return self.ranks[name], tuple(math.log(v / self.dense) for v in values)
        return self.ranks[name], tuple(values)

    # -- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "metric": self.metric,
            "dense": self.dense,
            "retentions": list(self.retentions),
            "method": self.method,
            "options": self.options,
            "model_fingerprint": self.model_fingerprint,
            "info": self.info,
            "matrices": {
                name: {
                    "shape": list(shape),
                    "ranks": list(self.ranks[name]),
                    "values": list(self.values[name]),
                }
                for name, shape in self.shapes.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> SensitivityTable:
        if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
            version = data.get("version") if isinstance(data, dict) else None
            raise ValueError(f"sensitivity table version {version!r} is not {TABLE_VERSION}")
        try:
            matrices = data["matrices"]
            return cls(
                metric=data["metric"],
                dense=float(data["dense"]),
                retentions=tuple(float(r) for r in data["retentions"]),
                shapes={k: (int(v["shape"][0]), int(v["shape"][1])) for k, v in matrices.items()},
                ranks={k: tuple(int(r) for r in v["ranks"]) for k, v in matrices.items()},
                values={k: tuple(float(x) for x in v["values"]) for k, v in matrices.items()},
                method=data["method"],
                options=dict(data.get("options") or {}),
                model_fingerprint=str(data["model_fingerprint"]),
                info=dict(data.get("info") or {}),
            )
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            raise ValueError(f"malformed sensitivity table ({type(err).__name__}: {err})") from err

    def save(self, path: str | Path) -> None:
        write_json_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ValueError(f"no sensitivity table at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err


def probe_ranks(shape: tuple[int, int], retentions: Sequence[float]) -> tuple[int, ...]:
    """The distinct ranks max(1, ⌊r·mn/(m+n)⌋) of a retention grid, ascending, below break-even only
    (a rank at break-even would stay dense, so probing it says nothing)."""
    m, n = shape
    ranks = {max(1, rank_for_retention(m, n, r)) for r in retentions}
    return tuple(sorted(k for k in ranks if k * (m + n) < m * n))


def check_grid(retentions: Sequence[float]) -> tuple[float, ...]:
    grid = tuple(float(r) for r in retentions)
    if not grid:
        raise ValueError("the retention grid is empty")
    for r in grid:
        check_retention(r)
    return tuple(sorted(set(grid)))
