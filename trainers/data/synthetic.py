"""The synthetic source: procedurally drawn faces with six expressions, so the pipeline runs offline.

Each face is built from eyebrows, eyes and mouth on top of a subject's identity
(skin tone, face shape, eye spacing, hair); pose, lighting and background vary
per image. Every image carries two attributes, ``group`` (a/b, drawn as short
hair and a square jaw versus long hair and an oval face, like the study's
male/female) and ``occluded``. The ``train`` variant reproduces the study's
spurious correlation (group b is rare except in happiness); the ``production``
variant shifts the group mix to mostly b and adds hands and text over faces.

Layout: ``root/<class>/<class>_00001.png`` plus ``root/metadata.csv``
(``path,subject,group,occluded``).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainers.config import SYNTHETIC_ATTRIBUTES, SyntheticConfig

# Bump whenever the drawing changes, so cached datasets are redrawn.
GENERATOR_VERSION = 1

# The study's Table 1: training + validation + testing images per class.
TABLE1_COUNTS: dict[str, int] = {
    "anger": 8228,
    "disgust": 2458,
    "fear": 2983,
    "happiness": 9113,
    "sadness": 13040,
    "surprise": 7417,
}
MIN_PER_CLASS = 10
IMAGES_PER_SUBJECT = 8

# Group b share per class. Train: 0.7 in happiness and 0.08 elsewhere gives
# 0.21 * 0.7 + 0.79 * 0.08 = ~21% b overall, and ~70% of b images are happy,
# the shortcut the study's model learned. Production: 75% b everywhere.
GROUP_B_SHARE = {"train": {"happiness": 0.70, "other": 0.08},
                 "production": {"happiness": 0.75, "other": 0.75}}
OCCLUDED_SHARE = {"train": 0.03, "production": 0.35}
VARIANT_CODES = {"train": 0, "production": 1}

INTENSITY_RANGE = (0.5, 1.0)   # expression strength; 0.5 is subtle
SUPERSAMPLE = 2                # draw at 2x and box-filter down, for smooth strokes
FACE_HALF_HEIGHT = 0.4         # of the image side, before the pose scale
DRAW_THREADS = min(4, os.cpu_count() or 1)


# --- counts and paths -----------------------------------------------------------------

def check_classes(classes: tuple[str, ...]) -> None:
    """Reject classes the synthetic source cannot draw."""
    for name in classes:
        if name not in TABLE1_COUNTS:
            known = ", ".join(TABLE1_COUNTS)
            raise ValueError(f"synthetic source draws only: {known}; got '{name}' in data.classes")


def class_counts(n_images: int, classes: tuple[str, ...]) -> dict[str, int]:
    """Split n_images over classes by Table 1 proportions (largest remainder, at least 10 each)."""
    check_classes(classes)
    if n_images < MIN_PER_CLASS * len(classes):
        raise ValueError(f"n_images must be at least {MIN_PER_CLASS} per class "
                         f"({MIN_PER_CLASS * len(classes)}); got {n_images}")
    total = sum(TABLE1_COUNTS[c] for c in classes)
    quotas = {c: n_images * TABLE1_COUNTS[c] / total for c in classes}
    counts = {c: math.floor(q) for c, q in quotas.items()}
    by_remainder = sorted(classes, key=lambda c: (-(quotas[c] - counts[c]), classes.index(c)))
    for c in by_remainder[:n_images - sum(counts.values())]:
        counts[c] += 1
    # Small totals: lift tiny classes to the minimum, paid for by the largest class.
    for c in classes:
        while counts[c] < MIN_PER_CLASS:
            donor = max(classes, key=lambda k: counts[k])
            counts[donor] -= 1
            counts[c] += 1
    return counts


def synthetic_root(cache_dir: str | Path, cfg: SyntheticConfig, classes: tuple[str, ...]) -> Path:
    """The dataset folder for these settings: cache_dir/synthetic/<12-hex hash>."""
    body = {"cfg": asdict(cfg), "classes": list(classes), "version": GENERATOR_VERSION}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return Path(cache_dir) / "synthetic" / hashlib.sha256(text.encode()).hexdigest()[:12]


# --- what to draw ---------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """One subject's fixed looks, in face units (a = face half-width, b = half-height)."""
    subject: str
    group: str
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    iris: tuple[int, int, int]
    hair_style: int
    width_ratio: float      # a / b
    squareness: float       # superellipse exponent: 2 oval, 3 square
    chin_taper: float       # how much the lower face narrows
    height_scale: float
    eye_spacing: float      # eye centre, in units of a from the midline
    eye_size: float         # eye half-width, in units of a
    brow_offset: float      # resting brow height, in units of b (positive: higher)
    brow_thickness: float   # in units of b
    mouth_width: float      # mouth half-width, in units of a
    lip_red: float          # 0..1, how red the lips are


