"""Which runs a production evaluation covers, each evaluated once per production data.

Selectors (`production --runs`, or the spec's production.evaluate): `champion` (the run behind the
registry alias), `all` (every finished trial run of the sweep) or an experiment name: the finished trial
runs whose config_hash the spec's plan lists in that experiment (so a run trained before the experiment
was added to the spec counts, though its groups tag predates it), and those whose groups tag names it.
The champion is one more source run: when a group holds the same run it is evaluated once, as the
champion (through the registry). A run is evaluated once per (source run, production data digest): a
FINISHED run in <sweep>-production with the same source_run_id and data_digest tags and an evaluated_as
tag means it was evaluated before, and its logged numbers stand. One made before evaluated_as existed
lacks the intervals and production_predictions.csv.gz, so it is evaluated once more.

production_steps is the one path the CLI and the tests take; a run whose model cannot be loaded is
skipped with a line saying why, and the others are still evaluated.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from orchestrator.results.drift import EXIT_DRIFT, drift_exit_status
from orchestrator.results.production import (Candidate, ModelUnavailable, PreparedCache, ProductionError,
                                             evaluate_run, require_champion)
from orchestrator.results.production_tables import Outcome, ProductionResult
from orchestrator.results.registry import champion_version, find_version, source_run_id
from orchestrator.results.runs import child_runs, groups_of, search_all, sweep_command
from orchestrator.sweep.spec import SweepSpec, run_selector_problem
from orchestrator.sweep.spec_types import ALL_RUNS, CHAMPION_RUNS
from trainers.errors import first_line

RUN = "run"     # evaluated_as of a run picked by experiment or `all`
EXIT_NOT_EVALUATED = 1      # some selected run could not be evaluated (EXIT_DRIFT takes precedence)


@dataclass(frozen=True)
class Skipped:
    """A selected run that cannot be evaluated, and why; it makes the exit status 1."""
    name: str
    why: str

    def __str__(self) -> str:
        return f"{self.name} skipped: {self.why}"


@dataclass(frozen=True)
class Progress:
    """An evaluation about to start: the index-th of the total selected runs."""
    index: int
    total: int
    name: str
    model_label: str

    def __str__(self) -> str:
        label = f" ({self.model_label})" if self.model_label else ""
        return f"evaluating {self.index}/{self.total}: {self.name}{label} ..."


# What production_steps yields: a note (a selector that found nothing), a skipped run, progress, an outcome.
Step = str | Skipped | Progress | Outcome


def production_steps(spec: SweepSpec, client: MlflowClient, asked: Sequence[str] = ()) -> Iterator[Step]:
    """Evaluate the runs asked for (champion, all, experiment names), else the spec's production.evaluate,
    else the champion, each once per production data; yields notes, skipped runs, progress and an Outcome
    per run evaluated (found or new), in order. ProductionError when nothing can be evaluated."""
    selectors = check_selectors(spec, list(asked) or list(spec.production_evaluate) or [CHAMPION_RUNS])
    # Only the spec's list may name a champion that does not exist yet: the rest is still worth evaluating.
    candidates, notes = select_candidates(spec, client, selectors, lenient=not asked and bool(spec.production_evaluate))
    yield from notes
    if not candidates:
        raise ProductionError(nothing_to_evaluate(spec, notes))
    yield from evaluate_candidates(spec, client, candidates)


def evaluate_production(spec: SweepSpec, client: MlflowClient, asked: Sequence[str] = ()) -> list[Outcome]:
    """production_steps' Outcomes: every selected run evaluated, found or new."""
    return [step for step in production_steps(spec, client, asked) if isinstance(step, Outcome)]


def production_exit_status(verdicts: list[str], skipped: int, fail_on_drift: bool) -> int:
    """EXIT_DRIFT with fail_on_drift when an evaluated run's drift verdict calls for retraining; else
    EXIT_NOT_EVALUATED when some selected run was skipped; else 0. Drift wins: it is what a scheduler acts
    on, and the skipped lines already say which runs were missed."""
    status = drift_exit_status(verdicts, fail_on_drift)
    if status == EXIT_DRIFT or not skipped:
        return status
    return EXIT_NOT_EVALUATED


