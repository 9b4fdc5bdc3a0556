"""``sparselite.evaluation``: image folders checked before the work (one SparseliteError each), images
resized and normalized per channel, top-1/top-5 and the confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sparselite.errors import SparseliteError
from sparselite.evaluation import (Scores, fit_to_model, image_folder_batches, image_input_layout, per_channel,
                                   scan_image_folder)


def make_image_folder(root, classes=("bag", "boot", "coat"), per_class=3, size=(30, 40), rgb=True, seed=0):
    """One subfolder per class of PNG and JPEG files (random pixels)."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if rgb else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_scan_lists_classes_in_sorted_order_and_every_image(tmp_path):
    folder = scan_image_folder(make_image_folder(tmp_path / "data", classes=("coat", "bag"), per_class=2))
    assert folder.classes == ["bag", "coat"]
    assert [(p.parent.name, label) for p, label in folder.files] == [("bag", 0), ("bag", 0), ("coat", 1), ("coat", 1)]


def _no_classes(root):
    root.mkdir()
    (root / "stray.png").write_bytes(b"")


def _empty_class(root):
    make_image_folder(root, classes=("a",))
    (root / "b").mkdir()


def _no_images(root):
    make_image_folder(root, classes=("a",))
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("not an image")


def _corrupt_png(root):
    make_image_folder(root, classes=("a",))
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)


def _text_as_jpeg(root):
    make_image_folder(root, classes=("a",))
    (root / "a" / "fake.jpg").write_text("hello")


def _a_file(root):
    root.write_text("not a folder")


@pytest.mark.parametrize("build, fragments", [
    (None, ["does not exist"]),
    (_a_file, ["is not a folder"]),
    (_no_classes, ["has no class subfolders"]),
    (_empty_class, ["b is empty"]),
    (_no_images, ["has no PNG/JPEG images"]),
    (_corrupt_png, ["broken.png cannot be read"]),
    (_text_as_jpeg, ["fake.jpg cannot be read"]),
], ids=["missing", "file", "no_classes", "empty_class", "no_images", "corrupt_png", "text_as_jpeg"])
def test_bad_folders_are_one_line_errors(tmp_path, build, fragments):
    root = tmp_path / "data"
    if build is not None:
        build(root)
    with pytest.raises(SparseliteError) as err:
        scan_image_folder(root)
    assert "\n" not in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_images_are_resized_converted_and_normalized_per_channel(tmp_path):
    root = tmp_path / "data"
    (root / "only").mkdir(parents=True)
    pixels = np.zeros((10, 6, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 255, 51, 0  # a flat color: resizing keeps it
    Image.fromarray(pixels).save(root / "only" / "a.png")
    folder = scan_image_folder(root)
    mean, std = np.array([0.5, 0.1, 0.0], np.float32), np.array([0.5, 0.1, 1.0], np.float32)
    (images, labels), = list(image_folder_batches(folder, 3, (4, 5), mean, std))
    assert images.shape == (1, 3, 4, 5) and labels.tolist() == [0]
    np.testing.assert_allclose(images[0, :, 0, 0], [1.0, 1.0, 0.0], atol=1e-5)  # (255/255-.5)/.5, (.2-.1)/.1, 0
    (gray, _), = list(image_folder_batches(folder, 1, (4, 5), np.zeros(1, np.float32), np.ones(1, np.float32)))
    assert gray.shape == (1, 1, 4, 5) and 0 < gray[0, 0, 0, 0] < 1  # RGB converted to one luminance channel


def test_mean_and_std_take_one_value_per_channel():
    np.testing.assert_array_equal(per_channel(None, 3, "mean", 0.0), [0, 0, 0])
    with pytest.raises(SparseliteError, match="--mean has 1 value.*3 channel"):
        per_channel([0.5], 3, "mean", 0.0)
    with pytest.raises(SparseliteError, match="--std .* > 0"):
        per_channel([0.0], 1, "std", 1.0)


def test_data_that_does_not_fit_the_model_is_refused_and_other_sizes_are_resized():
    batch = np.ones((2, 1, 28, 28), np.float32)
    assert fit_to_model(batch, (1, 1, 28, 28), "data") is batch
    assert fit_to_model(batch, (1, 1, 14, 14), "data").shape == (2, 1, 14, 14)
    assert fit_to_model(np.ones((2, 3, 8, 8), np.float32), (1, 8, 8, 3), "data").shape == (2, 8, 8, 3)  # NHWC file
    with pytest.raises(SparseliteError, match=r"takes 3-channel images \(\[1, 3, 32, 32\]\) but data gives 1-channel"):
        fit_to_model(batch, (1, 3, 32, 32), "data")
    with pytest.raises(SparseliteError, match="not a batch of 1- or 3-channel images"):
        image_input_layout((1, 16), "--images x")


def test_top1_top5_and_confusion_matrix():
    scores = Scores(num_classes=6)
    logits = np.array([[9, 1, 0, 0, 0, 0],    # true 0, predicted 0
                       [1, 0, 9, 8, 7, 6],    # true 1, predicted 2; 1 is 6th: outside the top 5
                       [0, 9, 8, 0, 0, 0]],   # true 2, predicted 1; 2 is in the top 5
                      dtype=np.float32)
    scores.add(logits, np.array([0, 1, 2]))
    result = scores.to_dict(["a", "b", "c"])
    assert result["top1"] == result["accuracy"] == pytest.approx(1 / 3)
    assert result["top5"] == pytest.approx(2 / 3) and result["examples"] == 3
    matrix = np.array(result["confusion_matrix"])
    assert matrix.shape == (6, 6) and matrix[0, 0] == 1 and matrix[1, 2] == 1 and matrix[2, 1] == 1 and matrix.sum() == 3
    text = scores.format_confusion(["a", "b", "c"])
    assert text.splitlines()[1].split() == ["a", "b", "c", "3", "4", "5"] and len(text.splitlines()) == 5
    with pytest.raises(SparseliteError, match="label 7.*6 outputs"):
        scores.add(logits, np.array([0, 1, 7]))


def test_many_classes_show_the_largest_confusions():
    scores = Scores(num_classes=30)
    logits = np.zeros((4, 30), np.float32)
    logits[:, 5] = 1
    scores.add(logits, np.array([3, 3, 3, 5]))
    assert "3 -> 5: 3" in scores.format_confusion()