@dataclass(frozen=True)
class Expression:
    """Face muscle settings; an expression is a point between NEUTRAL and its full shape."""
    brow_raise: float = 0.0     # units of b, up is positive
    brow_inner: float = 0.0     # inner end height relative to outer, units of b
    brow_pull: float = 0.0      # inner ends towards the midline, units of a
    brow_arch: float = 0.02     # mid-brow lift, units of b
    eye_open: float = 0.5       # eye half-height / half-width
    mouth_width: float = 1.0    # times the subject's mouth width
    mouth_curve: float = 0.0    # corner lift, units of b (smile positive)
    mouth_open: float = 0.0     # half-opening at the centre, units of b
    sneer: float = 0.0          # one-sided upper-lip lift, units of b; the sign picks the side
    lip_press: float = 0.0      # 0..1, thicker pressed lips
    cheeks: float = 0.0         # 0..1, raised rosy cheeks
    nose_wrinkle: float = 0.0   # 0..1, lines across the nose bridge


NEUTRAL = Expression()
# Full-strength shapes are cartoon-sized on purpose: at a 32 px model input the face's
# half-height b is ~13 px, so a subtle (0.5) smile of 0.3 b still lifts the corners ~2 px.
EXPRESSION_SHAPES: dict[str, Expression] = {
    "anger": Expression(brow_raise=-0.12, brow_inner=-0.17, brow_pull=0.1, brow_arch=0.0,
                        eye_open=0.2, mouth_width=0.7, mouth_curve=-0.06, lip_press=1.0),
    "disgust": Expression(brow_raise=-0.08, brow_inner=-0.05, brow_pull=0.05, brow_arch=0.0,
                          eye_open=0.3, mouth_curve=-0.1, mouth_open=0.02, sneer=0.24,
                          nose_wrinkle=1.0),
    "fear": Expression(brow_raise=0.15, brow_inner=0.12, brow_pull=0.1, brow_arch=0.01,
                       eye_open=1.05, mouth_width=1.45, mouth_curve=-0.06, mouth_open=0.14),
    "happiness": Expression(brow_raise=0.02, eye_open=0.28, mouth_width=1.3,
                            mouth_curve=0.3, mouth_open=0.1, cheeks=1.0),
    "sadness": Expression(brow_raise=0.03, brow_inner=0.2, brow_pull=0.04, brow_arch=-0.02,
                          eye_open=0.35, mouth_width=0.9, mouth_curve=-0.26),
    "surprise": Expression(brow_raise=0.26, brow_inner=0.02, brow_pull=-0.03, brow_arch=0.1,
                           eye_open=1.15, mouth_width=0.55, mouth_open=0.28),
}
# Per-image wobble of each muscle setting (same units), so classes overlap a little.
EXPRESSION_JITTER = Expression(brow_raise=0.02, brow_inner=0.02, brow_pull=0.02, brow_arch=0.015,
                               eye_open=0.08, mouth_width=0.1, mouth_curve=0.02, mouth_open=0.015,
                               sneer=0.01, lip_press=0.15, cheeks=0.15, nose_wrinkle=0.15)
