"""Training throughput through the project's own training step, on synthetic tensors (no download).

    python tests/bench/gpu_throughput.py            # on a CUDA machine: ViT-B/16 and ResNet-50, 224 px, batch 256
    python tests/bench/gpu_throughput.py --smoke    # a tiny CPU run that only checks the script works

Prints images/s and model FLOP utilisation (achieved training FLOP/s over the card's bf16 peak).
Anchors: timm trains vit_base_patch16_224 at ~391 img/s and ResNet-50 at ~1,218 img/s on an RTX 3090
(AMP); an H100's bf16 peak (~989 TFLOP/s) bounds ViT-B/16 training at ~9,400 img/s.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from trainers.config import from_dict
from trainers.data.dataset import DataReport, PreparedData
from trainers.models import build_model
from trainers.train import train_one_epoch

# Forward GFLOPs per image at 224 px (multiply-adds x 2); training ~ 3x forward.
FORWARD_GFLOP = {"vit": 2 * 17.56, "resnet50": 2 * 4.09}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def fake_data(n: int, size: int, classes: int = 6) -> PreparedData:
    """Random uint8 images, all in the training split: the cached-tensor input the trainer reads."""
    rng = np.random.default_rng(0)
    return PreparedData(images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                        labels=rng.integers(0, classes, n), splits=np.zeros(n, np.int8),
                        classes=tuple(f"c{i}" for i in range(classes)), paths=[""] * n, subjects=[None] * n,
                        attrs=[{}] * n, digest="bench", root="", report=DataReport())


def measure(model_name: str, size: int, batch: int, steps: int, compile_model: bool, device: torch.device) -> float:
    """Images per second of train_one_epoch after one warm-up epoch (compilation happens there)."""
    model_cfg = {"name": model_name, "image_size": size, "compile": compile_model}
    cfg = from_dict({"model": model_cfg, "train": {"batch_size": batch, "device": device.type}})
    data = fake_data(batch * steps, size)
    model = build_model(cfg.model, 6).to(device)
    if device.type == "cuda" and model_name == "resnet50":
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    plan = (np.arange(len(data.labels)), np.zeros(len(data.labels), bool))
    loss_fn = nn.CrossEntropyLoss()
    train_one_epoch(step_model, data, plan, optimizer, loss_fn, cfg, 0, device)      # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_one_epoch(step_model, data, plan, optimizer, loss_fn, cfg, 1, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(data.labels) / (time.perf_counter() - start)


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is")
    parser.add_argument("--steps", type=int, default=20, help="batches per measured epoch")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    size, batch, steps = (32, 8, 2) if args.smoke else (224, 256, args.steps)
    peak = peak_tflops()
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; {size} px, batch {batch}")
    for name, compile_model in (("vit", False), ("vit", True), ("resnet50", False), ("resnet50", True)):
        if args.smoke and compile_model:
            continue
        ips = measure(name, size, batch, steps, compile_model, device)
        flops = ips * 3 * FORWARD_GFLOP[name] * 1e9 * (size / 224) ** 2
        mfu = f"{flops / (peak * 1e12):.1%}" if peak else "n/a"
        print(f"{name:9s} compile={compile_model!s:5s} {ips:9.1f} img/s   {flops / 1e12:7.1f} TFLOP/s   MFU {mfu}")


if __name__ == "__main__":
    main()
