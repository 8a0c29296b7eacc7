"""The verbs of `python -m orchestrator`: each reads a spec, does one job and returns an exit code."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from rich.text import Text

from orchestrator.render import (balance_table, console, cost_lines, count_line, data_lines, data_table,
                                 degradation_table, drift_line, outcome_table, print_outcome, slice_table,
                                 status_table, tpe_line, trial_table)
from orchestrator.results.production_tables import Outcome, outcome_line
from orchestrator.sweep.plan import datasets_to_prepare, estimate_cost
from orchestrator.sweep.preflight import check_prepare_folders, check_sweep_folders, disk_full_error, sweep_folders
from orchestrator.sweep.spec import SweepSpec, load_spec
from orchestrator.sweep.spec_types import MAX_TRIALS_PER_GPU
from trainers.config import ConfigError
from trainers.process.free_space import is_disk_full

DEFAULT_SPEC = "sweeps/demo.yaml"


def plan(args: argparse.Namespace) -> int:
    """Check a sweep spec, then print its trials, their count and the estimated cost; runs nothing."""
    spec = load_spec(args.spec)
    out = console()
    out.print(trial_table(spec))
    out.print(count_line(spec))
    if spec.search.method == "tpe":
        out.print(tpe_line(spec))
    for line in cost_lines(estimate_cost(spec)):
        out.print(line)
    return 0


def sweep(args: argparse.Namespace) -> int:
    """Run a sweep end to end (or resume it): every planned trial once, then the report."""
    spec = _with_slot_options(load_spec(args.spec), args)
    check_sweep_folders(spec, args.storage, args.tracking_uri)    # before the ledger or any run exists
    try:
        outcome = _run_sweep(spec, args, enqueue=True)
    except KeyboardInterrupt:    # while preparing data: no trial had started
        print("\nstopped before any trial started; run the same command again to resume", file=sys.stderr)
        return 130
    print_outcome(spec, outcome)
    if outcome.interrupted:
        return 130
    _write_report(spec, args.tracking_uri)
    unfinished = outcome.counts.get("waiting", 0) + outcome.counts.get("running", 0)
    return 1 if outcome.counts.get("failed") or unfinished else 0


def worker(args: argparse.Namespace) -> int:
    """Join a started sweep: claim and train waiting trials on this host's slots until none is left."""
    spec = _with_slot_options(load_spec(args.spec), args)
    check_sweep_folders(spec, args.storage, args.tracking_uri)
    try:
        outcome = _run_sweep(spec, args, enqueue=False)
    except KeyboardInterrupt:    # while waiting for the sweep to start: nothing was claimed
        print("\nstopped before the sweep started", file=sys.stderr)
        return 130
    print_outcome(spec, outcome)
    return 130 if outcome.interrupted else 0


def _run_sweep(spec: SweepSpec, args: argparse.Namespace, enqueue: bool):
    """run_sweep with the command line's stores and slots. A disk that filled up despite the free-space reserve
    (ENOSPC, sqlite's "database or disk is full") is one line naming the folder with the least room."""
    from orchestrator.sweep.ledger import default_storage, take_host_lock

    # Before the runner's imports (MLflow and the trainers' helpers take seconds): a refused sweep says so at once.
    take_host_lock(args.storage or default_storage())
    from orchestrator.sweep.runner import run_sweep

    try:
        return run_sweep(spec, args.storage, args.tracking_uri, _gpu_list(args.gpus), args.jobs, enqueue=enqueue)
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise disk_full_error(sweep_folders(spec, args.storage, args.tracking_uri), err) from None


