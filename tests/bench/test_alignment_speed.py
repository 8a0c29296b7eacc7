"""Alignment throughput on CPU: batched vs one image at a time, and cached vs uncached preparation.

Faces: the astronaut photo shifted and mirrored (equal-sized images, so MTCNN can batch them).
Goal: a cached preparation >= 50x faster than the first one. Run with
`python -m pytest -q -s tests/bench/test_alignment_speed.py`; FER_BENCH_DEVICE=cuda measures a GPU.
"""
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from trainers.config import from_dict
from trainers.data import align
from trainers.data.align import MtcnnAligner
from trainers.data.dataset import prepare_data

DEVICE = os.environ.get("FER_BENCH_DEVICE", "cpu")
N_IMAGES = int(os.environ.get("FER_BENCH_FACES", "32"))


def shifted_faces(n: int, side: int, tight: bool = False) -> list[np.ndarray]:
    """n distinct side x side views of the astronaut (shifted crops, every other one mirrored).

    tight: a 160 px square around her face (box about x 181-268, y 62-172), as fer2013 crops faces.
    """
    photo = skdata.astronaut()
    origin, crop = ((30, 145), 160) if tight else ((0, 0), 440)
    out = []
    for i in range(n):
        top, left = origin[0] + 4 * (i % 6), origin[1] + 4 * (i // 6 % 6)
        view = photo[top:top + crop, left:left + crop]
        view = view[:, ::-1] if i % 2 else view
        out.append(np.asarray(Image.fromarray(np.ascontiguousarray(view)).resize((side, side))))
    return out


def rate(seconds: float, n: int) -> str:
    return f"{n / seconds:8.1f} images/s ({seconds:6.2f} s for {n})"


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def best_of(repeats: int, *fns) -> list[float]:
    """The fastest of ``repeats`` interleaved runs of each fn: the CPU is shared, so load comes and goes."""
    times = [[timed(fn) for fn in fns] for _ in range(repeats)]
    return [min(column) for column in zip(*times)]


def test_batched_detection_against_one_image_at_a_time():
    print(f"\ntorch threads {torch.get_num_threads()}, device {DEVICE}")
    for side, size, tight in ((256, 112, False), (48, 48, True)):   # a photo, and a fer2013-sized face
        faces = shifted_faces(N_IMAGES, side, tight)
        aligner = MtcnnAligner(size, 0.1, device=DEVICE)
        aligner.align(faces[:2])                      # load the weights and warm up
        one, batched = best_of(3, lambda: [aligner.align([face]) for face in faces], lambda: aligner.align(faces))
        found = sum(not f.fallback for f in aligner.align(faces[:8]))
        print(f"{side:3d} px faces -> {size} px: one at a time {rate(one, len(faces))}")
        print(f"{side:3d} px faces -> {size} px: batched {align.DETECT_BATCH:2d}    {rate(batched, len(faces))}"
              f"   batched / one = {one / batched:.2f}x   ({found}/8 found)")


def test_cached_preparation_against_uncached(tmp_path, monkeypatch):
    root = tmp_path / "faces"
    for i, face in enumerate(shifted_faces(N_IMAGES, 256)):
        folder = root / ("anger" if i % 2 else "happiness")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(face).save(folder / f"{i:03d}.jpg", quality=92)
    cfg = from_dict({"data": {"source": "imagefolder", "root": str(root), "classes": ["anger", "happiness"],
                              "align": "mtcnn", "cache_dir": str(tmp_path / "cache")}}).data
    monkeypatch.setattr(align, "detector_device", lambda: DEVICE)   # CPU even where a GPU is visible
    align.load_detector(DEVICE)                      # weights loaded outside the timing
    uncached = timed(lambda: prepare_data(cfg, 112))
    cached, = best_of(3, lambda: prepare_data(cfg, 112))
    for sets in (tmp_path / "cache" / "aligned").glob("*/sets"):
        shutil.rmtree(sets)
    objects = timed(lambda: prepare_data(cfg, 112))
    print(f"\nprepare uncached (decode + detect + warp) {rate(uncached, N_IMAGES)}")
    print(f"prepare cached, one stacked set file     {rate(cached, N_IMAGES)}   "
          f"uncached / cached = {uncached / cached:.0f}x   goal >= 50x")
    print(f"prepare cached, per-image objects        {rate(objects, N_IMAGES)}   "
          f"uncached / objects = {uncached / objects:.0f}x")
