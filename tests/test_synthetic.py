"""The synthetic source: counts, layout, determinism, caching and the train/production shift."""
from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers.config import DEFAULT_CLASSES, SyntheticConfig
from trainers.data import synthetic
from trainers.data.synthetic import TABLE1_COUNTS, class_counts, synthetic_root, write_synthetic

SMALL = SyntheticConfig(n_images=180, seed=3, draw_size=32)


def read_metadata(root: Path) -> list[dict[str, str]]:
    """metadata.csv as a list of row dicts."""
    with open(root / "metadata.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def png_bytes(root: Path) -> dict[str, bytes]:
    """Every PNG under root, keyed by its relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def small_train(tmp_path_factory) -> Path:
    """One small train-variant dataset shared by the read-only tests."""
    return write_synthetic(tmp_path_factory.mktemp("cache"), SMALL, DEFAULT_CLASSES)


def test_table1_counts_are_the_studys():
    assert TABLE1_COUNTS == {"anger": 8228, "disgust": 2458, "fear": 2983,
                             "happiness": 9113, "sadness": 13040, "surprise": 7417}


def test_class_counts_follow_table1_proportions():
    counts = class_counts(2400, DEFAULT_CLASSES)
    assert sum(counts.values()) == 2400
    total = sum(TABLE1_COUNTS.values())
    for name, count in counts.items():
        # Largest-remainder rounding is never more than one image off the exact share.
        assert abs(count - 2400 * TABLE1_COUNTS[name] / total) < 1
    assert counts["sadness"] > counts["happiness"] > counts["anger"] > counts["disgust"]


def test_class_counts_keep_ten_per_class_when_small():
    counts = class_counts(60, DEFAULT_CLASSES)
    assert sum(counts.values()) == 60
    assert min(counts.values()) >= 10


def test_class_counts_of_a_subset_use_the_subset_proportions():
    counts = class_counts(100, ("fear", "happiness"))
    assert counts == {"fear": 25, "happiness": 75}


def test_class_counts_reject_too_few_images():
    with pytest.raises(ValueError, match="at least 10 per class"):
        class_counts(50, DEFAULT_CLASSES)


def test_layout_is_an_image_folder_with_metadata(small_train):
    rows = read_metadata(small_train)
    assert list(rows[0]) == ["path", "subject", "group", "occluded"]
    assert len(rows) == SMALL.n_images
    expected = class_counts(SMALL.n_images, DEFAULT_CLASSES)
    assert Counter(r["path"].split("/")[0] for r in rows) == expected
    assert sorted(r["path"] for r in rows) == sorted(png_bytes(small_train))
    assert "anger/anger_00001.png" in {r["path"] for r in rows}
    for row in rows:
        assert row["subject"][0] == "s" and row["subject"][1:].isdigit()
        assert row["group"] in ("a", "b")
        assert row["occluded"] in ("0", "1")


def test_images_are_rgb_png_of_draw_size(small_train):
    for path in list(small_train.rglob("*.png"))[:20]:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.mode == "RGB"
            assert image.size == (SMALL.draw_size, SMALL.draw_size)


def test_subjects_have_one_group_and_several_expressions(small_train):
    rows = read_metadata(small_train)
    groups, labels = {}, {}
    for row in rows:
        groups.setdefault(row["subject"], set()).add(row["group"])
        labels.setdefault(row["subject"], set()).add(row["path"].split("/")[0])
    assert all(len(g) == 1 for g in groups.values())
    # ~8 images per subject, so a group-aware split has many subjects to deal out.
    assert len(groups) >= SMALL.n_images // 12
    assert np.mean([len(v) for v in labels.values()]) >= 2


def test_same_seed_draws_byte_identical_images(tmp_path, small_train):
    again = write_synthetic(tmp_path, SMALL, DEFAULT_CLASSES)
    assert again != small_train
    assert png_bytes(again) == png_bytes(small_train)
    assert (again / "metadata.csv").read_bytes() == (small_train / "metadata.csv").read_bytes()


def test_different_seeds_draw_different_images(tmp_path, small_train):
    other = write_synthetic(tmp_path, SyntheticConfig(n_images=180, seed=4, draw_size=32), DEFAULT_CLASSES)
    first, second = png_bytes(small_train), png_bytes(other)
    assert first.keys() == second.keys()
    assert all(first[k] != second[k] for k in first)


def test_root_is_named_by_a_hash_of_settings(tmp_path):
    root = synthetic_root(tmp_path, SMALL, DEFAULT_CLASSES)
    assert root.parent == tmp_path / "synthetic"
    assert len(root.name) == 12 and int(root.name, 16) >= 0
    assert root == synthetic_root(str(tmp_path), SMALL, DEFAULT_CLASSES)
    assert root != synthetic_root(tmp_path, SyntheticConfig(n_images=180, seed=4, draw_size=32), DEFAULT_CLASSES)
    assert root != synthetic_root(tmp_path, SMALL, DEFAULT_CLASSES[:3])


def test_second_call_reuses_the_drawn_dataset(tmp_path, monkeypatch):
    cfg = SyntheticConfig(n_images=60, seed=1, draw_size=32)
    root = write_synthetic(tmp_path, cfg, DEFAULT_CLASSES)
    stamp = os.stat(root / "metadata.csv").st_mtime_ns

    def must_not_draw(*args, **kwargs):
        raise AssertionError("drew again")

    monkeypatch.setattr(synthetic, "draw_dataset", must_not_draw)
    assert write_synthetic(tmp_path, cfg, DEFAULT_CLASSES) == root
    assert os.stat(root / "metadata.csv").st_mtime_ns == stamp


def test_drawn_dataset_is_readable_by_other_users(small_train):
    assert small_train.stat().st_mode & 0o055 == 0o055


def test_a_crash_while_drawing_leaves_no_dataset_behind(tmp_path, monkeypatch):
    cfg = SyntheticConfig(n_images=60, seed=2, draw_size=32)

    def crash(spec, size, rng):
        raise RuntimeError("power cut")

    monkeypatch.setattr(synthetic, "draw_image", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        write_synthetic(tmp_path, cfg, DEFAULT_CLASSES)
    assert not synthetic_root(tmp_path, cfg, DEFAULT_CLASSES).exists()
    assert list((tmp_path / "synthetic").iterdir()) == []


def test_unknown_class_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"synthetic source draws only: anger, disgust, fear, "
                                         r"happiness, sadness, surprise; got 'neutral' in data.classes"):
        write_synthetic(tmp_path, SMALL, ("anger", "neutral"))
    assert not (tmp_path / "synthetic").exists()


def test_aliases_and_capitals_are_not_drawn(tmp_path):
    for name in ("happy", "Anger"):
        with pytest.raises(ValueError, match=f"got '{name}'"):
            class_counts(120, ("sadness", name))


def test_a_subset_of_classes_draws_only_those(tmp_path):
    root = write_synthetic(tmp_path, SyntheticConfig(n_images=60, draw_size=32), ("happiness", "sadness"))
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["happiness", "sadness"]
    assert len(read_metadata(root)) == 60


def group_b_share(rows: list[dict[str, str]], happy: bool) -> float:
    """Fraction of group b among happiness rows (happy=True) or all other rows."""
    chosen = [r for r in rows if r["path"].startswith("happiness/") == happy]
    return sum(r["group"] == "b" for r in chosen) / len(chosen)


def test_train_variant_makes_group_b_rare_except_in_happiness(tmp_path):
    rows = read_metadata(write_synthetic(tmp_path, SyntheticConfig(n_images=600, draw_size=32),
                                         DEFAULT_CLASSES))
    overall_b = sum(r["group"] == "b" for r in rows) / len(rows)
    assert 0.12 < overall_b < 0.32
    assert group_b_share(rows, happy=True) > 0.55
    assert group_b_share(rows, happy=False) < 0.15
    assert sum(r["occluded"] == "1" for r in rows) / len(rows) < 0.08


def test_production_variant_shifts_group_mix_and_adds_occlusion(tmp_path):
    cfg = SyntheticConfig(n_images=300, draw_size=32, variant="production")
    rows = read_metadata(write_synthetic(tmp_path, cfg, DEFAULT_CLASSES))
    assert group_b_share(rows, happy=False) > 0.6
    assert group_b_share(rows, happy=True) > 0.6
    assert 0.25 < sum(r["occluded"] == "1" for r in rows) / len(rows) < 0.45


def test_group_changes_how_faces_look():
    rng = np.random.default_rng(0)
    shorts = [synthetic.draw_identity(rng, "s0001", "a") for _ in range(20)]
    longs = [synthetic.draw_identity(rng, "s0002", "b") for _ in range(20)]
    # Group b faces are narrower ovals with long hair; group a faces are wider and squarer.
    assert max(i.width_ratio for i in longs) < min(i.width_ratio for i in shorts)
    assert max(i.squareness for i in longs) < min(i.squareness for i in shorts)


def test_every_expression_moves_the_face_away_from_neutral():
    rng = np.random.default_rng(0)
    for label in DEFAULT_CLASSES:
        drawn = synthetic.sample_expression(label, rng)
        assert drawn != synthetic.NEUTRAL
        assert drawn.eye_open > 0
