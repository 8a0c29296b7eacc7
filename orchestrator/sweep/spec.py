"""A sweep spec: YAML read into a frozen, fully validated SweepSpec holding its plan.

A spec is shared data settings, named model presets, one trial's defaults and
named experiments, each a grid of axes over those defaults. Its trial sections are
built by trainers.config's builder; everything is checked before anything runs,
including every trial the grids produce, in the one pass that expands the plan.
Each error is one line: ``<file>: <dotted field> <what is wrong>; <what to do>``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import math
import re
import typing
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from trainers.config import (BEST_K, MODEL_NAMES, ConfigError, DataConfig, LimitedLoader, ModelConfig, TrackingConfig,
                             TrialConfig, YAMLLimitError, build, check_seed, describe, limited_load, short_list,
                             short_repr, validate_augment, validate_data, validate_model, validate_optim,
                             validate_tracking, validate_train)
from trainers.progress import progress
from orchestrator.sweep.plan import TrialBuilder, grid, grid_points, resolve_trial, trial_point, unique_trials
from orchestrator.sweep.spec_types import (ALL_RUNS, CHAMPION_RUNS, MAX_TRIALS_PER_GPU, Defaults, ExecutionSpec,
                                           Experiment, PlannedTrial, PromoteSpec, SearchSpec, SweepSpec)

TOP_KEYS = ("name", "description", "data", "production", "models", "defaults", "experiments",
            "seeds", "search", "promote", "execution", "tracking")
# What a spec's tracking section sets; the rest of a trial's tracking (store, experiment, parent run, tags)
# is the orchestrator's.
SPEC_TRACKING_KEYS = ("log_model", "best_k")
EXPERIMENT_KEYS = ("title", "grid", "set", "reference", "compare_to")
AXIS_ALIASES = {"optimizer": "optim.name", "lr": "optim.lr", "epochs": "train.epochs", "seed": "train.seed"}
SEARCH_METHODS = ("grid", "tpe")
PROMOTE_METRICS = ("val_macro_f1", "test_macro_f1", "val_accuracy", "test_accuracy")
SWEEP_NAME = re.compile(r"[a-z0-9_-]+")
GROUP_NAME = re.compile(r"[A-Za-z0-9_-]+")
# MLflow aliases: letters, digits, _ and -; "latest" and "v<digits>" are reserved.
ALIAS_NAME = re.compile(r"(?!latest$)(?!v\d+$)[A-Za-z0-9_-]+")
# MLflow registered model names: no / or :, not "." and not starting with ".." (MLflow reads those as paths).
REGISTERED_NAME = re.compile(r"(?!\.$)(?!\.\.)[^/:]+")
# YAML 1.1 (PyYAML) reads 1e-3 as a string; YAML 1.2 and every user read it as a number.
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class SpecError(ConfigError):
    """A sweep spec is invalid; ``field`` is the dotted spec field, the one-line message names the file too."""


# --- reading YAML ---------------------------------------------------------------------

class DuplicateKeyError(yaml.YAMLError):
    """A mapping key appears twice; ``path`` is its dotted name."""

    def __init__(self, path: str, mark: yaml.Mark):
        super().__init__(path)
        self.path, self.mark = path, mark


class SpecLoader(LimitedLoader):
    """The config's loader (safe, no alias bombs), but a key given twice is an error and 1e-3 is a float."""

    def construct_document(self, node):
        _reject_duplicate_keys(node, "", set())
        return super().construct_document(node)


SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789."))


def parse_yaml(text: str):
    """Parse one YAML document with SpecLoader (safe: plain data only, no Python objects)."""
    return limited_load(text, SpecLoader)


def _reject_duplicate_keys(node: yaml.Node, path: str, seen: set[int]) -> None:
    if id(node) in seen:          # an alias points back at a node already walked
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, f"{path}[{i}]", seen)
    elif isinstance(node, yaml.MappingNode):
        keys: set[tuple[str, str]] = set()
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":
                continue
            name = key.value if isinstance(key, yaml.ScalarNode) else "<complex key>"
            child = f"{path}.{name}" if path else name
            if (key.tag, name) in keys:
                raise DuplicateKeyError(child, key.start_mark)
            keys.add((key.tag, name))
            _reject_duplicate_keys(value, child, seen)


