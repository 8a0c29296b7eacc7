import numpy as np
import pytest
from PIL import Image

from trainers.config import from_dict
from trainers.data.dataset import DataError, prepare_data
from trainers.data.split import TEST, TRAIN, VAL


def folder_cfg(tmp_path, root, classes=("anger", "happiness")):
    return from_dict({"data": {"source": "imagefolder", "root": str(root), "classes": list(classes),
                               "cache_dir": str(tmp_path / "cache")}}).data


def write_faces(folder, n, colour, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size + i, size), (colour, i * 3 % 255, 80)).save(folder / f"img {i}.png")


def test_synthetic_source_prepares_uint8_images_at_the_model_size(tmp_path):
    cfg = from_dict({"data": {"synthetic": {"n_images": 120, "draw_size": 32},
                              "cache_dir": str(tmp_path / "cache")}})
    data = prepare_data(cfg.data, 24)
    assert data.images.shape == (120, 24, 24, 3) and data.images.dtype == np.uint8
    assert set(np.unique(data.splits)) == {TRAIN, VAL, TEST}
    assert len(data.attrs) == 120 and {"group", "occluded"} <= set(data.attrs[0])
    assert data.report.usable == 120 and data.report.decoded == 120


def test_second_preparation_decodes_nothing_and_gives_the_same_data(tmp_path):
    cfg = from_dict({"data": {"synthetic": {"n_images": 120, "draw_size": 32},
                              "cache_dir": str(tmp_path / "cache")}})
    first = prepare_data(cfg.data, 24)
    again = prepare_data(cfg.data, 24)
    assert again.report.decoded == 0
    assert np.array_equal(np.asarray(first.images), np.asarray(again.images))
    assert np.array_equal(first.splits, again.splits) and first.digest == again.digest


def test_another_input_size_reuses_nothing_but_the_same_files(tmp_path):
    cfg = from_dict({"data": {"synthetic": {"n_images": 120, "draw_size": 32},
                              "cache_dir": str(tmp_path / "cache")}})
    prepare_data(cfg.data, 24)
    other = prepare_data(cfg.data, 16)
    assert other.report.decoded == 120 and other.images.shape[1:] == (16, 16, 3)


def test_images_shared_with_an_earlier_dataset_are_not_decoded_again(tmp_path):
    root = tmp_path / "faces"
    write_faces(root / "anger", 6, 200)
    write_faces(root / "happy", 6, 20)
    prepare_data(folder_cfg(tmp_path, root), 16)
    write_faces(root / "happy" / "more", 3, 90)
    grown = prepare_data(folder_cfg(tmp_path, root), 16)
    assert grown.report.usable == 15 and grown.report.decoded == 3


def test_bad_files_are_skipped_and_counted_by_reason(tmp_path):
    root = tmp_path / "faces"
    write_faces(root / "Angry", 6, 200)
    write_faces(root / "happiness", 6, 20)
    (root / "happiness" / "empty.jpg").write_bytes(b"")
    (root / "happiness" / "notes.jpg").write_text("not an image")
    good = (root / "Angry" / "img 0.png").read_bytes()
    (root / "Angry" / "cut.png").write_bytes(good[: len(good) // 2])
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(root / "Angry" / "alpha.png")
    write_faces(root / "neutral", 4, 128)
    data = prepare_data(folder_cfg(tmp_path, root), 16)
    assert data.report.usable == 13
    assert data.report.skipped == {"empty": 1, "not_an_image": 1, "truncated": 1}
    assert data.report.dropped == {"neutral": 4}
    metrics = data.report.metrics()
    assert metrics["data_skipped_empty"] == 1 and metrics["data_dropped_neutral"] == 4
    again = prepare_data(folder_cfg(tmp_path, root), 16)
    assert again.report.decoded == 0 and again.report.skipped == data.report.skipped


def test_a_class_without_images_ends_with_one_clear_line(tmp_path):
    root = tmp_path / "faces"
    write_faces(root / "anger", 5, 200)
    (root / "happiness").mkdir()
    with pytest.raises(DataError, match="class 'happiness' has no usable image.*remove it from data.classes"):
        prepare_data(folder_cfg(tmp_path, root), 16)


def test_a_missing_root_says_what_to_set(tmp_path):
    with pytest.raises(DataError, match="data.root: folder .* does not exist"):
        prepare_data(folder_cfg(tmp_path, tmp_path / "nowhere"), 16)


def test_subjects_from_metadata_never_cross_splits(tmp_path):
    root = tmp_path / "faces"
    rows = ["path,subject,group"]
    for c, colour in (("anger", 200), ("happiness", 20)):
        write_faces(root / c, 30, colour)
        rows += [f"{c}/img {i}.png,p{i % 10},a" for i in range(30)]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    data = prepare_data(folder_cfg(tmp_path, root), 16)
    splits_of = {}
    for subject, split in zip(data.subjects, data.splits):
        splits_of.setdefault(subject, set()).add(int(split))
    assert len(splits_of) == 10 and all(len(s) == 1 for s in splits_of.values())
