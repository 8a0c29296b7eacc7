"""The training protocol of the study: one trial from prepared data to test metrics.

Returns plain dicts of numbers; never imports mlflow (trainers/tracking.py does the logging).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from trainers import metrics
from trainers.augment import augment
from trainers.config import TrialConfig
from trainers.data.balance import balance_plan, class_weights
from trainers.data.dataset import PreparedData
from trainers.data.split import TEST, TRAIN, VAL
from trainers.models import FerClassifier


class StopTrial(Exception):
    """Raised by an observer to end a trial early (e.g. pruned by the sweep's median rule)."""


class EpochObserver(Protocol):
    """Receives each finished epoch's metrics (the MLflow logger is one); may raise StopTrial."""

    def on_epoch(self, epoch: int, values: dict[str, float]) -> None: ...


@dataclass
class TrialResult:
    status: str                                   # "finished", "diverged" or "pruned"
    history: list[dict[str, float]] = field(default_factory=list)   # one dict per epoch, with "epoch"
    test: dict | None = None                      # summary, per-class arrays, confusion matrix
    train_seconds: float = 0.0                    # wall time inside epochs (this process)


# --- small pure helpers ---------------------------------------------------------------

def reduce_lr_on_f1_drop(prev_f1: float | None, f1: float, lr: float, threshold: float,
                         factor: float) -> float:
    """The study's rule: validation macro F1 fell by more than `threshold` (relative) -> lr * factor."""
    if prev_f1 is None or prev_f1 <= 0:
        return lr
    return lr * factor if (prev_f1 - f1) / prev_f1 > threshold else lr


def select_device(name: str) -> torch.device:
    """'auto' picks CUDA when present."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def build_optimizer(cfg: TrialConfig, model: nn.Module) -> torch.optim.Optimizer:
    """sgd / rmsprop / adam over every parameter."""
    o = cfg.optim
    params = model.parameters()
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- batches --------------------------------------------------------------------------

def to_float_images(batch_u8: torch.Tensor) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float in [0, 1]; the permuted view is channels-last in memory."""
    return batch_u8.permute(0, 3, 1, 2).float().div_(255)


def batches(images: np.ndarray, order: np.ndarray, batch_size: int, device: torch.device,
            training: bool = False):
    """Yield (row positions, uint8 batch on device) in the given order."""
    pin = device.type == "cuda"
    # BatchNorm cannot train on one sample (ResNet's 1x1 final maps): skip a lone trailing one.
    stop = len(order) - 1 if training and len(order) % batch_size == 1 and len(order) > 1 else len(order)
    for start in range(0, stop, batch_size):
        pos = np.arange(start, min(start + batch_size, stop))
        rows = order[pos]
        # Sorted reads are sequential in the memory-mapped cache; restore the order afterwards.
        sort = np.argsort(rows, kind="stable")
        block = np.empty((len(rows),) + images.shape[1:], dtype=np.uint8)
        block[sort] = images[rows[sort]]
        x = torch.from_numpy(block)
        if pin:
            x = x.pin_memory()
        yield pos, x.to(device, non_blocking=True)


# --- one epoch, one evaluation ------------------------------------------------------------

def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU (bf16 matmuls are slow on most CPUs)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_one_epoch(model: nn.Module, data: PreparedData, plan: tuple[np.ndarray, np.ndarray],
                    optimizer, loss_fn, cfg: TrialConfig, epoch: int, device) -> dict[str, float]:
    """One pass over the balanced training plan; returns loss, accuracy, macro F1."""
    model.train()
    indices, augmented = plan
    rng = np.random.default_rng([cfg.train.seed, epoch])
    order = rng.permutation(len(indices))
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    labels_all = torch.from_numpy(data.labels)
    n_classes = len(data.classes)
    # Sums stay on the device: no host sync per step; one .item() per epoch.
    cm = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for pos, x_u8 in batches(data.images, indices[order], cfg.train.batch_size, device, training=True):
        rows = indices[order[pos]]
        y = labels_all[rows].to(device, non_blocking=True)
        x = to_float_images(x_u8)
        aug = augmented[order[pos]]
        if aug.any():
            mask = torch.from_numpy(aug).to(device)
            x[mask] = augment(x[mask], gen)
        with autocast(device):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(rows)
        seen += len(rows)
        cm += torch.bincount(y * n_classes + logits.detach().argmax(1), minlength=n_classes * n_classes)
    mean_loss = total_loss.item() / max(seen, 1)
    if not math.isfinite(mean_loss):
        return {"train_loss": float("nan")}     # diverged: the caller ends the trial
    summary = metrics.summary(cm.view(n_classes, n_classes).cpu().numpy())
    return {"train_loss": mean_loss, "train_accuracy": summary["accuracy"],
            "train_macro_f1": summary["macro_f1"]}


@torch.no_grad()
def evaluate(model: nn.Module, data: PreparedData, split: int, cfg: TrialConfig, loss_fn,
             device) -> tuple[dict[str, float], np.ndarray]:
    """Loss, accuracy and macro F1 on one split, plus its confusion matrix."""
    model.eval()
    idx = data.indices(split)
    n_classes = len(data.classes)
    labels_all = torch.from_numpy(data.labels)
    cm = torch.zeros(n_classes * n_classes, dtype=torch.int64)
    total_loss = 0.0
    for pos, x_u8 in batches(data.images, idx, cfg.train.eval_batch_size, device):
        y = labels_all[idx[pos]].to(device)
        with autocast(device):
            logits = model(to_float_images(x_u8)).float()
        total_loss += loss_fn(logits, y).item() * len(pos)
        cm += torch.bincount((y * n_classes + logits.argmax(1)).cpu(), minlength=n_classes * n_classes)
    cm_np = cm.view(n_classes, n_classes).numpy()
    return {"loss": total_loss / max(len(idx), 1), **metrics.summary(cm_np)}, cm_np


# --- checkpoints --------------------------------------------------------------------------

class Checkpoint:
    """The last finished epoch of one trial, written atomically; loaded with weights_only=True."""

    def __init__(self, directory: Path):
        self.path = directory / "last.pt"

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


# --- the trial ----------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def run_training(cfg: TrialConfig, data: PreparedData, model: FerClassifier, checkpoint: Checkpoint,
                 observer: EpochObserver | None = None) -> TrialResult:
    """Train for cfg.train.epochs (resuming from the checkpoint), then test; the study's protocol."""
    device = select_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    model.to(device)
    if device.type == "cuda" and model.family == "resnet50":
        model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.model.compile else model
    optimizer = build_optimizer(cfg, model)
    train_idx = data.indices(TRAIN)
    plan = (balance_plan(train_idx, data.labels, cfg.data.balance_max_factor, cfg.train.seed)
            if cfg.data.balance else (train_idx, np.zeros(len(train_idx), bool)))
    weights = torch.from_numpy(class_weights(data.labels[plan[0]], len(data.classes))).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    eval_loss = nn.CrossEntropyLoss()

    result, lr, start = TrialResult(status="finished"), cfg.optim.lr, 1
    state = checkpoint.load()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr, start, result.history = state["lr"], state["epoch"] + 1, state["history"]
    prev_f1 = result.history[-1]["val_macro_f1"] if result.history else None

    for epoch in range(start, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        set_lr(optimizer, lr)
        train = train_one_epoch(step_model, data, plan, optimizer, loss_fn, cfg, epoch, device)
        if not math.isfinite(train["train_loss"]):
            result.status = "diverged"
            result.train_seconds += time.perf_counter() - t0
            break
        val, _ = evaluate(step_model, data, VAL, cfg, eval_loss, device)
        row = {"epoch": epoch, **train, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "val_macro_f1": val["macro_f1"], "lr": lr, "epoch_seconds": time.perf_counter() - t0}
        result.history.append(row)
        result.train_seconds += row["epoch_seconds"]
        # Log before checkpointing: a crash in between repeats this epoch rather than losing its metrics.
        if observer:
            try:
                observer.on_epoch(epoch, {k: v for k, v in row.items() if k != "epoch"})
            except StopTrial:
                result.status = "pruned"
                break
        lr = reduce_lr_on_f1_drop(prev_f1, val["macro_f1"], lr, cfg.optim.lr_drop_threshold,
                                  cfg.optim.lr_drop_factor)
        prev_f1 = val["macro_f1"]
        checkpoint.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "lr": lr, "history": result.history})

    if result.status == "finished":
        result.test = test_metrics(step_model, data, cfg, eval_loss, device)
    return result


def test_metrics(model, data: PreparedData, cfg: TrialConfig, loss_fn, device) -> dict:
    """Test accuracy, macro F1, per-class precision / recall / F1 and the confusion matrix."""
    summary, cm = evaluate(model, data, TEST, cfg, loss_fn, device)
    return {"loss": summary["loss"], "accuracy": summary["accuracy"], "macro_f1": summary["macro_f1"],
            "per_class": metrics.per_class(cm), "confusion": cm}
