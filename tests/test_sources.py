"""list_imagefolder maps folder names onto the spec's classes, counts what it drops, and attaches metadata."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers.data.sources import CLASS_ALIASES, canonical_class, list_imagefolder

CLASSES = ("anger", "disgust", "fear", "happiness", "sadness", "surprise")


def write_image(path: Path, value: int = 128) -> Path:
    """A tiny real PNG/JPEG at path (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path)
    return path


def labels_by_name(listing) -> dict[str, str]:
    """File name -> class name, for readable assertions."""
    return {Path(sample.path).name: CLASSES[sample.label] for sample in listing.samples}


def test_aliases_are_case_insensitive_and_cover_common_spellings():
    assert canonical_class("Angry", CLASSES) == "anger"
    assert canonical_class(" SURPRISED ", CLASSES) == "surprise"
    assert canonical_class("suprise", CLASSES) == "surprise"
    assert canonical_class("scared", CLASSES) == "fear"
    assert canonical_class("joy", CLASSES) == "happiness"
    assert canonical_class("neutral", CLASSES) is None
    assert CLASS_ALIASES["disgusted"] == "disgust"


def test_user_defined_class_names_map_to_themselves():
    assert canonical_class("Pain", ("pain", "anger")) == "pain"
    assert canonical_class("Anger", ("angry", "happy")) == "angry"   # a spec written with aliases


def test_listing_maps_folders_including_two_into_one_class(tmp_path):
    write_image(tmp_path / "Angry" / "a1.png")
    write_image(tmp_path / "anger" / "a2.png")
    write_image(tmp_path / "happy" / "h1.png")
    write_image(tmp_path / "SURPRISED" / "s1.jpg")
    listing = list_imagefolder(tmp_path, CLASSES)
    assert labels_by_name(listing) == {"a1.png": "anger", "a2.png": "anger", "h1.png": "happiness", "s1.jpg": "surprise"}
    assert all(Path(sample.path).is_absolute() for sample in listing.samples)
    assert listing.dropped == Counter() and listing.skipped == Counter()


def test_unmapped_folders_are_dropped_and_counted(tmp_path):
    write_image(tmp_path / "happy" / "h.png")
    for i in range(3):
        write_image(tmp_path / "neutral" / f"n{i}.png")
    write_image(tmp_path / "contempt" / "c.png")
    write_image(tmp_path / "xyz" / "deep" / "x.png")
    listing = list_imagefolder(tmp_path, CLASSES)
    assert [Path(sample.path).name for sample in listing.samples] == ["h.png"]
    assert listing.dropped == Counter({"neutral": 3, "contempt": 1, "xyz": 1})


def test_images_in_nested_folders_are_found_and_other_files_ignored(tmp_path):
    write_image(tmp_path / "sad" / "session1" / "day 2" / "deep.PNG")
    (tmp_path / "sad" / "notes.txt").write_text("not an image", encoding="utf-8")
    (tmp_path / "sad" / "broken.jpg").write_text("listed anyway; decode_image rejects it", encoding="utf-8")
    listing = list_imagefolder(tmp_path, CLASSES)
    assert sorted(Path(sample.path).name for sample in listing.samples) == ["broken.jpg", "deep.PNG"]


def test_metadata_csv_attaches_subject_and_sorted_attrs(tmp_path):
    write_image(tmp_path / "happy" / "h1.png")
    write_image(tmp_path / "sad" / "s1.png")
    write_image(tmp_path / "sad" / "no_row.png")
    (tmp_path / "metadata.csv").write_text(
        "path,subject,occluded,group\n"
        "happy/h1.png,p01,1,b\n"
        "./sad/s1.png,p02,0,a\n"
        "sad/missing.png,p03,0,a\n",          # no such file: ignored
        encoding="utf-8",
    )
    samples = {Path(sample.path).name: sample for sample in list_imagefolder(tmp_path, CLASSES).samples}
    assert samples["h1.png"].subject == "p01"
    assert samples["h1.png"].attrs == (("group", "b"), ("occluded", "1"))
    assert samples["s1.png"].subject == "p02"
    assert samples["no_row.png"].subject is None and samples["no_row.png"].attrs == ()
    assert len(samples) == 3


def test_metadata_csv_saved_by_a_spreadsheet_with_bom_is_read(tmp_path):
    write_image(tmp_path / "happy" / "h1.png")
    (tmp_path / "metadata.csv").write_text("path,subject\nhappy/h1.png,p07\n", encoding="utf-8-sig")
    (sample,) = list_imagefolder(tmp_path, CLASSES).samples
    assert sample.subject == "p07"


