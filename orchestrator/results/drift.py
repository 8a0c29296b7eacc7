"""Drift between the champion's held-out data and the production data: pure numpy and scikit-learn.

The reference is the champion's held-out images (its val and test splits), never its training split:
the model's logits on images it was fitted to are more confident than on any new image, so a training
reference would show "drift" for perfectly ordinary production data. The held-out images are split
in two halves by subject (each subject in one half, as production's people are new too); half A is
the reference of two comparisons of the same size:

  production   half A vs production images    -> drift_auc
  control      half A vs half B               -> drift_auc_control (what "no drift" scores here)

Each comparison is a domain classifier (a shrinkage linear discriminant, cross-validated with each
subject in one fold) whose out-of-fold ROC AUC says how well it tells the two sides apart (0.5: not at all). Per
score, `<score>_excess = <score> - <score>_control`. Scores (names as logged):

  drift_auc                  all features (logits and the colour grid)
  drift_auc_label_robust     the same, with reference rows reweighted to the other side's mix of
                             predicted classes, so a change of class mix alone scores like the control
  drift_auc_logits, drift_auc_pixels   the two halves of the features on their own

drift_auc and drift_auc_label_robust also log `_ci_low/_ci_high` (95% interval of the score) and
`_excess_ci_low/_excess_ci_high` (95% interval of the excess). Rule for the verdict: drift_verdict.

Features: the logged pt2 model exposes only its forward pass, so the "embedding" is the logits
(6 numbers) plus each image's mean colour on a 4 x 4 grid (48 numbers): the logits see what the
model reacts to, the grid sees shifts the model ignores (hair, hands, captions).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trainers.data.dataset import PreparedData
from trainers.data.split import TEST, VAL
from trainers.stats import Z

DRIFT_SAMPLE = 2000           # held-out images at most (two halves of ~1000): all scores in ~1-2 s on one core
DRIFT_GRID = 4                # mean colour on a 4 x 4 grid: 48 features
DRIFT_FOLDS = 5
SEED = 0
N_PERMUTATIONS = 100          # refits for the interval: its s.d. to ~7% (1 / sqrt(2 * 99)); ~1 s at 1000 rows a side
SHRINKAGE = 0.1               # of the within-side covariance towards the identity, on standardised features
# Strength of a drift the interval confirms, by the label-robust excess (AUC points above the control):
# below 0.1 "slight", below 0.25 "moderate", else "strong" (0.1 and 0.25 over a control of ~0.5 are
# the 0.6 and 0.75 AUC bounds this verdict used before it had a control).
STRENGTHS = ((0.1, "slight"), (0.25, "moderate"))

Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]   # (images, rows) -> logits of those rows


@dataclass(frozen=True)
class DriftSide:
    """One side of a domain classifier: feature rows, each row's group (subject) and predicted class, if known."""
    features: np.ndarray
    groups: list[str | None] | None = None
    predicted: np.ndarray | None = None

    def columns(self, columns: slice) -> DriftSide:
        """The same rows with only some feature columns."""
        return DriftSide(self.features[:, columns], self.groups, self.predicted)


@dataclass(frozen=True)
class Drift:
    """What measure_drift returns: the scores as logged, the verdict and the rows each side used."""
    scores: dict[str, float]
    verdict: str
    reference_rows: np.ndarray    # rows of the training data: half A, then half B (the control)
    production_rows: np.ndarray


