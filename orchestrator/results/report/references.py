"""The study's own numbers, printed beside ours: each experiment's `reference` block (see
sweeps/paper.yaml for its shape) and the study's table and figure numbers per model."""
from __future__ import annotations

import math

from orchestrator.sweep.spec import SweepSpec, canonical_axis

# The study's numbering for its main (ViT) and baseline (ResNet-50) model.
STUDY_NUMBERS = {
    "vit": {"curves": "Table 2, Figure 3", "per_class": "Table 4, Figure 4"},
    "resnet50": {"curves": "Table 5, Figure 6", "per_class": "Table 7, Figure 7"},
}


def same(a, b) -> bool:
    """Spec values and reference keys compare as numbers when both are numbers."""
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return str(a) == str(b)


def study(block, metric: str, query: dict, partial: bool = False) -> float | None:
    """The study's value of ``metric`` at the reference point matching ``query`` (see sweeps/paper.yaml).

    ``partial``: the point may carry keys the query does not name (the study's own best model).
    """
    if not isinstance(block, dict) or metric not in (block.get("metric") or []):
        return None
    index = block["metric"].index(metric)
    for point in block.get("points") or []:
        if not isinstance(point, dict):
            continue
        keys = {canonical_axis(str(k)): v for k, v in point.items() if k != "value"}
        if not partial and set(keys) != set(query):
            continue
        if all(k in keys and same(keys[k], v) for k, v in query.items()):
            values = point.get("value") or []
            return float(values[index]) if index < len(values) else None
    return None


def sweep_block(spec: SweepSpec, key: str, skip_model_grids: bool = False) -> dict | None:
    """The first experiment's reference sub-block named ``key`` (the study's best model and production
    numbers are given once, in any experiment); ``skip_model_grids``: not one of a `model` grid."""
    return next((e.reference[key] for e in spec.experiments
                 if isinstance(e.reference.get(key), dict) and not (skip_model_grids and "model" in e.grid)),
                None)


def study_numbers(architecture: str, part: str) -> str | None:
    """'Table 2, Figure 3' for the study's curves ('curves') or per-class ('per_class') of a model."""
    return STUDY_NUMBERS.get(architecture, {}).get(part)
