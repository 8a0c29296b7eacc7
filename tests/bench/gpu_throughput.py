"""Training throughput through the project's own training step, on synthetic tensors (no download), with the
candidates of the GPU fast path measured one at a time.

    python tests/bench/gpu_throughput.py                  # on a CUDA machine: the candidates, 224 px, batch 256
    python tests/bench/gpu_throughput.py --json out.json  # also write the figures as JSON
    python tests/bench/gpu_throughput.py --only vit,vit-bf16,vit-flash   # some variants (names: VARIANTS)
    python tests/bench/gpu_throughput.py --only all       # every variant, the extras too
    python tests/bench/gpu_throughput.py --smoke          # tiny sizes on whatever device there is: checks the script

First a short real trial (run_training: 2 epochs, then resumed from its checkpoint), in today's arithmetic
and in bf16 with master weights, checks the whole GPU path, and a ViT-B/16 checkpoint shows how long an
epoch waits for its background write. Then each variant runs train_one_epoch and evaluate exactly as a trial
does (build_loop's optimizer, precision and compile; 20% of the rows augmented on the device, the uint8 set
resident on the GPU). The candidates, one step at a time (CANDIDATES):
  vit                      today's path: fp32 weights, bf16 autocast, SDPA (PyTorch's pick), fused Adam
  vit-bf16                 + bf16 weights with fp32 master weights (train.precision: bf16): no per-step casts
  vit-bf16-blocks          + each encoder layer compiled once, reused by all 12 (model.compile: blocks)
  vit-bf16-blocks-cudnn    + the cuDNN attention kernel forced
  vit-bf16-blocks-flash    + the Flash attention kernel forced
  vit-bf16-compile         bf16, the whole model compiled (model.compile: true) instead of its blocks
  resnet50, resnet50-bf16, resnet50-bf16-compile   the same for ResNet-50 (its blocks compile whole)
Extras (--only): vit-compile, vit-blocks, vit-cudnn, vit-flash, vit-efficient, vit-foreach (Adam's
multi-tensor kernels instead of the fused one), vit-host and resnet50-host (batches gathered on the host),
resnet50-compile.
Fused Adam/SGD is already today's path on CUDA (build_optimizer), under master weights too; RMSprop has no
fused kernel. Each compiled variant runs in a fresh inductor cache (cold), then once more in a second
process over the same cache (what the next trainer process pays), and its model is built again in this
process (what the next trial of a long-lived trainer pays).
Prints training images/s, model FLOP utilisation (achieved training FLOP/s over the card's bf16 dense
peak), evaluation images/s, peak memory and warm-up seconds, then what the study's sweep
(sweeps/paper.yaml) would take at the best rates.
Anchors: timm trains vit_base_patch16_224 at ~391 img/s and ResNet-50 at ~1,218 img/s on an RTX 3090
(AMP); an H100's bf16 peak (~989 TFLOP/s) bounds ViT-B/16 training at ~9,400 img/s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainers.config import from_dict
from trainers.data.dataset import DataReport, PreparedData
from trainers.data.split import TEST, TRAIN, VAL
from trainers.models import build_model, compile_model
from trainers.precision import resolve_precision
from trainers.train import (Checkpoint, Loop, build_optimizer, evaluate, resident_images, run_training,
                            train_one_epoch)

# Forward GFLOP per image at 224 px (multiply-adds x 2); a training step is ~3x the forward pass.
FORWARD_GFLOP = {"vit": 2 * 17.56, "resnet50": 2 * 4.09}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
STUDY_IMAGES = 55_000      # images per epoch in the study
GOALS = {"vit": 4000.0, "resnet50": 6000.0}    # training images/s at batch 256, 224 px, one H100/H200
WARMUP_GOAL_S = 60.0       # compilation, paid once per trainer process
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Variant:
    model: str
    precision: str = "autocast"          # train.precision
    compile: bool | str = False          # model.compile
    attention: str | None = None         # None: PyTorch picks the SDPA kernel (what a trial does)
    resident: bool = True                # the uint8 set on the GPU (as a trial does when it fits)
    fused: bool = True                   # False: Adam's multi-tensor (foreach) kernels


VARIANTS = {
    "vit": Variant("vit"),
    "vit-bf16": Variant("vit", "bf16"),
    "vit-bf16-blocks": Variant("vit", "bf16", "blocks"),
    "vit-bf16-blocks-cudnn": Variant("vit", "bf16", "blocks", "cudnn"),
    "vit-bf16-blocks-flash": Variant("vit", "bf16", "blocks", "flash"),
    "vit-bf16-compile": Variant("vit", "bf16", True),
    "resnet50": Variant("resnet50"),
    "resnet50-bf16": Variant("resnet50", "bf16"),
    "resnet50-bf16-compile": Variant("resnet50", "bf16", True),
    "vit-compile": Variant("vit", compile=True),
    "vit-blocks": Variant("vit", compile="blocks"),
    "vit-cudnn": Variant("vit", attention="cudnn"),
    "vit-flash": Variant("vit", attention="flash"),
    "vit-efficient": Variant("vit", attention="efficient"),
    "vit-foreach": Variant("vit", fused=False),
    "vit-host": Variant("vit", resident=False),
    "resnet50-compile": Variant("resnet50", compile=True),
    "resnet50-host": Variant("resnet50", resident=False),
}
CANDIDATES = ("vit", "vit-bf16", "vit-bf16-blocks", "vit-bf16-blocks-cudnn", "vit-bf16-blocks-flash",
              "vit-bf16-compile", "resnet50", "resnet50-bf16", "resnet50-bf16-compile")


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


def attention_kernel(name: str | None):
    """A context forcing one SDPA kernel (cudnn, flash, efficient), or nothing for None."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[name])


