"""What a biologist sees, in a real browser: the Dagster asset pages and the MLflow run pages.

After the session's demo materialization (the ``demo_sqlite`` fixture of conftest.py) and one more training
(so that MLflow holds two runs to compare and the ``model`` page links to the MLflow UI started here),
``dagster dev`` and ``mlflow ui`` are started on free loopback ports and Debian's Chromium
(``/usr/bin/chromium``, package ``chromium``; Playwright drives it through ``executable_path`` and never
downloads a browser) visits: the asset lineage, one partition's ``patches`` page (the patch montage
opens as a picture that fits the window), the ``model`` page (its ``mlflow_run`` link opens the MLflow
run) and MLflow's comparison of the two trainings. Screenshots are saved to
``$PHENOCODER_UI_SCREENSHOTS`` or to a ``ui-screenshots`` folder under pytest's temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("PHENOCODER_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS_ENV = "PHENOCODER_UI_SCREENSHOTS"
ASSETS = ["sdata", "patches", "model", "latents", "cluster_reference", "clusters", "graph_stats", "embedding"]
VIEWPORT = {"width": 1280, "height": 900}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(args: list[str], env: dict[str, str], url: str, log: Path, timeout: float = 180):
    """Run ``args`` in its own process group until the block ends; wait until ``url`` answers."""
    import requests

    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited with {proc.returncode}: {log.read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(url, timeout=5).ok:
                    break
            if time.time() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f} s: {log.read_text()[-3000:]}")
            time.sleep(1)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # the server and its children (same session); as Ctrl-C
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def retrain(home: Path, dagster_home: Path, samples: list[str], mlflow_ui: str):
    """A second, smaller training whose ``mlflow_run`` link points at ``mlflow_ui``; returns its metadata."""
    from dagster import DagsterInstance, materialize

    from phenocoder_assets.definitions import ASSETS as DEFS
    from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage

    resources = {"storage": PhenocoderStorage(root=str(home)),
                 "mlflow": MLflowTracking(root=str(home), ui_url=mlflow_ui)}
    config = {"samples": samples[:2], "n_epochs": 2, "n_latent_dim": 8, "n_dense_dim": 16,
              "conv_layers": [8, 16], "batch_size": 32, "n_preview": 50}
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        res = materialize(DEFS, selection=["model"], instance=instance, resources=resources,
                          run_config={"ops": {"model": {"config": config}}})
    assert res.success
    return res.get_asset_materialization_events()[0].materialization.metadata


@pytest.fixture(scope="module")
def ui(demo_sqlite, tmp_path_factory):
    """(dagster url, mlflow url, model metadata, screenshot folder) with both servers running."""
    import playwright.sync_api  # noqa: F401  (a dev dependency: a broken install fails here, never skips)

    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium (or set PHENOCODER_CHROMIUM)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; CI must run the browser test (.ci/run installs it).")
        pytest.skip(message)
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path_factory.mktemp("ui-screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    logs = tmp_path_factory.mktemp("ui-logs")
    mlflow_url = f"http://127.0.0.1:{free_port()}"
    dagster_url = f"http://127.0.0.1:{free_port()}"
    meta = retrain(demo_sqlite.home, demo_sqlite.dagster_home, demo_sqlite.samples, mlflow_url)
    # An empty landing folder keeps the sensor of `dagster dev` from re-encoding the wells with the new model
    # while the pages are visited (those runs would outlive the servers).
    landing = tmp_path_factory.mktemp("ui-landing")
    env = {**os.environ, "DAGSTER_HOME": str(demo_sqlite.dagster_home), "PHENOCODER_HOME": str(demo_sqlite.home),
           "PHENOCODER_MLFLOW_UI_URL": mlflow_url, "PHENOCODER_LANDING": str(landing), "PYTHONPATH": str(REPO)}
    bindir = Path(sys.executable).parent
    mlflow_args = [str(bindir / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{demo_sqlite.home}/mlflow.db",
                   "--host", "127.0.0.1", "--port", mlflow_url.rsplit(":", 1)[1], "--workers", "1"]
    dagster_args = [str(bindir / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1",
                    "-p", dagster_url.rsplit(":", 1)[1]]
    with server(mlflow_args, env, f"{mlflow_url}/health", logs / "mlflow.log"), \
            server(dagster_args, env, f"{dagster_url}/server_info", logs / "dagster.log"):
        yield dagster_url, mlflow_url, meta, shots
    print(f"screenshots in {shots}")


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    # no background connections: this machine's closed network refuses them
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                                          "--disable-background-networking", "--disable-component-update",
                                          "--disable-sync", "--no-first-run", "--disable-quic"])
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(60_000)
        yield context.new_page()
        browser.close()


def show_picture(page, label: str):
    """Open the picture behind the metadata row ``label`` ("[Show Markdown]") and return its <img>."""
    row = page.locator("tr", has=page.locator("td", has_text=label)).filter(has_text="[Show Markdown]").first
    row.get_by_text("[Show Markdown]").click()
    dialog = page.locator(".bp5-dialog, [role=dialog]").filter(has_text=label).last
    img = dialog.locator("img").first
    img.wait_for(state="visible")
    return dialog, img


def assert_fits(page, img) -> None:
    """The picture has loaded and lies wholly inside the window (no scrolling to see it)."""
    assert img.evaluate("el => el.complete && el.naturalWidth > 0")
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    box = img.bounding_box()
    assert box is not None and box["width"] >= 100
    assert box["x"] >= 0 and box["x"] + box["width"] <= VIEWPORT["width"], box


def close_dialog(page) -> None:
    page.keyboard.press("Escape")
    page.locator(".bp5-dialog").first.wait_for(state="hidden")


def skip_welcome(page) -> None:
    """Dismiss the UI's one-time "Join the Dagster community" dialog of a new instance, if it shows."""
    skip = page.get_by_role("button", name="Skip")
    with contextlib.suppress(Exception):
        skip.wait_for(state="visible", timeout=5_000)
        skip.click()


