"""CompressionPlan: which rank each target matrix gets, by which method: the one object that flows from
the app and the CLI to the engine, and is saved beside every compressed model (versioned JSON).

A matrix whose rank reaches break-even, k·(m+n) ≥ m·n, would not get smaller as factors: it stays dense.
Parameter retention is the papers' convention: parameters of the target linears after / before.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sigmascale_core.artifacts import write_json_atomic
from sigmascale_core.methods import METHOD_OPTIONS, METHODS, check_options
from sigmascale_core.metrics import check_retention, rank_for_retention

PLAN_VERSION = 1


def parse_options(pairs: list[str], method: str) -> dict[str, object]:
    """KEY=VALUE strings (the CLI's --option) typed by the method's defaults, then check_options."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    defaults = METHOD_OPTIONS[method]
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--option takes key=value, got {pair!r}")
        kind = type(defaults.get(key, ""))
        try:
            options[key] = kind(value) if kind is not str else value
        except ValueError:
            raise ValueError(f"option {key} expects {kind.__name__}, got {value!r}") from None
    return check_options(method, options)


@dataclass(frozen=True)
class MatrixPlan:
    """One target matrix: its weight shape (out, in) and the rank it keeps (None: stays dense)."""

    shape: tuple[int, int]  # (m, n) = (out_features, in_features)
    rank: int | None  # None keeps the dense weight

    @property
    def params_before(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def is_dense(self) -> bool:
        """Dense when asked, or when factors would hold as many parameters as W (break-even)."""
        return self.rank is None or self.rank * (self.shape[0] + self.shape[1]) >= self.params_before

    @property
    def params_after(self) -> int:
        return self.params_before if self.is_dense else self.rank * (self.shape[0] + self.shape[1])


@dataclass(frozen=True)
class CompressionPlan:
    model_fingerprint: str  # model_fingerprint() of the model the plan was made for
    method: str  # one of METHODS
    options: dict[str, object]  # the method's options (see METHOD_OPTIONS); defaults fill the rest
    matrices: dict[str, MatrixPlan]  # module name -> shape and rank, in model order
    target_retention: float | None = None  # the global parameter retention asked for, if any
    allocation: str = "uniform"  # how the ranks were chosen: uniform, table, or an allocator's name
    keep_dense_if_slower: bool = False  # keep dense what factors would slow down here (speed.py)
    version: int = field(default=PLAN_VERSION)

    def __post_init__(self) -> None:
        if not isinstance(self.keep_dense_if_slower, bool):
            raise ValueError(f"keep_dense_if_slower must be true or false, got {self.keep_dense_if_slower!r}")
        check_options(self.method, self.options)
        if self.target_retention is not None:
            check_retention(self.target_retention)
        if not self.matrices:
            raise ValueError("a plan needs at least one matrix")
        for name, matrix in self.matrices.items():
            m, n = matrix.shape
            if matrix.rank is not None and (
                isinstance(matrix.rank, bool)
                or not isinstance(matrix.rank, int)
                or not 1 <= matrix.rank <= min(m, n)
            ):
                raise ValueError(
                    f"{name}: rank must be an int in [1, {min(m, n)}] or null, got {matrix.rank!r}"
                )

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        shapes: dict[str, tuple[int, int]],
        retention: float,
        method: str,
        model_fingerprint: str,
        options: dict[str, object] | None = None,
    ) -> CompressionPlan:
        """Every matrix keeps `retention` of its own parameters (rank ⌊retention·m·n/(m+n)⌋, at least 1)."""
        check_retention(retention)
        matrices = {
            name: MatrixPlan(tuple(shape), max(1, rank_for_retention(*shape, retention)))
            for name, shape in shapes.items()
        }
        return cls(model_fingerprint, method, dict(options or {}), matrices, retention, "uniform")

    def with_ranks(self, ranks: dict[str, int | None], allocation: str | None = None) -> CompressionPlan:
        """A copy with some matrices' ranks replaced."""
        unknown = sorted(set(ranks) - set(self.matrices))
        if unknown:
            raise ValueError(f"no such matrices in the plan: {unknown[:5]}")
        matrices = {
            name: MatrixPlan(m.shape, ranks[name]) if name in ranks else m
            for name, m in self.matrices.items()
        }
        return CompressionPlan(
            self.model_fingerprint,
            self.method,
            self.options,
            matrices,
            self.target_retention,
            allocation or self.allocation,
            self.keep_dense_if_slower,
        )

    def edited(
        self, ranks: dict[str, int | None], allocation: str, target_retention: float | None = None
    ) -> CompressionPlan:
        """The plan after an edit (the app's presets, table and sliders): new ranks, how they were
        chosen, and the global retention they aim at (None for hand edits). Method and options stay."""
        return replace(self.with_ranks(ranks, allocation), target_retention=target_retention)

    def with_method(self, method: str) -> CompressionPlan:
        """The same ranks by another method; the options are kept where the new method takes them."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        options = {k: v for k, v in self.options.items() if k in METHOD_OPTIONS[method]}
        return replace(self, method=method, options=options)

    # -- accounting ---------------------------------------------------------------------------------
    @property
    def compressed(self) -> dict[str, MatrixPlan]:
        """The matrices that will be replaced by factors (dense ones left out)."""
        return {name: m for name, m in self.matrices.items() if not m.is_dense}

    def parameter_retention(self) -> float:
        """Parameters of the target linears after / before."""
        before = sum(m.params_before for m in self.matrices.values())
        return sum(m.params_after for m in self.matrices.values()) / before

    def model_retention(self, total_params: int) -> float:
        """Whole-model parameters after / before (embeddings, norms and lm_head unchanged)."""
        saved = sum(m.params_before - m.params_after for m in self.matrices.values())
        return (total_params - saved) / total_params

    # -- JSON -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = asdict(self)
        out["matrices"] = {
            name: {"shape": list(m.shape), "rank": m.rank} for name, m in self.matrices.items()
        }
        out["parameter_retention"] = self.parameter_retention()  # informative; recomputed on load
        return out

    @classmethod
    def from_dict(cls, data: dict) -> CompressionPlan:
        if not isinstance(data, dict):
            raise ValueError(f"a plan is a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if version != PLAN_VERSION:
            raise ValueError(
                f"plan version {version!r} is not supported (this build reads version {PLAN_VERSION})"
            )
        try:
            matrices = {
                str(name): MatrixPlan(tuple(int(x) for x in entry["shape"]), entry["rank"])
                for name, entry in data["matrices"].items()
            }
            return cls(
                model_fingerprint=str(data["model_fingerprint"]),
                method=data["method"],
                options=dict(data.get("options") or {}),
                matrices=matrices,
                target_retention=data.get("target_retention"),
                allocation=str(data.get("allocation", "uniform")),
                keep_dense_if_slower=data.get("keep_dense_if_slower", False),  # absent before it existed
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"malformed plan: missing or bad field ({type(err).__name__}: {err})") from err

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CompressionPlan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"no plan file at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid plan JSON: {err}") from err
        return cls.from_dict(data)
