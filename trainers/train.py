"""The training protocol of the study: one trial from prepared data to test metrics.

Returns plain dicts of numbers; never imports mlflow (trainers/tracking.py does the logging).
"""
from __future__ import annotations

import math
import os
import pickle
import queue
import random
import re
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from trainers import metrics, stats
from trainers.augment import augment, occlude
from trainers.config import OptimConfig, TrialConfig
from trainers.data.balance import balance_cells, balance_plan, class_weights
from trainers.data.dataset import PreparedData
from trainers.data.split import TEST, TRAIN, VAL
from trainers.models import FerClassifier, compile_model
from trainers.precision import MasterWeightOptimizer, autocast, release_fp32, resolve_precision
from trainers.predictions import Predictions
from trainers.errors import UserError
from trainers.process.free_space import require_room
from trainers.process.gpu_share import gpu_share, resident_budget, share_gpu


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
    test_seconds: float = 0.0                     # the test pass after the last epoch


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


def build_optimizer(cfg: TrialConfig, model: nn.Module,
                    precision: str = "autocast") -> torch.optim.Optimizer | MasterWeightOptimizer:
    """sgd / rmsprop / adam over every parameter; with precision bf16, the model's weights are cast to bf16
    and the optimizer steps fp32 master copies of them (MasterWeightOptimizer)."""
    if precision == "bf16":
        return MasterWeightOptimizer(model, lambda masters: torch_optimizer(cfg.optim, masters))
    return torch_optimizer(cfg.optim, list(model.parameters()))


