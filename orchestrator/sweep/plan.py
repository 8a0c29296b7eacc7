"""The plan: a sweep spec expanded into unique trials, and a rough estimate of what they cost.

Every experiment's grid points, repeated per seed, resolve to typed trial
configs; trials with the same config hash run once and remember every group
they belong to (the study's ViT / Adam / 1e-3 / 3-epoch run is in three tables).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

from trainers.config import (HASHED_SECTIONS, NAME_SEPARATOR, NAMED_SECTIONS, SECTION_VALIDATORS, ConfigError, DataConfig, ModelConfig,
                             TrialConfig, ViTArchConfig, hash_of_pieces, hash_piece, join_name_parts, leading_parts,
                             name_from_parts, section_name_parts, validate, with_value)
from trainers.data.sources import IMAGE_SUFFIXES
from orchestrator.sweep.spec_types import Experiment, PlannedTrial, SweepSpec

# Forward multiply-adds of ResNet-50 at 224x224 (torchvision's published 4.09 GMACs); they scale with pixels.
RESNET50_MACS_224 = 4.09e9
# Rough sustained throughputs: fp32 on a few CPU cores; bf16 on one A100/H100-class GPU, well below peak.
CPU_FLOPS = 50e9
GPU_FLOPS = 100e12
TRIAL_OVERHEAD_S = 20          # process start, imports, model build, MLflow logging


def experiment_points(exp: Experiment) -> list[dict]:
    """The grid's points as {axis: value} dicts, the first axis varying slowest."""
    axes = list(exp.grid)
    return [dict(zip(axes, values)) for values in itertools.product(*exp.grid.values())]


def resolve_trial(spec: SweepSpec, point: dict) -> TrialConfig:
    """The validated trial at ``point``: the spec's typed sections with the point's dotted values applied."""
    # point maps dotted paths (aliases resolved) to values, applied in order; the plan
    # passes the seed, then the experiment's set, then the grid values. "model" names a preset.
    preset = point.get("model", spec.defaults.model)
    cfg = TrialConfig(data=spec.data, model=ModelConfig() if preset is None else spec.models[preset],
                      optim=spec.defaults.optim, train=spec.defaults.train, augment=spec.defaults.augment)
    for path, value in point.items():
        if path != "model":
            cfg = with_value(cfg, path, value, spec.path)
    validate(cfg, spec.path)
    return cfg


class TrialBuilder:
    """resolve_trial for the many points of one spec, each distinct section built and validated once.

    A point's value for optim.lr changes only the optim section, and each section is valid or not by
    itself. So each step (a section, then one value applied to it) is taken once and remembered, and each
    section that comes out is validated once: the 10^4 points of a 100 x 10 x 10 grid of
    lr x batch_size x epochs (and the seed) take 211 steps and validate ~200 sections, where resolving
    each point took 4 x 10^4 steps and 5 x 10^4 section validations. Steps are keyed by the identity of
    the section and of the value (both kept here, so no id is reused), never by equality, which would
    take 1 for 1.0 or True, or 0.0 for -0.0. A point that fails anywhere is resolved again by
    resolve_trial, so its error is the one resolve_trial gives (values in the order applied, then the
    sections' validation in SECTION_VALIDATORS order)."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.bases = {"data": spec.data, "model": ModelConfig(), "optim": spec.defaults.optim,
                      "train": spec.defaults.train, "augment": spec.defaults.augment}
        self.steps: dict[tuple[int, str, int], tuple[Any, Any, Any]] = {}   # -> (result, section, value)
        self.valid: dict[int, Any] = {}                                     # id -> the validated section

    def resolve(self, point: dict) -> TrialConfig:
        """resolve_trial(spec, point), its sections shared with the points resolved before."""
        preset = point.get("model", self.spec.defaults.model)
        sections = dict(self.bases)
        if preset is not None:
            sections["model"] = self.spec.models[preset]
        try:
            for path, value in point.items():
                if path == "model":                 # the preset, taken above
                    continue
                head = path.partition(".")[0]
                if head not in sections:            # not a trial section: resolve_trial names the field
                    return resolve_trial(self.spec, point)
                known = self.steps.get((id(sections[head]), path, id(value)))
                sections[head] = known[0] if known else self._step(head, sections[head], path, value)
            for head, section in sections.items():
                if id(section) not in self.valid:
                    SECTION_VALIDATORS[head](section, self.spec.path)
                    self.valid[id(section)] = section
        except ConfigError:
            return resolve_trial(self.spec, point)      # raises the error resolve_trial gives
        return TrialConfig(**sections)

    def _step(self, head: str, section: Any, path: str, value: Any) -> Any:
        """The section with the dotted path set to value (with_value), remembered under both identities."""
        cfg = with_value(TrialConfig(**{head: section}), path, value, self.spec.path)
        self.steps[(id(section), path, id(value))] = (getattr(cfg, head), section, value)
        return getattr(cfg, head)


def default_trial(spec: SweepSpec) -> TrialConfig:
    """The trial of no grid point: the defaults with the first seed (TPE samples start from it)."""
    return resolve_trial(spec, {"train.seed": spec.seeds[0]})


def trial_point(exp: Experiment, point: dict, seed: int) -> dict:
    """What resolve_trial applies for one grid point: the seed, then the experiment's set, then the point."""
    return {"train.seed": seed, **exp.set, **point}


