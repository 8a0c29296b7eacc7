"""What one photo costs the shipped model on this machine's CPU, step by step, and end to end.

Per image, over a batch of 16 copies of scikit-image's 512 x 512 astronaut (JPEG):
  decode    = decode_image_bytes at the size training decodes to
  face      = MTCNN detection and the crop (warp onto the template for align: mtcnn)
  network   = the exported network (torch.export, as logged) on the cropped faces
  total     = PhotoModel.predict on the encoded bytes; `overhead` = total / network
and the latency of one photo sent alone. Networks are randomly initialised: speed does not depend on weights.
"""
import io
import time

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from trainers.config import DEFAULT_CLASSES, ModelConfig, ViTArchConfig
from trainers.data.images import decode_image_bytes, decode_side
from trainers.models import build_model
from trainers.photo_model import PhotoModel, PhotoSettings

BATCH = 16
# The demo's ViT (32 px, align none: centre crop, the face still looked for) and the study's ViT-B/16.
MODELS = {
    "demo ViT 32 px, align none": (ModelConfig(name="vit", image_size=32, vit=ViTArchConfig(8, 96, 4, 4, 192)),
                                   "none"),
    "ViT-B/16 224 px, align mtcnn": (ModelConfig(name="vit", image_size=224), "mtcnn"),
}


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def exported(cfg: ModelConfig):
    network = build_model(cfg, len(DEFAULT_CLASSES)).eval()
    example = torch.zeros(2, 3, cfg.image_size, cfg.image_size)
    return torch.export.export(network, (example,), dynamic_shapes=[{0: torch.export.Dim.AUTO}]).module()


def test_photo_latency_per_image_on_cpu():
    buffer = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buffer, "JPEG", quality=90)
    payloads = [buffer.getvalue()] * BATCH
    print(f"\nper photo, batch of {BATCH} ({torch.get_num_threads()} torch threads):")
    for title, (cfg, align) in MODELS.items():
        model = PhotoModel(exported(cfg), PhotoSettings(DEFAULT_CLASSES, cfg.image_size, align, 0.1, "vit",
                                                             decode_side(cfg.image_size), False), "cpu")
        model.predict(payloads[:2])                          # warm-up: MTCNN and the network built
        side = decode_side(cfg.image_size)
        images = [decode_image_bytes(p, side)[0] for p in payloads]
        faces = np.stack([a.image for a in model.crop(images)])
        decode = best_of(3, lambda: [decode_image_bytes(p, side) for p in payloads]) / BATCH
        face = best_of(3, lambda: model.crop(images)) / BATCH
        network = best_of(3, lambda: model.probabilities(faces)) / BATCH
        total = best_of(3, lambda: model.predict(payloads)) / BATCH
        alone = best_of(3, lambda: model.predict(payloads[:1]))
        print(f"  {title}: decode {decode * 1e3:.1f} ms, face {face * 1e3:.1f} ms, network {network * 1e3:.1f} ms, "
              f"total {total * 1e3:.1f} ms ({1 / total:.1f} photos/s; overhead {total / network:.1f}x the "
              f"network); one photo alone {alone * 1e3:.0f} ms")
        assert total < 5.0, "a photo should take well under 5 s on any CPU"