def check_selectors(spec: SweepSpec, selectors: list[str]) -> tuple[str, ...]:
    """The selectors, each champion, all or an experiment of the spec; an error naming the bad one."""
    for name in selectors:
        why = run_selector_problem(name, spec.experiments)
        if why:
            raise ProductionError(f"--runs {why} (in {spec.path})")
    return tuple(dict.fromkeys(selectors))


def select_candidates(spec: SweepSpec, client: MlflowClient, selectors: tuple[str, ...],
                      lenient: bool = False) -> tuple[list[Candidate], list[str | Skipped]]:
    """The runs the selectors name, each once and in the order named, and a note per selector that found
    nothing or run that cannot be evaluated. No champion is an error, or with lenient (the spec's list)
    a note, and the rest still run."""
    champion = champion_version(client, spec.promote)
    champion_run = None if champion is None else source_run_id(champion)
    chosen: dict[str, Candidate] = {}
    notes: list[str | Skipped] = []
    finished = None
    for selector in selectors:
        if selector == CHAMPION_RUNS:
            if champion is None and not lenient:
                require_champion(client, spec)          # raises the error that says to promote first
            found = no_champion_note(spec) if champion is None else champion_candidate(client, spec, champion)
            if isinstance(found, Candidate):
                chosen.setdefault(champion_run, found)
            else:
                notes.append(found)
            continue
        if finished is None:
            finished = child_runs(client, spec.name, status="finished")
        runs = finished if selector == ALL_RUNS else runs_of_experiment(spec, finished, selector)
        if not runs:
            where = "" if selector == ALL_RUNS else f" in experiment '{selector}'"
            notes.append(f"no finished run of sweep '{spec.name}'{where} (run "
                         f"`{sweep_command(spec, client.tracking_uri)}` first)")
        for run in runs:
            if run.info.run_id not in chosen:
                chosen[run.info.run_id] = run_candidate(client, spec, run, champion_run, champion)
    return _loadable(list(chosen.values()), notes)


def no_champion_note(spec: SweepSpec) -> str:
    """The note for a listed champion that does not exist yet."""
    return (f"champion skipped: registered model '{spec.promote.name}' has no {spec.promote.alias} yet; "
            "run `make promote` to get one")


def champion_candidate(client: MlflowClient, spec: SweepSpec, champion: ModelVersion) -> Candidate | Skipped:
    """The run behind the champion alias, or why it cannot be read (deleted, in another store)."""
    run_id = source_run_id(champion)
    try:
        run = client.get_run(run_id)
    except (MlflowException, OSError) as err:
        return Skipped(f"{CHAMPION_RUNS} {champion.name} v{champion.version}",
                       f"cannot read its run {run_id} ({first_line(err)})")
    return Candidate(run, CHAMPION_RUNS, trial_groups(spec, run), champion)


def runs_of_experiment(spec: SweepSpec, finished: list[Run], experiment: str) -> list[Run]:
    """The finished runs the plan puts in the experiment (by config_hash), or whose groups tag names it."""
    planned = {t.hash for t in spec.plan if experiment in t.groups}
    return [r for r in finished if r.data.tags.get("config_hash") in planned or experiment in groups_of(r)]


def trial_groups(spec: SweepSpec, run: Run) -> str:
    """The run's experiments, comma-separated: the plan's for its config_hash (what the spec says now), else
    its groups tag (a run the plan no longer holds, or a search without a grid)."""
    config_hash = run.data.tags.get("config_hash")
    planned = next((t.groups for t in spec.plan if t.hash == config_hash), None)
    return ",".join(planned) if planned else run.data.tags.get("groups", "")


def run_candidate(client: MlflowClient, spec: SweepSpec, run: Run, champion_run: str | None,
                  champion: ModelVersion | None) -> Candidate:
    """A run picked by experiment or `all`: the champion when it is the run behind the alias (so it is
    loaded and tagged as such), else a run with its registered version if it has one."""
    if run.info.run_id == champion_run:
        return Candidate(run, CHAMPION_RUNS, trial_groups(spec, run), champion)
    return Candidate(run, RUN, trial_groups(spec, run), find_version(client, spec.promote.name, run.info.run_id))