MUSCLES = tuple(f.name for f in fields(Expression))


@dataclass(frozen=True)
class ImageSpec:
    """One image to draw: its label, file index within the class, subject and attributes."""
    label: str
    index: int
    identity: Identity
    occluded: bool

    @property
    def path(self) -> str:
        """Where the image lives, relative to the dataset root, with forward slashes."""
        return f"{self.label}/{self.label}_{self.index:05d}.png"


SKIN_LIGHT, SKIN_DARK = np.array([250, 220, 195]), np.array([115, 75, 50])
HAIR_COLOURS = np.array([[25, 20, 18], [70, 45, 30], [120, 80, 45], [185, 150, 95],
                         [150, 70, 35], [140, 140, 140]])
IRIS_COLOURS = np.array([[60, 40, 25], [70, 100, 140], [80, 110, 70], [40, 30, 25]])


def draw_identity(rng: np.random.Generator, subject: str, group: str) -> Identity:
    """A subject's looks; group b gets long hair and a narrower, tapered oval face."""
    is_b = group == "b"
    skin = SKIN_LIGHT + rng.uniform(0, 1) * (SKIN_DARK - SKIN_LIGHT) + rng.normal(0, 6, 3)
    hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] + rng.normal(0, 10, 3)
    return Identity(
        subject=subject, group=group,
        skin=_rgb(skin), hair=_rgb(hair), iris=_rgb(IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))]),
        hair_style=int(rng.integers(3)),
        width_ratio=rng.uniform(0.68, 0.76) if is_b else rng.uniform(0.80, 0.9),
        squareness=rng.uniform(2.0, 2.2) if is_b else rng.uniform(2.6, 3.2),
        chin_taper=rng.uniform(0.2, 0.3) if is_b else rng.uniform(0.0, 0.08),
        height_scale=rng.uniform(0.92, 1.05),
        eye_spacing=rng.uniform(0.36, 0.44),
        eye_size=rng.uniform(0.19, 0.23),
        brow_offset=rng.normal(0, 0.015),
        brow_thickness=rng.uniform(0.09, 0.12) * (0.85 if is_b else 1.0),
        mouth_width=rng.uniform(0.38, 0.46),
        lip_red=rng.uniform(0.4, 0.8) if is_b else rng.uniform(0.1, 0.4),
    )


def plan_images(cfg: SyntheticConfig, classes: tuple[str, ...], rng: np.random.Generator) -> list[ImageSpec]:
    """Labels, groups, subjects and occlusion flags for every image, in file order."""
    counts = class_counts(cfg.n_images, classes)
    labels = [c for c in classes for _ in range(counts[c])]
    indices = [i + 1 for c in classes for i in range(counts[c])]
    shares = GROUP_B_SHARE[cfg.variant]
    groups = ["b" if rng.random() < shares.get(lab, shares["other"]) else "a" for lab in labels]
    subject_of = assign_subjects(groups, rng)
    identities = {s: draw_identity(rng, s, g) for s, g in sorted(set(zip(subject_of, groups)))}
    occluded = rng.random(len(labels)) < OCCLUDED_SHARE[cfg.variant]
    return [ImageSpec(lab, idx, identities[s], bool(o))
            for lab, idx, s, o in zip(labels, indices, subject_of, occluded)]


def assign_subjects(groups: list[str], rng: np.random.Generator) -> list[str]:
    """Deal each group's images to subjects of ~8 images, so a subject shows several expressions."""
    chunks = []
    for group in ("a", "b"):
        members = rng.permutation([i for i, g in enumerate(groups) if g == group])
        n_subjects = max(1, round(len(members) / IMAGES_PER_SUBJECT))
        chunks += [chunk for chunk in np.array_split(members, n_subjects) if len(chunk)]
    # Shuffle the numbering so the subject id says nothing about the group.
    numbers = rng.permutation(len(chunks)) + 1
    subject_of = [""] * len(groups)
    for number, chunk in zip(numbers, chunks):
        for i in chunk:
            subject_of[i] = f"s{number:04d}"
    return subject_of


