"""Training throughput through the project's own training step, on synthetic tensors (no download).

    python tests/bench/gpu_throughput.py                  # on a CUDA machine: ViT-B/16 and ResNet-50, 224 px, batch 256
    python tests/bench/gpu_throughput.py --json out.json  # also write the figures as JSON
    python tests/bench/gpu_throughput.py --only vit,vit-cudnn  # some variants (names: see `variants` in main)
    python tests/bench/gpu_throughput.py --smoke          # tiny sizes on whatever device there is: checks the script

First a short real trial (run_training: 2 epochs, then resumed from its checkpoint) checks the whole
GPU path, and a ViT-B/16 checkpoint shows how long an epoch waits for its background write. Then,
for each model, train_one_epoch and evaluate run exactly as in a trial (bf16 autocast, SDPA
attention, channels-last ResNet, fused Adam, 20% of the rows augmented on the device, the uint8 set
resident on the GPU) with and without torch.compile, and once with batches gathered on the host, to
show what resident data buys; ViT also with the cuDNN and memory-efficient attention kernels forced.
Prints training images/s, model FLOP utilisation (achieved training FLOP/s over the card's bf16
dense peak), evaluation images/s and peak memory, then what the study's sweep (sweeps/paper.yaml)
would take at these rates.
Anchors: timm trains vit_base_patch16_224 at ~391 img/s and ResNet-50 at ~1,218 img/s on an RTX 3090
(AMP); an H100's bf16 peak (~989 TFLOP/s) bounds ViT-B/16 training at ~9,400 img/s.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainers.config import from_dict
from trainers.data.dataset import DataReport, PreparedData
from trainers.data.split import TEST, TRAIN, VAL
from trainers.models import build_model
from trainers.train import (Checkpoint, Loop, build_optimizer, evaluate, resident_images, run_training,
                            train_one_epoch)

# Forward GFLOP per image at 224 px (multiply-adds x 2); a training step is ~3x the forward pass.
FORWARD_GFLOP = {"vit": 2 * 17.56, "resnet50": 2 * 4.09}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
STUDY_IMAGES = 55_000      # images per epoch in the study
GOALS = {"vit": 3000.0, "resnet50": 4000.0}
REPO = Path(__file__).resolve().parents[2]


def fake_data(n: int, size: int, classes: int = 6) -> PreparedData:
    """Random uint8 images, 80% training / 10% validation / 10% test: the cached input a trial reads."""
    rng = np.random.default_rng(0)
    splits = np.select([np.arange(n) < n * 0.8, np.arange(n) < n * 0.9], [TRAIN, VAL], TEST).astype(np.int8)
    return PreparedData(images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                        labels=rng.integers(0, classes, n), splits=splits,
                        classes=tuple(f"c{i}" for i in range(classes)), paths=[""] * n, subjects=[None] * n,
                        attrs=[{}] * n, digest="bench", root="", report=DataReport())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, size: int, batch: int, steps: int, compile_model: bool, resident: bool,
            device: torch.device, attention: str | None = None) -> dict:
    """Training and evaluation images/s after a warm-up epoch (compilation happens there).

    attention: None lets PyTorch pick the SDPA kernel (what a trial does); "cudnn" or "efficient" force one.
    """
    if attention is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[attention]
        with sdpa_kernel(backend):
            return {**measure(name, size, batch, steps, compile_model, resident, device), "attention": attention}
    cfg = from_dict({"model": {"name": name, "image_size": size, "compile": compile_model},
                     "train": {"batch_size": batch, "eval_batch_size": batch * 2, "device": device.type}})
    data = fake_data(int(batch * steps / 0.8) + 1, size)
    train_idx = data.indices(TRAIN)
    plan = (train_idx, np.random.default_rng(1).random(len(train_idx)) < 0.2)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg.model, len(data.classes)).to(device)
    if device.type == "cuda" and name == "resnet50":
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile_model else model
    optimizer = build_optimizer(cfg, model)
    on_device = resident_images(data.images, device) if resident else None
    loop = Loop(cfg, data, model, step_model, optimizer, device, plan, loss_fn=nn.CrossEntropyLoss(),
                eval_loss=nn.CrossEntropyLoss(), resident=on_device)

    start = time.perf_counter()
    train_one_epoch(loop, 0)   # warm-up
    evaluate(loop, VAL)
    sync(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    train_one_epoch(loop, 1)
    sync(device)
    train_ips = len(train_idx) / (time.perf_counter() - start)
    start = time.perf_counter()
    evaluate(loop, VAL)
    sync(device)
    eval_ips = len(data.indices(VAL)) / (time.perf_counter() - start)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"model": name, "compile": compile_model, "resident": on_device is not None,
            "train_img_s": train_ips, "eval_img_s": eval_ips, "warmup_s": warmup, "peak_gib": peak_gb,
            "train_tflops": train_ips * 3 * FORWARD_GFLOP[name] * (size / 224) ** 2 / 1e3}


def trial_check(device: torch.device, size: int) -> dict:
    """A real trial on this device: 2 epochs, then the same trial resumed from its checkpoint to 3."""
    data = fake_data(640, size)
    raw = {"model": {"name": "vit", "image_size": size,
                     "vit": {"patch_size": 8, "hidden_size": 96, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "intermediate_size": 192}},
           "optim": {"name": "adam", "lr": 1e-3}, "train": {"epochs": 2, "batch_size": 64, "device": device.type}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Checkpoint(Path(tmp))
        start = time.perf_counter()
        first = run_training(from_dict(raw), data, build_model(from_dict(raw).model, 6), checkpoint)
        raw["train"]["epochs"] = 3
        resumed = run_training(from_dict(raw), data, build_model(from_dict(raw).model, 6), checkpoint)
        seconds = time.perf_counter() - start
    epochs = [row["epoch"] for row in resumed.history]
    assert first.status == resumed.status == "finished", (first.status, resumed.status)
    assert epochs == [1, 2, 3], epochs
    return {"status": resumed.status, "epochs": epochs, "seconds": seconds,
            "test_macro_f1": resumed.test["macro_f1"]}


def checkpoint_cost(device: torch.device, size: int) -> dict:
    """Seconds a trial's epoch waits for its checkpoint (ViT-B/16 with Adam's moments): the hand-off to
    the background writer, against writing the same state synchronously."""
    cfg = from_dict({"model": {"name": "vit", "image_size": size}, "train": {"device": device.type}})
    model = build_model(cfg.model, 6).to(device)
    optimizer = build_optimizer(cfg, model)
    model(torch.rand(2, 3, size, size, device=device)).sum().backward()
    optimizer.step()
    state = {"epoch": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr": 1e-4, "history": []}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Checkpoint(Path(tmp))
        checkpoint.save(state)
        checkpoint.wait()                        # warm-up: folders, allocator
        start = time.perf_counter()
        checkpoint.save(state)
        handoff = time.perf_counter() - start
        checkpoint.wait()
        full = time.perf_counter() - start
        size_mb = checkpoint.path.stat().st_size / 2**20
    return {"handoff_s": handoff, "write_s": full, "size_mb": size_mb}


def study_epochs() -> dict[str, int]:
    """Epochs per model family in the study's sweep (sweeps/paper.yaml), from its own plan."""
    import yaml

    from orchestrator.sweep.spec import spec_from_dict

    raw = yaml.safe_load((REPO / "sweeps" / "paper.yaml").read_text())
    with tempfile.TemporaryDirectory() as root:
        for section in ("data", "production"):
            if isinstance(raw.get(section), dict) and "root" in raw[section]:
                raw[section]["root"] = root
        epochs: dict[str, int] = {}
        for trial in spec_from_dict(raw, "paper.yaml").plan:
            epochs[trial.config.model.name] = epochs.get(trial.config.model.name, 0) + trial.config.train.epochs
    return epochs


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is")
    parser.add_argument("--steps", type=int, default=30, help="batches per measured epoch")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--only", help="comma-separated variants to run (default: all), e.g. vit,resnet50-compile")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, batch, steps = (32, 8, 2) if args.smoke else (224, 256, args.steps)
    peak = peak_tflops()
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {card}; torch {torch.__version__}; {size} px, batch {batch}, {steps} batches per epoch",
          flush=True)
    results: dict = {"device": card, "torch": torch.__version__, "size": size, "batch": batch, "runs": []}

    results["trial"] = trial_check(device, 32 if args.smoke else 64)
    print(f"trial check: {results['trial']}", flush=True)

    results["checkpoint"] = checkpoint_cost(device, size)
    c = results["checkpoint"]
    print(f"checkpoint: ViT-B/16 + Adam {c['size_mb']:.0f} MB; an epoch waits {c['handoff_s']:.2f} s for it "
          f"(written in the background; synchronously it took {c['write_s']:.2f} s)", flush=True)

    variants = {"vit": ("vit", False, True, None), "vit-compile": ("vit", True, True, None),
                "vit-host": ("vit", False, False, None), "vit-cudnn": ("vit", False, True, "cudnn"),
                "vit-efficient": ("vit", False, True, "efficient"),
                "resnet50": ("resnet50", False, True, None), "resnet50-compile": ("resnet50", True, True, None),
                "resnet50-host": ("resnet50", False, False, None)}
    chosen = args.only.split(",") if args.only else list(variants)
    for label in chosen:
        name, compile_model, resident, attention = variants[label]
        if args.smoke and (compile_model or attention):
            continue
        try:
            r = measure(name, size, batch, steps, compile_model, resident, device, attention)
        except Exception as err:    # one variant failing (a compiler error, memory) must not hide the rest
            print(f"{label:17s} failed: {type(err).__name__}: {err}", flush=True)
            results["runs"].append({"model": name, "variant": label, "error": repr(err)[:2000]})
            continue
        finally:
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r["variant"] = label
        r["mfu"] = r["train_tflops"] / peak if peak else None
        results["runs"].append(r)
        mfu = f"{r['mfu']:.1%}" if peak else "n/a"
        print(f"{label:17s} train {r['train_img_s']:8.1f} img/s  {r['train_tflops']:6.1f} TFLOP/s  MFU {mfu:>6s}  "
              f"eval {r['eval_img_s']:8.1f} img/s  peak {r['peak_gib']:5.1f} GiB  warm-up {r['warmup_s']:5.1f} s",
              flush=True)

    best = {name: max((r["train_img_s"] for r in results["runs"] if r.get("model") == name and "error" not in r),
                      default=float("nan")) for name in GOALS}
    for name, goal in GOALS.items():
        print(f"best {name}: {best[name]:.0f} img/s (goal on one H100 >= {goal:.0f})")
    epochs = study_epochs()
    seconds = sum(n * STUDY_IMAGES / best[name] for name, n in epochs.items())
    results["study"] = {"epochs": epochs, "train_minutes": seconds / 60}
    print(f"study sweep ({epochs}, {STUDY_IMAGES} images per epoch): ~{seconds / 60:.1f} min of training "
          "at these rates (goal < 20)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
