"""App latency on the bundled SmolLM2 (210 matrices): what a retention edit costs, and the Spectra page
rendered from cache.

    python bench/bench_app.py

1. engine: `SpectraBank.evaluate` after a one-matrix rank change (all that an edit recomputes: totals
   of parameter retention, relative loss and effective rank from the cached curves), p50/p95 over
   200 random edits;
2. Ranks page: the page's rerun after a table edit, through streamlit.testing's AppTest (the whole
   script, its widgets and charts serialised; no browser), p50/p95 over 20 random edits;
3. Spectra page: a full render from a warm cache (AppTest), over 5 visits.
The first pass loads the model and waits for the compute service to fill the spectra cache
(calibration, every curve and learned scaling: minutes on a CPU); it is reported, not counted.

    python bench/bench_app.py --cold

The cold path instead, on a fresh cache (the one-time GGUF conversion is reused from ./cache and
reported separately): from starting the compute service, when the first spectrum of W and the
overview appear, when the matrix on screen (layer 10 `down`, focused at the start) has its
activation-aware spectra, when every cheap curve and every learned scaling is done, and each page's
first paint (AppTest) while the worker runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def cold(focus: str) -> dict:
    """Milestones of the cold path on a fresh cache (seconds from starting the service)."""
    from sigmascale_core.artifacts import cache_root
    from sigmascale_core.compute import ComputeService, ServiceConfig
    from sigmascale_core.models import bundled_model_dir

    bundled_model_dir()  # the one-time conversion, into ./cache, not timed here
    models = cache_root() / "models"
    fresh = Path(tempfile.mkdtemp(prefix="sigmascale-cold-"))
    (fresh / "models").symlink_to(models)
    os.environ["SIGMASCALE_CACHE"] = str(fresh)
    service = ComputeService(ServiceConfig())
    service.focus(focus)
    start = time.perf_counter()
    service.start()
    marks: dict[str, float] = {}
    goals = {
        "first_spectrum_of_W": lambda s: s.bank is not None and len(s.bank.weights_sigma) > 0,
        "overview_all_W": lambda s: s.stages["weights"].complete,
        "focused_matrix_activation_aware": lambda s: s.bank is not None and focus in s.bank.cheap,
        "focused_matrix_learned": lambda s: s.bank is not None and focus in s.bank.learned,
        "calibration_done": lambda s: s.stats_ready,
        "all_cheap_curves": lambda s: s.stages["cheap"].complete,
        "all_learned": lambda s: s.stages["learned"].complete,
    }
    pages = {}
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    while len(marks) < len(goals):
        snap = service.snapshot()
        if snap.state == "error":
            raise SystemExit(f"compute service failed: {snap.error}")
        for name, reached in goals.items():
            if name not in marks and reached(snap):
                marks[name] = time.perf_counter() - start
                print(f"{marks[name]:8.1f} s  {name}", file=sys.stderr, flush=True)
        if "overview_all_W" in marks and not pages:  # first paints while the worker runs
            pages["model"] = timed(at.run)
            for page in ("2_spectra", "3_ranks", "4_run", "5_learn"):
                pages[page] = timed(at.switch_page(f"views/{page}.py").run)
        time.sleep(0.2)
    service.stop()
    stages = {name: stage.seconds for name, stage in service.snapshot().stages.items()}
    return {
        "milestones_s": marks,
        "busy_seconds_per_stage": stages,
        "first_paint_s": pages,
        "cache": str(fresh),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--edits", type=int, default=20, help="page edits timed")
    parser.add_argument("--cold", action="store_true", help="time the cold path on a fresh cache instead")
    parser.add_argument(
        "--focus", default="model.layers.10.mlp.down_proj", help="--cold: the matrix on screen"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.cold:
        result = cold(args.focus)
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
        return
    rng = np.random.default_rng(0)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=3600)
    warmup = {"model_page": timed(at.run)}
    assert not at.exception, [e.value for e in at.exception]
    from views import _shared as shared  # the app's own service (bare mode: no script context)

    start = time.perf_counter()
    snap = shared.service(shared.defaults()).wait_until(lambda s: s.state == "idle", timeout=24 * 3600)
    warmup["compute_service"] = time.perf_counter() - start
    bank = snap.bank
    method = "sigmascale"
    base = bank.ranks_for_retention(0.75)
    engine = []
    for _ in range(200):
        ranks = base.copy()
        i = rng.integers(len(ranks))
        ranks[i] = rng.integers(1, bank.full_rank[i] + 1)
        engine.append(timed(lambda ranks=ranks: bank.evaluate(bank.normalise(ranks), method)))

    at.switch_page("views/3_ranks.py").run()
    assert not at.exception, [e.value for e in at.exception]
    page = []
    for _ in range(args.edits):
        layer, kind = int(rng.integers(bank.layers.max() + 1)), str(rng.choice(sorted(set(bank.kinds))))
        key = f"editor_{at.session_state['plan']['version']}_retention"
        at.session_state[key] = {
            "edited_rows": {layer: {kind: round(float(rng.uniform(0.1, 0.95)), 2)}},
            "added_rows": [],
            "deleted_rows": [],
        }
        page.append(timed(at.run))
        assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]

    spectra = [timed(at.switch_page("views/2_spectra.py").run) for _ in range(5)]
    result = {
        "matrices": len(bank.names),
        "warmup_seconds": warmup,
        "engine_evaluate": percentiles(engine),
        "ranks_page_edit": percentiles(page),
        "spectra_page_from_cache": {
            "mean_s": float(np.mean(spectra)),
            "max_s": float(np.max(spectra)),
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