def _loadable(candidates: list[Candidate], notes: list[str | Skipped]) -> tuple[list[Candidate], list[str | Skipped]]:
    """The candidates whose model can be loaded; a Skipped for each run that logged none."""
    def loadable(c: Candidate) -> bool:
        return c.version is not None or bool(c.run.data.tags.get("model_id"))
    notes += [Skipped(c.name, "its run logged no model (tracking.log_model was off, or best_k and it was not among "
                              "the best)")
              for c in candidates if not loadable(c)]
    return [c for c in candidates if loadable(c)], notes


def earlier_evaluations(client: MlflowClient, sweep: str) -> dict[tuple[str, str], Run]:
    """(source run id, production data digest) -> the newest FINISHED run in <sweep>-production that has an
    evaluated_as tag (one without it predates the intervals and the predictions artifact): one search for
    every candidate."""
    experiment = client.get_experiment_by_name(f"{sweep}-production")
    if experiment is None:
        return {}
    found: dict[tuple[str, str], Run] = {}
    query = "tags.role = 'production' and attributes.status = 'FINISHED'"
    for run in search_all(client, [experiment.experiment_id], query, order_by=["attributes.start_time DESC"]):
        tags = run.data.tags
        if tags.get("evaluated_as") and tags.get("source_run_id"):
            found.setdefault((tags["source_run_id"], tags.get("data_digest", "")), run)
    return found


def evaluate_candidates(spec: SweepSpec, client: MlflowClient,
                        candidates: list[Candidate]) -> Iterator[Progress | Skipped | Outcome]:
    """Evaluate each candidate not evaluated before on this production data: yields Progress before each
    evaluation, then its Outcome, or a Skipped when its model cannot be loaded; the Outcome of one found."""
    cache = PreparedCache(spec, client)
    earlier = earlier_evaluations(client, spec.name)
    for i, candidate in enumerate(candidates, 1):
        _, data = cache.production(candidate.run)
        before = earlier.get((candidate.run.info.run_id, data.digest))
        if before is not None:
            yield outcome_of_run(candidate, before)
            continue
        yield Progress(i, len(candidates), candidate.name, candidate.model_label)
        try:
            result = evaluate_run(client, spec, candidate, cache)
        except ModelUnavailable as err:
            yield Skipped(candidate.name, str(err))
            continue
        yield outcome_of_result(candidate, result)


def outcome_of_result(candidate: Candidate, result: ProductionResult) -> Outcome:
    """The Outcome of an evaluation made now."""
    return _outcome(candidate, result.run_id, result.metrics, result.drift_verdict, result)


def outcome_of_run(candidate: Candidate, run: Run) -> Outcome:
    """The Outcome of an evaluation found in <sweep>-production, its numbers read from the run."""
    verdict = run.data.tags.get("drift_verdict", "unknown: the run has no drift_verdict tag")
    return _outcome(candidate, run.info.run_id, run.data.metrics, verdict)


def _outcome(candidate: Candidate, run_id: str, metrics: dict[str, float], verdict: str,
             result: ProductionResult | None = None) -> Outcome:
    source = candidate.run.data
    return Outcome(name=candidate.name, model_label=candidate.model_label, groups=candidate.groups, run_id=run_id,
                   test_f1=source.metrics.get("test_macro_f1"), production_f1=metrics.get("production_macro_f1"),
                   production_f1_ci=(metrics.get("production_macro_f1_ci_low"),
                                     metrics.get("production_macro_f1_ci_high")),
                   drift_verdict=verdict, result=result)


def nothing_to_evaluate(spec: SweepSpec, notes: list[str | Skipped]) -> str:
    """The one-line error when no selected run can be evaluated, with why."""
    return f"nothing to evaluate for sweep '{spec.name}': {'; '.join(map(str, notes))}"