def status(args: argparse.Namespace) -> int:
    """Show a sweep's trials: waiting, running, finished, failed, diverged, and who runs what."""
    from trainers.process.side_files import STORE_DIR
    from orchestrator.sweep.ledger import Ledger, count_points, default_storage
    from orchestrator.sweep.runner import SweepError, status_points

    spec = load_spec(args.spec)
    no_ledger = args.storage is None and not (STORE_DIR / "optuna.db").exists()     # reading creates nothing
    url = f"sqlite:///{(STORE_DIR / 'optuna.db').resolve()}" if no_ledger else args.storage or default_storage()
    ledger = None if no_ledger else Ledger.open_to_read(url, spec.name)
    latest = status_points(spec, ledger)     # with the trials MLflow holds that a lost ledger no longer has
    if not latest and no_ledger:
        raise SweepError(f"no sweep has run from this folder ({STORE_DIR.resolve()} has no optuna.db); start "
                         f"'{spec.name}' with `python -m orchestrator sweep {args.spec}`, or pass --storage")
    from sqlalchemy.engine import make_url

    shown = make_url(url).render_as_string(hide_password=True)
    if not latest and ledger is None:
        storage = f" --storage {shown}" if args.storage else ""
        raise SweepError(f"sweep '{spec.name}' has not been started in {shown}: no trial of it is queued; start "
                         f"it with `python -m orchestrator sweep {args.spec}{storage}`")
    counts = count_points(latest)
    print(f"sweep '{spec.name}' ({shown}): " + ", ".join(
        f"{k} {counts.get(k, 0)}" for k in ("waiting", "running", "finished", "diverged", "pruned", "failed")))
    console().print(status_table(latest))
    lost = sum(1 for t in latest.values() if t.number < 0)
    if lost:
        print(f"{lost} trial(s) (optuna # -1) ended in MLflow but are missing from the ledger; the next `sweep` "
              "records them from their runs and does not run them again")
    return 0


def _with_slot_options(spec: SweepSpec, args: argparse.Namespace) -> SweepSpec:
    """The spec with --trials-per-gpu applied. --jobs asks for CPU trials, so beside --gpus or --trials-per-gpu it
    contradicts them: refused rather than one of them silently ignored."""
    per_gpu = args.trials_per_gpu
    if args.jobs is not None and (args.gpus is not None or per_gpu is not None):
        other = "--gpus" if args.gpus is not None else "--trials-per-gpu"
        raise ConfigError("--jobs", "", f"runs trials on the CPU, {other} on GPUs: give one of them (several trials "
                                        "per GPU: --gpus with --trials-per-gpu)")
    if per_gpu is None:
        return spec
    if not 1 <= per_gpu <= MAX_TRIALS_PER_GPU:
        raise ConfigError("--trials-per-gpu", "", f"must be from 1 to {MAX_TRIALS_PER_GPU}; got {per_gpu}")
    return dataclasses.replace(spec, execution=dataclasses.replace(spec.execution, trials_per_gpu=per_gpu))


def _gpu_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError("--gpus", "", f"expected GPU indices like 0,1; got '{text}'") from None


def _write_report(spec: SweepSpec, tracking: str | None, out: str | None = None) -> None:
    """Write the sweep's report from MLflow, say where it is, and link to the runs in MLflow's UI. A store this
    process cannot write is only read: the report is written (a read-only mlruns/ needs --out) but not logged."""
    from orchestrator.results.runs import sweep_store
    from orchestrator.sweep.preflight import OutputFolder, check_folders, store_write_problem

    client = sweep_store(spec, tracking)     # first: the report's modules would make mlruns/cache for nothing
    from orchestrator.results.links import sweep_links
    from orchestrator.results.report import write_report
    from orchestrator.results.report.document import REPORTS_DIR

    folder = Path(out) if out else REPORTS_DIR / spec.name
    check_folders([OutputFolder(folder, "the report folder", "pass --out a folder you can write",
                                "free some space, or pass --out a folder on a disk with room")], need_mb=0)
    read_only = store_write_problem(client.tracking_uri)
    path = write_report(spec, client, folder, log=read_only is None)
    logged = "also logged to the sweep's parent run" if read_only is None else \
        f"not logged to the sweep's parent run: {read_only}"
    print(f"report: {path} ({logged})")
    _print_links(client, sweep_links(client, spec.name))


def _print_links(client, links: list[str]) -> None:
    """Deep links into MLflow's UI, after how to start it when the store is not a server."""
    from orchestrator.results.links import ui_command

    if not links:
        return
    command = ui_command(client.tracking_uri)
    print(f"MLflow UI ({command}, then open):" if command else "MLflow UI:")
    for link in links:
        print(f"  {link}")


def _refresh_report(spec: SweepSpec, client) -> None:
    """After promote or production: the parent run's report written again, so it shows what just changed.
    A report that cannot be written now (e.g. the sweep's runs are in another store) is left as it was."""
    from orchestrator.results.report import write_report
    from trainers.errors import first_line

    try:
        path = write_report(spec, client)
    except Exception as err:       # what was promoted or evaluated stands; `report` can write it later
        print(f"report not refreshed ({first_line(err)}); `python -m orchestrator report {spec.path}` writes it")
        return
    print(f"report: {path} (refreshed; also logged to the sweep's parent run)")


