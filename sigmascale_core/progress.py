"""Progress of long work: the engine reports (done, total, what) to a callback; `ProgressEvent` is the
structured form (stage, counts, elapsed time, estimated time left) that the CLI draws with tqdm or
writes as JSON lines, and that the app's compute service and job runner show."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

Progress = Callable[[int, int, str], None]  # (done, total, what is being worked on)


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a stage of work."""

    stage: str  # e.g. "calibration", "spectra", "probe", "compress", "perplexity"
    done: int  # units finished
    total: int  # units in the stage
    elapsed: float  # seconds since the stage started
    detail: str = ""  # what the last unit was (a matrix name, a text)

    @property
    def eta(self) -> float | None:
        """Seconds left at the stage's average rate so far (None before the first unit)."""
        if self.done <= 0 or self.total <= 0:
            return None
        return max(self.elapsed / self.done * (self.total - self.done), 0.0)

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total > 0 else 0.0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "eta": self.eta}, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> ProgressEvent:
        """The event of a JSON line written by `to_json` (ValueError if it is not one)."""
        try:
            data = json.loads(line)
            return cls(
                str(data["stage"]),
                int(data["done"]),
                int(data["total"]),
                float(data["elapsed"]),
                str(data.get("detail", "")),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"not a progress event: {line[:80]!r}") from err


EventSink = Callable[[ProgressEvent], None]


def tracked(sink: EventSink, stage: str, clock: Callable[[], float] = time.monotonic) -> Progress:
    """A (done, total, what) callback for one stage that sends `sink` ProgressEvents with the time
    elapsed since the callback was made (its clock restarts when `total` changes: a new sub-stage)."""
    state = {"start": clock(), "total": None}

    def update(done: int, total: int, what: str) -> None:
        if state["total"] is not None and total != state["total"]:
            state["start"], state["total"] = clock(), total
        sink(ProgressEvent(stage, done, total, clock() - state["start"], what))

    return update


def format_seconds(seconds: float | None) -> str:
    """'1 h 05 min', '4 min 10 s', '12 s', or '…' when unknown."""
    if seconds is None:
        return "…"
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"
