"""Faces: MTCNN alignment on a real photo, the cached second preparation, importers, the leakage audit."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from skimage import data as skdata

from trainers.config import ConfigError, config_hash, from_dict
from trainers.data import align
from trainers.data.align import MtcnnAligner, canonical_landmarks
from trainers.data.dataset import prepare_data
from trainers.data.importers import AFFECTNET_LABELS, FER2013_LABELS, RAFDB_LABELS
from trainers.data.sources import canonical_class
from trainers.data.split import TEST, TRAIN, VAL

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("anger", "disgust", "fear", "happiness", "sadness", "surprise")


def data_cfg(tmp_path, **data):
    return from_dict({"data": {"cache_dir": str(tmp_path / "cache"), **data}}).data


def noise(rng, shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


# --- alignment ------------------------------------------------------------------------

def test_mtcnn_puts_the_astronauts_eyes_on_the_template():
    aligner = MtcnnAligner(112, margin=0.25, device="cpu")
    face = aligner.align([skdata.astronaut()])[0]
    assert not face.fallback and face.image.shape == (112, 112, 3) and face.image.dtype == np.uint8
    # Detect again on the warped output: the eyes must sit where the template puts them.
    again = aligner.detect_landmarks([face.image])[0]
    assert again is not None
    eyes_off = np.linalg.norm(again[:2] - canonical_landmarks(112, 0.25)[:2], axis=1)
    assert eyes_off.max() < 3.0, eyes_off


def test_margin_scales_the_template_about_the_centre():
    tight, loose = canonical_landmarks(100, 0.0), canonical_landmarks(100, 0.5)
    assert np.allclose(tight, align.TEMPLATE_112 * 100 / 112)
    assert np.allclose(loose - 50, (tight - 50) / 2)


def faces_and_coffee(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "anger").mkdir(parents=True)
    (root / "happiness").mkdir()
    Image.fromarray(skdata.astronaut()).save(root / "anger" / "astronaut.png")
    Image.fromarray(skdata.coffee()).save(root / "happiness" / "coffee.png")
    return root


def to_per_image_layout(cache: Path, keep_sets: bool = False) -> None:
    """Rewrite every aligned set as caches written before set files held the images: one object per image
    (objects/ab/<key>.npy, a .fallback beside a centre crop, a .skip holding why an image is unusable),
    and with keep_sets the stacked set too, its manifest without the rows' keys."""
    for manifest_path in list(cache.glob("aligned/*/sets/*.json")):
        manifest = json.loads(manifest_path.read_text())
        objects = manifest_path.parent.parent / "objects"
        images = np.load(manifest_path.with_suffix(".npy"))
        for key, image, fell_back in zip(manifest["keys"], images, manifest["fallback"]):
            (objects / key[:2]).mkdir(parents=True, exist_ok=True)
            np.save(objects / key[:2] / f"{key}.npy", image)
            if fell_back:
                (objects / key[:2] / f"{key}.fallback").touch()
        for key, reason in manifest["skips"].items():
            (objects / key[:2]).mkdir(parents=True, exist_ok=True)
            (objects / key[:2] / f"{key}.skip").write_text(reason)
        if keep_sets:
            manifest_path.write_text(json.dumps({k: manifest[k] for k in ("keep", "reasons", "fallback")}))
    if not keep_sets:
        for sets in list(cache.glob("aligned/*/sets")):
            shutil.rmtree(sets)


