"""Which runs a production evaluation covers, each evaluated once per production data.

Selectors (`production --runs`, or the spec's production.evaluate): `champion` (the run behind the
registry alias), `all` (every finished trial run of the sweep) or an experiment name (its finished
runs, by their groups tag). The champion is one more source run: when a group holds the same run it is
evaluated once, as the champion (through the registry). A run is evaluated once per (source run,
production data digest): a FINISHED run in <sweep>-production with the same source_run_id and
data_digest tags means it was evaluated before, and its logged numbers stand.
"""
from __future__ import annotations

from collections.abc import Iterator

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.entities.model_registry import ModelVersion

from orchestrator.results.production import (Candidate, PreparedCache, ProductionError, evaluate_run,
                                             require_champion)
from orchestrator.results.production_tables import Outcome, ProductionResult
from orchestrator.results.registry import champion_version, find_version
from orchestrator.results.runs import child_runs, groups_of
from orchestrator.sweep.spec import SweepSpec, run_selector_problem
from orchestrator.sweep.spec_types import ALL_RUNS, CHAMPION_RUNS

RUN = "run"     # evaluated_as of a run picked by experiment or `all`


def check_selectors(spec: SweepSpec, selectors: list[str]) -> tuple[str, ...]:
    """The selectors, each champion, all or an experiment of the spec; an error naming the bad one."""
    for name in selectors:
        why = run_selector_problem(name, spec.experiments)
        if why:
            raise ProductionError(f"--runs {why} (in {spec.path})")
    return tuple(dict.fromkeys(selectors))


def select_candidates(spec: SweepSpec, client: MlflowClient, selectors: tuple[str, ...],
                      lenient: bool = False) -> tuple[list[Candidate], list[str]]:
    """The runs the selectors name, each once and in the order named, and a note per selector that found
    nothing. No champion is an error, or with lenient (the spec's list) a note, and the rest still run."""
    champion = champion_version(client, spec.promote)
    champion_run = None if champion is None else champion.tags.get("source_run_id") or champion.run_id
    chosen: dict[str, Candidate] = {}
    notes, finished = [], None
    for selector in selectors:
        if selector == CHAMPION_RUNS:
            if champion is None and not lenient:
                require_champion(client, spec)          # raises the error that says to promote first
            if champion is None:
                notes.append(f"champion skipped: registered model '{spec.promote.name}' has no "
                             f"{spec.promote.alias} yet; run `make promote` to get one")
                continue
            chosen[champion_run] = Candidate(client.get_run(champion_run), CHAMPION_RUNS, champion)
            continue
        if finished is None:
            finished = child_runs(client, spec.name, status="finished")
        runs = finished if selector == ALL_RUNS else [r for r in finished if selector in groups_of(r)]
        if not runs:
            where = "" if selector == ALL_RUNS else f" in experiment '{selector}'"
            notes.append(f"no finished run of sweep '{spec.name}'{where} (run `make sweep` first)")
        for run in runs:
            if run.info.run_id not in chosen:
                chosen[run.info.run_id] = run_candidate(client, spec, run, champion_run, champion)
    return _loadable(list(chosen.values()), notes)


def run_candidate(client: MlflowClient, spec: SweepSpec, run: Run, champion_run: str | None,
                  champion: ModelVersion | None) -> Candidate:
    """A run picked by experiment or `all`: the champion when it is the run behind the alias (so it is
    loaded and tagged as such), else a run with its registered version if it has one."""
    if run.info.run_id == champion_run:
        return Candidate(run, CHAMPION_RUNS, champion)
    return Candidate(run, RUN, find_version(client, spec.promote.name, run.info.run_id))


def _loadable(candidates: list[Candidate], notes: list[str]) -> tuple[list[Candidate], list[str]]:
    """The candidates whose model can be loaded; a note for each run that logged none."""
    def loadable(c: Candidate) -> bool:
        return c.version is not None or bool(c.run.data.tags.get("model_id"))
    notes += [f"{c.name} skipped: its run logged no model (tracking.log_model was off)"
              for c in candidates if not loadable(c)]
    return [c for c in candidates if loadable(c)], notes


def earlier_evaluation(client: MlflowClient, sweep: str, source_run_id: str, digest: str) -> Run | None:
    """The newest FINISHED run in <sweep>-production of this source run on this production data, if any."""
    experiment = client.get_experiment_by_name(f"{sweep}-production")
    if experiment is None:
        return None
    query = (f"tags.role = 'production' and tags.source_run_id = '{source_run_id}' and "
             f"tags.data_digest = '{digest}' and attributes.status = 'FINISHED'")
    found = client.search_runs([experiment.experiment_id], filter_string=query, run_view_type=ViewType.ACTIVE_ONLY,
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def evaluate_candidates(spec: SweepSpec, client: MlflowClient, candidates: list[Candidate]) -> Iterator[str | Outcome]:
    """Evaluate each candidate not evaluated before on this production data: yields a progress line
    before each evaluation and an Outcome for every candidate (found or new), in order."""
    cache = PreparedCache(spec, client)
    for i, candidate in enumerate(candidates, 1):
        _, data = cache.production(candidate.run)
        before = earlier_evaluation(client, spec.name, candidate.run.info.run_id, data.digest)
        if before is not None:
            yield outcome_of_run(candidate, before)
            continue
        model = f" ({candidate.model})" if candidate.model else ""
        yield f"evaluating {i}/{len(candidates)}: {candidate.name}{model} ..."
        yield outcome_of_result(candidate, evaluate_run(client, spec, candidate, cache))


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
    return Outcome(name=candidate.name, model=candidate.model, groups=source.tags.get("groups", ""), run_id=run_id,
                   test_f1=source.metrics.get("test_macro_f1"), production_f1=metrics.get("production_macro_f1"),
                   production_f1_ci=(metrics.get("production_macro_f1_ci_low"),
                                     metrics.get("production_macro_f1_ci_high")),
                   drift_verdict=verdict, result=result)


def evaluate_production(spec: SweepSpec, client: MlflowClient,
                        selectors: tuple[str, ...] = (CHAMPION_RUNS,)) -> list[Outcome]:
    """Evaluate the selected runs on spec.production (by default the champion), each once per production
    data: one run each in <sweep>-production; the Outcome of every selected run, found or new."""
    candidates, notes = select_candidates(spec, client, check_selectors(spec, list(selectors)))
    if not candidates:
        raise ProductionError(nothing_to_evaluate(spec, notes))
    return [step for step in evaluate_candidates(spec, client, candidates) if isinstance(step, Outcome)]


def nothing_to_evaluate(spec: SweepSpec, notes: list[str]) -> str:
    """The one-line error when no selected run can be evaluated, with why."""
    return f"nothing to evaluate for sweep '{spec.name}': {'; '.join(notes)}"
