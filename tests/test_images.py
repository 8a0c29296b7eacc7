"""decode_image turns every odd file into RGB uint8 or a counted skip reason; centre_square crops the centre."""
from __future__ import annotations

import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers.data.images import SKIP_REASONS, ImageSkipped, centre_square, decode_image

RED, WHITE = (255, 0, 0), (255, 255, 255)
DEFAULT_PIL_LIMIT = Image.MAX_IMAGE_PIXELS


def noise(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """Random RGB pixels: incompressible, so a cut file really loses image data."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def skip_reason(path: Path) -> str:
    """The reason decode_image gives for refusing path (fails the test if it decodes)."""
    with pytest.raises(ImageSkipped) as caught:
        decode_image(path)
    assert caught.value.reason in SKIP_REASONS
    assert caught.value.detail
    return caught.value.reason


def test_truncated_jpeg_is_skipped_as_truncated(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(noise()).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert skip_reason(path) == "truncated"


def test_truncated_png_is_skipped_as_truncated(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(noise()).save(path, "PNG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert skip_reason(path) == "truncated"


def test_png_cut_inside_its_header_is_truncated_not_unknown_format(tmp_path):
    path = tmp_path / "stub.png"
    Image.fromarray(noise()).save(path, "PNG")
    path.write_bytes(path.read_bytes()[:20])
    assert skip_reason(path) == "truncated"


def test_zero_byte_file_is_empty(tmp_path):
    path = tmp_path / "zero.jpg"
    path.touch()
    assert skip_reason(path) == "empty"


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are my notes, not a photo\n", encoding="utf-8")
    assert skip_reason(path) == "not_an_image"


def test_rgba_png_transparent_area_comes_out_white(tmp_path):
    rgba = np.zeros((20, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)       # opaque red on the left
    rgba[:, 20:] = (0, 0, 0, 0)           # fully transparent (black underneath) on the right
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    rgb = decode_image(path)
    assert rgb.shape == (20, 40, 3) and rgb.dtype == np.uint8
    assert (rgb[:, :20] == RED).all()
    assert (rgb[:, 20:] == WHITE).all()


def test_palette_gif_with_transparency_comes_out_white(tmp_path):
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 4, 8))             # index 0 (declared transparent) on the left half
    path = tmp_path / "pal.gif"
    pal.save(path, transparency=0)
    rgb = decode_image(path)
    assert (rgb[:, :4] == WHITE).all()
    assert (rgb[:, 4:] == RED).all()


def test_sixteen_bit_png_is_scaled_by_its_range_not_clipped_white(tmp_path):
    ramp = np.linspace(0, 65535, 128 * 128).astype(np.uint16).reshape(128, 128)
    path = tmp_path / "deep.png"
    Image.frombytes("I;16", (128, 128), ramp.astype("<u2").tobytes()).save(path)
    rgb = decode_image(path)
    assert rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8
    assert rgb.min() <= 2 and rgb.max() >= 253
    assert 100 < rgb.mean() < 155           # a ramp averages mid-grey; all-white would be 255
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_float_image_is_scaled_by_its_range(tmp_path):
    values = np.linspace(-1.0, 3.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    path = tmp_path / "float.tif"
    Image.fromarray(values, "F").save(path)
    rgb = decode_image(path)
    assert rgb.min() == 0 and rgb.max() == 255


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, "JPEG", quality=95)  # no cyan, full M+Y = red
    rgb = decode_image(path)
    assert rgb.shape == (32, 32, 3)
    red, green, blue = rgb.reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(noise()[..., 0], "L").save(path)
    rgb = decode_image(path)
    assert rgb.shape == (64, 64, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_exif_rotated_jpeg_is_transposed(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = RED                  # stored landscape: red left, black right
    exif = Image.Exif()
    exif[0x0112] = 6                      # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif.tobytes())
    rgb = decode_image(path)
    assert rgb.shape == (40, 20, 3)       # displayed portrait
    assert rgb[:18, :, 0].mean() > 200    # the stored left (red) is now on top
    assert rgb[22:, :, 0].mean() < 50


def test_huge_jpeg_decodes_reduced_without_bomb_warning(tmp_path):
    # 10,000 x 10,000 = 100 MP: above Pillow's default warning limit (~89 MP).
    path = tmp_path / "huge.jpg"
    Image.new("L", (10_000, 10_000), 90).save(path, "JPEG")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        rgb = decode_image(path, max_side=512)
    assert rgb.shape == (512, 512, 3)
    assert abs(int(rgb.mean()) - 90) <= 2


def test_large_png_is_reduced_keeping_aspect_ratio(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("L", (3000, 1000), 200).save(path)
    rgb = decode_image(path, max_side=300)
    assert rgb.shape == (100, 300, 3)


@pytest.mark.parametrize("bomb_warning", ["always", "error"])  # "error" as under python -W error
def test_png_header_over_250_megapixels_is_too_large_without_a_raw_warning(tmp_path, bomb_warning):
    path = tmp_path / "bomb.png"
    Image.new("L", (8, 8)).save(path)
    path.write_bytes(with_png_size(path.read_bytes(), 20_000, 20_000))  # claims 400 MP
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter(bomb_warning, Image.DecompressionBombWarning)
        assert skip_reason(path) == "too_large"
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]   # counted, not printed


def test_png_header_of_200_megapixels_is_not_refused_as_too_large(tmp_path):
    # Pillow alone would raise its bomb error above ~179 MP; our limit is 250 MP.
    path = tmp_path / "big.png"
    Image.new("L", (8, 8)).save(path)
    path.write_bytes(with_png_size(path.read_bytes(), 20_000, 10_000))
    assert skip_reason(path) == "truncated"      # the header is fine; the pixel data is missing
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_PIL_LIMIT  # Pillow's global is restored afterwards


def with_png_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR claiming width x height (CRC recomputed so the header is valid)."""
    ihdr_start = 8 + 4                     # signature, then the chunk's length field
    fields = png[ihdr_start + 4: ihdr_start + 17]
    new_fields = struct.pack(">II", width, height) + fields[8:]
    chunk = b"IHDR" + new_fields
    crc = struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    return png[:ihdr_start] + chunk + crc + png[ihdr_start + 4 + 13 + 4:]


def test_symlink_loop_is_unreadable(tmp_path):
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)
    assert skip_reason(loop) == "unreadable"