def test_a_non_face_falls_back_is_counted_and_the_second_preparation_detects_nothing(tmp_path):
    cfg = data_cfg(tmp_path, source="imagefolder", root=str(faces_and_coffee(tmp_path)),
                   classes=["anger", "happiness"], align="mtcnn")
    first = prepare_data(cfg, 64)
    assert first.report.decoded == 2
    assert first.paths == ["anger/astronaut.png", "happiness/coffee.png"]
    assert first.fallback.tolist() == [False, True]
    metrics = first.report.metrics()
    assert metrics["data_align_failures"] == 1 and metrics["data_align_failure_rate"] == 0.5

    detected = align.DETECTOR_STATS.images
    again = prepare_data(cfg, 64)
    assert align.DETECTOR_STATS.images == detected and again.report.decoded == 0
    assert again.fallback.tolist() == [False, True] and again.report.align_failures == 1
    assert np.array_equal(np.asarray(again.images), np.asarray(first.images))

    # A cache of the per-image layout (one .npy per image, a .fallback beside it) is read, flag included,
    # and moved into the set file: one copy is left.
    to_per_image_layout(tmp_path / "cache")
    objects = prepare_data(cfg, 64)
    assert align.DETECTOR_STATS.images == detected and objects.report.decoded == 0
    assert objects.report.align_failures == 1
    assert np.array_equal(np.asarray(objects.images), np.asarray(first.images))
    assert not list((tmp_path / "cache" / "aligned").glob("*/objects"))

    # A set stacked by that layout is read as it is; its manifest gains its keys, the objects go.
    to_per_image_layout(tmp_path / "cache", keep_sets=True)
    stacked = prepare_data(cfg, 64)
    assert stacked.report.decoded == 0 and stacked.report.align_failures == 1
    assert not list((tmp_path / "cache" / "aligned").glob("*/objects"))
    manifest, = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("aligned/*/sets/*.json")]
    assert len(manifest["keys"]) == 2

    # Another margin is another cache entry: aligned afresh.
    wider = prepare_data(data_cfg(tmp_path, source="imagefolder", root=cfg.root, classes=["anger", "happiness"],
                                  align="mtcnn", align_margin=0.3), 64)
    assert wider.report.decoded == 2 and align.DETECTOR_STATS.images > detected


def test_margin_only_enters_the_config_hash_when_mtcnn_aligns():
    base = from_dict({})
    assert config_hash(from_dict({"data": {"align_margin": 0.3}})) == config_hash(base)
    assert config_hash(from_dict({"data": {"dedupe": False, "use_dataset_split": False}})) == config_hash(base)
    mtcnn = from_dict({"data": {"align": "mtcnn"}})
    assert config_hash(mtcnn) != config_hash(base)
    assert config_hash(from_dict({"data": {"align": "mtcnn", "align_margin": 0.3}})) != config_hash(mtcnn)


@pytest.mark.parametrize("data, field", [
    ({"align_margin": 1.5}, "data.align_margin"),
    ({"source": "imagefolder", "root": "x", "use_dataset_split": True}, "data.use_dataset_split"),
    ({"duplicate_distance": 100}, "data.duplicate_distance"),
    ({"align": "dlib"}, "data.align"),
])
def test_bad_face_settings_are_rejected_naming_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_dict({"data": data})


# --- importers ------------------------------------------------------------------------

