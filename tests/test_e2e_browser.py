"""End to end in a real browser: Debian's chromium driven by Playwright against `streamlit run app.py`.

Opens every page while the compute service works (each page paints at once and shows its progress),
sees the Spectra page fill in by itself, edits a retention in the Ranks table and sees the totals
change, picks the svd method, uses a preset and Undo, starts a small run on the Run page and waits for
it to finish; a second browser tab sees the same progress. Screenshots of every step are saved under
$SIGMASCALE_E2E_ARTIFACTS (default build/e2e/), for CI to keep as artefacts.

The app runs on a tiny random Llama (with the bundled tokenizer) and small file: texts, with its own
cache and runs folders, on a free localhost port.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SIGMASCALE_E2E_ARTIFACTS", ROOT / "build" / "e2e"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

try:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # CI's 2 cores are shared with the Streamlit server: no 5 s default
except ImportError:  # pragma: no cover - CI installs it (the test extra)
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(
        sync_playwright is None, reason="playwright is not installed (pip install playwright)"
    ),
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is missing (apt-get install chromium)"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`streamlit run app.py` on a free localhost port, healthy; yields its base URL."""
    from tiny import save_tiny_model, write_text

    from sigmascale_core.metrics import rank_for_retention
    from sigmascale_core.plan import CompressionPlan
    from sigmascale_core.surgery import target_shapes

    root = tmp_path_factory.mktemp("e2e")
    model = save_tiny_model(root / "tiny")
    defaults = {
        "model": str(root / "tiny"),
        "device": "cpu",
        "text": write_text(root / "cal.txt", 1),
        "samples": 4,
        "seq_len": 32,
        "heldout_text": write_text(root / "held.txt", 2),
        "heldout_samples": 2,
        "evaluation": [write_text(root / "eval.txt", 3)],
        "max_eval_tokens": 2048,
    }
    env = {
        **os.environ,
        "SIGMASCALE_CACHE": str(root / "cache"),
        "SIGMASCALE_RUNS": str(root / "runs"),
        "SIGMASCALE_APP_DEFAULTS": json.dumps(defaults),
    }
    port = free_port()
    log = open(root / "streamlit.log", "wb")  # noqa: SIM115 - closed below
    argv = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true"]
    argv += ["--server.port", str(port), "--server.address", "127.0.0.1"]
    argv += ["--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"streamlit did not become healthy:\n{(root / 'streamlit.log').read_text()[-3000:]}")
        time.sleep(0.3)
    # the plan's parameter retention once layer 0's q is set to 0.2 (the others uniform at 0.75)
    shapes = target_shapes(model)
    q = "model.layers.0.self_attn.q_proj"
    uniform = CompressionPlan.uniform(shapes, 0.75, "svd", "fp")
    edited = uniform.with_ranks({q: rank_for_retention(*shapes[q], 0.2)}).parameter_retention()
    yield {"base": base, "runs": root / "runs", "log": root / "streamlit.log", "q_at_0.2": edited}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "streamlit.log", ARTIFACTS / "streamlit.log")


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh user-data dir
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={
                "width": 1400,
                "height": 2400,
            },  # Streamlit scrolls inside: a tall viewport shows it all
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def settle(page) -> None:
    """Wait until the app's script run is over (Streamlit's "Running…" widget gone): the next click must
    not interrupt a rerun, or a busy machine replays widget states in another order than a user's."""
    page.wait_for_timeout(300)
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=60_000)


def shot(page, name: str) -> None:
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def nav(page, title: str) -> None:
    """Switch page through the sidebar (keeps the session, as a user does)."""
    page.get_by_role("link", name=title, exact=True).click()


def metric_value(page, label: str):
    return (
        page.locator('[data-testid="stMetric"]')
        .filter(has_text=label)
        .locator('[data-testid="stMetricValue"]')
    )


def test_a_deep_link_on_a_cold_server_opens_the_app(server, page):
    """First in the module, so the server has served nobody yet: a bookmark of /ranks must get the app
    (its navigation, its wide layout), not Streamlit's own page list of a folder named pages/."""
    page.goto(f"{server['base']}/ranks")
    page.get_by_role("heading", name="Ranks", exact=True).wait_for(timeout=120_000)
    sidebar = page.get_by_test_id("stSidebarNav")
    expect(sidebar).to_contain_text("Model & data")
    expect(sidebar.get_by_text("shared", exact=True)).to_have_count(0)
    width = page.get_by_test_id("stMainBlockContainer").bounding_box()["width"]
    assert width > 1000, f"the page is not in the wide layout ({width:.0f} px of a 1400 px window)"
    shot(page, "0_deep_link_ranks")


