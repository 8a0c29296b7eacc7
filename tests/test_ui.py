"""MLflow's UI as a newcomer sees it after a sweep and promote: the real `mlflow ui` over a small real sweep's
store, driven by Debian's Chromium (headless, through Playwright's driver; no browser is downloaded).

The links come from what the verbs print, so the test follows the same links a user does. Screenshots of
each page are saved under the test's tmp_path. Where neither Playwright nor Chromium is installed the test
skips saying so; CI (FER_REQUIRE_BROWSER=1, set by .ci/run, which installs both) fails instead.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from trainers.config import NAME_SEPARATOR

CHROMIUM = "/usr/bin/chromium"
# The probe's flags: no sandbox as root, and nothing that reaches for the network (this machine has none).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PAGE_SECONDS = 90          # the UI's first load on a busy 2-core machine takes tens of seconds


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401  (only whether it imports)
    except ImportError:
        return "playwright is not installed (pip install playwright; .ci/run does)"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does)"
    return None


@pytest.fixture(scope="module")
def browser_ready():
    missing = _browser_missing()
    if missing and os.environ.get("FER_REQUIRE_BROWSER"):
        pytest.fail(f"FER_REQUIRE_BROWSER is set but {missing}")
    if missing:
        pytest.skip(missing)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, write_spec, tiny_vit, orchestrate):
    """A 2 x 2 optimizer x learning-rate sweep of the tiny ViT, promoted: its folder and the verbs' output."""
    folder = tmp_path_factory.mktemp("ui")
    spec = write_spec(folder, "ui", {"optimizer_lr": {"grid": {"optim.name": ["sgd", "adam"],
                                                               "optim.lr": [1e-3, 1e-2]}}},
                      promote={"model": "vit", "metric": "val_macro_f1", "name": "fer-ui", "alias": "champion"})
    out = ""
    for verb in ("sweep", "promote"):
        done = orchestrate(folder, verb, str(spec))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        out += done.stdout + done.stderr       # the sweep reports each finished trial on stderr
    return folder, out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runs_carry_what_the_ui_shows(swept, store):
    """Without a browser: what the pages above are made of, as logged."""
    folder, _ = swept
    client = store(folder)
    experiment = client.get_experiment_by_name("ui")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "mlflow.sharedViewState.fer-compare" in experiment.tags
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("role") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    for run in children:
        note = run.data.tags["mlflow.note.content"]      # the run's description: its one-line summary
        assert re.fullmatch(r"vit · (sgd|adam) · lr 1e-[23] · 1 epochs · seed 0 · finished · val macro F1 \S+ · "
                            r"test macro F1 \S+", note), note
        assert run.data.tags["mlflow.source.name"].endswith("ui.yaml") and run.data.tags["mlflow.user"]
        metrics = client.get_metric_history(run.info.run_id, "test_macro_f1")
        assert [m.step for m in metrics] == [0]           # one bar per run in the chart view
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_macro_f1")] == [1]   # per epoch
        assert "data/n_test" in run.data.metrics and "time/train_seconds" in run.data.metrics
        model = client.get_logged_model(run.data.tags["model_id"])
        assert model.params["optim.lr"] == run.data.params["optim.lr"]
        assert {m.key for m in model.metrics} >= {"test_macro_f1", "final_val_macro_f1"}
    # The parent: the axes as params, the best run and its scores, the counts; the report refreshed by promote.
    parent = client.get_run(parent.info.run_id)
    assert parent.data.params["grid.optimizer_lr.optim.lr"] == "0.001,0.01"
    assert parent.data.metrics["trials_finished"] == 4 and parent.data.metrics["trials_failed"] == 0
    assert "best_config_val_macro_f1" in parent.data.metrics
    assert parent.data.tags["best_run"] in {r.info.run_name for r in children}
    report = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert "report/report.md" in report


@pytest.fixture(scope="module")
def ui(swept, clean_env, browser_ready):
    """`mlflow ui` on a free loopback port over the sweep's store (one worker), until the module ends."""
    folder, _ = swept
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              cwd=folder, env={**clean_env(), "MLFLOW_DISABLE_TELEMETRY": "true"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None, "mlflow ui exited"
            assert time.monotonic() < deadline, "mlflow ui did not answer within 180 s"
            time.sleep(0.5)
    yield base
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page(viewport={"width": 2200, "height": 1100})
        browser.close()


def _link(output: str, label: str, base: str) -> str:
    """The link a verb printed after `label:`, pointed at this test's server instead of `make ui`'s."""
    found = re.search(rf"^\s+{label}: (http://\S+)$", output, re.M)
    assert found, f"no '{label}:' link in the output:\n{output[-2000:]}"
    return re.sub(r"^http://127\.0\.0\.1:5000", base, found.group(1))


def _visit(page, url: str, expect: str, shots: Path, name: str) -> str:
    """Open url, wait until `expect` is on the page, screenshot it, return the page's text."""
    page.goto(url)
    page.get_by_text(expect, exact=False).first.wait_for(timeout=PAGE_SECONDS * 1000)
    page.wait_for_timeout(1000)      # let the rest of the table settle
    page.screenshot(path=str(shots / f"{name}.png"))
    return page.inner_text("body")


def test_a_newcomer_compares_the_trials_from_the_printed_links(swept, ui, page, tmp_path):
    folder, output = swept
    names = sorted(set(re.findall(rf"finished ((?:sgd|adam){NAME_SEPARATOR}\S+)", output)))
    assert len(names) == 4, output
    # Distinct where MLflow's runs table cuts names (~16 characters): optimizer and lr lead.
    assert len({n[:16] for n in names}) == 4, names

    # The experiment opened in the model-training view lists the parent alone: its trials are nested in it.
    plain = re.sub(r"&viewStateShareKey=[^&]+", "", _link(output, "runs", ui))
    text = _visit(page, plain, "5 matching runs", tmp_path, "1-experiment")      # the parent and 4 trials
    assert "\nui\n" in text and not any(n in text for n in names)

    # The printed runs link opens the saved comparison view: every trial, F1 and the axes as columns.
    text = _visit(page, _link(output, "runs", ui), names[0], tmp_path, "2-compare-view")
    assert "Compare trials" in text
    assert all(n in text for n in names)
    for column in ("val_macro_f1", "test_macro_f1", "test_accuracy", "optim.name", "optim.lr"):
        assert column in text, column

    # MLflow's Compare page of the trials shows the learning rate and validation F1 of each.
    text = _visit(page, _link(output, "compare", ui), "Comparing 4 Runs", tmp_path, "3-compare-page")
    assert "optim.lr" in text and "val_macro_f1" in text
    assert "model.vit.hidden_size" in text          # applies to these ViT runs, so it is logged

    # A trial's artifacts include its confusion matrix.
    run_id = re.search(r"#/compare-runs\?runs=%5B%22([0-9a-f]{32})", _link(output, "compare", ui)).group(1)
    experiment = re.search(r"#/experiments/(\d+)/", _link(output, "runs", ui)).group(1)
    text = _visit(page, f"{ui}/#/experiments/{experiment}/runs/{run_id}/artifacts?workflowType=machine_learning",
                  "confusion_matrix.png", tmp_path, "4-trial-artifacts")
    assert "curves.png" in text and "per_class.csv" in text

    # The registry shows the promoted version as the champion.
    text = _visit(page, _link(output, "version", ui).rsplit("/versions/", 1)[0], "Version 1", tmp_path,
                  "5-registry")
    assert "champion" in text
    shutil.copytree(tmp_path, folder / "screenshots", dirs_exist_ok=True)