def write_fer2013(root: Path, rows: list[tuple[int, np.ndarray | str, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "fer2013.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["emotion", "pixels", "Usage"])
        for emotion, pixels, usage in rows:
            text = pixels if isinstance(pixels, str) else " ".join(map(str, pixels.ravel()))
            writer.writerow([emotion, text, usage])
    return root


def fer2013_rows(seed: int = 0) -> list[tuple[int, np.ndarray, str]]:
    """Each of the 7 emotions twice in Training, once in PublicTest and once in PrivateTest."""
    rng = np.random.default_rng(seed)
    return [(emotion, noise(rng, (48, 48)), usage) for emotion in range(7)
            for usage in ("Training", "Training", "PublicTest", "PrivateTest")]


def test_fer2013_maps_labels_drops_neutral_and_keeps_its_own_split(tmp_path):
    rows = fer2013_rows()
    root = write_fer2013(tmp_path / "fer", rows + [(3, "1 2 3", "Training")])   # a short pixel string
    data = prepare_data(data_cfg(tmp_path, source="fer2013", root=str(root), use_dataset_split=True), 48)
    assert data.report.dropped == {"neutral": 4}
    assert data.report.skipped == {"malformed_row": 1}
    assert all(counts == {c: n for c in CLASSES}
               for counts, n in zip(data.report.per_split.values(), (2, 1, 1)))
    for i, path in enumerate(data.paths):            # imported/fer2013-<key>/<row>.png
        emotion, pixels, usage = rows[int(Path(path).stem)]
        assert data.classes[data.labels[i]] == canonical_class(FER2013_LABELS[emotion], CLASSES)
        assert data.splits[i] == {"Training": TRAIN, "PublicTest": VAL, "PrivateTest": TEST}[usage]
        assert np.array_equal(data.images[i][:, :, 0], pixels)
    by_spec = prepare_data(data_cfg(tmp_path, source="fer2013", root=str(root)), 48)
    assert by_spec.report.usable == 24 and not np.array_equal(by_spec.splits, data.splits)


def write_rafdb(root: Path, rng) -> dict[str, int]:
    """Per code 1..7: three train_ and one test_ image; returns name -> code."""
    (root / "EmoLabel").mkdir(parents=True)
    (root / "Image" / "aligned").mkdir(parents=True)
    names = {}
    for code in range(1, 8):
        for k, prefix in enumerate(("train", "train", "train", "test")):
            name = f"{prefix}_{code}{k:04d}.jpg"
            Image.fromarray(noise(rng, (40, 40, 3))).save(root / "Image" / "aligned" / f"{Path(name).stem}_aligned.jpg")
            names[name] = code
    lines = [f"{name} {code}" for name, code in names.items()] + ["train_09999.jpg 4", "garbage"]
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return names


def test_rafdb_maps_labels_and_splits_by_prefix_with_val_carved_from_train(tmp_path):
    names = write_rafdb(tmp_path / "raf", np.random.default_rng(1))
    data = prepare_data(data_cfg(tmp_path, source="rafdb", root=str(tmp_path / "raf"), use_dataset_split=True), 32)
    assert data.report.dropped == {"neutral": 4}
    assert data.report.skipped == {"malformed_row": 1, "missing": 1}
    assert all(counts == {c: n for c in CLASSES}
               for counts, n in zip(data.report.per_split.values(), (2, 1, 1)))
    for i, path in enumerate(data.paths):            # Image/aligned/<stem>_aligned.jpg
        name = Path(path).name.replace("_aligned", "")
        assert data.classes[data.labels[i]] == canonical_class(RAFDB_LABELS[names[name]], CLASSES)
        assert (data.splits[i] == TEST) == name.startswith("test_")


def write_affectnet(root: Path, rng) -> list[dict]:
    """Every code 0..10 in training.csv, codes 1..6 also in validation.csv; a textured box on grey."""
    lists, images = root / "Manually_Annotated_file_lists", root / "Manually_Annotated_Images"
    lists.mkdir(parents=True)
    rows = []
    for split, codes, copies in (("training", range(11), 3), ("validation", range(1, 7), 1)):
        split_rows = []
        for code in codes:
            for k in range(copies if 1 <= code <= 6 else 1):
                picture = np.full((400, 600, 3), 128, dtype=np.uint8)
                x, y = 60 + 40 * k, 50 + 10 * code
                colour = np.array([20 * code, 250 - 20 * code, 40 * k], dtype=np.int64)
                patch = colour + rng.integers(-8, 9, (200, 200, 3))
                picture[y:y + 200, x:x + 200] = np.clip(patch, 0, 255)
                relative = f"{code}/{split}_{code}_{k}.png"
                (images / str(code)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(picture).save(images / relative)
                split_rows.append({"subDirectory_filePath": relative, "face_x": x, "face_y": y, "face_width": 200,
                                   "face_height": 200, "facial_landmarks": "", "expression": code,
                                   "valence": 0, "arousal": 0, "colour": colour, "split": split})
        with open(lists / f"{split}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(split_rows[0])[:9], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(split_rows)
        rows += split_rows
    return rows


def test_affectnet_crops_to_the_face_box_and_drops_contempt_and_non_faces(tmp_path):
    rows = {r["subDirectory_filePath"]: r for r in write_affectnet(tmp_path / "affectnet", np.random.default_rng(2))}
    data = prepare_data(data_cfg(tmp_path, source="affectnet", root=str(tmp_path / "affectnet"),
                                 use_dataset_split=True), 16)
    assert data.report.dropped == {"contempt": 1, "neutral": 1, "no_face": 1, "none": 1, "uncertain": 1}
    assert all(counts == {c: n for c in CLASSES}
               for counts, n in zip(data.report.per_split.values(), (2, 1, 1)))
    for i, path in enumerate(data.paths):            # Manually_Annotated_Images/<code>/<name>
        row = rows[path.split("/", 1)[1]]
        assert data.classes[data.labels[i]] == canonical_class(AFFECTNET_LABELS[row["expression"]], CLASSES)
        assert (data.splits[i] == TEST) == (row["split"] == "validation")
        # The 600 x 400 file was decoded at 256 px wide: the box still selects just the patch.
        assert np.abs(data.images[i].reshape(-1, 3).mean(0) - row["colour"]).max() < 6


# --- leakage audit --------------------------------------------------------------------

def test_the_audit_finds_planted_duplicates_and_dedupe_removes_the_later_copies(tmp_path):
    rows = fer2013_rows(seed=3)
    face = rows[12][1]                                      # happy, Training
    blurred = np.clip(face.astype(int) + np.random.default_rng(4).integers(-3, 4, face.shape), 0, 255)
    rows[14] = (3, face.copy(), "PublicTest")               # the same image in val ...
    rows[15] = (3, blurred.astype(np.uint8), "PrivateTest")  # ... and a near copy in test
    root = write_fer2013(tmp_path / "leaky", rows)
    cfg = dict(source="fer2013", root=str(root), use_dataset_split=True)
    counted = prepare_data(data_cfg(tmp_path, **cfg), 48)
    assert counted.report.duplicates == {"train-test": 1, "train-val": 1, "val-test": 1}
    assert counted.report.duplicates_removed == 0 and counted.report.usable == 24
    metrics = counted.report.metrics()
    assert metrics["data_duplicates_found"] == 3 and metrics["data_duplicates_train_test"] == 1

    deduped = prepare_data(data_cfg(tmp_path, dedupe=True, **cfg), 48)
    assert deduped.report.duplicates_removed == 2 and deduped.report.usable == 22
    assert deduped.report.per_split["val"]["happiness"] == 0 and deduped.report.per_split["test"]["happiness"] == 0
    assert deduped.images.shape == (22, 48, 48, 3) and deduped.digest != counted.digest
    kept = [int(Path(p).stem) for p in deduped.paths]
    assert 12 in kept and 14 not in kept and 15 not in kept
    assert np.array_equal(deduped.images[kept.index(12)][:, :, 0], face)
    again = prepare_data(data_cfg(tmp_path, dedupe=True, **cfg), 48)
    assert again.digest == deduped.digest and again.report.decoded == 0


def test_the_audit_finds_nothing_in_a_clean_split(tmp_path):
    root = write_fer2013(tmp_path / "clean", fer2013_rows(seed=5))
    data = prepare_data(data_cfg(tmp_path, source="fer2013", root=str(root), dedupe=True), 48)
    assert data.report.duplicates == {} and data.report.duplicates_removed == 0
    assert data.report.metrics()["data_duplicates_found"] == 0


# --- the prepare verb -----------------------------------------------------------------

def test_prepare_prints_images_per_class_per_split_skips_and_duplicates(tmp_path, capsys):
    from orchestrator.__main__ import main

    rows = fer2013_rows(seed=6)
    rows[15] = (3, rows[12][1].copy(), "PrivateTest")
    root = write_fer2013(tmp_path / "fer", rows + [(9, "0 " * 2304, "Training")])
    spec = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())
    data = {"source": "fer2013", "root": str(root), "cache_dir": str(tmp_path / "cache")}
    spec["data"] = {**data, "use_dataset_split": True}
    spec["production"] = data
    del spec["experiments"]["mitigation"]      # it balances by group, which fer2013 images do not carry
    for preset in spec["models"].values():
        preset["image_size"] = 32
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["prepare", str(path)]) == 0
    out = capsys.readouterr().out
    assert "data: fer2013 at 32 px, align none" in out and "production: fer2013 at 32 px" in out
    assert "│ happiness │     2 │   1 │    1 │     4 │" in out
    assert "skipped: malformed_row 1" in out and "dropped (label not in classes): neutral 4" in out
    assert "near-duplicates across splits" in out and "train-test 1" in out