def sample_expression(label: str, rng: np.random.Generator) -> Expression:
    """The label's full shape scaled by a random intensity, plus per-image jitter."""
    intensity = rng.uniform(*INTENSITY_RANGE)
    full, jitter = EXPRESSION_SHAPES[label], EXPRESSION_JITTER
    noise = rng.normal(0, 1, len(MUSCLES))
    values = {k: getattr(NEUTRAL, k) + intensity * (getattr(full, k) - getattr(NEUTRAL, k))
              + z * getattr(jitter, k) for k, z in zip(MUSCLES, noise)}
    for k in ("eye_open", "mouth_open", "lip_press", "cheeks", "nose_wrinkle"):
        values[k] = max(0.0, values[k])
    values["eye_open"] = max(0.12, values["eye_open"])
    values["sneer"] = abs(values["sneer"]) * rng.choice((-1.0, 1.0))
    return Expression(**values)


# --- drawing --------------------------------------------------------------------------

@dataclass(frozen=True)
class FaceFrame:
    """Maps face units (u right, v down; the face outline spans -1..1) to canvas pixels."""
    cx: float
    cy: float
    a: float
    b: float

    def at(self, u: float, v: float) -> tuple[float, float]:
        """The canvas pixel of face point (u, v)."""
        return (self.cx + u * self.a, self.cy + v * self.b)

    def box(self, u: float, v: float, ru: float, rv: float) -> tuple[float, float, float, float]:
        """The pixel bounding box of an ellipse centred on (u, v) with radii (ru, rv) in face units."""
        return (self.cx + (u - ru) * self.a, self.cy + (v - rv) * self.b,
                self.cx + (u + ru) * self.a, self.cy + (v + rv) * self.b)