def load_spec(path: str | Path) -> SweepSpec:
    """Read a sweep spec file, validate it completely and expand its plan."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(source, "", "file not found") from None
    except UnicodeDecodeError:
        raise SpecError(source, "", "is not UTF-8 text") from None
    except OSError as err:
        raise SpecError(source, "", f"cannot be read ({err.strerror})") from None
    try:
        raw = parse_yaml(text)
    except DuplicateKeyError as err:
        raise SpecError(source, err.path, f"is given twice ({_at(err.mark)}); "
                                          "each key may appear once, rename or remove one") from None
    except YAMLLimitError as err:
        raise SpecError(source, "", f"is refused {_yaml_problem(err)}") from None
    except yaml.YAMLError as err:
        raise SpecError(source, "", f"not valid YAML {_yaml_problem(err)}") from None
    return spec_from_dict(raw, source)


def _at(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"at {_at(mark)}: {problem}" if mark else f"({problem})"


# --- validating -----------------------------------------------------------------------

def spec_from_dict(raw: dict, source: str = "spec") -> SweepSpec:
    """Validate a parsed spec and expand its plan; every error names ``source`` and the dotted field."""
    if not isinstance(raw, dict):
        _fail(source, "the top level", f"must be a mapping with name, data, experiments ...; got {describe(raw)}")
    raw = copy.deepcopy(raw)
    _reject_unknown(raw, TOP_KEYS, "", source, "top-level key")
    name = _parse_name(raw.get("name"), source)
    description = raw.get("description") or ""
    if not isinstance(description, str):
        _fail(source, "description", f"must be text, got {describe(description)}")
    data = _parse_data(raw.get("data"), "data", source)
    written = raw.get("production")
    # evaluate says which runs `production` covers; the rest of the section is a data section.
    evaluate = written.pop("evaluate", None) if isinstance(written, dict) else None
    production = None if written is None else _parse_production(written, source)
    models = _parse_models(raw.get("models"), source)
    search = _parse_search(raw.get("search"), models, source)
    experiments = _parse_experiments(raw.get("experiments"), models, source)
    production_evaluate = _parse_evaluate(evaluate, experiments, source)
    if search.method == "grid" and not experiments:
        _fail(source, "experiments", "is required with search method grid: at least one named group with a grid")
    spec = SweepSpec(
        name=name, description=description, path=source, data=data,
        production=production, production_has_classes=isinstance(written, dict) and "classes" in written,
        models=models, defaults=_parse_defaults(raw.get("defaults"), models, source),
        experiments=experiments, seeds=_parse_seeds(raw.get("seeds", [0]), source), search=search,
        promote=_parse_promote(raw.get("promote"), models, source),
        execution=_parse_execution(raw.get("execution"), source), production_evaluate=production_evaluate,
        tracking=_parse_tracking(raw.get("tracking"), source),
    )
    _check_plan_size(spec)
    spec = dataclasses.replace(spec, plan=_plan(spec, raw))
    # After the plan: a grid value that makes no valid trial is named as such first, not as a compare_to miss.
    return dataclasses.replace(spec, experiments=tuple(
        dataclasses.replace(exp, compare_to=_reference_point(spec, exp, raw["experiments"][exp.name]))
        for exp in spec.experiments))


def _fail(source: str, field: str, why: str) -> typing.NoReturn:
    raise SpecError(source, field, why)


@contextlib.contextmanager
def _located(source: str, where: Callable[[str], str] | None = None) -> Iterator[None]:
    """A trainers.config error inside becomes a SpecError naming the spec field (``where`` maps trial fields)."""
    try:
        yield
    except SpecError:
        raise
    except ConfigError as err:
        raise SpecError(source, where(err.field) if where else err.field, err.why) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mapping(value: Any, field: str, source: str, optional: bool = False) -> dict:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        _fail(source, field, f"must be a mapping, got {describe(value)}")
    return value


def _reject_unknown(mapping: dict, allowed: tuple[str, ...], prefix: str, source: str, what: str = "key") -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            field = short_list([f"{prefix}.{key}" if prefix else str(key)])
            _fail(source, field, f"is not a known {what}; {hint}allowed: {', '.join(allowed)}")


def _reject_repeats(values: list, field: str, source: str) -> None:
    """The first value equal to an earlier one fails (1 == 1.0 == True, as Python compares); linear in the
    values, so an axis of 10^5 values is checked in milliseconds."""
    seen: set = set()
    unhashable: list = []           # lists (balance_by, split) and mappings: compared one by one
    for value in values:
        try:
            repeated = value in seen
            seen.add(value)
        except TypeError:
            repeated = value in unhashable
            unhashable.append(value)
        if repeated:
            _fail(source, field, f"lists {short_repr(value)} more than once")


def _parse_name(value: Any, source: str) -> str:
    if value is None:
        _fail(source, "name", "is required: a short id ([a-z0-9_-]+) naming the MLflow experiment and Optuna study")
    if not isinstance(value, str) or not SWEEP_NAME.fullmatch(value):
        _fail(source, "name", f"must use only a-z, 0-9, _ and -; got {describe(value)}")
    return value


def _parse_data(value: Any, section: str, source: str) -> DataConfig:
    where = _locator([("data", section)], section)
    with _located(source, where):
        data = build(DataConfig, {} if value is None else value, "data.", source)
        validate_data(data, source)
    _check_data_root(data, source, where)
    return data


def _parse_production(value: Any, source: str) -> DataConfig:
    """production without evaluate: a data section naming the production images, never trained on."""
    if value == {}:     # an empty section would silently make the default synthetic training data "production"
        _fail(source, "production", "needs a data section naming the production images besides evaluate; add "
                                    "e.g. source: imagefolder and root: <folder> (or synthetic: {variant: production})")
    # Production images are only predicted: no balance copies (nor data_n_train_balanced). The data
    # digest and the prepared cache do not depend on balance, so evaluations made before still match.
    return dataclasses.replace(_parse_data(value, "production", source), balance=False)


def _parse_evaluate(value: Any, experiments: tuple[Experiment, ...], source: str) -> tuple[str, ...]:
    """production.evaluate: which runs `production` evaluates (champion, all, experiment names); () if absent."""
    field = "production.evaluate"
    if value is None:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        _fail(source, field, f"must be a non-empty list of {CHAMPION_RUNS}, {ALL_RUNS} or experiment names, "
                             f"e.g. [{CHAMPION_RUNS}, mitigation]; got {describe(value)}")
    _reject_repeats(value, field, source)
    for name in value:
        why = run_selector_problem(name, experiments)
        if why:
            _fail(source, field, why)
    return tuple(value)


def run_selector_problem(name: str, experiments: tuple[Experiment, ...]) -> str | None:
    """Why name cannot select runs for a production evaluation (None when it can): it must be champion,
    all or one of the spec's experiments."""
    names = [exp.name for exp in experiments]
    if name in (CHAMPION_RUNS, ALL_RUNS, *names):
        return None
    close = difflib.get_close_matches(name, [CHAMPION_RUNS, ALL_RUNS, *names], n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return (f"names {short_repr(name)}, which is not {CHAMPION_RUNS}, {ALL_RUNS} or an experiment of this spec; {hint}"
            f"experiments: {', '.join(names) or 'none'}")


def _parse_models(value: Any, source: str) -> dict[str, ModelConfig]:
    models = {}
    for preset, body in _mapping(value, "models", source, optional=True).items():
        field = f"models.{preset}"
        body = _mapping(body, field, source)
        if "name" not in body:
            _fail(source, f"{field}.name", f"is required: the architecture, one of {', '.join(MODEL_NAMES)}")
        with _located(source, _locator([("model", field)], field)):
            model = build(ModelConfig, body, "model.", source)
            validate_model(model, source)
        models[str(preset)] = model
    return models


def _check_preset(value: Any, models: dict, field: str, source: str) -> None:
    if not isinstance(value, str) or value not in models:
        have = ", ".join(models) or "none are defined"
        _fail(source, field, f"must name a model preset under models ({have}); got {describe(value)}")


def _parse_defaults(value: Any, models: dict, source: str) -> Defaults:
    defaults = _mapping(value, "defaults", source, optional=True)
    if "tracking" in defaults:
        _fail(source, "defaults.tracking", "is not allowed here; put log_model and best_k in the top-level tracking "
                                           "section (the rest is set by the orchestrator)")
    if "data" in defaults:
        _fail(source, "defaults.data", "is not allowed here; put shared data settings in the top-level data section")
    if isinstance(defaults.get("train"), dict) and "seed" in defaults["train"]:
        _fail(source, "defaults.train.seed", "is set per trial from seeds; list them under seeds: [...]")
    if models and "model" not in defaults:
        _fail(source, "defaults.model", f"is required: the preset every trial starts from ({', '.join(models)})")
    if "model" in defaults:
        _check_preset(defaults["model"], models, "defaults.model", source)
    with _located(source):
        parsed = build(Defaults, defaults, "defaults.", source)
    sections = [(name, f"defaults.{name}") for name in ("optim", "train", "augment")]
    with _located(source, _locator(sections, "defaults")):
        validate_optim(parsed.optim, source)
        validate_train(parsed.train, source)
        validate_augment(parsed.augment, source)
    return parsed


def _parse_seeds(value: Any, source: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(_is_int(s) for s in value):
        _fail(source, "seeds", f"must be a non-empty list of integers, e.g. [0, 1, 2]; got {describe(value)}")
    _reject_repeats(value, "seeds", source)
    with _located(source):
        for i, seed in enumerate(value):
            check_seed(source, f"seeds[{i}]", seed)
    return tuple(value)


# --- experiments and axes -------------------------------------------------------------

def _trial_fields(cls: type = TrialConfig, prefix: str = "") -> list[str]:
    """Every dotted path into the trial config (sections and leaves), tracking excluded."""
    paths = []
    for name, tp in typing.get_type_hints(cls).items():
        if name == "tracking":
            continue
        paths.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            paths += _trial_fields(tp, f"{prefix}{name}.")
    return paths


TRIAL_FIELDS = tuple(_trial_fields())


def canonical_axis(key: str) -> str:
    """The dotted trial path an axis name stands for (aliases resolved)."""
    return AXIS_ALIASES.get(key, key)


def _axis_path(key: Any, field: str, source: str) -> str:
    if not isinstance(key, str):
        _fail(source, field, "must be a dotted trial field such as optim.lr")
    path = canonical_axis(key)
    if path.split(".")[0] == "tracking":
        _fail(source, field, "is not a grid axis: the orchestrator sets where runs are logged, and log_model / best_k "
                             "go in the spec's top-level tracking: section; remove it")
    if path != "model" and path not in TRIAL_FIELDS:
        close = difflib.get_close_matches(path, TRIAL_FIELDS + tuple(AXIS_ALIASES), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        _fail(source, field, f"is not a trial field; {hint}use a dotted path such as optim.lr, train.epochs "
                             f"or data.split_seed, model (a preset), or an alias ({', '.join(AXIS_ALIASES)})")
    return path


def _parse_experiments(value: Any, models: dict, source: str) -> tuple[Experiment, ...]:
    experiments = _mapping(value, "experiments", source, optional=True)
    return tuple(_parse_experiment(name, body, models, source) for name, body in experiments.items())


def _parse_experiment(name: Any, body: Any, models: dict, source: str) -> Experiment:
    field = f"experiments.{name}"
    if not isinstance(name, str) or not GROUP_NAME.fullmatch(name):
        _fail(source, field, "must be named with letters, digits, _ and - only")
    body = _mapping(body, field, source)
    _reject_unknown(body, EXPERIMENT_KEYS, field, source)
    title = body.get("title", name)
    if not isinstance(title, str):
        _fail(source, f"{field}.title", f"must be text, got {describe(title)}")
    if not body.get("grid"):
        _fail(source, f"{field}.grid", "is missing or empty; give at least one axis, e.g. {train.epochs: [2, 3]}")
    grid = _parse_grid(_mapping(body["grid"], f"{field}.grid", source), f"{field}.grid", models, source)
    fixed = _parse_set(_mapping(body.get("set"), f"{field}.set", source, True), f"{field}.set", models, source)
    reference = _mapping(body.get("reference"), f"{field}.reference", source, optional=True)
    return Experiment(name=name, title=title, grid=grid, set=fixed, reference=reference)


def same_value(a: Any, b: Any) -> bool:
    """A spec value against a grid or config value: numbers by value (1e-3 == 0.001), lists as tuples."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _reference_point(spec: SweepSpec, exp: Experiment, written: dict) -> dict:
    """The experiment's compare_to as canonical axis -> the grid's own value; when not given, the point of
    the sweep's defaults."""
    if written.get("compare_to") is None:
        return _defaults_point(spec, exp)
    return _parse_compare_to(written["compare_to"], exp.grid, f"experiments.{exp.name}.compare_to", spec.path)


def _parse_compare_to(value: Any, grid: dict[str, tuple], field: str, source: str) -> dict:
    """A written compare_to, checked: one value of the grid per grid axis (seed aside)."""
    axes = [axis for axis in grid if axis != "train.seed"]
    example = ", ".join(f"{axis}: {grid[axis][0]}" for axis in axes)
    if not isinstance(value, dict) or not value:
        _fail(source, field, f"must map each grid axis to one of its values, e.g. {{{example}}}; "
                             f"got {describe(value)}")
    point = {}
    for key_field, path, chosen in _axes(value, field, source, "give each axis once"):
        if path not in axes:
            why = "seeds are replicates, not a point to compare to" if path == "train.seed" else \
                f"is not an axis of this experiment's grid ({', '.join(axes)})"
            _fail(source, key_field, f"{why}; name one value per grid axis")
        found = next((v for v in grid[path] if same_value(chosen, v)), None)
        if found is None:
            _fail(source, key_field, f"is {short_repr(chosen)}, not a value of the grid's {path} "
                                     f"({short_list(grid[path])}); pick one of them")
        point[path] = found
    missing = [axis for axis in axes if axis not in point]
    if missing:
        _fail(source, field, f"must give a value for every grid axis; missing {', '.join(missing)} "
                             f"(e.g. {{{example}}})")
    return {axis: point[axis] for axis in axes}      # in grid order, however it was written


def _defaults_point(spec: SweepSpec, exp: Experiment) -> dict:
    """The grid point the sweep's defaults (with the experiment's set) land on, else the grid's first point."""
    axes = [axis for axis in exp.grid if axis != "train.seed"]
    first = {axis: exp.grid[axis][0] for axis in axes}
    try:
        cfg = resolve_trial(spec, {"train.seed": spec.seeds[0], **exp.set})
    except ConfigError:           # the set is only valid with the grid's values: no defaults point
        return first
    point = {}
    for axis in axes:
        default = exp.set.get("model", spec.defaults.model) if axis == "model" else \
            functools.reduce(getattr, axis.split("."), cfg)
        point[axis] = next((v for v in exp.grid[axis] if same_value(default, v)), None)
    return first if any(v is None for v in point.values()) else point


def _axes(mapping: dict, prefix: str, source: str, again: str) -> Iterator[tuple[str, str, Any]]:
    """(field as written, canonical trial path, value) per entry; a path given twice (say lr and optim.lr) fails."""
    seen: set[str] = set()
    for key, value in mapping.items():
        field = f"{prefix}.{key}"
        path = _axis_path(key, field, source)
        if path in seen:
            _fail(source, field, f"sets {path} again; {again}")
        seen.add(path)
        yield field, path, value


def _parse_grid(grid: dict, prefix: str, models: dict, source: str) -> dict[str, tuple]:
    axes: dict[str, tuple] = {}
    for field, path, values in _axes(grid, prefix, source, "give each field one axis"):
        if not isinstance(values, list) or not values:
            _fail(source, field, f"must be a non-empty list of values, got {describe(values)}; "
                                 "write [x] for one value, or put it under set")
        _reject_repeats(values, field, source)
        if path == "model":
            for preset in values:
                _check_preset(preset, models, field, source)
        axes[path] = tuple(values)
    return axes


def _parse_set(mapping: dict, prefix: str, models: dict, source: str) -> dict:
    fixed: dict = {}
    for field, path, value in _axes(mapping, prefix, source, "give each field once"):
        if path == "model":
            _check_preset(value, models, field, source)
        fixed[path] = value
    return fixed


# --- search, promote, execution -------------------------------------------------------

def _check_values(section: dict, prefix: str, source: str, rules: dict[str, tuple[Callable, str]]) -> None:
    """Values the builder would only call the wrong type, named with what they must be: {key: (ok, needs)}."""
    for key, (ok, needs) in rules.items():
        if key in section and not ok(section[key]):
            _fail(source, f"{prefix}.{key}", f"must be {needs}; got {describe(section[key])}")


def _parse_search(value: Any, models: dict, source: str) -> SearchSpec:
    search = _mapping(value, "search", source, optional=True)
    _check_values(search, "search", source,
                  {"method": (lambda m: m in SEARCH_METHODS, f"one of {', '.join(SEARCH_METHODS)}")})
    if search.get("method", "grid") == "tpe":
        _check_values(search, "search", source,
                      {"n_trials": (lambda n: _is_int(n) and n >= 1, "a positive integer for method tpe")})
    with _located(source):
        parsed = build(SearchSpec, search, "search.", source)
    if parsed.method == "grid":
        for key in ("n_trials", "space"):
            if key in search:
                _fail(source, f"search.{key}", "is only used with method tpe")
        return parsed
    if parsed.n_trials < 1:
        _fail(source, "search.n_trials",
              f"must be a positive integer for method tpe; got {describe(search.get('n_trials'))}")
    space = _mapping(search.get("space"), "search.space", source)
    if not space:
        _fail(source, "search.space", "must name at least one axis to search, "
                                      "e.g. {optim.lr: {low: 1.0e-5, high: 1.0e-2, log: true}}")
    axes: dict = {}
    for field, path, entry in _axes(space, "search.space", source, "give each field one axis"):
        axes[path] = _parse_space_entry(entry, path, field, models, source)
    return dataclasses.replace(parsed, space=axes)


def _parse_space_entry(entry: Any, path: str, field: str, models: dict, source: str) -> tuple | dict:
    if isinstance(entry, list) and entry:
        _reject_repeats(entry, field, source)
        if path == "model":
            for preset in entry:
                _check_preset(preset, models, field, source)
        return tuple(entry)
    if not isinstance(entry, dict) or path == "model":
        _fail(source, field, f"must be a list of choices or a range {{low, high, log}}; got {describe(entry)}")
    _reject_unknown(entry, ("low", "high", "log"), field, source)
    low, high = (_number(entry.get(end), f"{field}.{end}", source) for end in ("low", "high"))
    log = entry.get("log", False)
    if not isinstance(log, bool):
        _fail(source, f"{field}.log", f"must be true or false, got {describe(log)}")
    if not low < high:
        _fail(source, field, f"needs low < high; got low {low:g}, high {high:g}")
    if log and low <= 0:
        _fail(source, f"{field}.low", f"must be positive on a log scale; got {low:g}")
    return {"low": low, "high": high, "log": log}


def _number(value: Any, field: str, source: str) -> int | float:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            _fail(source, field, f"must be a number, got {describe(value)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(source, field, f"must be a number, got {describe(value)}")
    return value


def _parse_promote(value: Any, models: dict, source: str) -> PromoteSpec:
    promote = _mapping(value, "promote", source, optional=True)
    text = (lambda v: isinstance(v, str) and bool(v), "non-empty text")
    _check_values(promote, "promote", source, {key: text for key in ("model", "metric", "name", "alias")})
    with _located(source):
        spec = build(PromoteSpec, promote, "promote.", source)
    if spec.metric not in PROMOTE_METRICS:
        _fail(source, "promote.metric", f"must be one of {', '.join(PROMOTE_METRICS)}; got {short_repr(spec.metric)}")
    choices = dict.fromkeys([*models, *MODEL_NAMES])
    if spec.model not in choices:
        _fail(source, "promote.model",
              f"must be a model preset or architecture ({', '.join(choices)}); got {short_repr(spec.model)}")
    if not REGISTERED_NAME.fullmatch(spec.name) or not spec.name.strip():
        _fail(source, "promote.name", f"names the registered model: no / or :, not '.' or '..' (e.g. fer-vit); "
                                         f"got {short_repr(spec.name)}")
    if not ALIAS_NAME.fullmatch(spec.alias):
        _fail(source, "promote.alias",
              f"must use letters, digits, _ and - and not be 'latest' or v<n>; got {short_repr(spec.alias)}")
    return spec


def _parse_tracking(value: Any, source: str) -> TrackingConfig:
    """tracking: which trials log their model (log_model: true | false | best_k, with best_k: K)."""
    tracking = _mapping(value, "tracking", source, optional=True)
    for key in tracking:
        if key in TrackingConfig.__dataclass_fields__ and key not in SPEC_TRACKING_KEYS:
            _fail(source, f"tracking.{key}", "is set by the orchestrator (store, experiment, parent run, tags); "
                                             f"a spec sets {' and '.join(SPEC_TRACKING_KEYS)}")
    _reject_unknown(tracking, SPEC_TRACKING_KEYS, "tracking", source)
    if "best_k" in tracking and tracking.get("log_model") != BEST_K:
        _fail(source, "tracking.best_k", f"applies only with log_model: {BEST_K}; set log_model: {BEST_K} or "
                                         "remove best_k")
    with _located(source):
        parsed = build(TrackingConfig, tracking, "tracking.", source)
        validate_tracking(parsed, source)
    return parsed


def _parse_execution(value: Any, source: str) -> ExecutionSpec:
    execution = _mapping(value, "execution", source, optional=True)
    gpus = (lambda g: g is None or (isinstance(g, list) and bool(g) and all(_is_int(i) and i >= 0 for i in g)),
            "null (every visible GPU) or a list of GPU indices like [0, 1]")
    _check_values(execution, "execution", source, {
        "jobs": (lambda n: _is_int(n) and n >= 1, "an integer >= 1"),
        "max_retries": (lambda n: _is_int(n) and n >= 0, "an integer >= 0"), "gpus": gpus,
        "max_trials": (lambda n: _is_int(n) and n >= 1, "an integer >= 1"),
        "trials_per_gpu": (lambda n: _is_int(n) and 1 <= n <= MAX_TRIALS_PER_GPU,
                           f"an integer from 1 to {MAX_TRIALS_PER_GPU} (trainer slots sharing each GPU)")})
    with _located(source):
        spec = build(ExecutionSpec, execution, "execution.", source)
    if spec.gpus is not None:
        _reject_repeats(list(spec.gpus), "execution.gpus", source)
    return spec


# --- every trial the spec produces ----------------------------------------------------

def _check_plan_size(spec: SweepSpec) -> None:
    """Refuse a plan past execution.max_trials from the axes' lengths alone, before a point is built."""
    points, limit = grid_points(spec), spec.execution.max_trials
    sampled = spec.search.n_trials if spec.search.method == "tpe" else 0
    allows = f"more than execution.max_trials allows ({limit:,})"
    if points > limit:
        _fail(spec.path, "experiments", f"make {points:,} trials (grid points x seeds), {allows}; "
                                        "shrink the grids, or raise execution.max_trials to plan them all")
    if points + sampled > limit:
        _fail(spec.path, "search.n_trials", f"is {sampled:,}: with the grids' {points:,} points that makes "
                                            f"{points + sampled:,} trials, {allows}; lower it, or raise "
                                            "execution.max_trials")


def _plan(spec: SweepSpec, raw: dict) -> tuple[PlannedTrial, ...]:
    """Build every grid point's trial (naming the spec entry that fails) into the plan's unique trials."""
    builder, roots_checked, listed = TrialBuilder(spec), set(), []
    where = None      # the locator of the point being built: a failure is named after that point
    with _located(spec.path, lambda field: where(field)):
        for exp, point, seed in _with_progress(grid(spec), grid_points(spec)):
            where = _experiment_locator(exp, raw["experiments"][exp.name], point)
            cfg = builder.resolve(trial_point(exp, point, seed))
            if (cfg.data.source, cfg.data.root) not in roots_checked:     # each folder is looked at once
                _check_data_root(cfg.data, spec.path, where)
                roots_checked.add((cfg.data.source, cfg.data.root))
            listed.append((exp.name, cfg))
    if spec.search.method == "tpe":
        _check_search_space(spec, raw["search"]["space"])
    return tuple(unique_trials(listed, {exp.name: tuple(exp.grid) for exp in spec.experiments}))


# Past 1,000 grid points a plan shows its progress on stderr; below, it is done in well under a second.
PROGRESS_FROM = 1000


def _with_progress(points: Iterator[tuple], total: int) -> Iterator[tuple]:
    return progress(points, total, "planning grid points") if total > PROGRESS_FROM else points


def _check_search_space(spec: SweepSpec, written: dict) -> None:
    """Every choice and both ends of every range must make a valid trial over the defaults."""
    seed = {"train.seed": spec.seeds[0]}
    for key in written:
        path = canonical_axis(key)
        entry = spec.search.space[path]
        if isinstance(entry, dict):
            values = [(f".{end}", entry[end]) for end in ("low", "high")]
        else:
            values = [("", choice) for choice in entry]
        for suffix, value in values:
            field = f"search.space.{key}{suffix}"
            _build_trial(spec, {**seed, path: value}, _locator([(path, field)], field))


def _experiment_locator(exp: Experiment, written: dict, point: dict) -> Callable[[str], str]:
    """Name a failing field after the set or grid entry (as the user spelt it) that produced it; worked out
    only when a field fails (the plan makes one locator per grid point)."""
    def locate(field: str) -> str:
        entries = []
        for section in ("set", "grid"):
            for key in written.get(section) or {}:
                if canonical_axis(key) != "model":
                    entries.append((canonical_axis(key), f"experiments.{exp.name}.{section}.{key}"))
        values = ", ".join(f"{path}={short_repr(value)}" for path, value in point.items())
        return _locator(entries, f"experiments.{exp.name} at {values}")(field)
    return locate


def _locator(entries: list[tuple[str, str]], context: str) -> Callable[[str], str]:
    """Map a trial field to the last spec entry that covers it, else name it with ``context``."""
    def locate(field: str) -> str:
        for path, label in reversed(entries):
            if field == path or field.startswith((path + ".", path + "[")):
                return label + field[len(path):]
        return f"{field} (from {context})"
    return locate


def _build_trial(spec: SweepSpec, point: dict, where: Callable[[str], str]) -> TrialConfig:
    """resolve_trial plus the data-root check; a failure names the spec field that caused it."""
    with _located(spec.path, where):
        cfg = resolve_trial(spec, point)
    _check_data_root(cfg.data, spec.path, where)
    return cfg


def _check_data_root(data: DataConfig, source: str, where: Callable[[str], str]) -> None:
    if data.source == "synthetic":
        return
    root = Path(data.root).expanduser()
    relative = "" if root.is_absolute() else f" (relative to {Path.cwd()})"
    if not root.exists():
        _fail(source, where("data.root"), f"folder {short_repr(data.root)} does not exist{relative}; "
                                          "point it at your dataset folder")
    if not root.is_dir():
        _fail(source, where("data.root"), f"{short_repr(data.root)} is a file, not a folder{relative}")
