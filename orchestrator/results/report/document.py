"""The whole report: its header, every group's section in spec order, the best model, the production run
and the mitigation experiments evaluated in production, written to report.md beside its CSVs and figures
and logged to the parent run."""
from __future__ import annotations

import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.results.report.cells import Cell, Trial
from orchestrator.results.report.champion import best_model_section, production_section
from orchestrator.results.report.data_section import data_section
from orchestrator.results.report.groups import experiment_section, other_groups_section
from orchestrator.results.report.mitigation_section import mitigation_sections
from orchestrator.results.report.store import MlflowClient, SweepRuns
from orchestrator.results.runs import not_run_error
from orchestrator.results.report.tables import Report
from orchestrator.sweep.spec import SweepSpec
from trainers.process.side_files import STORE_DIR

REPORTS_DIR = STORE_DIR / "reports"
ONE_SEED_WARNING = ("**One seed per trial.** The intervals below are over test images: they say how much a "
                    "number could move with other test images of the same data, not with another seed; "
                    "differences below the run-to-run noise cannot be read from a single seed. List several "
                    "under `seeds:` to get intervals over seeds.")


def header(report: Report, spec: SweepSpec, uri: str, parent_run_id: str, trials: list[Trial]) -> None:
    """Title, description, where the numbers come from, the trials' tally and how to read the cells."""
    counts = Counter(t.status for t in trials)
    tally = " · ".join(f"{n} {status}" for status, n in counts.most_common()) or "none"
    report.text(f"# {spec.name}: report")
    if spec.description.strip():
        report.text(spec.description.strip())
    report.text(f"From MLflow `{uri}`, experiment `{spec.name}`, parent run `{parent_run_id}`; written "
                f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Trials: {tally}.")
    report.text("Numbers are percentages with one decimal (losses: raw, three decimals); a study value is "
                "shown beside ours as `· study 99.0`; per-class \"accuracy\" is recall, as in the study. "
                "Each table's CSV holds the same numbers unrounded and the run ids behind them.")
    report.text("Δ F1: the difference to the experiment's `compare_to` point, with its 95% interval; ≈: it holds 0.")
    if report.replicated:
        report.text("Cells over several seeds show the mean ± the half-width of the 95% t-interval; "
                    "n is the number of finished seeds.")
    else:
        report.text(f"> {ONE_SEED_WARNING}")


def write_report(spec: SweepSpec, client: MlflowClient, out_dir: Path | str | None = None, log: bool = True) -> Path:
    """Write <out_dir>/report.md with its CSVs and figures from the sweep's MLflow runs; log them to the parent
    (unless log is False: a store this process cannot write)."""
    out = Path(out_dir) if out_dir is not None else REPORTS_DIR / spec.name
    with tempfile.TemporaryDirectory() as scratch:
        store = SweepRuns(client, spec.name, Path(scratch))
        parent_run_id = store.parent_run_id()
        if parent_run_id is None:
            raise not_run_error(spec, client.tracking_uri)
        trials = store.trials(parent_run_id)
        sizes = Counter(t.replicate_key() for t in trials if t.finished)
        out.mkdir(parents=True, exist_ok=True)
        report = Report(out, replicated=any(n > 1 for n in sizes.values()))
        header(report, spec, store.uri, parent_run_id, trials)
        champion = store.champion_source_run(spec.promote.name, spec.promote.alias)
        data_section(report, store, trials, champion)
        plan = spec.plan
        for exp in spec.experiments:
            experiment_section(report, store, spec, plan, exp, trials)
        other_groups_section(report, spec, trials)
        best = best_model_section(report, spec, trials)
        production_section(report, store, spec, champion)
        mitigation_sections(report, store, spec, plan, trials)
        path = out / "report.md"
        path.write_text("\n\n".join(report.blocks) + "\n", encoding="utf-8")
        if log:
            store.log_report(parent_run_id, [path, *report.files])
            store.log_summary(parent_run_id, *parent_summary(best))
    return path


def parent_summary(best: Cell | None) -> tuple[dict[str, float], dict[str, str]]:
    """The parent run's summary for MLflow's runs table, when there is a best configuration (Table 11's):
    its runs (tag best_run) and its mean validation and test scores (best_config_val_macro_f1, ...; a
    trial's own best_val_macro_f1 is its best epoch, another number). The trial counts are the sweep's
    (trials_<status>, logged when it ends)."""
    metrics, tags = {}, {}
    if best is not None:
        tags["best_run"] = ", ".join(t.name for t in best.finished)
        for key in ("val_macro_f1", "test_macro_f1", "test_accuracy"):
            stat = best.stat(key)
            if stat is not None:
                metrics[f"best_config_{key}"] = stat.mean
    return metrics, tags
