"""Which runs answer which grid point: the plan gives every point's trials (their config hashes),
each child run carries its trial's `config_hash` tag, so a point's cell is the runs with its hashes.

An axis value is read from the planned trial's TrialConfig (cfg.optim.lr), a `model` axis by the
model its preset resolves to; a `train.seed` axis, like the spec's seeds, only adds replicates.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from dataclasses import dataclass, field

from orchestrator.results.report.tables import Stat, summarize, value_text
from orchestrator.sweep.plan import PlannedTrial, experiment_points, resolve_trial
from orchestrator.sweep.spec import Experiment, SweepSpec, same_value
from trainers.config import PRECISIONS_AS_BEFORE, ModelConfig, TrialConfig, applicable_params, inapplicable_params

# Params that say where or how a trial ran, not what it computed (config_hash leaves them out too);
# runs that differ only in these and the seed are replicates of one configuration.
NOT_RESULT_PARAMS = {"train.seed", "train.device", "train.checkpoint_dir", "train.num_threads", "data.cache_dir"}
# Params at a default added after runs were logged (older runs lack them): not a difference between runs.
DEFAULT_ONLY_PARAMS = {("train.deterministic", "False"), *(("train.precision", p) for p in PRECISIONS_AS_BEFORE)}


@dataclass(frozen=True)
class Trial:
    """One child run, as the report needs it."""
    run_id: str
    name: str
    status: str                   # finished | diverged | failed | pruned | running | duplicate (a seed run again)
    groups: tuple[str, ...]
    config_hash: str              # the planned trial it ran ("" for a run without the tag)
    params: dict[str, str]
    metrics: dict[str, float]
    data_digest: str = ""         # the prepared data it trained and was tested on ("" if not logged)

    @property
    def seed(self) -> str:
        return self.params.get("train.seed", "")

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def classes(self) -> list[str]:
        return [c for c in self.params.get("data.classes", "").split(",") if c]

    @property
    def applicable_params(self) -> dict[str, str]:
        """Its params without those that cannot apply to it, which runs logged before they were left out
        still have: old and new runs of one configuration compare equal."""
        dropped = inapplicable_params(self.params)
        return {k: v for k, v in self.params.items() if k not in dropped}

    def replicate_key(self) -> frozenset:
        """What the run computed, seed aside: runs with equal keys are replicates of one configuration."""
        return frozenset((k, v) for k, v in self.applicable_params.items()
                         if k not in NOT_RESULT_PARAMS and (k, v) not in DEFAULT_ONLY_PARAMS)


def without_duplicate_seeds(trials: list[Trial]) -> list[Trial]:
    """The runs (oldest first), each finished run that a newer finished run of the same config hash and seed
    supersedes marked 'duplicate': a trial run twice (its ledger lost, its worker taken for dead) is one
    seed, not two, and the newer run stands."""
    def key(trial: Trial) -> tuple:
        return trial.config_hash or trial.replicate_key(), trial.seed

    newest = {key(t): t.run_id for t in trials if t.finished}
    return [t if not t.finished or newest[key(t)] == t.run_id else dataclasses.replace(t, status="duplicate")
            for t in trials]


def stat_of(trials: list[Trial], metric: str) -> Stat | None:
    """Mean ± t over the runs' values; one run's value carries its logged bootstrap interval
    (<metric>_ci_low / _ci_high, logged for test accuracy and macro F1) when it has one. When every run
    logged the metric as NaN (undefined: a class without images), a Stat with a NaN mean, shown 'n/a'."""
    values = [t.metrics.get(metric) for t in trials]
    stat = summarize(values)
    if stat is None and values and all(v is not None and not math.isfinite(v) for v in values):
        return Stat(math.nan, None, len(values))
    if stat is None or stat.n > 1 or len(trials) != 1:
        return stat
    low, high = (trials[0].metrics.get(f"{metric}_ci_{end}") for end in ("low", "high"))
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return stat
    return dataclasses.replace(stat, low=low, high=high)


def status_text(trials: list[Trial], counted: bool = False) -> str:
    """Why there is no number: 'diverged' (one kind), '2 failed, 1 diverged' (or when counted), 'not run'."""
    counts = Counter(t.status for t in trials if not t.finished)
    if not counts:
        return "not run"
    if len(counts) == 1 and not counted:
        return next(iter(counts))
    return ", ".join(f"{n} {status}" for status, n in counts.most_common())


@dataclass
class Cell:
    """One grid point of a group (or one configuration) and its runs, over seeds and retries."""
    point: tuple
    config: TrialConfig | None = None     # the point's planned trial (its first seed)
    trials: list[Trial] = field(default_factory=list)

    @property
    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.finished]

    def stat(self, metric: str) -> Stat | None:
        return stat_of(self.finished, metric)

    def run_ids(self) -> str:
        return ";".join(t.run_id for t in self.finished)

    def n_text(self) -> str:
        """'3', or '2, 1 diverged' when some of the point's runs did not finish."""
        others = [t for t in self.trials if not t.finished]
        return f"{len(self.finished)}" + (f", {status_text(others)}" if others else "")


