"""docs/diagnostics.png: the Spectra page's diagnostics section (ESD of one matrix, W vs scaled numbers),
screenshotted by Playwright's chromium from `streamlit run app.py` on an already filled cache.

    OMP_NUM_THREADS=1 SIGMASCALE_CACHE=/tmp/cache sigmascale spectra --diagnostics --out /tmp/d.csv
    SIGMASCALE_CACHE=/tmp/cache python scripts/diagnostics_figure.py --layer 10 --matrix up --method svdllm
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
LABELS = {
    "svd": "W (plain SVD)",
    "asvd": "ASVD scaling",
    "svdllm": "whitening (SVD-LLM)",
    "sigmascale": "learned (SigmaScale)",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--matrix", default="q")
    parser.add_argument("--method", default="svd", choices=list(LABELS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "diagnostics.png")
    args = parser.parse_args()
    port = free_port()
    argv = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true"]
    argv += ["--server.port", str(port), "--server.address", "127.0.0.1"]
    server = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 4000})
            page.goto(f"{base}/spectra")
            page.get_by_text("Spectral diagnostics (WeightWatcher's)").wait_for(timeout=600_000)
            page.get_by_test_id("stSelectbox").filter(has_text="Layer").click()
            page.get_by_role("option", name=str(args.layer), exact=True).click()
            page.wait_for_timeout(3000)
            page.get_by_test_id("stButtonGroup").first.get_by_text(args.matrix, exact=True).click()
            page.wait_for_timeout(3000)
            esd = page.get_by_test_id("stButtonGroup").filter(has_text="W (plain SVD)").last
            esd.get_by_text(LABELS[args.method], exact=True).click()
            page.wait_for_timeout(5000)
            top = page.get_by_text("Spectral diagnostics (WeightWatcher's)").bounding_box()
            bottom = page.get_by_text("Diagnostics of every matrix").bounding_box()
            left = max(top["x"] - 20, 0)
            clip = {"x": left, "y": top["y"] - 10, "width": 1400 - left, "height": bottom["y"] - top["y"]}
            page.screenshot(path=args.out, clip=clip)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
