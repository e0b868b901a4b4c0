"""App latency on the bundled SmolLM2 (210 matrices): what a retention edit costs, and the Spectra page
rendered from cache.

    python bench/bench_app.py

1. engine: `SpectraBank.evaluate` after a one-matrix rank change (all that an edit recomputes: totals
   of parameter retention, relative loss and effective rank from the cached curves), p50/p95 over
   200 random edits;
2. Ranks page: the page's rerun after a table edit, through streamlit.testing's AppTest (the whole
   script, its widgets and charts serialised; no browser), p50/p95 over 20 random edits;
3. Spectra page: a full render from a warm cache (AppTest), over 5 visits.
The first pass loads the model and fills the spectra cache (calibration + one SVD per matrix and
method: minutes on a CPU); it is reported, not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--edits", type=int, default=20, help="page edits timed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=3600)
    warmup = {"model_page": timed(at.run)}
    assert not at.exception, [e.value for e in at.exception]
    warmup["spectra_first_visit"] = timed(at.switch_page("pages/2_spectra.py").run)  # fills the cache
    assert not at.exception, [e.value for e in at.exception]

    sys.path.insert(0, str(ROOT))
    from pages import _shared as shared  # the app's own cached bank (bare mode: no script context)

    bank = shared.bank(shared.config())
    method = "sigmascale"
    base = bank.ranks_for_retention(0.75)
    engine = []
    for _ in range(200):
        ranks = base.copy()
        i = rng.integers(len(ranks))
        ranks[i] = rng.integers(1, bank.full_rank[i] + 1)
        engine.append(timed(lambda ranks=ranks: bank.evaluate(bank.normalise(ranks), method)))

    at.switch_page("pages/3_ranks.py").run()
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

    spectra = [timed(at.switch_page("pages/2_spectra.py").run) for _ in range(5)]
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