def test_metadata_without_path_column_is_a_clear_error(tmp_path):
    write_image(tmp_path / "happy" / "h1.png")
    (tmp_path / "metadata.csv").write_text("file,subject\nhappy/h1.png,p01\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"metadata\.csv: needs a 'path' column .* found columns: file, subject"):
        list_imagefolder(tmp_path, CLASSES)


def test_missing_root_says_what_to_set(tmp_path):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(FileNotFoundError, match="set data.root to the folder holding one sub-folder per class") as caught:
        list_imagefolder(missing, CLASSES)
    assert str(missing) in str(caught.value)


def test_unicode_and_spaces_in_names_are_listed(tmp_path):
    write_image(tmp_path / "happy" / "café smile 😀.png")
    write_image(tmp_path / "happy" / "Zoë" / "über glücklich.jpg")
    (tmp_path / "metadata.csv").write_text("path,subject\nhappy/café smile 😀.png,Zoë\n", encoding="utf-8")
    samples = {Path(sample.path).name: sample for sample in list_imagefolder(tmp_path, CLASSES).samples}
    assert set(samples) == {"café smile 😀.png", "über glücklich.jpg"}
    assert samples["café smile 😀.png"].subject == "Zoë"


def test_symlinked_directory_loop_does_not_hang_or_duplicate(tmp_path):
    write_image(tmp_path / "fear" / "f1.png")
    os.symlink(tmp_path / "fear", tmp_path / "fear" / "again")      # fear/again -> fear
    os.symlink(tmp_path, tmp_path / "fear" / "up")                  # fear/up -> root
    listing = list_imagefolder(tmp_path, CLASSES)
    assert [Path(sample.path).name for sample in listing.samples] == ["f1.png"]


def test_dangling_and_looping_image_links_are_skipped_as_unreadable(tmp_path):
    write_image(tmp_path / "fear" / "f1.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "fear" / "dangling.png")
    os.symlink(tmp_path / "fear" / "loop.png", tmp_path / "fear" / "loop.png")
    os.symlink(tmp_path / "fear" / "f1.png", tmp_path / "fear" / "alias.png")   # resolves: listed
    listing = list_imagefolder(tmp_path, CLASSES)
    assert sorted(Path(sample.path).name for sample in listing.samples) == ["alias.png", "f1.png"]
    assert listing.skipped == Counter({"unreadable": 2})


def test_symlinked_class_folder_is_followed(tmp_path):
    write_image(tmp_path / "elsewhere" / "joy_pics" / "j.png")
    (tmp_path / "dataset").mkdir()
    os.symlink(tmp_path / "elsewhere" / "joy_pics", tmp_path / "dataset" / "joy")
    listing = list_imagefolder(tmp_path / "dataset", CLASSES)
    assert [sample.path for sample in listing.samples] == [str(tmp_path / "dataset" / "joy" / "j.png")]


def test_root_that_is_a_file_says_what_to_set(tmp_path):
    archive = tmp_path / "faces.zip"
    archive.write_bytes(b"PK")
    with pytest.raises(NotADirectoryError, match="set data.root"):
        list_imagefolder(archive, CLASSES)


def test_hidden_files_and_folders_are_ignored(tmp_path):
    write_image(tmp_path / "happy" / "h.png")
    write_image(tmp_path / "happy" / "._h.png")                      # macOS resource fork
    write_image(tmp_path / "happy" / ".thumbs" / "t.png")
    write_image(tmp_path / ".cache" / "c.png")
    listing = list_imagefolder(tmp_path, CLASSES)
    assert [Path(sample.path).name for sample in listing.samples] == ["h.png"]
    assert listing.dropped == Counter()


def test_listing_order_is_deterministic_and_sorted_by_path(tmp_path):
    for name in ["b.png", "a.png", "c.png"]:
        write_image(tmp_path / "sad" / name)
        write_image(tmp_path / "Happy" / name)
    first = list_imagefolder(tmp_path, CLASSES)
    second = list_imagefolder(tmp_path, CLASSES)
    assert first.samples == second.samples
    paths = [Path(sample.path) for sample in first.samples]
    assert paths == sorted(paths)
    assert [p.relative_to(tmp_path).as_posix() for p in paths[:3]] == ["Happy/a.png", "Happy/b.png", "Happy/c.png"]


def test_listing_order_is_the_order_of_path_parts_so_sets_cached_before_keep_their_rows(tmp_path):
    # A set's rows (and so its split) follow the listing's order: folder "a" comes before "a-b", part by part,
    # as when samples held Path objects; a plain string sort would put "a-b/..." first ("-" < "/").
    for folder in ["a-b", "a", "a.b", "a b"]:
        write_image(tmp_path / "happy" / folder / "x.png")
    listing = list_imagefolder(tmp_path, CLASSES)
    assert [Path(s.path).parent.name for s in listing.samples] == ["a", "a b", "a-b", "a.b"]