def draw_image(spec: ImageSpec, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB face of size x size pixels: background, posed and lit face, noise."""
    canvas = size * SUPERSAMPLE
    expression = sample_expression(spec.label, rng)
    background = draw_background(canvas, rng)
    layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    # A loose face crop, like an aligned FER image: the face spans ~80% of the height.
    half_height = canvas * FACE_HALF_HEIGHT * spec.identity.height_scale
    frame = FaceFrame(canvas / 2, canvas * 0.5, half_height * spec.identity.width_ratio, half_height)
    draw_person(ImageDraw.Draw(layer), frame, spec.identity, expression, rng)
    if spec.occluded:
        draw_occlusion(ImageDraw.Draw(layer), frame, rng)
    background.alpha_composite(apply_pose(layer, rng))
    return light_and_noise(background.convert("RGB").reduce(SUPERSAMPLE), rng)


def draw_background(canvas: int, rng: np.random.Generator) -> Image.Image:
    """A two-colour gradient with a few random shapes as clutter."""
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    # A linear ramp survives bilinear upsampling almost unchanged, so compute it on 8x8 pixels.
    ramp = _ramp(8, rng.uniform(0, 2 * math.pi))[..., None] * 0.5 + 0.5
    small = Image.fromarray((start + ramp * (end - start)).astype(np.uint8)).convert("RGBA")
    image = small.resize((canvas, canvas), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 6)):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * canvas
        w, h = rng.uniform(0.05, 0.35, 2) * canvas
        colour = _rgb(rng.uniform(0, 255, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=int(rng.integers(1, 4)))
    return image


def draw_person(draw: ImageDraw.ImageDraw, frame: FaceFrame, who: Identity,
                expression: Expression, rng: np.random.Generator) -> None:
    """Shoulders, hair, head and features, back to front, upright at the canvas centre."""
    clothes = _rgb(rng.uniform(0, 255, 3))
    draw.ellipse(frame.box(0, 2.6, 2.1, 1.3), fill=clothes)
    draw_hair_back(draw, frame, who)
    draw.rectangle(frame.box(0, 1.1, 0.42, 0.5), fill=_shade(who.skin, 0.85))
    draw.ellipse(frame.box(-1.0, -0.05, 0.12, 0.2), fill=_shade(who.skin, 0.9))
    draw.ellipse(frame.box(1.0, -0.05, 0.12, 0.2), fill=_shade(who.skin, 0.9))
    draw.polygon(face_outline(frame, who), fill=who.skin)
    draw_cheeks(draw, frame, who, expression)
    draw_nose(draw, frame, who, expression)
    draw_eyes(draw, frame, who, expression)
    draw_brows(draw, frame, who, expression)
    draw_mouth(draw, frame, who, expression)
    draw_hair_front(draw, frame, who)


def face_outline(frame: FaceFrame, who: Identity, points: int = 40) -> list[tuple[float, float]]:
    """A superellipse (square jaw for high exponents) whose lower half narrows by chin_taper."""
    outline = []
    for t in np.linspace(0, 2 * math.pi, points, endpoint=False):
        s, c = math.sin(t), -math.cos(t)
        u = math.copysign(abs(s) ** (2 / who.squareness), s)
        v = math.copysign(abs(c) ** (2 / who.squareness), c)
        u *= 1 - who.chin_taper * max(0.0, v) ** 2
        outline.append(frame.at(u, v))
    return outline


def draw_hair_back(draw: ImageDraw.ImageDraw, frame: FaceFrame, who: Identity) -> None:
    """Hair behind the head: a short cap (group a) or long hair to the shoulders (group b)."""
    if who.group == "b":
        bottom = (1.5, 1.0, 1.9)[who.hair_style]   # shoulder length, bob, very long
        x0, y0 = frame.at(-1.3, -1.2)
        x1, y1 = frame.at(1.3, bottom)
        draw.rounded_rectangle((x0, y0, x1, y1), radius=0.9 * frame.a, fill=who.hair)
    else:
        lift = (0.25, 0.15, 0.3)[who.hair_style]
        draw.ellipse(frame.box(0, -0.45, 1.08, 0.6 + lift), fill=who.hair)


def draw_hair_front(draw: ImageDraw.ImageDraw, frame: FaceFrame, who: Identity) -> None:
    """Fringe over the forehead; long hair also frames the sides of the face."""
    if who.group == "b":
        draw.chord(frame.box(0, -0.55, 1.1, 0.6), 180, 360, fill=who.hair)
        for side in (-1, 1):
            draw.polygon([frame.at(side * 1.1, -0.6), frame.at(side * 0.82, -0.55),
                          frame.at(side * 0.9, 0.5), frame.at(side * 1.15, 0.9)], fill=who.hair)
    else:
        # Short styles: straight fringe, side part, or a high crop.
        depth = (0.62, 0.6, 0.72)[who.hair_style]
        draw.chord(frame.box(0, -depth, 1.02, 0.45), 180, 360, fill=who.hair)
        if who.hair_style == 1:
            draw.polygon([frame.at(-0.95, -0.65), frame.at(0.3, -1.0), frame.at(-0.9, -0.4)],
                         fill=who.hair)


def draw_eyes(draw: ImageDraw.ImageDraw, frame: FaceFrame, who: Identity, ex: Expression) -> None:
    """Sclera, iris and upper lid; eye_open sets the height (narrowed to wide and round)."""
    half_w = who.eye_size * frame.a
    half_h = half_w * ex.eye_open
    iris_r = min(0.55 * half_w, half_h)
    lid = max(1.0, 0.05 * frame.b)
    for side in (-1, 1):
        x, y = frame.at(side * who.eye_spacing, -0.1)
        draw.ellipse((x - half_w, y - half_h, x + half_w, y + half_h), fill=(245, 245, 240))
        draw.ellipse((x - iris_r, y - iris_r, x + iris_r, y + iris_r), fill=who.iris)
        pupil = 0.45 * iris_r
        draw.ellipse((x - pupil, y - pupil, x + pupil, y + pupil), fill=(10, 10, 10))
        draw.arc((x - half_w, y - half_h, x + half_w, y + half_h), 190, 350,
                 fill=_shade(who.skin, 0.35), width=int(round(lid)))


def draw_brows(draw: ImageDraw.ImageDraw, frame: FaceFrame, who: Identity, ex: Expression) -> None:
    """Two curved strokes; raise, inner-corner tilt, pull towards the midline and arch."""
    colour = _mix(who.hair, (20, 15, 10), 0.75)
    width = max(1, int(round(who.brow_thickness * frame.b)))
    rest = -0.4 - who.brow_offset - ex.brow_raise
    for side in (-1, 1):
        inner = (side * (who.eye_spacing - 0.22 - ex.brow_pull), rest - ex.brow_inner)
        outer = (side * (who.eye_spacing + 0.24), rest + 0.02)
        middle = ((inner[0] + outer[0]) / 2, (inner[1] + outer[1]) / 2 - 2 * ex.brow_arch)
        points = [frame.at(*_bezier(inner, middle, outer, t)) for t in np.linspace(0, 1, 7)]
        draw.line(points, fill=colour, width=width, joint="curve")


def draw_nose(draw: ImageDraw.ImageDraw, frame: FaceFrame, who: Identity, ex: Expression) -> None:
    """A faint bridge line, nostrils, and wrinkle lines across the bridge when scrunched."""
    line = _shade(who.skin, 0.7)
    width = max(1, int(round(0.03 * frame.b)))
    draw.line([frame.at(0.02, -0.02), frame.at(0.06, 0.22), frame.at(0.0, 0.26)], fill=line, width=width)
    for side in (-1, 1):
        draw.ellipse(frame.box(side * 0.1, 0.25, 0.05, 0.03), fill=_shade(who.skin, 0.55))
    if ex.nose_wrinkle > 0.2:
        wrinkle = _shade(who.skin, 1 - 0.55 * min(1.0, ex.nose_wrinkle))
        for v in (-0.06, 0.02, 0.1):
            draw.line([frame.at(-0.12, v + 0.03), frame.at(0.0, v), frame.at(0.12, v + 0.03)],
                      fill=wrinkle, width=width)


def draw_cheeks(draw: ImageDraw.ImageDraw, frame: FaceFrame, who: Identity, ex: Expression) -> None:
    """Raised rosy cheeks (happiness): skin blended towards pink, drawn opaque."""
    if ex.cheeks < 0.1:
        return
    rosy = _mix(who.skin, (230, 120, 120), 0.35 * min(1.0, ex.cheeks))
    for side in (-1, 1):
        draw.ellipse(frame.box(side * 0.5, 0.2, 0.2, 0.12), fill=rosy)


def draw_mouth(draw: ImageDraw.ImageDraw, frame: FaceFrame, who: Identity, ex: Expression) -> None:
    """A lip line when closed, an open shape otherwise; curve, sneer and pressed lips included."""
    lips = _mix(_shade(who.skin, 0.45), (150, 30, 40), who.lip_red)
    thickness = max(1, int(round((0.07 + 0.05 * ex.lip_press) * frame.b)))
    half_w = who.mouth_width * max(0.3, ex.mouth_width)
    sneer_side = 1.0 if ex.sneer >= 0 else -1.0
    us = np.linspace(-1, 1, 15)
    centre = 0.55 - ex.mouth_curve * us ** 2
    opening = ex.mouth_open * np.sqrt(1 - us ** 2)
    # The sneer lifts the upper lip on one side only: 0 at the far side, full at the near corner.
    lift = abs(ex.sneer) * np.clip(sneer_side * us + 0.2, 0, 1) * np.sqrt(1 - us ** 2 * 0.8)
    upper = [frame.at(u * half_w, v) for u, v in zip(us, centre - opening - lift)]
    lower = [frame.at(u * half_w, v) for u, v in zip(us, centre + opening)]
    if (ex.mouth_open + abs(ex.sneer)) * frame.b < 0.8:
        draw.line(upper, fill=lips, width=thickness, joint="curve")
        return
    inside = _mix((60, 15, 20), (240, 240, 235), 0.7 if ex.cheeks > 0.3 else 0.0)
    draw.polygon(upper + lower[::-1], fill=inside)
    draw.line(upper, fill=lips, width=thickness, joint="curve")
    draw.line(lower, fill=lips, width=thickness, joint="curve")


def draw_occlusion(draw: ImageDraw.ImageDraw, frame: FaceFrame, rng: np.random.Generator) -> None:
    """A hand or a bar of text-like marks over the eyes, the mouth or a cheek."""
    u = rng.choice([0.0, -0.4, 0.4])
    v = rng.choice([-0.2, 0.45, 0.25])
    if rng.random() < 0.6:
        draw_hand(draw, frame, u, v, rng)
    else:
        draw_text_bar(draw, frame, v, rng)


def draw_hand(draw: ImageDraw.ImageDraw, frame: FaceFrame, u: float, v: float,
              rng: np.random.Generator) -> None:
    """A palm with four fingers spread around a random direction."""
    skin = _rgb(SKIN_LIGHT + rng.uniform(0, 1) * (SKIN_DARK - SKIN_LIGHT))
    draw.ellipse(frame.box(u, v, 0.38, 0.3), fill=skin)
    direction = rng.uniform(0, 2 * math.pi)
    finger = max(2, int(round(0.14 * frame.a)))
    px, py = frame.at(u, v)
    for spread in (-0.45, -0.15, 0.15, 0.45):
        angle = direction + spread
        length = rng.uniform(0.55, 0.8) * frame.a
        tip = (px + length * math.cos(angle), py + length * math.sin(angle))
        draw.line([(px, py), tip], fill=skin, width=finger)
        draw.ellipse((tip[0] - finger / 2, tip[1] - finger / 2, tip[0] + finger / 2, tip[1] + finger / 2),
                     fill=skin)


def draw_text_bar(draw: ImageDraw.ImageDraw, frame: FaceFrame, v: float, rng: np.random.Generator) -> None:
    """A caption band across the face with rows of glyph-like marks."""
    dark = rng.random() < 0.5
    band, ink = ((20, 20, 20), (235, 235, 235)) if dark else ((235, 235, 225), (20, 20, 20))
    left, right = rng.uniform(-1.3, -0.7), rng.uniform(0.7, 1.3)
    x0, y0 = frame.at(left, v - 0.13)
    x1, y1 = frame.at(right, v + 0.13)
    draw.rectangle((x0, y0, x1, y1), fill=band)
    glyph_h = (y1 - y0) * 0.5
    x = x0 + 2
    while x < x1 - 3:
        w = rng.uniform(0.4, 1.0) * glyph_h
        draw.rectangle((x, y0 + glyph_h * 0.5, x + w, y0 + glyph_h * 1.5), fill=ink)
        x += w + rng.uniform(0.3, 1.2) * glyph_h


def apply_pose(layer: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotate (up to +-15 degrees), scale (0.93-1.07) and shift (up to +-5%) about the centre."""
    size = layer.width
    # Mostly small, like the residual pose of aligned crops; large tilts are the tail.
    angle = math.radians(np.clip(rng.normal(0, 5), -15, 15))
    scale = rng.uniform(0.93, 1.07)
    tx, ty = np.clip(rng.normal(0, 0.02, 2), -0.05, 0.05) * size
    c = size / 2
    # PIL's affine maps output pixels to input pixels, so invert: p_in = R(-angle) (p_out - c - t) / s + c.
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    ox, oy = -c - tx, -c - ty
    coeffs = (cos, sin, cos * ox + sin * oy + c, -sin, cos, -sin * ox + cos * oy + c)
    return layer.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


def light_and_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Side light (a brightness gradient of up to +-30%), exposure (0.85-1.15) and sensor noise."""
    exposure, side_light = rng.uniform(0.85, 1.15), rng.uniform(0.0, 0.3)
    gain = exposure * (1 + side_light * _ramp(image.width, rng.uniform(0, 2 * math.pi)))
    noise = rng.standard_normal((image.height, image.width, 3), dtype=np.float32) * rng.uniform(2, 8)
    pixels = np.asarray(image, dtype=np.float32) * gain[..., None] + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# --- writing --------------------------------------------------------------------------

def write_synthetic(cache_dir: str | Path, cfg: SyntheticConfig, classes: tuple[str, ...]) -> Path:
    """Draw the dataset once (atomically: temp folder, then rename) and return its root."""
    check_classes(classes)
    root = synthetic_root(cache_dir, cfg, classes)
    if (root / "metadata.csv").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    # mkdtemp makes the folder private (0700); the dataset is shared with other users' workers.
    staging.chmod(0o755)
    try:
        draw_dataset(staging, cfg, classes)
        try:
            os.rename(staging, root)
        except OSError:
            # Another process finished the same dataset first; its copy is identical.
            if not (root / "metadata.csv").is_file():
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def draw_dataset(folder: Path, cfg: SyntheticConfig, classes: tuple[str, ...]) -> None:
    """Draw every image into folder and write metadata.csv last."""
    seeds = np.random.SeedSequence([cfg.seed, VARIANT_CODES[cfg.variant], GENERATOR_VERSION])
    plan_seed, image_seed = seeds.spawn(2)
    specs = plan_images(cfg, classes, np.random.default_rng(plan_seed))
    for name in classes:
        (folder / name).mkdir()
    draw_one = partial(draw_and_save, folder, cfg.draw_size)
    # PIL and numpy release the GIL while drawing, warping and encoding, so threads
    # overlap; each image has its own seed, so the order of work does not matter.
    with ThreadPoolExecutor(max_workers=DRAW_THREADS) as pool:
        list(pool.map(draw_one, specs, image_seed.spawn(len(specs))))
    write_metadata(folder / "metadata.csv", specs)


def draw_and_save(folder: Path, size: int, spec: ImageSpec, seed: np.random.SeedSequence) -> None:
    """Draw one image from its own seed and save it as PNG."""
    image = draw_image(spec, size, np.random.default_rng(seed))
    # Level 1: noisy 64 px faces hardly compress further, and saving takes half the time.
    image.save(folder / spec.path, format="PNG", compress_level=1)


def write_metadata(path: Path, specs: list[ImageSpec]) -> None:
    """One row per image: path, subject, group, occluded (0/1)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "subject", *SYNTHETIC_ATTRIBUTES])   # group, occluded: the row's order
        for spec in specs:
            writer.writerow([spec.path, spec.identity.subject, spec.identity.group, int(spec.occluded)])


# --- small helpers --------------------------------------------------------------------

def _rgb(values) -> tuple[int, int, int]:
    """Round and clip three numbers to an 8-bit colour."""
    r, g, b = (min(255, max(0, int(round(float(x))))) for x in values)
    return (r, g, b)


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """The colour darkened (factor < 1) or brightened."""
    return _rgb([x * factor for x in colour])


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    """The colour a fraction t of the way from a to b."""
    return _rgb([x * (1 - t) + y * t for x, y in zip(a, b)])


def _ramp(size: int, angle: float) -> np.ndarray:
    """A linear ramp over a size x size grid along angle, -1 at one edge to 1 at the other."""
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    ramp = axis[None, :] * math.cos(angle) + axis[:, None] * math.sin(angle)
    return ramp / (abs(math.cos(angle)) + abs(math.sin(angle)))


def _bezier(p0, p1, p2, t: float) -> tuple[float, float]:
    """A point on the quadratic Bezier curve through p0 and p2 pulled towards p1."""
    return tuple((1 - t) ** 2 * a + 2 * (1 - t) * t * b + t ** 2 * c for a, b, c in zip(p0, p1, p2))