def test_dangling_symlink_is_unreadable(tmp_path):
    link = tmp_path / "gone.jpg"
    os.symlink(tmp_path / "deleted.jpg", link)
    assert skip_reason(link) == "unreadable"


def test_directory_named_like_an_image_is_unreadable(tmp_path):
    folder = tmp_path / "album.jpg"
    folder.mkdir()
    assert skip_reason(folder) == "unreadable"


def test_centre_square_crops_the_centre_and_resizes():
    rgb = np.zeros((30, 90, 3), dtype=np.uint8)
    rgb[:, :30] = (0, 0, 255)
    rgb[:, 30:60] = (0, 255, 0)           # the centre third is green
    rgb[:, 60:] = RED
    square = centre_square(rgb, 16)
    assert square.shape == (16, 16, 3) and square.dtype == np.uint8
    assert (square == (0, 255, 0)).all()


def test_centre_square_of_a_portrait_keeps_the_middle_rows():
    rgb = np.zeros((90, 30, 3), dtype=np.uint8)
    rgb[30:60] = WHITE
    square = centre_square(rgb, 30)
    assert square.shape == (30, 30, 3)
    assert (square == 255).all()


def test_concurrent_decodes_restore_pillows_pixel_limit(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(32)]
    for i, path in enumerate(paths):
        Image.fromarray(noise(seed=i)).save(path)
    with ThreadPoolExecutor(max_workers=8) as pool:
        shapes = list(pool.map(lambda path: decode_image(path).shape, paths))
    assert shapes == [(64, 64, 3)] * 32
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_PIL_LIMIT
