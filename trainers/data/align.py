"""Face alignment: decoded RGB images in, model-sized uint8 faces out, each flagged found or fallen back.

``none`` crops the centred square. ``mtcnn`` finds boxes and five landmarks
with facenet-pytorch's MTCNN (its weights ship in the wheel), keeps the most
confident face (the largest among confident ones), and warps it with a
similarity transform that puts the landmarks on a canonical five-point
template; facenet-pytorch only crops boxes, so the warp is ours (scikit-image).
A face not found falls back to the centre crop, flagged, so it is counted.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image
from skimage.transform import SimilarityTransform, warp

from trainers.data.images import centre_square

# The five-point template of ArcFace/InsightFace for a 112 x 112 crop, in
# (x, y) pixels: left eye, right eye, nose tip, left and right mouth corner
# (left = image left), the same order MTCNN reports its landmarks in.
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]])

# A detection below this confidence is not a face. MTCNN's last stage already
# stops at 0.7; facenet-pytorch selects faces at 0.9, and so do we.
FACE_THRESHOLD = 0.9

# Detection runs on a copy whose long side is at most this many times the
# output size, and at least DETECT_MIN_SIDE (never upscaled): 448 px for a
# 224 px model. A face big enough to be worth 224 px is found as well there,
# at a quarter of the pixels of the 4x-decoded image the warp samples from.
# The floor keeps faces of small models' photos above MTCNN's 20 px minimum.
DETECT_SCALE = 2
DETECT_MIN_SIDE = 256

# An annotated face box (AffectNet) is widened by this fraction on each side
# before detection: MTCNN needs some context around a face to find it.
BOX_CONTEXT = 0.25

# MTCNN's default smallest face, in pixels; a smaller image cannot hold one.
MIN_FACE_SIDE = 20

# Images detected in one MTCNN call. Equal-sized images share every pyramid level;
# 32 at 448 x 448 is ~25 MB of input and well under 1 GB of activations.
DETECT_BATCH = 32


@dataclass(frozen=True)
class Face:
    """The face MTCNN chose in one image, in that image's pixels."""
    box: np.ndarray             # x0, y0, x1, y1
    landmarks: np.ndarray       # 5 x 2 (x, y): eyes, nose tip, mouth corners
    probability: float


@dataclass(frozen=True)
class Aligned:
    """One aligned face: size x size x 3 uint8, whether the aligner fell back to a centre crop, and the face."""
    image: np.ndarray
    fallback: bool
    face: Face | None = None    # None for align: none and for a fallback


class Aligner(Protocol):
    """Turns decoded RGB images (any sizes) into aligned faces, one per input, in order."""
    settings: dict
    box_context: float          # how far to widen a given face box before aligning its crop

    def align(self, images: list[np.ndarray]) -> list[Aligned]: ...


class CentreCrop:
    """align: none. The centred largest square, resized; never a fallback."""
    box_context = 0.0           # a given face box is the crop

    def __init__(self, size: int):
        self.size = size
        self.settings = {"align": "none", "size": size}

    def align(self, images: list[np.ndarray]) -> list[Aligned]:
        return [Aligned(centre_square(rgb, self.size), False) for rgb in images]


@dataclass
class DetectorStats:
    """How often a detector ran in this process: lets a test (or a log) prove a cache hit detected nothing."""
    calls: int = 0
    images: int = 0


DETECTOR_STATS = DetectorStats()
_DETECTORS: dict[str, object] = {}
_DETECTORS_LOCK = threading.Lock()


def canonical_landmarks(size: int, margin: float) -> np.ndarray:
    """The template scaled to a size x size output, with ``margin`` of the face box added on each side."""
    unit = TEMPLATE_112 / 112.0 - 0.5           # centred, in face-box units
    return (unit / (1.0 + 2.0 * margin) + 0.5) * size


def detector_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_detector(device: str):
    """facenet-pytorch's MTCNN on ``device``, built once per process (its weights ship in the wheel)."""
    with _DETECTORS_LOCK:
        if device not in _DETECTORS:
            from facenet_pytorch import MTCNN
            _DETECTORS[device] = MTCNN(device=device)   # detect() returns every face; we choose
        return _DETECTORS[device]


