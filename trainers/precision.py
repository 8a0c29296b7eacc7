"""The arithmetic a trial trains in (train.precision), and the optimizer that keeps fp32 master weights.

autocast: fp32 weights, bf16 autocast on CUDA, plain fp32 on CPU (the path every trial took before this
option). bf16: the weights themselves in bf16, norm layers' in fp32, the forward under bf16 autocast on
any device; the optimizer steps fp32 master copies (MasterWeightOptimizer). Autocast re-casts every fp32
weight to bf16 in each step's forward and backward: ~18% of a ViT-B/16 step's GPU time on an H200,
which bf16 weights do not pay. fp32: no autocast anywhere.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# Layers whose parameters (and BatchNorm's running statistics, which are buffers) stay fp32 under bf16:
# their affine weights are a few KB, and bf16's 8-bit significand would round running variances and
# layer-norm gains by up to 0.4%. Under autocast they run with fp32 weights already (layer_norm is on its
# fp32 list; batch_norm takes bf16 inputs with fp32 weights and statistics): bf16 copies would add casts.
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
               nn.SyncBatchNorm)


# What train.precision: auto means on CUDA. bf16 weights are not measured on a GPU yet, so auto stays on the
# old path: flip this to "bf16" once tests/bench/gpu_throughput.py measures vit-bf16 faster than vit (and a
# short fine-tune reaches the same validation F1). auto is left out of config_hash, so after the flip a
# sweep counts its earlier auto runs (autocast) as done: rerun them, or set train.precision explicitly.
AUTO_ON_CUDA = "autocast"


def resolve_precision(name: str, device: torch.device) -> str:
    """train.precision as this device runs it: auto is AUTO_ON_CUDA on CUDA and autocast elsewhere."""
    if name != "auto":
        return name
    return AUTO_ON_CUDA if device.type == "cuda" else "autocast"


def autocast(device: torch.device, precision: str = "autocast"):
    """bf16 autocast where the precision computes in bf16: autocast on CUDA (on CPU bf16 matmuls are slow
    on most CPUs), bf16 on any device (its bf16 weights meet fp32 inputs and norm layers); fp32 never."""
    enabled = precision == "bf16" or (precision == "autocast" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def cast_to_bf16(model: nn.Module) -> nn.Module:
    """The model's parameters in bf16, in place, except those of norm layers; buffers stay as they are."""
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(torch.bfloat16)
    return model


class MasterWeightOptimizer:
    """A torch optimizer (sgd, rmsprop, adam: its own update rule and fused kernels) stepping fp32 master
    copies of a model's bf16 parameters.

    backward leaves bf16 gradients on the model; step() copies them onto the masters (exact: every bf16
    value is an fp32 value), steps the wrapped optimizer in fp32, and writes the masters back to the model
    rounded to the nearest bf16. An update below half of bf16's spacing (2^-9 to 2^-8 of the weight, 0.2-0.4%;
    lr 1e-4 x a gradient of 1 on a weight of 0.1 is 0.1% of it) rounds back to the old weight in a bf16
    optimizer, every step; here it accumulates on the master until the bf16 weight moves. fp32 parameters (norm
    layers) are their own masters. state_dict() holds the wrapped optimizer's state and the masters.
    """

    def __init__(self, model: nn.Module, build: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
        """Casts the fp32 model's weights to bf16 (cast_to_bf16); the masters start from its fp32 values, so a
        pretrained fp32 weight keeps the bits bf16 would round off."""
        self.params = list(model.parameters())
        originals = [p.detach().clone() for p in self.params]
        cast_to_bf16(model)
        masters = [p if p.dtype == torch.float32 else o.float() for p, o in zip(self.params, originals)]
        self.pairs = [(p, m) for p, m in zip(self.params, masters) if m is not p]   # (bf16 weight, its master)
        self.optimizer = build(masters)

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's groups (lr, the fused flag), over the masters."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        with_grad = []
        for p, m in self.pairs:
            if p.grad is None:
                m.grad = None      # skipped by the wrapped optimizer, as the model's parameter would be
                continue
            if m.grad is None:     # kept between steps: fp32 gradients are 4 bytes a weight, allocated once
                m.grad = torch.empty_like(m)
            with_grad.append((p, m))
        if with_grad:
            torch._foreach_copy_([m.grad for _, m in with_grad], [p.grad for p, _ in with_grad])
        self.optimizer.step()
        self._write_back()

    def _write_back(self) -> None:
        if self.pairs:
            torch._foreach_copy_([p for p, _ in self.pairs], [m for _, m in self.pairs])

    def state_dict(self) -> dict:
        """The wrapped optimizer's state_dict plus 'master_weights': the fp32 masters of the bf16 weights."""
        return {**self.optimizer.state_dict(), "master_weights": [m for _, m in self.pairs]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """The wrapped optimizer's state and the masters, then the model's bf16 weights rounded from them."""
        state = dict(state)
        masters = state.pop("master_weights", None)
        self.optimizer.load_state_dict(state)
        if masters is None:      # an autocast checkpoint of this trial (auto flipped to bf16 meanwhile): its
            masters = [p for p, _ in self.pairs]     # weights, as the model loaded them in bf16, are all there is
        if len(masters) != len(self.pairs):
            raise ValueError(f"the checkpoint holds {len(masters)} master weights; this model has "
                             f"{len(self.pairs)} bf16 parameters")
        for (_, m), saved in zip(self.pairs, masters):
            m.copy_(saved)
        self._write_back()

    @torch.no_grad()
    def release_fp32(self) -> None:
        """The model's bf16 parameters replaced by fp32 copies of their masters; the optimizer is done."""
        for p, m in self.pairs:
            p.grad = None        # a bf16 gradient cannot stay on an fp32 tensor
            p.data = m.detach().clone()
        self.pairs = []


def release_fp32(optimizer) -> None:
    """A model trained with bf16 weights handed back in fp32 (its masters); any other optimizer: nothing."""
    if isinstance(optimizer, MasterWeightOptimizer):
        optimizer.release_fp32()