def build_bench_loop(v: Variant, data: PreparedData, size: int, batch: int, device: torch.device) -> Loop:
    """What build_loop makes for this variant (its optimizer, precision, compile), over the bench's data."""
    cfg = from_dict({"model": {"name": v.model, "image_size": size, "compile": v.compile},
                     "train": {"batch_size": batch, "eval_batch_size": batch * 2, "device": device.type,
                               "precision": v.precision}})
    torch.manual_seed(0)
    model = build_model(cfg.model, len(data.classes)).to(device)
    if device.type == "cuda" and v.model == "resnet50":
        model = model.to(memory_format=torch.channels_last)
    precision = resolve_precision(cfg.train.precision, device)
    optimizer = build_optimizer(cfg, model, precision)
    for group in optimizer.param_groups:
        if not v.fused and group.get("fused"):
            group["fused"] = False      # Adam then takes its foreach path, as on a device without fused kernels
    step_model = compile_model(model, cfg.model.compile)
    train_idx = data.indices(TRAIN)
    plan = (train_idx, np.random.default_rng(1).random(len(train_idx)) < 0.2)
    on_device = resident_images(data.images, device) if v.resident else None
    return Loop(cfg, data, model, step_model, optimizer, device, plan, loss_fn=nn.CrossEntropyLoss(),
                eval_loss=nn.CrossEntropyLoss(), resident=on_device, precision=precision)