def grid(spec: SweepSpec) -> Iterator[tuple[Experiment, dict, int]]:
    """Every (experiment, grid point, seed) in plan order."""
    # Seeds are the outer loop, so a whole first replicate comes before the next.
    # TPE trials are not here: the ledger samples them at run time.
    for seed in spec.seeds:
        for exp in spec.experiments:
            for point in experiment_points(exp):
                yield exp, point, seed


def unique_trials(listed: Iterable[tuple[str, TrialConfig]],
                  axes: dict[str, tuple[str, ...]] | None = None) -> list[PlannedTrial]:
    """(group, config) pairs deduplicated by config hash, in first-seen order, each with every group.
    axes: each group's grid axes, whose name parts lead its trials' names (see _unique_names)."""
    found: dict[str, tuple[list[str], TrialConfig]] = {}
    hash_of = _config_hasher()
    for group, cfg in listed:
        groups, _ = found.setdefault(hash_of(cfg), ([], cfg))
        if group not in groups:
            groups.append(group)
    names = _unique_names(found, axes or {})
    return [PlannedTrial(hash=h, name=names[h], groups=tuple(groups), config=cfg)
            for h, (groups, cfg) in found.items()]


def _config_hasher() -> Callable[[TrialConfig], str]:
    """config_hash, each section's piece (hash_piece) worked out once per section object: the trials of a
    plan share their sections (TrialBuilder), so 10^4 trials need a few hundred pieces, not 5 x 10^4."""
    pieces = _section_memo(hash_piece)
    return lambda cfg: hash_of_pieces([pieces(name, getattr(cfg, name)) for name in HASHED_SECTIONS])