def torch_optimizer(o: OptimConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer o names over params; the fused CUDA kernels when they are on a GPU (RMSprop has none)."""
    fused = {"fused": True} if params and params[0].is_cuda else {}
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **fused)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **fused)


def set_lr(optimizer: torch.optim.Optimizer | MasterWeightOptimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- batches --------------------------------------------------------------------------

# Host batches gathered ahead of the step by batches()'s reader thread; 0 gathers in the caller's thread.
# Two waiting training batches (256 at 224 px) hold 2 x 256 x 224 x 224 x 3 bytes = 77 MB, evaluation's
# (512) 154 MB; the reader holds one more, pinned on CUDA.
PREFETCH_BATCHES = 2


def to_float_images(batch_u8: torch.Tensor) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float in [0, 1]; the permuted view is channels-last in memory."""
    return batch_u8.permute(0, 3, 1, 2).float().div_(255)


def resident_images(images: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """The whole uint8 set copied to the GPU once, when it takes under a quarter of its free memory (and of
    this trainer's share of the card, when trials_per_gpu slots share it: resident_budget).

    A batch is then a gather on the device: no host copy per step and no wait for one. Returns None
    on CPU or when the set does not fit; batches() then gathers on the host into pinned memory.
    """
    if device.type != "cuda" or images.nbytes > resident_budget(*torch.cuda.mem_get_info(device), gpu_share()):
        return None
    with warnings.catch_warnings():     # a read-only memory-mapped cache: only copied from, never written
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(np.ascontiguousarray(images)).to(device)


@contextmanager
def rows_file(images: np.ndarray) -> Iterator[int | None]:
    """A read-only descriptor of the .npy file a whole memory-mapped set maps; None for any other array."""
    path = getattr(images, "filename", None)
    # A C-ordered array as large as the file's data is the file's own row layout (not a reversed view).
    whole = path is not None and hasattr(os, "posix_fadvise") and images.flags.c_contiguous
    try:
        fd = os.open(path, os.O_RDONLY) if whole else None
        if fd is not None and os.fstat(fd).st_size != images.offset + images.nbytes:
            os.close(fd)
            fd = None
    except OSError:
        fd = None       # the file was moved or removed since it was mapped: the mapping still reads
    if fd is None:
        yield None      # in memory, a view of part of a file, or no posix_fadvise (not Linux)
        return
    try:
        yield fd
    finally:
        os.close(fd)


def gather_rows(images: np.ndarray, rows: np.ndarray, fd: int | None = None) -> np.ndarray:
    """images[rows] as a new uint8 block, read in ascending row order (ascending offsets in a mapped file).

    With fd (rows_file), the kernel is told first which rows are wanted (POSIX_FADV_WILLNEED): it reads
    exactly those, all queued at once. Otherwise each page fault reads the disk's whole read-ahead window
    around its row: 8 MB on a disk set to read_ahead_kb 8192, about 100 ms for a batch of 32 rows of
    12 KB that are not cached, against about 1.3 ms with the hint.
    """
    sort = np.argsort(rows, kind="stable")
    if fd is not None:
        row_bytes = images.strides[0]
        try:
            for row in rows[sort].tolist():
                os.posix_fadvise(fd, images.offset + row * row_bytes, row_bytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass        # a hint only: the rows are read below either way
    block = np.empty((len(rows),) + images.shape[1:], dtype=np.uint8)
    block[sort] = images[rows[sort]]
    return block


def prefetched(items: Iterator, depth: int) -> Iterator:
    """The same items in the same order, produced up to `depth` ahead by a background thread.

    An exception in the reader is raised here, in the caller. Closing this generator (a break or an
    exception in the caller's loop ends it) stops the reader and joins it. depth 0: no thread.
    """
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stopping = threading.Event()
    reader = threading.Thread(target=_read_ahead, args=(items, ready, stopping), name="batch-reader", daemon=True)
    reader.start()
    try:
        while True:
            more, item = ready.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stopping.set()
        while True:     # make room: the reader puts at most one item after it is told to stop
            try:
                ready.get_nowait()
            except queue.Empty:
                break
        reader.join()


def _read_ahead(items: Iterator, ready: queue.Queue, stopping: threading.Event) -> None:
    """The reader thread: (True, item) for each item until told to stop, then (False, None) or (False, error)."""
    try:
        for item in items:
            ready.put((True, item))
            if stopping.is_set():
                return
        ready.put((False, None))
    except BaseException as err:      # raised in the caller's thread by prefetched()
        ready.put((False, err))


def batches(images: np.ndarray, order: np.ndarray, batch_size: int, device: torch.device,
            training: bool = False, resident: torch.Tensor | None = None):
    """Yield (row positions, uint8 batch on device) in the given order.

    Nothing here waits for the device: the order travels once, host batches come from pinned memory.
    On the host a background thread gathers the next PREFETCH_BATCHES batches while the caller runs its
    step, so reads from a set larger than the page cache overlap the compute. Each batch's rows are
    announced to the kernel, read in ascending order, then put back in the shuffled order (gather_rows):
    a batch holds exactly the rows the shuffle chose, so its statistics are unchanged. A block shuffle
    (runs of neighbouring rows) would read faster still but changes what a batch contains: not done.
    """
    pin = device.type == "cuda"
    # BatchNorm cannot train on one sample (ResNet's 1x1 final maps): skip a lone trailing one.
    stop = len(order) - 1 if training and len(order) % batch_size == 1 and len(order) > 1 else len(order)
    positions = (np.arange(start, min(start + batch_size, stop)) for start in range(0, stop, batch_size))
    if resident is not None:
        order_dev = torch.from_numpy(np.ascontiguousarray(order)).to(device)
        for pos in positions:
            yield pos, resident[order_dev[int(pos[0]):int(pos[-1]) + 1]]
        return
    # The file closes after the reader thread has stopped (closing() joins it first). An array in memory on
    # CPU has nothing to wait for: no thread copies it (it would take a core from the step).
    with rows_file(images) as fd, closing(prefetched(
            ((pos, _host_batch(images, order[pos], fd, pin)) for pos in positions),
            PREFETCH_BATCHES if fd is not None or pin else 0)) as ready:
        for pos, x in ready:
            yield pos, x.to(device, non_blocking=True)


def _host_batch(images: np.ndarray, rows: np.ndarray, fd: int | None, pin: bool) -> torch.Tensor:
    x = torch.from_numpy(gather_rows(images, rows, fd))
    return x.pin_memory() if pin else x


# --- one epoch, one evaluation ------------------------------------------------------------

@dataclass
class Loop:
    """What every epoch of one trial shares: built once by build_loop, read by train_one_epoch and evaluate."""
    cfg: TrialConfig
    data: PreparedData
    model: nn.Module                          # the classifier whose weights a checkpoint holds
    step_model: nn.Module                     # what batches run through: model (its blocks maybe compiled), or
                                              # torch.compile's wrapper of it (compile_model)
    optimizer: torch.optim.Optimizer | MasterWeightOptimizer
    device: torch.device
    plan: tuple[np.ndarray, np.ndarray]       # training rows (balanced) and whether each one is augmented
    loss_fn: nn.Module                        # class-weighted cross-entropy, for training
    eval_loss: nn.Module                      # plain cross-entropy, for validation and test
    resident: torch.Tensor | None = None      # the uint8 set on the GPU (resident_images), or None
    precision: str = "autocast"               # train.precision as resolved for the device (resolve_precision)


def train_one_epoch(loop: Loop, epoch: int) -> dict[str, float]:
    """One pass over the balanced training plan; returns loss, accuracy, macro F1.

    The step never waits for the device: rows, labels and augmentation positions travel once per
    epoch, random numbers are drawn on the device, and the sums are read once at the end.
    """
    model, data, device, optimizer = loop.step_model, loop.data, loop.device, loop.optimizer
    model.train()
    indices, augmented = loop.plan
    rng = np.random.default_rng([loop.cfg.train.seed, epoch])
    order = rng.permutation(len(indices))
    gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**31)))
    # Dropout draws from torch's global generator: seeded per epoch, so an epoch resumed from a
    # checkpoint gets the same masks as it had in an uninterrupted run.
    torch.manual_seed(int(rng.integers(2**31)))
    # Occluders draw from a generator of their own, so every image keeps the flips, crops and colours it
    # has without them; none is made (nothing drawn) when augment.occlusion is 0.
    occlusion = loop.cfg.augment.occlusion
    occluders = torch.Generator(device=device).manual_seed(int(rng.integers(2**31))) if occlusion else None
    rows = indices[order]
    labels = torch.from_numpy(data.labels[rows]).to(device)
    aug_pos = np.flatnonzero(augmented[order])
    aug_dev = torch.from_numpy(aug_pos).to(device)
    n_classes = len(data.classes)
    cm = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for pos, x_u8 in batches(data.images, rows, loop.cfg.train.batch_size, device, training=True,
                             resident=loop.resident):
        start, end = int(pos[0]), int(pos[-1]) + 1
        y = labels[start:end]
        x = to_float_images(x_u8)
        a, b = np.searchsorted(aug_pos, (start, end))
        if b > a:
            sel = aug_dev[a:b] - start
            x[sel] = augment(x[sel], gen)
        if occluders is not None:      # every training row, balance copy or not
            x = occlude(x, occluders, occlusion)
        with autocast(device, loop.precision):
            logits = model(x)
            loss = loop.loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(pos)
        seen += len(pos)
        cells = y * n_classes + logits.detach().argmax(1)
        cm.index_add_(0, cells, torch.ones_like(cells))     # bincount would read its max back: a sync
    mean_loss = total_loss.item() / max(seen, 1)
    if not math.isfinite(mean_loss):
        return {"train_loss": float("nan")}     # diverged: the caller ends the trial
    summary = metrics.summary(cm.view(n_classes, n_classes).cpu().numpy())
    return {"train_loss": mean_loss, "train_accuracy": summary["accuracy"],
            "train_macro_f1": summary["macro_f1"]}