def timed(step, device: torch.device) -> float:
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def measure(v: Variant, size: int, batch: int, steps: int, device: torch.device) -> dict:
    """Training and evaluation images/s after a warm-up epoch (compilation happens there); for a compiled
    variant also the warm-up of a second model built in this process (the next trial's)."""
    data = fake_data(int(batch * steps / 0.8) + 1, size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with attention_kernel(v.attention):
        loop = build_bench_loop(v, data, size, batch, device)
        warmup = timed(lambda: (train_one_epoch(loop, 0), evaluate(loop, VAL)), device)
        train_s = timed(lambda: train_one_epoch(loop, 1), device)
        eval_s = timed(lambda: evaluate(loop, VAL), device)
        next_trial = None
        if v.compile:
            again = build_bench_loop(v, data, size, batch, device)
            first_epoch = timed(lambda: (train_one_epoch(again, 0), evaluate(again, VAL)), device)
            next_trial = max(first_epoch - train_s - eval_s, 0.0)
    train_ips = len(data.indices(TRAIN)) / train_s
    # Warm-up: what the first epoch (and evaluation) took beyond a later one: compilation, autotuning, allocation.
    return {"train_img_s": train_ips, "eval_img_s": len(data.indices(VAL)) / eval_s,
            "warmup_s": max(warmup - train_s - eval_s, 0.0),
            "next_trial_warmup_s": next_trial, "resident": loop.resident is not None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
            "train_tflops": train_ips * 3 * FORWARD_GFLOP[v.model] * (size / 224) ** 2 / 1e3}


def next_process_warmup(label: str, args: argparse.Namespace) -> float | None:
    """The warm-up a second process pays for one variant (same sizes) over the inductor cache this one filled."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        command = [sys.executable, __file__, "--only", label, "--steps", str(args.steps), "--no-checks",
                   "--no-next-process", "--cache-dir", os.environ["TORCHINDUCTOR_CACHE_DIR"], "--json", str(out)]
        done = subprocess.run(command + (["--smoke"] if args.smoke else []), capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0 or not out.exists():
            print(f"  second process failed: {done.stderr[-500:]}", flush=True)
            return None
        runs = json.loads(out.read_text())["runs"]
    return runs[0].get("warmup_s") if runs else None


def trial_check(device: torch.device, size: int, precision: str) -> dict:
    """A real trial on this device: 2 epochs, then the same trial resumed from its checkpoint to 3."""
    data = fake_data(640, size)
    raw = {"model": {"name": "vit", "image_size": size,
                     "vit": {"patch_size": 8, "hidden_size": 96, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "intermediate_size": 192}},
           "optim": {"name": "adam", "lr": 1e-3},
           "train": {"epochs": 2, "batch_size": 64, "device": device.type, "precision": precision}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Checkpoint(Path(tmp))
        start = time.perf_counter()
        first = run_training(from_dict(raw), data, build_model(from_dict(raw).model, 6), checkpoint)
        raw["train"]["epochs"] = 3
        model = build_model(from_dict(raw).model, 6)
        resumed = run_training(from_dict(raw), data, model, checkpoint)
        seconds = time.perf_counter() - start
    epochs = [row["epoch"] for row in resumed.history]
    assert first.status == resumed.status == "finished", (first.status, resumed.status)
    assert epochs == [1, 2, 3], epochs
    assert {p.dtype for p in model.parameters()} == {torch.float32}     # what a trial exports
    return {"precision": precision, "status": resumed.status, "epochs": epochs, "seconds": seconds,
            "test_macro_f1": resumed.test["macro_f1"]}


def checkpoint_cost(device: torch.device, size: int, precision: str) -> dict:
    """Seconds a trial's epoch waits for its checkpoint (ViT-B/16 with Adam's moments, and the master weights
    under bf16): the hand-off to the background writer, against writing the same state synchronously."""
    cfg = from_dict({"model": {"name": "vit", "image_size": size}, "train": {"device": device.type}})
    model = build_model(cfg.model, 6).to(device)
    optimizer = build_optimizer(cfg, model, resolve_precision(precision, device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(torch.rand(2, 3, size, size, device=device)).float().sum().backward()
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
    return {"precision": precision, "handoff_s": handoff, "write_s": full, "size_mb": size_mb}


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


def run_variant(label: str, args, size: int, batch: int, steps: int, device: torch.device) -> dict:
    """One variant measured and printed; a failure (a compiler error, memory) is recorded, not raised."""
    v = VARIANTS[label]
    try:
        r = {"variant": label, **asdict(v), **measure(v, size, batch, steps, device)}
    except Exception as err:
        print(f"{label:22s} failed: {type(err).__name__}: {err}", flush=True)
        return {"variant": label, **asdict(v), "error": repr(err)[:2000]}
    finally:
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = peak_tflops()
    r["mfu"] = r["train_tflops"] / peak if peak else None
    if v.compile and not args.no_next_process:
        r["next_process_warmup_s"] = next_process_warmup(label, args)
    mfu = f"{r['mfu']:.1%}" if peak else "n/a"
    warm = "".join(f" / {r[k]:.1f}" if r.get(k) is not None else "" for k in ("next_trial_warmup_s",
                                                                          "next_process_warmup_s"))
    print(f"{label:22s} train {r['train_img_s']:8.1f} img/s  MFU {mfu:>6s}  eval {r['eval_img_s']:8.1f} img/s  "
          f"peak {r['peak_gib']:5.1f} GiB  warm-up {r['warmup_s']:5.1f}{warm} s", flush=True)
    return r


def print_summary(results: dict) -> None:
    """The best rate per model against its goal, the compiled warm-ups against theirs, and the study's sweep."""
    runs = [r for r in results["runs"] if "error" not in r]
    best = {}
    for name, goal in GOALS.items():
        mine = [r for r in runs if r["model"] == name]
        top = max(mine, key=lambda r: r["train_img_s"], default=None)
        best[name] = top["train_img_s"] if top else float("nan")
        label = top["variant"] if top else "none"
        print(f"best {name}: {best[name]:.0f} img/s ({label}; goal on one H100/H200 >= {goal:.0f})")
    for r in runs:
        if r["compile"]:
            print(f"warm-up {r['variant']}: {r['warmup_s']:.1f} s cold, next trial {r['next_trial_warmup_s']:.1f} s, "
                  f"next process {r.get('next_process_warmup_s') or float('nan'):.1f} s (goal <= {WARMUP_GOAL_S:.0f})")
    epochs = study_epochs()
    seconds = sum(n * STUDY_IMAGES / best[name] for name, n in epochs.items())
    results["study"] = {"epochs": epochs, "train_minutes": seconds / 60}
    print(f"study sweep ({epochs}, {STUDY_IMAGES} images per epoch): ~{seconds / 60:.1f} min of training "
          "at these rates (goal < 20)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is")
    parser.add_argument("--steps", type=int, default=30, help="batches per measured epoch")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--only", help="comma-separated variants (default: the candidates), or all")
    parser.add_argument("--no-checks", action="store_true", help="skip the trial and checkpoint checks")
    parser.add_argument("--no-next-process", action="store_true",
                        help="do not time a compiled variant's warm-up again in a second process")
    parser.add_argument("--cache-dir", help="inductor cache to compile into (default: a fresh one, removed after)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # A fresh inductor cache: the first compile is measured cold; the second process (next_process_warmup)
    # is given it and finds the kernels this one compiled, as a sweep's next trainer process does.
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as fresh:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or fresh
        measure_all(args)


def measure_all(args: argparse.Namespace) -> None:
    """The checks, then each chosen variant, then the summary; the figures to --json."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, batch, steps = (32, 8, 2) if args.smoke else (224, 256, args.steps)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {card}; torch {torch.__version__}; {size} px, batch {batch}, {steps} batches per epoch",
          flush=True)
    results: dict = {"device": card, "torch": torch.__version__, "size": size, "batch": batch, "runs": []}
    if not args.no_checks:
        results["trial"] = [trial_check(device, 32 if args.smoke else 64, p) for p in ("autocast", "bf16")]
        print(f"trial check: {results['trial']}", flush=True)
        results["checkpoint"] = [checkpoint_cost(device, size, p) for p in ("autocast", "bf16")]
        for c in results["checkpoint"]:
            print(f"checkpoint ({c['precision']}): ViT-B/16 + Adam {c['size_mb']:.0f} MB; an epoch waits "
                  f"{c['handoff_s']:.2f} s for it (written in the background; synchronously {c['write_s']:.2f} s)",
                  flush=True)
    chosen = list(VARIANTS) if args.only == "all" else args.only.split(",") if args.only else list(CANDIDATES)
    for label in chosen:
        v = VARIANTS[label]
        if args.smoke and not args.only and (v.compile or v.attention):
            continue      # compiling on a CPU takes minutes, the forced kernels are CUDA's: only when named
        results["runs"].append(run_variant(label, args, size, batch, steps, device))
    if len(chosen) > 1:
        print_summary(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