def promote(args: argparse.Namespace) -> int:
    """Register the run nearest the best configuration's mean over seeds; champion if it beats the incumbent."""
    from orchestrator.results.runs import sweep_store
    from orchestrator.sweep.preflight import check_store_writable

    spec = load_spec(args.spec)
    client = sweep_store(spec, args.tracking_uri)     # a missing store is not created
    check_store_writable(client.tracking_uri, "the registered version and its alias")
    from orchestrator.results.links import version_link
    from orchestrator.results.registry import promote as promote_best

    result = promote_best(spec, client, replace=args.replace)
    print(result.message)
    _refresh_report(spec, client)
    _print_links(client, [f"version: {version_link(client, spec.promote.name, str(result.version))}"])
    return 0


def production(args: argparse.Namespace) -> int:
    """Evaluate a sweep's runs on the production data (--runs, else the spec's production.evaluate, else
    the champion): metrics, slices, drift; each run once per production data."""
    from orchestrator.results.runs import sweep_store
    from orchestrator.sweep.preflight import check_store_writable

    spec = load_spec(args.spec)
    client = sweep_store(spec, args.tracking_uri)     # a missing store is not created
    check_store_writable(client.tracking_uri, "the production runs")
    if spec.production is not None:      # its images are prepared (and cached) before any evaluation
        check_prepare_folders([spec.production])
    from orchestrator.results.production_runs import Progress, Skipped, production_steps

    asked = [name.strip() for text in args.runs or [] for name in text.split(",") if name.strip()]
    out = console()
    outcomes, skipped, selected = [], 0, 1
    for step in production_steps(spec, client, asked):
        if isinstance(step, Outcome):
            outcomes.append(step)
            # One run evaluated now gets its tables below; every other outcome gets its line here.
            if selected > 1 or not step.evaluated_now:
                out.print(Text(outcome_line(step)))
            continue
        selected = step.total if isinstance(step, Progress) else selected
        skipped += isinstance(step, Skipped)
        out.print(Text(str(step)))
    _print_production(spec, outcomes)
    if any(o.evaluated_now for o in outcomes):
        _refresh_report(spec, client)
        _print_links(client, _production_links(client, outcomes))
    return _production_status(outcomes, skipped, args.fail_on_drift)


def _production_links(client, outcomes: list[Outcome]) -> list[str]:
    """A link to each production run evaluated now."""
    from orchestrator.results.links import run_link

    links = []
    for o in outcomes:
        if o.evaluated_now:
            run = client.get_run(o.run_id)
            links.append(f"production run {o.name}: {run_link(client, run.info.experiment_id, run.info.run_id)}")
    return links


def _print_production(spec: SweepSpec, outcomes: list[Outcome]) -> None:
    """One run evaluated now: its tables and drift line; several: a summary table."""
    out = console()
    if len(outcomes) == 1 and outcomes[0].evaluated_now:
        result = outcomes[0].result
        out.print(degradation_table(result))
        out.print(slice_table(result))
        out.print(Text(drift_line(result)))
        out.print(f"logged run {result.run_id} in experiment '{spec.name}-production'")
    elif len(outcomes) > 1:
        out.print(outcome_table(outcomes))
        now = sum(o.evaluated_now for o in outcomes)
        out.print(f"{now} evaluated now, {len(outcomes) - now} before; runs in experiment '{spec.name}-production'")


def _production_status(outcomes: list[Outcome], skipped: int, fail_on_drift: bool) -> int:
    """The exit status (production_exit_status), saying why when it is not 0; with --fail-on-drift, which
    runs trigger it and which verdicts do not count (class mix only, unknown)."""
    from orchestrator.results.drift import EXIT_DRIFT, calls_for_retraining
    from orchestrator.results.production_runs import production_exit_status

    status = production_exit_status([o.drift_verdict for o in outcomes], skipped, fail_on_drift)
    out = console()
    if skipped and status != EXIT_DRIFT:
        out.print(f"{skipped} selected run(s) not evaluated (skipped above): exit status {status}")
    if not fail_on_drift:
        return status
    for o in outcomes:
        if o.drift_verdict == "class mix only":
            out.print(Text(f"{o.name}: class mix only (production's mix of predicted classes moved, nothing else "
                           "the drift features see) does not count as drift"))
        elif o.drift_verdict.startswith("unknown"):
            out.print(Text(f"{o.name}: drift {o.drift_verdict}; not measured, so it does not count"))
    drifted = [f"{o.name} ({o.drift_verdict})" for o in outcomes if calls_for_retraining(o.drift_verdict)]
    if drifted:
        also = f"; {skipped} selected run(s) not evaluated (skipped above)" if skipped else ""
        out.print(Text(f"drift beyond slight in {', '.join(drifted)}: exit status {EXIT_DRIFT} (--fail-on-drift)"
                       f"{also}"))
    return status