@torch.no_grad()
def evaluate(loop: Loop, split: int, keep_probs: bool = False) -> tuple[dict[str, float], np.ndarray]:
    """Loss, accuracy and macro F1 on one split, plus its confusion matrix (one device sync).

    With keep_probs the summary also holds "probs": the N x K softmax probabilities, in split order."""
    model, data, device = loop.step_model, loop.data, loop.device
    model.eval()
    idx = data.indices(split)
    n_classes = len(data.classes)
    labels = torch.from_numpy(data.labels[idx]).to(device)
    cm = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    probs = []
    for pos, x_u8 in batches(data.images, idx, loop.cfg.train.eval_batch_size, device, resident=loop.resident):
        y = labels[int(pos[0]):int(pos[-1]) + 1]
        with autocast(device, loop.precision):
            logits = model(to_float_images(x_u8)).float()
        total_loss += loop.eval_loss(logits, y) * len(pos)
        cells = y * n_classes + logits.argmax(1)
        cm.index_add_(0, cells, torch.ones_like(cells))
        if keep_probs:
            probs.append(logits.softmax(1))
    cm_np = cm.view(n_classes, n_classes).cpu().numpy()
    out = {"loss": total_loss.item() / max(len(idx), 1), **metrics.summary(cm_np)}
    if keep_probs:
        out["probs"] = (torch.cat(probs) if probs else torch.zeros(0, n_classes)).cpu().numpy()
    return out, cm_np


# --- checkpoints --------------------------------------------------------------------------