def close_mlflow_assistant(page) -> None:
    """Close MLflow's assistant side panel (open on a first visit) so the screenshot shows the page."""
    panel = page.get_by_text("MLflow Assistant")
    with contextlib.suppress(Exception):
        panel.first.wait_for(state="visible", timeout=5_000)
        # short: once closed on an earlier page, the panel's title stays as a button and no Close button
        # exists; the page's default timeout (60 s) would be spent waiting for one
        page.get_by_role("button", name="Close").last.click(timeout=5_000)


def test_lineage_shows_every_asset(ui, page):
    dagster_url, _, _, shots = ui
    page.goto(f"{dagster_url}/asset-groups")
    page.locator("foreignObject [aria-label=unfold_more]").first.wait_for()  # the two groups, collapsed
    skip_welcome(page)
    page.locator("foreignObject").first.hover()
    page.keyboard.press("Alt+e")  # "Expand all groups" (the graph settings menu's shortcut)
    page.get_by_role("button", name="Hide navigation").click()
    page.locator("[aria-label=panel_show_right]").first.click()  # hide the asset tree beside the graph
    graph = page.locator("foreignObject")
    for name in ASSETS:
        graph.get_by_text(name, exact=True).first.wait_for(state="visible")
    page.wait_for_timeout(1500)  # let the graph settle before the picture
    for name in ASSETS:
        assert graph.get_by_text(name, exact=True).first.is_visible(), name
    page.screenshot(path=str(shots / "1-lineage.png"))


def test_patches_partition_page_shows_the_montage(demo_sqlite, ui, page):
    dagster_url, _, _, shots = ui
    sample = demo_sqlite.samples[0]
    # the description keeps its angle brackets (not swallowed as HTML tags) and explains the metadata
    page.goto(f"{dagster_url}/assets/patches")
    skip_welcome(page)
    page.get_by_text("<root>/patches/<sample>/").first.wait_for(state="visible")
    page.get_by_text("zero-padded to the full patch size").first.wait_for(state="visible")
    page.goto(f"{dagster_url}/assets/patches?view=partitions&partition={sample}")
    page.get_by_text("n_padded", exact=True).first.wait_for(state="visible")
    page.screenshot(path=str(shots / "2-patches-partition.png"))
    _, img = show_picture(page, "preview")
    assert_fits(page, img)
    page.screenshot(path=str(shots / "3-patches-montage.png"))
    close_dialog(page)


def test_model_page_pictures_and_link_to_the_mlflow_run(ui, page):
    dagster_url, mlflow_url, meta, shots = ui
    page.goto(f"{dagster_url}/assets/model")
    skip_welcome(page)
    link = page.locator(f"a[href^='{mlflow_url}/#/experiments/']").first
    link.wait_for(state="visible")
    page.screenshot(path=str(shots / "4-model.png"))
    for label in ("reconstructions", "latent_space", "curves"):
        _, img = show_picture(page, label)
        assert_fits(page, img)
        page.screenshot(path=str(shots / f"5-model-{label}.png"))
        close_dialog(page)
    href = link.get_attribute("href")
    assert href == meta["mlflow_run"].value and meta["mlflow_run_id"].value in href
    with page.context.expect_page() as opened:
        link.click()  # the link opens a new tab, as a user would get it
    run_page = opened.value
    run_page.get_by_text("model DEMO_A01,DEMO_A02").first.wait_for(state="visible")
    run_page.get_by_text(meta["mlflow_run_id"].value).first.wait_for(state="visible")
    run_page.get_by_text("dagster.run_id").first.wait_for(state="visible")
    close_mlflow_assistant(run_page)
    run_page.wait_for_timeout(1000)
    run_page.screenshot(path=str(run_page_path := shots / "6-mlflow-run.png"))
    assert run_page_path.stat().st_size > 10_000
    run_page.close()


def test_mlflow_compares_the_two_trainings(ui, page):
    _, mlflow_url, meta, shots = ui
    href = meta["mlflow_compare"].value
    assert href.startswith(f"{mlflow_url}/#/compare-runs?runs=") and href.endswith("workflowType=machine_learning")
    page.goto(href)
    page.get_by_text("Comparing 2 Runs").first.wait_for(state="visible")
    page.get_by_text("n_latent_dim").first.wait_for(state="visible")
    page.get_by_text("val_loss").first.wait_for(state="visible")
    close_mlflow_assistant(page)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(shots / "7-mlflow-compare.png"))
    # the validation loss of both trainings, epoch by epoch, in one chart
    # follow the link's address rather than clicking it: on a loaded machine a click can land while the
    # table re-renders and be lost, and the chart then never comes
    page.goto(page.get_by_role("link", name="val_loss", exact=True).first.evaluate("a => a.href"))
    chart = page.locator("svg").filter(has_text="Step").first
    chart.wait_for(state="visible")
    legend = page.get_by_text(re.compile(r"^model DEMO_A01,DEMO_A02.* \(val_loss\)$"))
    legend.first.wait_for(state="visible")
    assert legend.count() == 2  # one curve per training (the older run trained on all three wells)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "8-mlflow-val-loss-curves.png"))
