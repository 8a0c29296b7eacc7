import numpy as np
import pytest
from PIL import Image

from trainers.config import from_dict
from trainers.data.dataset import DataError, prepare_data
from trainers.data.split import TEST, TRAIN, VAL
from trainers.run import require_val_and_test


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


def write_subject_faces(root, classes_and_subjects):
    """Folders of faces per class, and metadata.csv naming each image's subject (None: no subject given)."""
    rows = ["path,subject"]
    for c, colour, subjects in classes_and_subjects:
        write_faces(root / c, len(subjects), colour)
        rows += [f"{c}/img {i}.png,{s or ''}" for i, s in enumerate(subjects)]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")


def test_subjects_for_some_images_only_warn_with_the_count_and_split_stratified(tmp_path):
    root = tmp_path / "faces"
    write_subject_faces(root, [("anger", 200, [f"p{i % 5}" if i < 24 else None for i in range(30)]),
                               ("happiness", 20, [f"q{i % 5}" if i < 21 else None for i in range(30)])])
    report = prepare_data(folder_cfg(tmp_path, root), 16).report
    assert report.split_mode == "stratified"
    (warning,) = report.warnings
    assert warning.startswith("subjects for 45 of 60 images: split stratified by class, not by subject")
    assert report.metrics()["data_warnings"] == 1


def test_a_group_split_that_leaves_a_class_out_of_test_warns_naming_class_and_split(tmp_path):
    root = tmp_path / "faces"
    # Every fear image is one subject's, so the group split puts all of fear in one split.
    write_subject_faces(root, [("anger", 200, [f"p{i % 10}" for i in range(30)]),
                               ("happiness", 20, [f"p{i % 10}" for i in range(30)]),
                               ("fear", 120, ["solo"] * 6)])
    data = prepare_data(folder_cfg(tmp_path, root, ("anger", "happiness", "fear")), 16)
    assert data.report.split_mode == "group"
    assert set(data.splits[data.labels == 2].tolist()) == {TRAIN}
    assert [w.split(":")[0] for w in data.report.warnings] == ["the group split left fear out of val",
                                                               "the group split left fear out of test"]
    assert "its test metrics are n/a" in data.report.warnings[1]


def test_report_counts_images_subjects_and_alignment_failures_per_split(tmp_path):
    root = tmp_path / "faces"
    write_subject_faces(root, [("anger", 200, [f"p{i % 10}" for i in range(30)]),
                               ("happiness", 20, [f"p{i % 10}" for i in range(30)])])
    data = prepare_data(folder_cfg(tmp_path, root), 16)
    report = data.report
    for s, name in enumerate(("train", "val", "test")):
        rows = data.splits == s
        assert report.split_images()[name] == rows.sum()
        assert report.subjects[name] == len({data.subjects[i] for i in np.flatnonzero(rows)})
        assert report.split_align_failures[name] == data.fallback[rows].sum() == 0   # align: none
        assert report.metrics()[f"data_subjects_{name}"] == report.subjects[name]
        assert report.metrics()[f"data_align_failure_rate_{name}"] == 0
    assert sum(report.subjects.values()) == 10 and report.warnings == []


def test_a_split_left_without_test_images_stops_the_trial_before_it_trains(tmp_path):
    root = tmp_path / "faces"
    # Two subjects cannot fill three splits without splitting a person: the group split leaves test empty.
    write_subject_faces(root, [("anger", 200, ["p0", "p1"] * 10), ("happiness", 20, ["p0", "p1"] * 10)])
    data = prepare_data(folder_cfg(tmp_path, root), 16)
    assert data.report.split_mode == "group" and not len(data.indices(TEST))
    with pytest.raises(DataError, match=r"the group split left no (val|test) image \(of 40 images\); give"):
        require_val_and_test(data)
