"""Training-set augmentation on the device: flip, small rotation and crop, colour jitter, and occluders."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Randomly augment a float batch in [0, 1], N x 3 x H x W; returns a new tensor."""
    n = x.shape[0]
    if n == 0:
        return x
    dev = x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        # Drawn where the generator lives (the batch's device in training): no host-to-device copy.
        return (torch.rand(n, generator=generator, device=generator.device) * (hi - lo) + lo).to(dev)

    # One affine warp does flip, rotation (±10°), zoom (0.9-1.1x) and shift (±6%) together.
    angle = uniform(-10, 10) * (math.pi / 180)
    scale = uniform(0.9, 1.1)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, uniform(-0.06, 0.06)], dim=1),
        torch.stack([sin * flip, cos, uniform(-0.06, 0.06)], dim=1),
    ], dim=1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    # Colour jitter: brightness and contrast ±20%, saturation ±20%.
    brightness = uniform(0.8, 1.2).view(n, 1, 1, 1).to(x.dtype)
    contrast = uniform(0.8, 1.2).view(n, 1, 1, 1).to(x.dtype)
    saturation = uniform(0.8, 1.2).view(n, 1, 1, 1).to(x.dtype)
    x = x * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * saturation + gray
    return x.clamp_(0, 1)


# --- occluders ------------------------------------------------------------------------------------
# A hand over part of the face, a caption bar of text-like strokes, or a random-erasing box: the kinds of
# occlusion a production camera sees. The synthetic production variant draws hands and text bars too, but
# with its own code at a few fixed spots of the face; these are placed anywhere in the face box.

KINDS = ("hand", "text", "erase")
HAND, TEXT, ERASE = range(3)
# The face area of an aligned or cropped training image: the central box left after a margin of 1/8 of
# the side on each side (the central 75% x 75%, 24 x 24 px of a 32 px image). An aligned crop at the
# default align_margin 0.1 puts the face box in the central 1/1.2 = 83% of the side, and a synthetic face
# spans rows 10-90%; the slightly smaller box keeps occluders on the face, not the background or hair.
FACE_MARGIN = 0.125
AREA_RANGE = (0.10, 0.35)          # an occluder covers 10-35% of the face box
SKIN_LIGHT, SKIN_DARK = (0.96, 0.84, 0.74), (0.40, 0.26, 0.17)   # RGB in [0, 1], the ends of the skin tones
# The hand, in shape units (u right, v down, fingers up): a palm ellipse, four fingers and a thumb.
PALM = (0.0, 0.3, 0.5, 0.46)                  # centre u, v and radii
# Fingers (index to little) and thumb: base u, base v (inside the palm), length (before a 0.8-1.15x draw),
# angle from straight up in radians (before a 0.3-2x fan draw; the thumb's is drawn in 0.6-1.3), radius.
DIGITS = ((-0.33, 0.0, 0.5, -0.2, 0.1), (-0.11, 0.0, 0.64, -0.07, 0.1), (0.11, 0.0, 0.6, 0.07, 0.1),
          (0.33, 0.0, 0.46, 0.2, 0.1), (0.36, 0.42, 0.4, 0.0, 0.12))
HAND_EXTENT = (0.95, 0.95)                    # half-width and half-height of a box holding any hand
HAND_CELLS = 24                               # each hand is drawn on a 24 x 24 grid, then sampled
# Caption glyphs are 5 x 3 cells, like a small pixel font; each keeps a random subset of seven strokes
# (left, right, top, middle, bottom, diagonal, stem), like a letter of an unknown script.
GLYPH_ROWS, GLYPH_COLUMNS = 5, 3
GLYPH_CELLS = GLYPH_ROWS * GLYPH_COLUMNS
GLYPH_STROKES = ("left", "right", "top", "middle", "bottom", "diagonal", "stem")
MAX_GLYPHS = 24                               # glyphs per caption bar at most; a bar holds about 4-16