def _section_memo(work: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """work(section name, section), done once per section object. Keyed by identity, not equality (which
    takes 0.0 for -0.0), and each section is kept, so its id is not reused while the memo lives."""
    done: dict[int, tuple[Any, Any]] = {}      # id -> (the result, the section)

    def memo(name: str, section: Any) -> Any:
        known = done.get(id(section))
        if known is None:
            known = done[id(section)] = (work(name, section), section)
        return known[0]
    return memo


def _unique_names(found: dict[str, tuple[list[str], TrialConfig]],
                  axes: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Readable names that lead with what varies: the parts the trial's first group varies, then the other
    parts that vary across the plan, then the rest (trial_name). MLflow's runs table shows ~16 characters
    of a name, so ep2·adam·1e-3·vit·s0 and ep4·... differ where it shows them. Where two trials share a
    name (they differ elsewhere), a short hash is appended."""
    grid_axes = tuple(dict.fromkeys(a for group_axes in axes.values() for a in group_axes))
    pieces = _section_memo(lambda name, section: section_name_parts(name, section, grid_axes))
    parts = {h: join_name_parts({name: pieces(name, getattr(cfg, name)) for name in NAMED_SECTIONS}, grid_axes)
             for h, (_, cfg) in found.items()}      # name_parts, from parts worked out once per section
    keys = dict.fromkeys(k for p in parts.values() for k in p)        # every part, in the standing order
    varying = tuple(k for k in keys if len({p.get(k) for p in parts.values()}) > 1)
    # A group's own axes lead, then what varies; one order per group, not per trial.
    first = {group: tuple(dict.fromkeys(leading_parts(group_axes) + varying)) for group, group_axes in axes.items()}
    names = {h: name_from_parts(parts[h], first.get(groups[0], varying)) for h, (groups, _) in found.items()}
    counts = Counter(names.values())
    return {h: name if counts[name] == 1 else f"{name}{NAME_SEPARATOR}{h[:6]}" for h, name in names.items()}


def grid_points(spec: SweepSpec) -> int:
    """How many (grid point, seed) pairs the spec lists before deduplication."""
    per_seed = sum(math.prod(len(values) for values in exp.grid.values()) for exp in spec.experiments)
    return per_seed * len(spec.seeds)


def datasets_to_prepare(spec: SweepSpec) -> list[tuple[str, DataConfig, int]]:
    """Each distinct (data, input size) the plan trains on, then the production data at those sizes."""
    out = []
    for t in spec.plan:
        entry = ("data", t.config.data, t.config.model.image_size)
        if entry not in out:
            out.append(entry)
    if spec.production is not None:
        production = spec.production
        if out and not spec.production_has_classes:    # production is evaluated on the model's classes
            production = dataclasses.replace(production, classes=out[0][1].classes)
        for size in sorted({size for _, _, size in out}):
            out.append(("production", production, size))
    return out


# --- cost ---------------------------------------------------------------------------

def estimate_cost(spec: SweepSpec) -> dict:
    """Total epochs, image-epochs and a rough serial CPU / GPU time of the plan, with the assumptions stated."""
    configs = [t.config for t in spec.plan]
    tpe_trials = spec.search.n_trials if spec.search.method == "tpe" else 0
    if tpe_trials:   # each sampled trial is costed like the defaults trial
        configs += [default_trial(spec)] * tpe_trials
    images = _image_counts(configs)
    known = None not in images
    flop = sum(trial_flop(cfg, n) for cfg, n in zip(configs, images)) if known else None
    overhead_h = len(configs) * TRIAL_OVERHEAD_S / 3600
    image_epochs = sum(n * c.data.split[0] * c.train.epochs for c, n in zip(configs, images)) if known else None
    return {
        "trials": len(spec.plan),
        "tpe_trials": tpe_trials,
        "epochs": sum(cfg.train.epochs for cfg in configs),
        "image_epochs": round(image_epochs) if known else None,
        "flop": flop,
        "cpu_hours": flop / CPU_FLOPS / 3600 + overhead_h if known else None,
        "gpu_hours": flop / GPU_FLOPS / 3600 + overhead_h if known else None,
        "assumptions": _assumptions(tpe_trials, known),
    }


def _assumptions(tpe_trials: int, known: bool) -> list[str]:
    notes = [
        "image-epochs = images × train ratio × epochs, before class balancing adds augmented copies",
        "training ≈ 3 × forward FLOPs (forward + backward); validation each epoch and one test pass add forward FLOPs",
        "a pretrained ViT is costed as ViT-B/16; ResNet-50 as 4.09 GMACs at 224 px, scaled by pixels",
        f"CPU {CPU_FLOPS / 1e9:.0f} GFLOP/s (fp32, a few cores), GPU {GPU_FLOPS / 1e12:.0f} TFLOP/s "
        f"(bf16, A100/H100 class), plus {TRIAL_OVERHEAD_S} s start-up per trial",
        "times are serial: divide by the number of GPUs or CPU jobs; trials packed on one GPU "
        "(execution.trials_per_gpu) share its FLOP/s, so packing brings small trials nearer this rate, no further",
    ]
    if tpe_trials:
        notes.append(f"the {tpe_trials} TPE trials are costed like the defaults trial")
    if not known:
        notes.append("image counts are known only for the synthetic and imagefolder sources")
    return notes


def _image_counts(configs: list[TrialConfig]) -> list[int | None]:
    """count_images of each config's data, counted once per distinct data section."""
    counts: dict[DataConfig, int | None] = {}
    # The plan's trials share a few data section objects: looked up by identity, 10^4 trials skip hashing
    # a DataConfig (~3 us each) 10^4 times. configs holds every section, so no id is reused meanwhile.
    by_id: dict[int, int | None] = {}
    for cfg in configs:
        if id(cfg.data) not in by_id:
            if cfg.data not in counts:
                counts[cfg.data] = count_images(cfg.data)
            by_id[id(cfg.data)] = counts[cfg.data]
    return [by_id[id(cfg.data)] for cfg in configs]


def count_images(data: DataConfig) -> int | None:
    """How many images the source holds: synthetic n_images, image files under an imagefolder root, else None."""
    if data.source == "synthetic":
        return data.synthetic.n_images
    if data.source != "imagefolder" or not data.root:
        return None
    return sum(1 for _, _, files in os.walk(data.root) for f in files if f.lower().endswith(IMAGE_SUFFIXES))


def trial_flop(cfg: TrialConfig, images: int) -> float:
    """FLOPs of one trial: train 3× forward per image-epoch, validation each epoch, one test pass."""
    train, val, test = (images * ratio for ratio in cfg.data.split)
    forward = forward_flop(cfg.model)
    return forward * (cfg.train.epochs * (3 * train + val) + test)


def forward_flop(model: ModelConfig) -> float:
    """Forward FLOPs for one image (2 per multiply-add)."""
    if model.name == "resnet50":
        return 2 * RESNET50_MACS_224 * (model.image_size / 224) ** 2
    arch = model.vit if model.pretrained is None else ViTArchConfig()
    patches = (model.image_size // arch.patch_size) ** 2
    tokens = patches + 1
    h, i = arch.hidden_size, arch.intermediate_size
    # per layer: q, k, v, out projections (4h²) and the MLP (2hi) per token, plus attention scores and mix (2·t²·h)
    per_layer = tokens * (4 * h * h + 2 * h * i) + 2 * tokens * tokens * h
    embed = patches * 3 * arch.patch_size ** 2 * h
    return 2 * (arch.num_hidden_layers * per_layer + embed)
