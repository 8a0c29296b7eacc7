"""The typed sweep spec: frozen dataclasses that spec.py builds from YAML and plan.py expands.

Trial sections (data, models, defaults' optim, train and augment) are the trial config's own
dataclasses, built by trainers.config's builder; only what a spec adds is defined here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trainers.config import (AugmentConfig, DataConfig, ModelConfig, OptimConfig, TrackingConfig, TrainConfig,
                             TrialConfig)

# What production.evaluate (and `production --runs`) may name besides an experiment: the registry's
# champion, or every finished trial run of the sweep.
CHAMPION_RUNS, ALL_RUNS = "champion", "all"

@dataclass(frozen=True)
class Defaults:
    """What every trial starts from; a section given in part keeps the dataclass defaults for the rest."""
    model: str | None = None      # a preset under models; None: the trial config's default model
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()


@dataclass(frozen=True)
class SearchSpec:
    method: str = "grid"
    n_trials: int = 0             # tpe only: how many trials the sampler proposes
    space: dict = dataclasses.field(default_factory=dict)   # axis -> tuple of choices or {low, high, log}


@dataclass(frozen=True)
class PromoteSpec:
    model: str = "vit"            # a model preset or architecture name; only those runs compete
    metric: str = "val_macro_f1"
    name: str = "fer-vit"         # registered model name
    alias: str = "champion"


# The most trainer slots execution.trials_per_gpu may put on one GPU: 64 processes hold ~32 GB of CUDA
# contexts alone (~0.5 GB each), a quarter of an H200's memory.
MAX_TRIALS_PER_GPU = 64


@dataclass(frozen=True)
class ExecutionSpec:
    jobs: int = 1                 # parallel trials (CPU) or slots when no GPU list is given
    gpus: tuple[int, ...] | None = None   # None: every visible GPU, else these indices
    # Trainer slots per GPU, each a process pinned to the same card with a 1/N share of its memory: small
    # trials (the demo's) leave an H100/H200 mostly idle, so N of them run side by side. Ignored on CPU.
    trials_per_gpu: int = 1
    max_retries: int = 2
    # The most trials (grid points x seeds, plus TPE's n_trials) a spec may plan; a larger plan is refused
    # from the axes' lengths, before a point is built. 10^4 trials plan in seconds (tests/test_plan_scale.py)
    # and take ~55 h of start-up alone (20 s each); 10^6 would take minutes and gigabytes just to plan.
    max_trials: int = 10_000


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    grid: dict[str, tuple]        # canonical dotted axis (aliases resolved) -> values, in spec order
    set: dict                     # canonical dotted path -> one value, applied before the grid
    reference: dict               # the study's reported numbers, free form
    # The grid point the report's differences are taken against: canonical axis -> the grid's own value
    # (seed aside). load_spec fills it: the spec's compare_to, else the point of the sweep's defaults.
    compare_to: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class PlannedTrial:
    hash: str                     # config_hash(config): the trial's identity across sweeps and workers
    name: str                     # readable, unique within the plan
    groups: tuple[str, ...]       # every experiment that lists this trial, in spec order
    config: TrialConfig


@dataclass(frozen=True)
class SweepSpec:
    name: str
    description: str
    path: str
    data: DataConfig
    production: DataConfig | None
    production_has_classes: bool  # production.classes given; else production takes the model's classes
    models: dict[str, ModelConfig]
    defaults: Defaults
    experiments: tuple[Experiment, ...]
    seeds: tuple[int, ...]
    search: SearchSpec
    promote: PromoteSpec
    execution: ExecutionSpec
    # production.evaluate: champion, all or experiment names; () evaluates the champion alone.
    production_evaluate: tuple[str, ...] = ()
    plan: tuple[PlannedTrial, ...] = ()   # the grid's unique trials, expanded once when the spec is loaded
    # The spec's tracking section: log_model and best_k, as every trial of the sweep runs with them.
    tracking: TrackingConfig = TrackingConfig()