def face_box(height: int, width: int) -> tuple[int, int, int, int]:
    """Rows [top, bottom) and columns [left, right) of the face area: the image less FACE_MARGIN each side."""
    top, left = round(FACE_MARGIN * height), round(FACE_MARGIN * width)
    return top, height - top, left, width - left


@dataclass(frozen=True)
class Occluders:
    """One occluder per image of a batch, drawn but not yet applied."""
    kind: torch.Tensor      # N: HAND, TEXT or ERASE (indices into KINDS)
    alpha: torch.Tensor     # N x 1 x H x W coverage in [0, 1]; 0 outside the face box
    paint: torch.Tensor     # N x 3 x H x W colours where alpha > 0


class _Uniform:
    """Uniform draws from one generator, made where the generator lives and moved to the batch's device."""

    def __init__(self, n: int, generator: torch.Generator, device: torch.device):
        self.n, self.generator, self.device = n, generator, device

    def __call__(self, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        u = torch.rand((self.n, *shape), generator=self.generator, device=self.generator.device)
        if (lo, hi) != (0.0, 1.0):
            u = u * (hi - lo) + lo
        return u if u.device == self.device else u.to(self.device)


def occlude(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """Cover part of the face of each image of a float batch (N x 3 x H x W in [0, 1]) with probability p.

    With p = 0 the batch is returned as it is and nothing is drawn from the generator."""
    n = x.shape[0]
    if p <= 0 or n == 0:
        return x
    hit = _Uniform(n, generator, x.device)() < p
    occ = draw_occluders(n, (x.shape[2], x.shape[3]), generator, x.device)
    weight = occ.alpha.to(x.dtype) * hit.view(n, 1, 1, 1)
    return torch.lerp(x, occ.paint.to(x.dtype), weight)     # weight 0 returns x's pixel exactly


def draw_occluders(n: int, size: tuple[int, int], generator: torch.Generator,
                   device: torch.device | None = None) -> Occluders:
    """N occluders for images of size (H, W): each covers 10-35% of the face box and lies inside it.

    A random third of the batch gets each kind (each image's kind is uniform), so each shape is computed
    only for its own images, without reading anything back from the device."""
    device = generator.device if device is None else device
    order = _Uniform(n, generator, device)().argsort()
    kind = torch.empty(n, dtype=torch.long, device=device)
    kind[order] = torch.arange(n, device=device) % len(KINDS)
    alpha, paint = torch.zeros(n, 1, *size, device=device), torch.zeros(n, 3, *size, device=device)
    for k, make in enumerate((_hand, _text, _erase)):
        rows = order[k::len(KINDS)]
        if len(rows):
            alpha[rows], paint[rows] = make(_Uniform(len(rows), generator, device), size)
    top, bottom, left, right = face_box(*size)
    inside = torch.zeros(size, device=device)
    inside[top:bottom, left:right] = 1
    return Occluders(kind=kind, alpha=alpha * inside, paint=paint)


# --- size, turn and place ---------------------------------------------------------------------------

def _coverage(signed_px: torch.Tensor) -> torch.Tensor:
    """How much of a pixel a shape covers, from its signed distance in pixels (negative inside): a 1 px ramp."""
    return (0.5 - signed_px).clamp_(0, 1)


def _scale(area: torch.Tensor, unit_area: torch.Tensor | float, size: tuple[int, int]) -> torch.Tensor:
    """Pixels per shape unit that make a shape of unit_area (units^2) cover ``area`` of the face box."""
    top, bottom, left, right = face_box(*size)
    return (area * ((bottom - top) * (right - left)) / unit_area).sqrt()


def _box_half(draw: _Uniform, area: torch.Tensor, size: tuple[int, int],
              aspects: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width and half-height (shape units) of a box of area 1, its width / height log-uniform in aspects."""
    lo, hi = math.log(aspects[0]), math.log(aspects[1])
    aspect = torch.exp(draw(lo=lo, hi=hi))
    # Capped so the box fits in 95% of the face box: a box of 35% is at most 0.95^2 / 0.35 = 2.6x as wide as high.
    top, bottom, left, right = face_box(*size)
    pixels = area * ((bottom - top) * (right - left))
    aspect = aspect.minimum((0.95 * (right - left)) ** 2 / pixels).maximum(pixels / (0.95 * (bottom - top)) ** 2)
    return aspect.sqrt() / 2, 0.5 / aspect.sqrt()


def _place(draw: _Uniform, size: tuple[int, int], scale: torch.Tensor, half: tuple,
           max_turn: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pixel centre in each occluder's own units (N x 1 x H x W each): turned, then placed in the face box.

    ``half``: the shape's half-width and half-height in its units; it is placed wholly inside the face box
    when it fits there, else centred on it (the face box then clips it)."""
    n = draw.n
    angle = draw(lo=-max_turn, hi=max_turn)
    cos, sin = angle.cos(), angle.sin()
    top, bottom, left, right = face_box(*size)
    centre = []
    for start, end, a, b in ((left, right, *half), (top, bottom, *half[::-1])):
        reach = scale * (cos.abs() * a + sin.abs() * b)          # half the turned shape's extent, pixels
        room = ((end - start) - 2 * reach).clamp(min=0)           # where its centre may go
        centre.append(start + (end - start - room) / 2 + draw() * room)
    xs = torch.arange(size[1], device=draw.device).view(1, 1, 1, -1) + 0.5 - centre[0].view(n, 1, 1, 1)
    ys = torch.arange(size[0], device=draw.device).view(1, 1, -1, 1) + 0.5 - centre[1].view(n, 1, 1, 1)
    c, s, k = cos.view(n, 1, 1, 1), sin.view(n, 1, 1, 1), scale.view(n, 1, 1, 1)
    return (c * xs + s * ys) / k, (c * ys - s * xs) / k


def _segment_distance(u: torch.Tensor, v: torch.Tensor, a: tuple, b: tuple) -> torch.Tensor:
    """Distance from each point (u, v) to the segment from a to b (each end a pair of numbers or tensors)."""
    pu, pv, du, dv = u - a[0], v - a[1], b[0] - a[0], b[1] - a[1]
    t = ((pu * du + pv * dv) / (du * du + dv * dv + 1e-12)).clamp_(0, 1)
    pu, pv = pu - t * du, pv - t * dv
    return (pu * pu + pv * pv).sqrt_()


# --- the three kinds --------------------------------------------------------------------------------

def _hand(draw: _Uniform, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Skin-toned hands (a palm, four fingers, a thumb) turned up to 120 degrees from fingers-up.

    Each hand is drawn once on a HAND_CELLS^2 grid over its extent (signed distance and shading), which also
    gives its area; the image samples that grid, so the shape costs the same at any image size."""
    n = draw.n
    hand = {"lengths": draw(len(DIGITS), lo=0.8, hi=1.15), "fan": draw(lo=0.3, hi=2.0), "left": draw() < 0.5,
            "thumb_angle": draw(lo=0.6, hi=1.3)}
    tone, tint = draw(), draw(3, lo=-0.03, hi=0.03)
    step = 2.0 / HAND_CELLS                       # the grid spans -1..1 shape units, beyond HAND_EXTENT
    axis = (torch.arange(HAND_CELLS, device=draw.device) + 0.5) * step - 1.0
    grid_u = axis.view(1, 1, 1, -1).expand(n, 1, HAND_CELLS, HAND_CELLS)
    drawn = _hand_shape(grid_u, grid_u.transpose(2, 3), hand)
    unit_area = _coverage(drawn[:, :1] / step).sum(dim=(1, 2, 3)) * step * step
    area = draw(lo=AREA_RANGE[0], hi=AREA_RANGE[1])
    scale = _scale(area, unit_area, size)
    u, v = _place(draw, size, scale, HAND_EXTENT, max_turn=2.1)
    # Read between the grid's cells, the distance to a crease between two fingers comes out a little short,
    # so the hand covers 1-4% more pixels than the grid says; grown or shrunk once about its centre, it
    # covers its drawn area to a fraction of a percent.
    sampled = _sample(drawn, u, v)
    covered = _coverage(sampled[:, :1] * scale.view(n, 1, 1, 1)).sum(dim=(1, 2, 3))
    top, bottom, left, right = face_box(*size)
    grow = (area * ((bottom - top) * (right - left)) / covered.clamp(min=1e-6)).sqrt().view(n, 1, 1, 1)
    sampled = _sample(drawn, u / grow, v / grow)
    alpha = _coverage(sampled[:, :1] * scale.view(n, 1, 1, 1) * grow)
    skin = torch.stack([lo + tone * (hi - lo) for lo, hi in zip(SKIN_LIGHT, SKIN_DARK)], 1) + tint
    return alpha, skin.clamp(0, 1).view(n, 3, 1, 1) * sampled[:, 1:]


def _sample(drawn: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The hand grid read at each pixel's shape units (the grid spans -1..1 units, as grid_sample reads it);
    beyond it, its border: outside the hand."""
    return F.grid_sample(drawn, torch.cat([u, v], 1).permute(0, 2, 3, 1), mode="bilinear",
                         padding_mode="border", align_corners=False)


def _hand_shape(u: torch.Tensor, v: torch.Tensor, hand: dict) -> torch.Tensor:
    """At each point (u, v) (N x 1 x A x B, shape units): the signed distance to the hand (negative inside)
    and its skin shade, N x 2 x A x B."""
    n = u.shape[0]
    u = torch.where(hand["left"].view(n, 1, 1, 1), -u, u)     # a left hand is the right one mirrored
    cu, cv, ru, rv = PALM
    du, dv = (u - cu) / ru, (v - cv) / rv
    palm = ((du * du + dv * dv).sqrt_() - 1) * rv
    base_u, base_v, length, spread, radius = (column.view(1, -1, 1, 1) for column in _digits(u.device).T)
    # Fingers fan out together (one fan draw); the thumb has an angle of its own.
    angle = torch.cat([hand["fan"].view(n, 1) * spread[0, :-1, 0, 0], hand["thumb_angle"].view(n, 1)], 1)
    angle, reach = angle.view(n, -1, 1, 1), hand["lengths"].view(n, -1, 1, 1) * length
    tip = (base_u + reach * angle.sin(), base_v - reach * angle.cos())
    digits = _segment_distance(u, v, (base_u, base_v), tip) - radius          # N x 5 x A x B
    # Depth 0 at a part's edge to 1 at its middle; its rounded (cylinder) profile shades the skin, so the
    # fingers stand apart from each other and from the palm.
    depth = torch.maximum((-palm / rv).clamp_(0, 1), (-digits / radius).clamp_(0, 1).amax(1, keepdim=True))
    shade = 0.72 + 0.28 * (depth * (2 - depth)).sqrt_()
    return torch.cat([torch.minimum(palm, digits.amin(1, keepdim=True)), shade], 1)


@functools.lru_cache(maxsize=None)
def _digits(device: torch.device) -> torch.Tensor:
    """DIGITS as a 5 x 5 tensor on the device, copied there once per process."""
    return torch.tensor(DIGITS, device=device)


def _text(draw: _Uniform, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption bars: a light band with dark glyphs or a dark one with light glyphs, tilted up to 10 degrees."""
    n = draw.n
    strokes = draw(MAX_GLYPHS, len(GLYPH_STROKES)) < 0.4
    strokes[..., -1] |= ~strokes.any(-1)                     # every glyph has a stroke, at least its stem
    strokes &= (draw(MAX_GLYPHS) >= 0.15).unsqueeze(-1)      # 15% of glyphs are spaces between words
    dark, band, ink, tint, glyph = draw() < 0.5, draw(), draw(), draw(3, lo=-0.03, hi=0.03), draw(lo=0.45, hi=0.7)
    area = draw(lo=AREA_RANGE[0], hi=AREA_RANGE[1])
    half = _box_half(draw, area, size, aspects=(2.5, 6.0))
    scale = _scale(area, 1.0, size)
    u, v = _place(draw, size, scale, half, max_turn=0.17)
    half_u, half_v = half[0].view(n, 1, 1, 1), half[1].view(n, 1, 1, 1)
    alpha = _coverage(torch.maximum(u.abs() - half_u, v.abs() - half_v) * scale.view(n, 1, 1, 1))
    marks = _glyph_ink(u + half_u, v, half_v * glyph.view(n, 1, 1, 1), 2 * half_u, strokes)
    band = torch.where(dark, 0.02 + 0.13 * band, 0.82 + 0.15 * band).view(n, 1) + tint
    ink = torch.where(dark, 0.85 + 0.15 * ink, 0.15 * ink).view(n, 1, 1, 1).expand(n, 3, 1, 1)
    return alpha, torch.lerp(band.clamp(0, 1).view(n, 3, 1, 1), ink, marks)


def _glyph_ink(along: torch.Tensor, v: torch.Tensor, half_height: torch.Tensor, length: torch.Tensor,
               strokes: torch.Tensor) -> torch.Tensor:
    """Ink (0 or 1) of one row of 5 x 3-cell glyphs centred on v = 0, from along = 0 to length (shape units)."""
    n = along.shape[0]
    cell = 2 * half_height / GLYPH_ROWS                  # square cells; one empty column between glyphs
    pitch = cell * (GLYPH_COLUMNS + 1)
    # Glyph k spans 2 + 4k to 5 + 4k cells along the bar; the ones ending 2 cells before its end are shown.
    count = ((length - 3 * cell) / pitch).floor().clamp(max=MAX_GLYPHS)
    slot = ((along - 2 * cell) / pitch).floor()
    col = ((along - 2 * cell - slot * pitch) / cell).floor()
    row = ((v + half_height) / cell).floor()
    shown = (slot >= 0) & (slot < count) & (col < GLYPH_COLUMNS) & (row >= 0) & (row < GLYPH_ROWS)
    # Which cells each glyph inks: the union of its strokes' cells, looked up per pixel.
    bitmaps = (strokes.to(along.dtype) @ _glyph_cells(along.device).to(along.dtype)).clamp_(max=1)
    index = (slot.clamp(0, MAX_GLYPHS - 1) * GLYPH_CELLS + row.clamp(0, GLYPH_ROWS - 1) * GLYPH_COLUMNS
             + col.clamp(0, GLYPH_COLUMNS - 1))
    ink = torch.gather(bitmaps.view(n, -1), 1, index.long().view(n, -1)).view_as(along)
    return ink * shown


@functools.lru_cache(maxsize=None)
def _glyph_cells(device: torch.device) -> torch.Tensor:
    """Which of a glyph's 5 x 3 cells (row-major) each of GLYPH_STROKES covers: 7 x 15, built once per device."""
    cell = torch.arange(GLYPH_CELLS, device=device)
    row, col = cell // GLYPH_COLUMNS, cell % GLYPH_COLUMNS
    diagonal = (2 * col + row - (GLYPH_ROWS - 1)).abs() <= 1          # bottom-left to top-right
    return torch.stack([col == 0, col == 2, row == 0, row == 2, row == 4, diagonal, col == 1])


def _erase(draw: _Uniform, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random erasing: an upright box of uniform noise in each pixel, or of one flat colour."""
    n = draw.n
    noisy, flat, noise = draw() < 0.5, draw(3), draw(3, *size)
    area = draw(lo=AREA_RANGE[0], hi=AREA_RANGE[1])
    half = _box_half(draw, area, size, aspects=(0.5, 2.0))
    scale = _scale(area, 1.0, size)
    u, v = _place(draw, size, scale, half, max_turn=0.0)
    sd = torch.maximum(u.abs() - half[0].view(n, 1, 1, 1), v.abs() - half[1].view(n, 1, 1, 1))
    paint = torch.where(noisy.view(n, 1, 1, 1), noise, flat.view(n, 3, 1, 1))
    return _coverage(sd * scale.view(n, 1, 1, 1)), paint
