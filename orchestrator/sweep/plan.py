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
from typing import Iterable, Iterator

from trainers.config import (NAME_SEPARATOR, DataConfig, ModelConfig, TrialConfig, ViTArchConfig, config_hash,
                             leading_parts, name_parts, trial_name, validate, with_value)
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
    for group, cfg in listed:
        groups, _ = found.setdefault(config_hash(cfg), ([], cfg))
        if group not in groups:
            groups.append(group)
    names = _unique_names(found, axes or {})
    return [PlannedTrial(hash=h, name=names[h], groups=tuple(groups), config=cfg)
            for h, (groups, cfg) in found.items()]


def _unique_names(found: dict[str, tuple[list[str], TrialConfig]],
                  axes: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Readable names that lead with what varies: the parts the trial's first group varies, then the other
    parts that vary across the plan, then the rest (trial_name). MLflow's runs table shows ~16 characters
    of a name, so ep2·adam·1e-3·vit·s0 and ep4·... differ where it shows them. Where two trials share a
    name (they differ elsewhere), a short hash is appended."""
    grid_axes = tuple(dict.fromkeys(a for group_axes in axes.values() for a in group_axes))
    parts = [name_parts(cfg, grid_axes) for _, cfg in found.values()]
    keys = dict.fromkeys(k for p in parts for k in p)        # every part, in the standing order
    varying = tuple(k for k in keys if len({p.get(k) for p in parts}) > 1)
    names = {}
    for h, (groups, cfg) in found.items():
        own = leading_parts(axes.get(groups[0], ()))
        names[h] = trial_name(cfg, tuple(dict.fromkeys(own + varying)), grid_axes)
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
    counts = {data: count_images(data) for data in {cfg.data for cfg in configs}}
    known = all(counts[cfg.data] is not None for cfg in configs)
    flop = sum(trial_flop(cfg, counts[cfg.data]) for cfg in configs) if known else None
    overhead_h = len(configs) * TRIAL_OVERHEAD_S / 3600
    image_epochs = sum(counts[c.data] * c.data.split[0] * c.train.epochs for c in configs) if known else None
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
        "times are serial: divide by the number of parallel slots (GPUs or jobs)",
    ]
    if tpe_trials:
        notes.append(f"the {tpe_trials} TPE trials are costed like the defaults trial")
    if not known:
        notes.append("image counts are known only for the synthetic and imagefolder sources")
    return notes


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