def drift_features(images: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Logits plus mean colour on a DRIFT_GRID x DRIFT_GRID grid, in [0, 1]."""
    n, side = len(images), images.shape[1] // DRIFT_GRID * DRIFT_GRID
    cells = np.asarray(images[:, :side, :side], np.float32).reshape(
        n, DRIFT_GRID, side // DRIFT_GRID, DRIFT_GRID, side // DRIFT_GRID, 3).mean(axis=(2, 4)) / 255
    return np.concatenate([logits, cells.reshape(n, -1)], axis=1)


# --- one domain classifier ------------------------------------------------------------------

@dataclass(frozen=True)
class Pool:
    """Both sides' rows together: features, each row's group numbered across both sides, predicted classes."""
    x: np.ndarray
    units: np.ndarray
    predicted: np.ndarray | None


def pooled(reference: DriftSide, candidate: DriftSide) -> tuple[Pool, np.ndarray]:
    """The two sides as one Pool, and the side of each row (0 reference, 1 candidate)."""
    ref_units = _units(reference)
    cand_units = _units(candidate) + (int(ref_units.max()) + 1 if len(ref_units) else 0)
    predicted = None
    if reference.predicted is not None and candidate.predicted is not None:
        predicted = np.r_[reference.predicted, candidate.predicted].astype(np.int64)
    y = np.r_[np.zeros(len(ref_units), np.int64), np.ones(len(cand_units), np.int64)]
    return Pool(np.concatenate([reference.features, candidate.features]).astype(np.float64),
                np.r_[ref_units, cand_units], predicted), y


def _units(side: DriftSide) -> np.ndarray:
    """Each row's group as an index 0..G-1; a row without a group is a group of its own."""
    n = len(side.features)
    names = [f"#{i}" if side.groups is None or not side.groups[i] else f":{side.groups[i]}" for i in range(n)]
    return np.unique(names, return_inverse=True)[1].astype(np.int64) if n else np.zeros(0, np.int64)


def domain_auc(pool: Pool, y: np.ndarray, robust: bool = False, seed: int = SEED) -> float:
    """Out-of-fold ROC AUC of a linear classifier telling side 1 from side 0 (0.5: no difference).

    Folds keep each group (subject) in one fold, so the classifier cannot score by recognising
    people it saw while fitting; with no signal a cross-validated AUC lands a little below 0.5
    (each fold fits noise that does not carry over), hence the control. With robust, reference
    rows are reweighted to the candidate's mix of predicted classes (class_mix_weights), in the fit
    and in the AUC. NaN when a side has under two groups.
    """
    folds = group_folds(pool.units, y, np.random.default_rng(seed))
    if folds is None:
        return float("nan")
    weights = class_mix_weights(y, pool.predicted) if robust else np.ones(len(y))
    scores = out_of_fold_scores(pool.x, y, weights, folds)
    return weighted_auc(y, scores, weights)


def group_folds(units: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Each row's fold: each side's groups dealt to DRIFT_FOLDS folds in a seeded order; None under 2 a side."""
    sides = [np.unique(units[y == side]) for side in (0, 1)]
    k = min(DRIFT_FOLDS, *(len(groups) for groups in sides))
    if k < 2:
        return None
    fold_of = np.zeros(int(units.max()) + 1, np.int64)
    for groups in sides:
        fold_of[rng.permutation(groups)] = np.arange(len(groups)) % k
    return fold_of[units]


def class_mix_weights(y: np.ndarray, predicted: np.ndarray | None) -> np.ndarray:
    """Weight q(c) / p(c) on each reference row (y == 0) of predicted class c, 1 on candidate rows.

    p and q are the reference's and the candidate's shares of class c, so the weighted reference
    has the candidate's class mix: a class the candidate lacks weighs 0, one the reference lacks
    stays unmatched (and shows as drift). Unit weights when the predicted classes are unknown.
    """
    weights = np.ones(len(y))
    if predicted is None or not len(y):
        return weights
    k = int(predicted.max()) + 1
    p = np.bincount(predicted[y == 0], minlength=k) / max(1, int((y == 0).sum()))
    q = np.bincount(predicted[y == 1], minlength=k) / max(1, int((y == 1).sum()))
    ratio = np.divide(q, p, out=np.zeros(k), where=p > 0)
    weights[y == 0] = ratio[predicted[y == 0]]
    return weights


def out_of_fold_scores(x: np.ndarray, y: np.ndarray, weights: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each row's log-odds of side 1 from a shrinkage linear discriminant fitted on the other folds.

    Both sides weigh the same in each fit. Features are standardised once over all rows (no labels
    used); each (fold, side) cell's weighted sums are taken once and a fit's statistics are the
    totals less its held-out fold, so a cross-validation costs one pass over the rows plus one
    54 x 54 solve per fold: the hundred refits of the permutation interval take about a second.
    SHRINKAGE pulls the within-side covariance towards the identity, which keeps it invertible for
    constant or collinear grid cells.
    """
    scale = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    k, dim = int(folds.max()) + 1, z.shape[1]
    cells = 2 * folds + y
    total = np.bincount(cells, weights, minlength=2 * k).reshape(k, 2)
    first = np.zeros((2 * k, dim))
    second = np.zeros((2 * k, dim, dim))
    for cell in range(2 * k):
        rows = cells == cell
        weighted = z[rows] * weights[rows, None]
        first[cell], second[cell] = weighted.sum(axis=0), weighted.T @ z[rows]
    first, second = first.reshape(k, 2, dim), second.reshape(k, 2, dim, dim)
    scores = np.zeros(len(y))
    for fold in range(k):
        w = total.sum(axis=0) - total[fold]
        if (w <= 0).any():
            continue
        means = (first.sum(axis=0) - first[fold]) / w[:, None]
        cov = sum((second.sum(axis=0)[s] - second[fold, s]) / w[s] - np.outer(means[s], means[s]) for s in (0, 1)) / 2
        cov = (1 - SHRINKAGE) * cov + SHRINKAGE * np.eye(dim)
        coef = np.linalg.solve(cov, means[1] - means[0])
        scores[folds == fold] = (z[folds == fold] - (means[0] + means[1]) / 2) @ coef
    return scores


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float:
    """ROC AUC of scores for labels (1 positive), each row counted with its weight.

    The Mann-Whitney form: the weighted share of (positive, negative) pairs ordered correctly, ties
    counting half; with unit weights it equals sklearn.metrics.roc_auc_score. NaN when a side weighs 0.
    """
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], labels[order], np.asarray(weights, np.float64)[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]   # blocks of tied scores
    pos, neg = np.add.reduceat(w * (y == 1), starts), np.add.reduceat(w * (y == 0), starts)
    total = pos.sum() * neg.sum()
    if total <= 0:
        return float("nan")
    return float((pos * (np.cumsum(neg) - neg + 0.5 * neg)).sum() / total)


def drift_auc(reference: DriftSide, candidate: DriftSide, robust: bool = False, seed: int = SEED) -> float:
    """Cross-validated AUC of a classifier telling candidate rows from reference rows (domain_auc)."""
    return domain_auc(*pooled(reference, candidate), robust, seed)


def null_sd(pool: Pool, y: np.ndarray, robust: bool = False, seed: int = SEED) -> float:
    """S.d. of domain_auc over N_PERMUTATIONS seeded reshuffles of whole groups between the two sides.

    Each reshuffle keeps each side's number of groups and refits the classifier, so the spread
    includes the fitting noise of cross-validation (what an AUC of the same procedure on two samples
    of one distribution varies by), not only the sampling of rows.
    """
    rng = np.random.default_rng(seed)
    groups = np.unique(pool.units)
    n_reference = len(np.unique(pool.units[y == 0]))
    aucs = []
    for i in range(N_PERMUTATIONS):
        side_of = np.ones(int(pool.units.max()) + 1, np.int64)
        side_of[rng.permutation(groups)[:n_reference]] = 0
        aucs.append(domain_auc(pool, side_of[pool.units], robust, seed + 1 + i))
    finite = np.array(aucs)[np.isfinite(aucs)]
    return float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")


# --- the score against its control, with intervals -----------------------------------------

def compare_with_control(reference: DriftSide, production: DriftSide, control: DriftSide, name: str,
                         robust: bool = False, intervals: bool = True) -> dict[str, float]:
    """<name> (reference vs production), <name>_control (reference vs control), <name>_excess, and
    (intervals) the permutation intervals <name>_ci_low/high and <name>_excess_ci_low/high.

    The intervals are the point value +- z * sd, z = 1.96 for 95%, sd = null_sd of the control
    comparison for the score and sqrt(2) * that for the excess (the score and its control are two
    comparisons of the same size, each with that spread when nothing drifts). The control's two
    halves are one distribution, so each reshuffle of their subjects is a draw of "no drift";
    reshuffling production's subjects instead would mix two distributions and widen the interval
    exactly when there is drift. The score's interval is clipped to [0, 1]. Checked by simulation
    on 200 datasets of Gaussian rows (54 features, subject effects, 150 rows in 18 subjects a side, as
    the held-out halves of the test sweep) with no shift: the excess varied with an s.d. of 0.056
    against the 0.065 its interval assumes, and its interval lay above 0 in 2 (plain) and 1
    (label-robust) of 200 datasets, against 5 for an exact one-sided 2.5%: slightly cautious. With
    a change of class mix only, the label-robust interval lay above 0 in 5 of 200 (plain: 25).
    A bootstrap of the fixed out-of-fold scores was tried first and rejected: it missed the fitting
    noise (s.d. 0.024 against 0.039 over fresh datasets of 1000 rows a side, with the logistic regression
    this module used before) and so called drift too often.
    """
    auc = drift_auc(reference, production, robust)
    pool, y = pooled(reference, control)
    ctl = domain_auc(pool, y, robust)
    out = {name: auc, f"{name}_control": ctl, f"{name}_excess": auc - ctl}
    if intervals:
        sd = null_sd(pool, y, robust)
        for key, value, spread, bound in (("ci", auc, sd, (0, 1)), ("excess_ci", auc - ctl, np.sqrt(2) * sd, (-1, 1))):
            if not (np.isfinite(value) and np.isfinite(spread)):    # a score that could not be computed has
                out[f"{name}_{key}_low"] = out[f"{name}_{key}_high"] = float("nan")   # no interval: verdict unknown
                continue
            out[f"{name}_{key}_low"] = max(bound[0], value - Z * spread)
            out[f"{name}_{key}_high"] = min(bound[1], value + Z * spread)
    return out


def drift_scores(reference: DriftSide, control: DriftSide, production: DriftSide, n_logits: int) -> dict[str, float]:
    """Every drift score as logged: reference (half A) against production and against control (half B)."""
    from threadpoolctl import threadpool_limits   # scikit-learn's own dependency

    # One BLAS thread: the matrices are 54 wide, and threads only contend on them (1,000 rows a side:
    # 1.2 s with one thread, 23 s with the default threads on a busy 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"):
        return _drift_scores(reference, control, production, n_logits)


def _drift_scores(reference: DriftSide, control: DriftSide, production: DriftSide, n_logits: int) -> dict[str, float]:
    scores: dict[str, float] = {}
    for name, robust in (("drift_auc", False), ("drift_auc_label_robust", True)):
        scores.update(compare_with_control(reference, production, control, name, robust))
    for name, columns in (("drift_auc_logits", slice(None, n_logits)), ("drift_auc_pixels", slice(n_logits, None))):
        sides = (side.columns(columns) for side in (reference, production, control))
        scores.update(compare_with_control(*sides, name, intervals=False))
    return scores


def drift_verdict(scores: dict[str, float]) -> str:
    """Plain words, relative to the control: 'none', 'class mix only', 'slight', 'moderate', 'strong' or 'unknown'.

    Drift is called when the label-robust excess's 95% interval lies above 0
    (drift_auc_label_robust_excess_ci_low > 0); its strength is the robust excess (STRENGTHS).
    When only the plain score's excess interval lies above 0, production differs from the held-out
    data in its mix of predicted classes and in nothing else the features see: 'class mix only'.
    Otherwise 'none'; 'unknown' when the robust score could not be computed.
    """
    robust_low = scores.get("drift_auc_label_robust_excess_ci_low", float("nan"))
    if not np.isfinite(robust_low):
        return "unknown"
    if robust_low > 0:
        excess = scores["drift_auc_label_robust_excess"]
        return next((word for bound, word in STRENGTHS if excess < bound), "strong")
    return "class mix only" if scores.get("drift_auc_excess_ci_low", float("nan")) > 0 else "none"


# A scheduler's retraining trigger (production --fail-on-drift): only drift the interval confirms and
# that is more than slight. "class mix only" is not drift of the images (the predicted class mix moved,
# nothing else the features see) and "unknown: ..." is no measurement: neither triggers.
RETRAIN_VERDICTS = ("moderate", "strong")
EXIT_DRIFT = 3


def calls_for_retraining(verdict: str) -> bool:
    """True when a drift verdict is more than none/slight relative to its control (moderate or strong)."""
    return verdict in RETRAIN_VERDICTS


def drift_exit_status(verdicts: list[str], fail_on_drift: bool) -> int:
    """EXIT_DRIFT when fail_on_drift and any verdict calls for retraining; else 0."""
    return EXIT_DRIFT if fail_on_drift and any(calls_for_retraining(v) for v in verdicts) else 0


# --- which images --------------------------------------------------------------------------

def drift_rows(train: PreparedData, production: PreparedData, seed: int = SEED) -> tuple[np.ndarray, ...]:
    """(half A, half B, production) rows: held-out (val + test) images split by subject, and production
    images; half B and production have the same count, so control and production comparisons match in size."""
    rng = np.random.default_rng(seed)
    held = sample_rows(np.r_[train.indices(VAL), train.indices(TEST)], rng)
    half_a, half_b = split_by_group(held, [train.subjects[i] for i in held], rng)
    n = min(len(half_b), len(production.labels))
    prod = np.sort(rng.choice(len(production.labels), n, replace=False))
    return half_a, np.sort(rng.choice(half_b, n, replace=False)), prod


def split_by_group(rows: np.ndarray, groups: list[str | None], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Two halves of rows, each group (subject) wholly in one: groups dealt largest first (ties in a seeded
    order) to whichever half is smaller, so neither half is empty while there are two groups."""
    names = [g if g else f"#{i}" for i, g in enumerate(groups)]
    unique, inverse = np.unique(names, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(unique))
    shuffled = rng.permutation(len(unique))
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    in_first, totals = np.zeros(len(unique), bool), [0, 0]
    for group in order:
        half = int(totals[1] < totals[0])
        in_first[group] = half == 0
        totals[half] += sizes[group]
    in_a = in_first[inverse]
    return np.sort(rows[in_a]), np.sort(rows[~in_a])


def sample_rows(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """At most DRIFT_SAMPLE rows, sorted (sequential reads from the memory-mapped cache)."""
    return np.sort(rng.choice(rows, DRIFT_SAMPLE, replace=False)) if len(rows) > DRIFT_SAMPLE else rows


def measure_drift(train: PreparedData, production: PreparedData, logits: np.ndarray, predict: Predict) -> Drift:
    """The drift scores and verdict of production data (with its logits) against the model's held-out data."""
    half_a, half_b, prod = drift_rows(train, production)
    held = np.r_[half_a, half_b]
    held_logits = predict(train.images, held)

    # Production without subjects puts each image in a fold of its own (one person's frames may sit in
    # several folds); the control's half B is then split the same way, so both comparisons share one
    # fold structure and the excess is not the difference between two ways of cross-validating.
    grouped = any(production.subjects[i] for i in prod)

    def side(data: PreparedData, rows: np.ndarray, row_logits: np.ndarray, groups: bool = True) -> DriftSide:
        return DriftSide(drift_features(np.asarray(data.images[rows]), row_logits),
                         [data.subjects[i] for i in rows] if groups else None, row_logits.argmax(axis=1))

    scores = drift_scores(side(train, half_a, held_logits[:len(half_a)]),
                          side(train, half_b, held_logits[len(half_a):], grouped),
                          side(production, prod, logits[prod]), logits.shape[1])
    return Drift(scores, drift_verdict(scores), held, prod)