class CheckpointError(UserError, RuntimeError):
    """A trial's checkpoint holds more than tensors and numbers; it was refused, not loaded."""


class Checkpoint:
    """The last finished epoch of one trial, written atomically; loaded with weights_only=True.

    save() copies the state to host memory at once and writes it from a background thread, so the
    next epoch trains while the file is written (a ViT-B/16 checkpoint with Adam's moments is ~1 GB).
    At most one write is in flight; wait() (and load) finish it and raise what it failed with.
    """

    def __init__(self, directory: Path):
        self.path = directory / "last.pt"
        self._writer: threading.Thread | None = None
        self._failed: BaseException | None = None
        self.seconds = 0.0      # what training waited for it: the host copies, and writes still in flight

    def load(self) -> dict | None:
        self.wait()
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:     # a pickled object: never ours, never run
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f" ({found[1]})" if found else ""
            raise CheckpointError(f"checkpoint {self.path} holds a pickled object{what}, which a trial never "
                                  "writes; it was refused, not loaded. Delete it to restart the trial from "
                                  "epoch 1") from None

    def save(self, state: dict) -> None:
        self.wait()
        t0 = time.perf_counter()
        snapshot = _host_copy(state)     # training goes on changing the live tensors in place
        # The file is about the tensors' size: refused here (DiskFullError) when writing it would eat into the
        # free-space reserve the run needs to close, rather than failing half written on a full disk.
        require_room([(self.path.parent, "train.checkpoint_dir")], writing_mb=tensor_bytes(snapshot) // 2**20 + 1)
        self._writer = threading.Thread(target=self._write, args=(snapshot,), name="checkpoint")
        self._writer.start()
        self.seconds += time.perf_counter() - t0

    def wait(self, raise_failure: bool = True) -> None:
        if self._writer is not None:
            t0 = time.perf_counter()
            self._writer.join()
            self._writer = None
            self.seconds += time.perf_counter() - t0
        failed, self._failed = self._failed, None
        if failed is not None and raise_failure:
            raise failed

    def _write(self, state: dict) -> None:
        try:
            save_tensors(state, self.path)
        except BaseException as err:      # raised in the training thread by the next wait()
            self._failed = err


def save_tensors(state: dict, path: Path) -> None:
    """torch.save through a temporary file renamed into place, so a reader never loads half a file."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")   # two processes writing one file never share it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)     # a half-written file would hold the room closing the run needs
        raise


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a (nested) state: what a checkpoint of it takes on disk, within a few KB."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def _host_copy(value):
    """Tensors copied to CPU memory (a copy even when already there), containers rebuilt, the rest kept."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return value


# --- the trial ----------------------------------------------------------------------------

def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every global generator a trial draws from (Python, NumPy, torch on CPU and every GPU) and set
    torch's deterministic mode, on or off: a long-lived trainer must not keep the last trial's setting.

    Called before the model is built (its initial weights) and again before training (dropout); data
    order and augmentation draw from generators derived from the seed and the epoch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:     # cuBLAS reads it when its first handle is made: before any CUDA matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


def build_loop(cfg: TrialConfig, data: PreparedData, model: FerClassifier) -> Loop:
    """Seed, place the model on its device, and build its optimizer, training plan and losses."""
    device = select_device(cfg.train.device)
    share_gpu(device)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    model.to(device)
    if device.type == "cuda" and model.family == "resnet50":
        model.to(memory_format=torch.channels_last)
    precision = resolve_precision(cfg.train.precision, device)
    optimizer = build_optimizer(cfg, model, precision)     # bf16: casts the weights, keeps fp32 masters
    step_model = compile_model(model, cfg.model.compile)
    resident = resident_images(data.images, device)
    train_idx = data.indices(TRAIN)
    # The cells are those prepare_data reported in data_report.json (data.balance_by over the same images).
    plan = (balance_plan(train_idx, balance_cells(data.labels, data.attrs, data.classes, cfg.data.balance_by).ids,
                         cfg.data.balance_max_factor, cfg.train.seed)
            if cfg.data.balance else (train_idx, np.zeros(len(train_idx), bool)))
    weights = torch.from_numpy(class_weights(data.labels[plan[0]], len(data.classes))).to(device)
    return Loop(cfg, data, model, step_model, optimizer, device, plan, loss_fn=nn.CrossEntropyLoss(weight=weights),
                eval_loss=nn.CrossEntropyLoss(), resident=resident, precision=precision)


def resume(loop: Loop, state: dict) -> tuple[float, int, list[dict[str, float]]]:
    """Load a checkpoint's weights and optimizer state; returns its lr, the next epoch and the history."""
    loop.model.load_state_dict(state["model"])
    fused = [group.get("fused") for group in loop.optimizer.param_groups]
    loop.optimizer.load_state_dict(state["optimizer"])   # takes the saved groups whole, "fused" included
    for group, flag in zip(loop.optimizer.param_groups, fused):
        if "fused" in group:
            group["fused"] = flag                        # the kernels this device has, not the saver's
    return state["lr"], state["epoch"] + 1, state["history"]


def train_and_validate(loop: Loop, epoch: int, lr: float) -> dict[str, float]:
    """One epoch at lr, then validation: the epoch's history row (only the NaN train loss if it diverged)."""
    t0 = time.perf_counter()
    set_lr(loop.optimizer, lr)
    train = train_one_epoch(loop, epoch)
    if not math.isfinite(train["train_loss"]):
        return {**train, "epoch_seconds": time.perf_counter() - t0}
    val, _ = evaluate(loop, VAL)
    return {"epoch": epoch, **train, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"], "lr": lr, "epoch_seconds": time.perf_counter() - t0}


def run_training(cfg: TrialConfig, data: PreparedData, model: FerClassifier, checkpoint: Checkpoint,
                 observer: EpochObserver | None = None) -> TrialResult:
    """Train for cfg.train.epochs (resuming from the checkpoint), then test; the study's protocol. The model is
    trained in place and left in fp32."""
    loop = build_loop(cfg, data, model)
    result, lr, start = TrialResult(status="finished"), cfg.optim.lr, 1
    state = checkpoint.load()
    if state is not None:
        lr, start, result.history = resume(loop, state)
    prev_f1 = result.history[-1]["val_macro_f1"] if result.history else None

    try:     # a crash still leaves the last finished epoch's checkpoint fully written
        for epoch in range(start, cfg.train.epochs + 1):
            row = train_and_validate(loop, epoch, lr)
            result.train_seconds += row["epoch_seconds"]
            if not math.isfinite(row["train_loss"]):
                result.status = "diverged"
                break
            result.history.append(row)
            # Log before checkpointing: a crash in between repeats this epoch rather than losing its metrics.
            if observer:
                try:
                    observer.on_epoch(epoch, {k: v for k, v in row.items() if k != "epoch"})
                except StopTrial:
                    result.status = "pruned"
                    break
            lr = reduce_lr_on_f1_drop(prev_f1, row["val_macro_f1"], lr, cfg.optim.lr_drop_threshold,
                                      cfg.optim.lr_drop_factor)
            prev_f1 = row["val_macro_f1"]
            checkpoint.save({"epoch": epoch, "model": model.state_dict(), "optimizer": loop.optimizer.state_dict(),
                             "lr": lr, "history": result.history})

        if result.status == "finished":     # the last checkpoint is written meanwhile
            t0 = time.perf_counter()
            result.test = test_metrics(loop)
            result.test_seconds = time.perf_counter() - t0
    except BaseException:
        checkpoint.wait(raise_failure=False)     # the trial's own error is the one to report
        raise
    checkpoint.wait()
    release_fp32(loop.optimizer)     # the model handed back (exported, served) holds fp32 weights
    return result


def test_metrics(loop: Loop) -> dict:
    """Test accuracy, macro F1 with their bootstrap intervals, per-class precision / recall / F1, the
    confusion matrix, and the predictions they all come from."""
    summary, cm = evaluate(loop, TEST, keep_probs=True)
    data, idx = loop.data, loop.data.indices(TEST)
    predicted = summary["probs"].argmax(1) if len(idx) else np.zeros(0, np.int64)
    preds = Predictions(keys=np.asarray(data.paths, dtype=object)[idx], labels=data.labels[idx],
                        predicted=predicted, probs=summary["probs"], classes=data.classes)
    intervals = stats.bootstrap_ci(preds.labels, preds.predicted, len(data.classes))
    return {"loss": summary["loss"], "accuracy": summary["accuracy"], "macro_f1": summary["macro_f1"],
            **{f"{name}_ci_{end}": value for name, ends in intervals.items()
               for end, value in zip(("low", "high"), ends)},
            "per_class": metrics.per_class(cm), "confusion": cm, "predictions": preds}