def test_every_page_then_an_edit_then_a_run(server, page):
    page.goto(server["base"])
    page.get_by_role("heading", name="Model & data", exact=True).wait_for(timeout=60_000)
    expect(page.get_by_role("button", name="Apply")).to_be_visible()
    # the background work shows its progress at once, and fills in without a click
    expect(page.get_by_text("spectra of W").first).to_be_visible(timeout=60_000)
    shot(page, "1_model")

    second = page.context.new_page()  # another tab on the same server sees the same service
    second.goto(f"{server['base']}/spectra")
    second.get_by_role("heading", name="Spectra", exact=True).wait_for(timeout=60_000)
    second.get_by_text("Overview: layers × matrices").wait_for(timeout=240_000)
    shot(second, "2_spectra_second_tab")

    nav(page, "Spectra")  # fills in by itself as the service finishes: no button
    page.get_by_text("Overview: layers × matrices").wait_for(timeout=180_000)
    expect(page.locator(".vega-embed")).to_have_count(6, timeout=180_000)  # heatmap, σ, energy, ESD, 2 curves
    expect(page.get_by_text("learned (SigmaScale)").first).to_be_visible(timeout=180_000)
    shot(page, "2_spectra")
    second.close()

    nav(page, "Ranks")
    retention = metric_value(page, "Params kept")
    expect(retention).to_have_text("73.75%", timeout=60_000)
    settle(page)
    shot(page, "3_ranks_before")
    # edit layer 0's q retention in the table (a canvas grid): select the cell, open it, type, commit
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.scroll_into_view_if_needed()
    box = grid.bounding_box()
    page.mouse.click(box["x"] + 130, box["y"] + 52)  # header row ≈ 35 px; first data column after the index
    page.wait_for_timeout(500)
    page.keyboard.press("Enter")  # opens the cell's overlay editor (glide-data-grid's portal)
    cell_editor = page.locator("#portal input, #portal textarea").first
    cell_editor.wait_for(timeout=30_000)
    cell_editor.fill("0.2")  # replaces the text at once: no keystrokes to lose on a busy machine
    expect(cell_editor).to_have_value("0.2")
    cell_editor.press("Enter")
    expected = f"{server['q_at_0.2']:.2%}"
    expect(retention).to_have_text(expected, timeout=20_000)
    settle(page)
    expect(page.get_by_role("button", name="Undo")).to_be_enabled()  # at once, from the edit's own rerun
    shot(page, "3_ranks_edited")
    # a preset changes it again: uniform at the slider's retention
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Method").click()
    page.get_by_role("option", name="svd", exact=True).click()
    settle(page)
    page.get_by_role("button", name="Uniform", exact=True).click()
    expect(retention).to_have_text("73.75%", timeout=20_000)
    settle(page)
    undo = page.get_by_role("button", name="Undo")
    expect(undo).to_be_enabled(timeout=20_000)
    undo.click()
    expect(retention).to_have_text(expected, timeout=20_000)
    shot(page, "3_ranks_after")

    nav(page, "Run")
    expect(page.get_by_text("The plan from")).to_contain_text("svd", timeout=60_000)
    page.get_by_role("button", name="Start run").click()
    expect(page.get_by_text("Started run")).to_be_visible(timeout=30_000)
    shot(page, "4_run_started")
    page.get_by_text("— done;").wait_for(timeout=480_000)  # a loaded machine: minutes
    shot(page, "4_run_done")
    runs = [p for p in server["runs"].iterdir() if not p.name.startswith(".")]  # .slots: the run limit
    assert len(runs) == 1
    meta = json.loads((runs[0] / "meta.json").read_text())
    assert meta["status"] == "done"
    report = json.loads((runs[0] / "report.json").read_text())
    assert report["method"] == "svd" and report["parameter_retention"] == pytest.approx(
        server["q_at_0.2"], abs=1e-12
    )

    nav(page, "Learn")
    page.get_by_text("Activation cloud").wait_for(timeout=60_000)
    error = metric_value(page, "Activation error")
    before = error.inner_text()
    page.get_by_role("button", name="ASVD scales").click()
    expect(error).not_to_have_text(before, timeout=20_000)
    shot(page, "5_learn")
    assert "Traceback" not in server["log"].read_text()