class MappingValue(tuple):
    """A mapping on an axis (e.g. model.vit: {patch_size: 4}) as a hashable point value: its (key, value) items."""

    def __str__(self) -> str:
        return "{" + ", ".join(f"{k}: {v}" for k, v in self) + "}"


def frozen(value):
    """An axis value made hashable, so a grid point can key a dict: lists as tuples, mappings as MappingValue."""
    if isinstance(value, (list, tuple)) and not isinstance(value, MappingValue):
        return tuple(frozen(v) for v in value)
    if isinstance(value, dict):
        return MappingValue((k, frozen(v)) for k, v in value.items())
    return value


def axes_of(exp: Experiment) -> list[str]:
    """The grid's axes; seeds are replicates, not an axis of any table."""
    return [axis for axis in exp.grid if axis != "train.seed"]


def label(exp: Experiment, point: tuple) -> str:
    """A point's row label: its value on a one-axis grid, else 'axis=value, ...'."""
    axes = axes_of(exp)
    if len(axes) == 1:
        return value_text(point[0])
    return ", ".join(f"{a}={value_text(v)}" for a, v in zip(axes, point)) or "all"


def preset_model(spec: SweepSpec, preset: str, fixed: dict | None = None) -> ModelConfig:
    """The model a preset resolves to in the plan (with the spec's defaults and an experiment's `set`)."""
    return resolve_trial(spec, {**(fixed or {}), "model": preset}).model


def point_of(cfg: TrialConfig, exp: Experiment, presets: dict[str, ModelConfig]) -> tuple:
    """The grid point a planned trial of the group stands for, read from its config."""
    values = []
    for axis in axes_of(exp):
        choices = exp.grid[axis]
        if axis == "model":
            found = next((p for p in choices if presets[p] == cfg.model), None)
        else:
            value = functools.reduce(getattr, axis.split("."), cfg)
            found = next((c for c in choices if matches(value, c)), None)
        values.append(frozen(found))
    return tuple(values)


def matches(value, choice) -> bool:
    """A config value against a grid value; a mapping (model.vit: {patch_size: 4}) matches the fields it names."""
    if isinstance(choice, dict):
        return all(matches(getattr(value, k, None), v) for k, v in choice.items())
    return same_value(value, choice)


def group_cells(spec: SweepSpec, plan: list[PlannedTrial], exp: Experiment,
                trials: list[Trial]) -> tuple[list[Cell], list[Trial]]:
    """The group's grid points in spec order, each with its runs; and the group's runs that match none."""
    axes = axes_of(exp)
    cells: dict[tuple, Cell] = {}
    for point in experiment_points(exp):
        key = tuple(frozen(point[a]) for a in axes)
        cells.setdefault(key, Cell(key))
    presets = {p: preset_model(spec, p, exp.set) for p in exp.grid.get("model", ())}
    by_hash: dict[str, Cell] = {}
    for planned in (t for t in plan if exp.name in t.groups):
        cell = cells.get(point_of(planned.config, exp, presets))
        if cell is not None:          # None: a preset the plan resolved differently (an edge of `set`)
            cell.config = cell.config or planned.config
            by_hash[planned.hash] = cell
    # A run belongs to a point by its config hash, whatever its groups tag says: a trial that finished before
    # the experiment was added to the spec (the shared baseline) keeps the groups it was run with.
    stray = []
    for trial in trials:
        if trial.config_hash in by_hash:
            by_hash[trial.config_hash].trials.append(trial)
        elif exp.name in trial.groups:
            stray.append(trial)
    return list(cells.values()), stray


def runs_of_model(spec: SweepSpec, model: str, trials: list[Trial]) -> list[Trial]:
    """The runs of a preset (as the plan resolves it, when the spec defines it) or of an architecture."""
    if model not in spec.models:
        return [t for t in trials if t.params.get("model.name") == model]
    cfg = resolve_trial(spec, {"model": model})
    logged = {k: v for k, v in applicable_params(cfg).items() if k.startswith("model.")}
    return [t for t in trials if all(t.params.get(k) == v for k, v in logged.items())]


def configurations(trials: list[Trial]) -> list[Cell]:
    """The runs grouped by what they computed (replicates over seeds together, a seed's duplicates not counted),
    first run first."""
    found: dict[frozenset, Cell] = {}
    for trial in without_duplicate_seeds(trials):
        found.setdefault(trial.replicate_key(), Cell(())).trials.append(trial)
    return list(found.values())


def best_configuration(configs: list[Cell], metric: str) -> Cell | None:
    """The configuration with the highest mean metric over its finished seeds (the first of equals), or None.

    Table 11 and `promote` both choose with it, so the report's best model is the one promoted."""
    scored = [(c.stat(metric).mean, c) for c in configs if c.stat(metric) and math.isfinite(c.stat(metric).mean)]
    return max(scored, key=lambda s: s[0])[1] if scored else None
