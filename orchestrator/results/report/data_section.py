"""The report's data section: how the data was split, and per split its images, subjects, near-duplicate
pairs with the other splits and alignment failure rate; the data's warnings; then training beside
production (alignment failures, production images that near-duplicate training ones).

Read from one finished trial's data_report.json (trials on the same data config share it; several
datasets are named by their digest) and from the newest production run's metrics."""
from __future__ import annotations

import json

from orchestrator.results.report.cells import Trial
from orchestrator.results.report.store import ProductionRun, SweepRuns
from orchestrator.results.report.tables import Report, Table
from trainers.tracking import logged_metric

DATA_REPORT = "data_report.json"
SPLITS = ("train", "val", "test")
MODE_TEXT = {
    "group": "whole subjects in one split: no subject's images sit in two splits",
    "stratified": "by class, image by image: frames of one subject may sit in two splits, and near-copies "
                  "of training images in test inflate its scores",
    "dataset": "the dataset's own split (validation carved from its train split when it has none)",
}


def data_section(report: Report, store: SweepRuns, trials: list[Trial], champion: str | None) -> None:
    """The data section, from the first finished trial of each distinct data config; beside it the production
    data of the champion's (trial run id) production evaluation."""
    reports = trial_data_reports(store, trials)
    report.text("## Data")
    if not reports:
        report.text("Data: no finished trial logged a data_report.json.")
        return
    trial, data = reports[0]
    report.text(provenance_line(trial, data, [d for _, d in reports]))
    report.text(mode_line(data.get("split_mode", "")))
    report.table(split_table(data))
    for warning in data.get("warnings", []):
        report.text(f"> **Warning:** {warning}")
    production = store.production_run(champion, any_run=True)     # the production data is the same for all
    if production is not None:
        source = source_data_report(store, production) or data
        report.text(f"Training data (digest `{source.get('digest', '?')}`) beside the production data "
                    f"(production run `{production.run_id}`):")
        report.table(production_table(source, production.metrics))


def trial_data_reports(store: SweepRuns, trials: list[Trial]) -> list[tuple[Trial, dict]]:
    """(trial, its data_report.json) for the first finished trial of each distinct data.* config and image size
    (the two settings a prepared dataset's digest depends on)."""
    firsts: dict[tuple, Trial] = {}
    for t in trials:
        if t.finished:
            key = sorted((k, v) for k, v in t.applicable_params.items()
                         if k.startswith("data.") or k == "model.image_size")
            firsts.setdefault(tuple(key), t)
    out = []
    for t in firsts.values():
        path = store.download(t.run_id, DATA_REPORT)
        if path is not None:
            out.append((t, json.loads(path.read_text(encoding="utf-8"))))
    return out


def source_data_report(store: SweepRuns, production: ProductionRun) -> dict | None:
    """The data_report.json of the trial the production run's model came from, if it is still there."""
    run_id = production.tags.get("source_run_id")
    path = store.download(run_id, DATA_REPORT) if run_id else None
    return None if path is None else json.loads(path.read_text(encoding="utf-8"))


def provenance_line(trial: Trial, shown: dict, all_reports: list[dict]) -> str:
    """Which run the numbers come from, and whether the sweep's trials trained on one dataset or several."""
    digests = list(dict.fromkeys(d.get("digest", "?") for d in all_reports))
    here = f"trial `{trial.name}`, data digest `{shown.get('digest', '?')}`"
    if len(digests) == 1:
        return f"Every finished trial trained on the same data; counts from {here}."
    return (f"The finished trials trained on {len(digests)} prepared datasets (digests {', '.join(digests)}: "
            f"a digest changes with the data settings and the image size); shown: {here}.")


def mode_line(mode: str) -> str:
    """'Split mode: group (whole subjects in one split ...).'"""
    if not mode:
        return "Split mode: not recorded (the trials predate `data_split_mode`)."
    return f"Split mode: **{mode}** ({MODE_TEXT.get(mode, 'unknown mode')})."


def split_pairs(duplicates: dict[str, int]) -> dict[str, int]:
    """Near-duplicate pairs with another split, per split ({'train-test': 2} counts for train and test)."""
    out = dict.fromkeys(SPLITS, 0)
    for key, n in duplicates.items():
        for split in key.split("-"):
            out[split] = out.get(split, 0) + n
    return out


def split_table(data: dict) -> Table:
    """Per split: images, distinct subjects, near-duplicate pairs with other splits, alignment failure rate."""
    table = Table("data_splits", ["split", "images", "subjects", "near-duplicate pairs with other splits",
                                  "alignment failure rate"])
    images = {s: sum(c.values()) for s, c in data.get("per_split", {}).items()}
    subjects, failures = data.get("subjects"), data.get("split_align_failures")
    if subjects is not None and not any(subjects.values()):
        subjects = None         # the dataset names no subject: unknown, not zero
    pairs = split_pairs(data.get("duplicates", {}))
    for split in SPLITS:
        n = images.get(split, 0)
        rate = None if failures is None else failures.get(split, 0) / max(n, 1)
        record = {"split": split, "images": n, "subjects": None if subjects is None else subjects.get(split, 0),
                  "duplicate_pairs": pairs[split], "align_failure_rate": None if rate is None else 100 * rate}
        table.records.append({k: "" if v is None else v for k, v in record.items()})
        table.rows.append([split, str(n), "—" if subjects is None else str(record["subjects"]),
                           str(pairs[split]), percent(rate)])
    duplicates = ", ".join(f"{k} {v}" for k, v in data.get("duplicates", {}).items()) or "none"
    removed = data.get("duplicates_removed", 0)
    table.rows.append(["pairs by split pair", "", "", duplicates + (f"; {removed} removed" if removed else ""), ""])
    return table


def production_table(training: dict, metrics: dict[str, float]) -> Table:
    """Training beside production: images, alignment failure rate, near-duplicates of training images."""
    table = Table("data_production", ["measure", "training", "production"])
    train_rate = training.get("align_failures", 0) / max(training.get("usable", 0), 1)
    prod_rate = metrics.get("production_align_failure_rate")
    prod_images = logged_metric(metrics, "data_usable")
    table.rows.append(["images", str(training.get("usable", "—")), "—" if prod_images is None else f"{prod_images:.0f}"])
    table.rows.append(["alignment failure rate", percent(train_rate), percent(prod_rate)])
    pairs = metrics.get("production_duplicates_train")
    images = metrics.get("production_duplicates_train_images")
    shown = "—" if pairs is None else f"{pairs:.0f} pairs" + ("" if images is None else f" ({images:.0f} images)")
    table.rows.append(["near-duplicates of the training split", "", shown])
    table.records = [{"metric": "images", "training": training.get("usable", ""),
                      "production": "" if prod_images is None else prod_images},
                     {"metric": "align_failure_rate", "training": 100 * train_rate,
                      "production": "" if prod_rate is None else 100 * prod_rate},
                     {"metric": "production_duplicates_train", "training": "", "production": "" if pairs is None
                      else pairs},
                     {"metric": "production_duplicates_train_images", "training": "",
                      "production": "" if images is None else images}]
    return table


def percent(rate: float | None) -> str:
    """'3.0%', or '—' when unknown."""
    return "—" if rate is None else f"{100 * rate:.1f}%"