class MtcnnAligner:
    """align: mtcnn. Batched MTCNN detection, then a similarity warp onto the template."""
    box_context = BOX_CONTEXT

    def __init__(self, size: int, margin: float, device: str | None = None, detector=None):
        self.size = size
        self.margin = margin
        self.settings = {"align": "mtcnn", "margin": margin, "size": size}
        self.template = canonical_landmarks(size, margin)
        self._device = device
        self._detector = detector      # built on first use: a cache hit never loads it

    @property
    def detector(self):
        if self._detector is None:
            self._detector = load_detector(self._device or detector_device())
        return self._detector

    def align(self, images: list[np.ndarray]) -> list[Aligned]:
        faces = self.detect_faces(images)
        return [self.warp_face(rgb, face) for rgb, face in zip(images, faces)]

    def detect_landmarks(self, images: list[np.ndarray]) -> list[np.ndarray | None]:
        """Five (x, y) landmarks of the chosen face per image, in its own pixels; None where no face."""
        return [None if face is None else face.landmarks for face in self.detect_faces(images)]

    def detect_faces(self, images: list[np.ndarray]) -> list[Face | None]:
        """The chosen face per image, in its own pixels; None where there is none."""
        small = [self._detection_copy(rgb) for rgb in images]
        out: list[Face | None] = [None] * len(images)
        by_shape: dict[tuple, list[int]] = {}
        for i, (copy, _) in enumerate(small):
            by_shape.setdefault(copy.shape, []).append(i)
        for shape, members in by_shape.items():
            if min(shape[:2]) < MIN_FACE_SIDE:
                continue       # smaller than MTCNN's smallest face: its image pyramid would be empty
            for start in range(0, len(members), DETECT_BATCH):
                batch = members[start:start + DETECT_BATCH]
                found = self._detect(np.stack([small[i][0] for i in batch]))
                for i, face in zip(batch, found):
                    out[i] = None if face is None else _scaled(face, 1.0 / small[i][1])
        return out

    def warp_face(self, rgb: np.ndarray, face: Face | None) -> Aligned:
        """The face warped so its landmarks land on the template; the centre crop when there is none."""
        if face is None:
            return Aligned(centre_square(rgb, self.size), True)
        points = face.landmarks
        tform = _estimate(points, self.template)
        if tform is not None and tform.scale < 0.5:
            # Bilinear sampling from more than 2 source pixels per output pixel aliases;
            # shrink the source (antialiased) to about the output's density first.
            rgb, points = _shrink(rgb, points, tform.scale)
            tform = _estimate(points, self.template)
        if tform is None:          # degenerate landmarks (all in one point): no usable face
            return Aligned(centre_square(rgb, self.size), True)
        warped = warp(rgb, tform.inverse, output_shape=(self.size, self.size), order=1, mode="edge",
                      preserve_range=True)
        return Aligned(np.clip(np.rint(warped), 0, 255).astype(np.uint8), False, face)

    def _detection_copy(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        limit = max(DETECT_SCALE * self.size, DETECT_MIN_SIDE)
        height, width = rgb.shape[:2]
        factor = min(1.0, limit / max(height, width))
        if factor >= 1.0:
            return rgb, 1.0
        shape = (max(1, round(width * factor)), max(1, round(height * factor)))
        small = np.asarray(Image.fromarray(rgb).resize(shape, Image.Resampling.BILINEAR))
        return small, small.shape[1] / width

    def _detect(self, batch: np.ndarray) -> list[Face | None]:
        DETECTOR_STATS.calls += 1
        DETECTOR_STATS.images += len(batch)
        boxes, probs, points = self.detector.detect(batch, landmarks=True)
        return [choose_face(b, p, q) for b, p, q in zip(boxes, probs, points)]


def choose_face(boxes, probs, points) -> Face | None:
    """The largest face among confident ones; None when none is confident."""
    if boxes is None or points is None:
        return None
    probs = np.asarray(probs, dtype=np.float64)
    confident = np.flatnonzero(probs >= FACE_THRESHOLD)
    if not len(confident):
        return None
    boxes = np.asarray(boxes, dtype=np.float64)
    area = (boxes[confident, 2] - boxes[confident, 0]) * (boxes[confident, 3] - boxes[confident, 1])
    chosen = confident[int(np.argmax(area))]
    return Face(boxes[chosen], np.asarray(points[chosen], dtype=np.float64), float(probs[chosen]))


def _scaled(face: Face, factor: float) -> Face:
    """The face with its box and landmarks multiplied by factor (detection copy -> image pixels)."""
    return Face(face.box * factor, face.landmarks * factor, face.probability)


def _estimate(src: np.ndarray, dst: np.ndarray) -> SimilarityTransform | None:
    """The least-squares similarity taking src points to dst; None when degenerate (e.g. coincident points)."""
    tform = SimilarityTransform.from_estimate(src, dst)
    return tform if tform and np.all(np.isfinite(tform.params)) else None


def _shrink(rgb: np.ndarray, points: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    height, width = rgb.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
    return small, points * np.array([small.shape[1] / width, small.shape[0] / height])


ALIGNERS = {"none": lambda size, margin: CentreCrop(size),
            "mtcnn": lambda size, margin: MtcnnAligner(size, margin)}


def build_aligner(align: str, size: int, margin: float) -> Aligner:
    """The aligner a DataConfig names, producing size x size faces."""
    return ALIGNERS[align](size, margin)
