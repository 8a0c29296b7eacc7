"""The two model families of the study, behind one explicit table: MODELS[name](cfg, n_classes)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from trainers.config import ModelConfig
from trainers.errors import UserError, first_line

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIT_MEAN, VIT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)   # google/vit-* processors


class ModelUnavailableError(UserError, RuntimeError):
    """Pretrained weights cannot be loaded (offline, missing file); the message says how to supply them."""


class FerClassifier(nn.Module):
    """A backbone plus its normalisation: takes float images in [0, 1], N x 3 x H x W; returns logits."""

    def __init__(self, backbone: nn.Module, family: str, mean, std, interpolate_pos: bool = False):
        super().__init__()
        self.backbone = backbone
        self.family = family
        # A pretrained ViT used at another input size than it was trained at (e.g. 112 px
        # instead of 224) interpolates its position embeddings instead of re-learning them.
        self.interpolate_pos = interpolate_pos
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.family == "vit":
            return self.backbone(pixel_values=x, interpolate_pos_encoding=self.interpolate_pos).logits
        return self.backbone(x)


def build_vit(cfg: ModelConfig, n_classes: int) -> FerClassifier:
    """transformers ViTForImageClassification: a hub id / local folder, or an explicit small shape."""
    from transformers import ViTConfig, ViTForImageClassification

    if cfg.pretrained is None:
        a = cfg.vit
        config = ViTConfig(image_size=cfg.image_size, patch_size=a.patch_size, hidden_size=a.hidden_size,
                           num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
                           intermediate_size=a.intermediate_size, num_labels=n_classes,
                           attn_implementation="sdpa")
        return FerClassifier(ViTForImageClassification(config), "vit", VIT_MEAN, VIT_STD)
    try:
        backbone = ViTForImageClassification.from_pretrained(
            cfg.pretrained, num_labels=n_classes, ignore_mismatched_sizes=True,
            attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise ModelUnavailableError(
            f"model.pretrained: ViT weights '{cfg.pretrained}' could not be loaded ({first_line(err)}); "
            "download them once with `huggingface-cli download "
            f"{cfg.pretrained}` on a machine with network, or set model.pretrained to a local folder "
            "holding config.json and model.safetensors") from None
    mean, std = _processor_stats(cfg.pretrained)
    resized = backbone.config.image_size != cfg.image_size
    return FerClassifier(backbone, "vit", mean, std, interpolate_pos=resized)


def _processor_stats(name_or_path: str) -> tuple[tuple, tuple]:
    """image_mean / image_std from a local preprocessor_config.json, else the ViT defaults."""
    path = Path(name_or_path) / "preprocessor_config.json"
    if path.is_file():
        stats = json.loads(path.read_text())
        return tuple(stats.get("image_mean", VIT_MEAN)), tuple(stats.get("image_std", VIT_STD))
    return VIT_MEAN, VIT_STD


def build_resnet50(cfg: ModelConfig, n_classes: int) -> FerClassifier:
    """torchvision ResNet-50 with weights none, a torchvision weights name, or a local state-dict file."""
    from torchvision.models import ResNet50_Weights, resnet50

    source = cfg.pretrained
    if source is None:
        net = resnet50(weights=None)
    elif Path(source).suffix in (".pt", ".pth", ".bin", ".safetensors") or Path(source).exists():
        net = resnet50(weights=None)
        try:
            net.load_state_dict(_read_state_dict(Path(source)))
        except RuntimeError as err:
            raise ModelUnavailableError(f"model.pretrained: '{source}' does not hold ResNet-50 weights "
                                        f"({first_line(err)})") from None
    else:
        net = resnet50(weights=_torchvision_weights(ResNet50_Weights, source))
    net.fc = nn.Linear(net.fc.in_features, n_classes)
    return FerClassifier(net, "resnet50", IMAGENET_MEAN, IMAGENET_STD)


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise ModelUnavailableError(f"model.pretrained: weights file '{path}' does not exist; "
                                    "point it at a ResNet-50 state dict (.pth)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        # weights_only: a state dict needs no pickled code, and a downloaded file must not run any.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # truncated download, wrong format, or a pickle that needs code
        raise ModelUnavailableError(f"model.pretrained: '{path}' is not a readable state dict "
                                    f"({type(err).__name__}: {first_line(err)}); download it again") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _torchvision_weights(enum, name: str):
    try:
        weights = enum[name.removeprefix("ResNet50_Weights.")]
    except KeyError:
        options = ", ".join(w.name for w in enum)
        raise ModelUnavailableError(f"model.pretrained: unknown ResNet-50 weights '{name}'; "
                                    f"use one of {options}, a local .pth file, or null") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.exists():
        try:
            weights.get_state_dict(progress=False)
        except Exception as err:   # URLError, HTTPError, socket errors: all mean "not downloadable here"
            raise ModelUnavailableError(
                f"model.pretrained: ResNet-50 weights {weights.name} are not cached at {cached} and could "
                f"not be downloaded ({first_line(err)}); copy the file there, or set model.pretrained to a "
                "local .pth file") from None
    return weights


MODELS = {"vit": build_vit, "resnet50": build_resnet50}


def build_model(cfg: ModelConfig, n_classes: int) -> FerClassifier:
    """The model named by cfg.name, head sized to n_classes, every parameter trainable."""
    model = MODELS[cfg.name](cfg, n_classes)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def compile_model(model: FerClassifier, mode: bool | str) -> nn.Module:
    """What training steps run through under model.compile: the model itself (false), torch.compile's
    wrapper of it (true), or, for blocks, the model with each repeated block compiled in place.

    A block compiled with module.compile() shares its code with its siblings, so one graph serves all 12
    layers of a ViT-B/16 (and the next trial's model of the same shape, in the same process); the compiled
    kernels are cached on disk (TORCHINDUCTOR_CACHE_DIR, under mlruns/cache/) for the next process. A model
    without a repeated block of one shape is compiled whole.
    """
    if mode is False:
        return model
    blocks = repeated_blocks(model) if mode == "blocks" else []
    if not blocks:
        return torch.compile(model)
    for block in blocks:
        block.compile()
    return model


def repeated_blocks(model: FerClassifier) -> list[nn.Module]:
    """The blocks compile_model compiles one graph for: a ViT's encoder layers. None for ResNet-50: its 16
    bottlenecks come in 8 shapes (each stage's first block downsamples), so one training batch size already
    makes 8 graphs, dynamo's recompile_limit for one function; a ninth (eval mode, another batch size) would
    run uncompiled."""
    if model.family != "vit":
        return []
    from transformers.models.vit.modeling_vit import ViTLayer
    return [m for m in model.modules() if isinstance(m, ViTLayer)]


def move_exported(module, device):
    """module.to(device) for a torch.export graph, whose ops carry the export device (cpu) burnt in.

    A ViT's graph creates position indices with aten.arange(..., device=cpu); moved with .to()
    alone it fails on any other device. This rewrites those arguments, as
    torch.export.passes.move_to_device_pass does for an ExportedProgram.
    """
    module = module.to(device)
    for sub in module.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            if "device" in node.kwargs:
                node.kwargs = {**node.kwargs, "device": device}
            if node.op == "call_function" and node.target is torch.ops.aten.to.device:
                node.args = (node.args[0], device, *node.args[2:])
        sub.recompile()
    return module
