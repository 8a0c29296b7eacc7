"""The plan: a sweep spec expanded into unique trials, and a rough estimate of what they cost.

Every experiment's grid points, repeated per seed, resolve to plain trial
dicts; trials with the same config hash run once and remember every group
they belong to (the study's ViT / Adam / 1e-3 / 3-epoch run is in three tables).
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainers.config import (DataConfig, ModelConfig, TrialConfig, ViTArchConfig, config_hash, from_dict, merge,
                             trial_name)
from trainers.data.sources import IMAGE_SUFFIXES

if TYPE_CHECKING:   # spec.py imports this module at run time, to validate every point it plans
    from orchestrator.sweep.spec import Experiment, SweepSpec

# Forward multiply-adds of ResNet-50 at 224x224 (torchvision's published 4.09 GMACs); they scale with pixels.
RESNET50_MACS_224 = 4.09e9
# Rough sustained throughputs: fp32 on a few CPU cores; bf16 on one A100/H100-class GPU, well below peak.
CPU_FLOPS = 50e9
GPU_FLOPS = 100e12
TRIAL_OVERHEAD_S = 20          # process start, imports, model build, MLflow logging


@dataclass(frozen=True)
class PlannedTrial:
    hash: str                     # config_hash(config): the trial's identity across sweeps and workers
    name: str                     # readable, unique within the plan
    groups: tuple[str, ...]       # every experiment that lists this trial, in spec order
    config: TrialConfig
    raw: dict                     # the resolved plain dict that built config


def experiment_points(exp: Experiment) -> list[dict]:
    """The grid's points as {axis: value} dicts, the first axis varying slowest."""
    axes = list(exp.grid)
    return [dict(zip(axes, values)) for values in itertools.product(*exp.grid.values())]


def resolve_trial(spec: SweepSpec, point: dict) -> dict:
    """defaults ⊕ point over spec.data and the chosen model preset: the plain dict for from_dict."""
    # point maps dotted paths (aliases resolved) to values, applied in order; expand
    # passes the seed, then the experiment's set, then the grid values. "model" names a preset.
    preset = point.get("model", spec.defaults.get("model"))
    raw: dict = {"data": spec.data}
    if preset is not None:
        raw["model"] = spec.models[preset]
    raw = merge(raw, {k: v for k, v in spec.defaults.items() if k != "model"})
    for path, value in point.items():
        if path != "model":
            raw = merge(raw, _nested(path, value))
    return copy.deepcopy(raw)


def _nested(path: str, value) -> dict:
    head, _, rest = path.partition(".")
    return {head: _nested(rest, value) if rest else value}


def trial_point(exp: Experiment, point: dict, seed: int) -> dict:
    """What resolve_trial applies for one grid point: the seed, then the experiment's set, then the point."""
    return {"train.seed": seed, **exp.set, **point}


def expand(spec: SweepSpec) -> list[PlannedTrial]:
    """All groups' grid points × seeds, deduplicated by config hash, in a stable order."""
    # Seeds are the outer loop, so a whole first replicate comes before the next.
    # TPE trials are not here: the ledger samples them at run time.
    found: dict[str, tuple[list[str], TrialConfig, dict]] = {}
    for seed in spec.seeds:
        for exp in spec.experiments:
            for point in experiment_points(exp):
                raw = resolve_trial(spec, trial_point(exp, point, seed))
                cfg = from_dict(raw, spec.path)
                groups, _, _ = found.setdefault(config_hash(cfg), ([], cfg, raw))
                if exp.name not in groups:
                    groups.append(exp.name)
    names = _unique_names({h: cfg for h, (_, cfg, _) in found.items()})
    return [PlannedTrial(hash=h, name=names[h], groups=tuple(groups), config=cfg, raw=raw)
            for h, (groups, cfg, raw) in found.items()]


def _unique_names(configs: dict[str, TrialConfig]) -> dict[str, str]:
    """Readable names; where two trials share one (they differ elsewhere), append a short hash."""
    names = {h: trial_name(cfg) for h, cfg in configs.items()}
    counts = Counter(names.values())
    return {h: name if counts[name] == 1 else f"{name}-{h[:6]}" for h, name in names.items()}


def grid_points(spec: SweepSpec) -> int:
    """How many (grid point, seed) pairs the spec lists before deduplication."""
    per_seed = sum(math.prod(len(values) for values in exp.grid.values()) for exp in spec.experiments)
    return per_seed * len(spec.seeds)


def datasets_to_prepare(spec: SweepSpec, trials: list[PlannedTrial]) -> list[tuple[str, DataConfig, int]]:
    """Each distinct (data, input size) the trials train on, then the production data at those sizes."""
    from trainers.config import from_dict, to_dict

    seen, out = set(), []
    for t in trials:
        key = (json.dumps(to_dict(t.config.data), sort_keys=True), t.config.model.image_size)
        if key not in seen:
            seen.add(key)
            out.append(("data", t.config.data, t.config.model.image_size))
    if spec.production is not None:
        classes = out[0][1].classes if out else None
        raw = spec.production if "classes" in spec.production or classes is None else \
            {**spec.production, "classes": list(classes)}    # production is evaluated on the model's classes
        production_cfg = from_dict({"data": raw}, spec.path).data
        for size in sorted({size for _, _, size in out}):
            out.append(("production", production_cfg, size))
    return out


# --- cost ---------------------------------------------------------------------------

def estimate_cost(spec: SweepSpec, trials: list[PlannedTrial]) -> dict:
    """Total epochs, image-epochs and a rough serial CPU / GPU time, with the assumptions stated."""
    configs = [t.config for t in trials]
    tpe_trials = spec.search.n_trials if spec.search.method == "tpe" else 0
    if tpe_trials:   # each sampled trial is costed like the defaults trial
        base = from_dict(resolve_trial(spec, {"train.seed": spec.seeds[0]}), spec.path)
        configs += [base] * tpe_trials
    counts = {data: count_images(data) for data in {cfg.data for cfg in configs}}
    known = all(counts[cfg.data] is not None for cfg in configs)
    flop = sum(trial_flop(cfg, counts[cfg.data]) for cfg in configs) if known else None
    overhead_h = len(configs) * TRIAL_OVERHEAD_S / 3600
    image_epochs = sum(counts[c.data] * c.data.split[0] * c.train.epochs for c in configs) if known else None
    return {
        "trials": len(trials),
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