def report(args: argparse.Namespace) -> int:
    """Write the study's tables and figures for a sweep from MLflow."""
    _write_report(load_spec(args.spec), args.tracking_uri, args.out)
    return 0


def prepare(args: argparse.Namespace) -> int:
    """Align and cache a spec's data (and production data) ahead of a sweep, then summarise what was found."""
    from trainers.data.dataset import prepare_data

    spec = load_spec(args.spec)
    datasets = datasets_to_prepare(spec)
    check_prepare_folders([cfg for _, cfg, _ in datasets])
    out = console()
    for title, cfg, size in datasets:
        data = prepare_data(cfg, size, refresh=args.refresh)
        out.print(f"{title}: {cfg.source} at {size} px, align {cfg.align}")
        out.print(data_table(data))
        for line in data_lines(cfg, data):
            out.print(line)
        if title == "data" and data.report.balance:    # production images are not trained on
            out.print(balance_table(data.report.balance))
    return 0


def predict(args: argparse.Namespace) -> int:
    """Label photo files (or every file in folders) with the champion, or --model: a table and a CSV."""
    from orchestrator.render import prediction_table
    from orchestrator.results.serving import (existing_store, load_shipped, model_classes, photo_files,
                                              predict_files, shipped_model, write_predictions)
    from trainers.progress import progress

    spec_path, paths = _spec_and_paths(args.spec, args.paths)
    promote = None if args.model else load_spec(spec_path).promote     # --model needs no spec
    client = existing_store(args.tracking_uri)
    files = photo_files(paths)
    shipped = shipped_model(client, args.model, promote)
    model = load_shipped(client, shipped)
    classes = model_classes(model)
    rows = list(progress(predict_files(model, files, classes), len(files), "labelling photos"))
    write_predictions(rows, Path(args.out), classes)
    out = console()
    out.print(prediction_table(rows, classes))
    failed = sum(1 for row in rows if row["error"])
    no_face = sum(1 for row in rows if row["face_found"] is False)
    out.print(Text(f"{len(rows)} file(s) read, model {shipped.label}: {len(rows) - failed} labelled ({no_face} of "
                   f"them with no face found, labelled from the centre crop), {failed} not usable (see the error "
                   f"column); wrote {args.out}"))
    return 1 if failed else 0


def _spec_and_paths(spec: str, paths: list[str]) -> tuple[str, list[str]]:
    """The parser reads `predict a.jpg b.jpg` as spec a.jpg (a first argument that is not YAML is a photo),
    and `predict my.yaml` as the default spec and photo my.yaml (a spec with no photo after it)."""
    if spec == DEFAULT_SPEC and len(paths) == 1 and paths[0].endswith((".yaml", ".yml")):
        raise ConfigError("predict", "", f"no photo given after the spec {paths[0]}: python -m orchestrator "
                                         "predict [SPEC] PATH... (photo files or folders)")
    if spec.endswith((".yaml", ".yml")):
        return spec, paths
    return DEFAULT_SPEC, [spec, *paths]


def serve(args: argparse.Namespace) -> int:
    """Serve the champion (or --model) with `mlflow models serve`: POST base64 photos to /invocations."""
    from orchestrator.results.serving import exec_server, existing_store, serve_command, shipped_model

    promote = None if args.model else load_spec(args.spec).promote     # --model needs no spec
    client = existing_store(args.tracking_uri)
    shipped = shipped_model(client, args.model, promote)
    print(f"serving {shipped.label} on http://{args.host}:{args.port}/invocations (Ctrl-C stops it)\n"
          f"  POST {{\"inputs\": [\"<base64 of a JPEG or PNG>\", ...]}} as application/json; see the README",
          flush=True)
    exec_server(serve_command(shipped, args.host, args.port), client.tracking_uri)
    return 0        # not reached: this process is now the server
