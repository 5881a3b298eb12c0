"""Image-folder data: calibration sampling, evaluation loading, errors; and `evaluate`."""

import logging

import pytest
import torch
from PIL import Image
from torch import nn

from brecq.data import check_finite, eval_loader, load_calibration
from brecq.errors import DataError
from brecq.evaluate import decision_changes, evaluate
from brecq.models import Preprocessing

PREP = Preprocessing(resize=None, crop=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CLASSES = ("cat", "dog", "frog")


def _image(path, value):
    Image.new("RGB", (8, 8), color=(value, value, value)).save(path)


def make_folder(root, per_class=4, splits=("train", "val")):
    """root/<split>/<class>/<i>.png with a distinct gray value per image."""
    for split in splits:
        for c, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                _image(d / f"{i}.png", 10 * (c * per_class + i) + 5)
    return root


def test_calibration_shape_and_seeding(tmp_path):
    root = make_folder(tmp_path / "data", per_class=6)
    a = load_calibration(root, PREP.to_transform(), num_samples=8, seed=0)
    b = load_calibration(root, PREP.to_transform(), num_samples=8, seed=0)
    c = load_calibration(root, PREP.to_transform(), num_samples=8, seed=1)
    assert a.shape == (8, 3, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Distinct images: each has its own gray level.
    assert len({round(float(x[0, 0, 0]), 4) for x in a}) == 8


def test_calibration_accepts_preprocessing_and_caps_to_available(tmp_path, caplog):
    root = make_folder(tmp_path / "data", per_class=2)
    with caplog.at_level(logging.WARNING, logger="brecq.data"):
        x = load_calibration(root, PREP, num_samples=100)
    assert x.shape[0] == 6
    assert "only 6 readable" in caplog.text


def test_corrupt_jpeg_is_skipped_and_counted(tmp_path, caplog):
    root = make_folder(tmp_path / "data", per_class=3)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "train" / "cat" / "notes.txt").write_text("hello")
    with caplog.at_level(logging.WARNING, logger="brecq.data"):
        x = load_calibration(root, PREP, num_samples=100)
    assert x.shape[0] == 9
    assert "skipped 2 unreadable file(s)" in caplog.text
    with pytest.raises(DataError, match=r"broken\.jpg|notes\.txt"):
        load_calibration(root, PREP, num_samples=100, strict=True)


def test_truncated_jpeg_is_skipped(tmp_path):
    root = make_folder(tmp_path / "data", per_class=2)
    good = root / "train" / "cat" / "full.jpg"
    Image.new("RGB", (64, 64), color=(1, 2, 3)).save(good, quality=95)
    (root / "train" / "cat" / "cut.jpg").write_bytes(good.read_bytes()[:200])
    x = load_calibration(root, PREP, num_samples=100)
    assert x.shape[0] == 7


def test_only_unreadable_files_is_an_error(tmp_path):
    d = tmp_path / "data" / "train" / "cat"
    d.mkdir(parents=True)
    (d / "a.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="no readable images"):
        load_calibration(tmp_path / "data", PREP, num_samples=4)


def test_data_layout_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_calibration(tmp_path / "missing", PREP)
    root = make_folder(tmp_path / "only_val", splits=("val",))
    with pytest.raises(DataError, match="no train/ folder"):
        load_calibration(root, PREP)
    root = make_folder(tmp_path / "only_train", splits=("train",))
    with pytest.raises(DataError, match="no val/ folder"):
        eval_loader(root, PREP)
    root = make_folder(tmp_path / "empty_class")
    (root / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra is empty"):
        load_calibration(root, PREP)
    (tmp_path / "no_classes" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        load_calibration(tmp_path / "no_classes", PREP)
    with pytest.raises(DataError, match="num_samples"):
        load_calibration(make_folder(tmp_path / "ok"), PREP, num_samples=0)


def test_nan_calibration_is_an_error(tmp_path):
    root = make_folder(tmp_path / "data", per_class=2)

    def nan_transform(img):
        return torch.full((3, 8, 8), float("nan"))

    with pytest.raises(DataError, match="NaN/inf"):
        load_calibration(root, nan_transform, num_samples=2)
    with pytest.raises(DataError, match="weights"):
        check_finite(torch.tensor([1.0, float("inf")]), "weights")
    t = torch.ones(3)
    assert check_finite(t, "x") is t


def test_eval_loader_labels_order_and_skipping(tmp_path, caplog):
    root = make_folder(tmp_path / "data", per_class=2)
    (root / "val" / "frog" / "zz_bad.jpg").write_bytes(b"nope")
    loader = eval_loader(root, PREP, batch_size=4, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="brecq.data"):
        batches = list(loader)
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(x.shape[1:] == (3, 8, 8) for x, _ in batches)
    assert loader.skipped == 1 and "skipped 1 unreadable" in caplog.text
    assert loader.dataset.classes == list(CLASSES)
    strict = eval_loader(root, PREP, batch_size=4, num_workers=0, strict=True)
    with pytest.raises(DataError, match="zz_bad.jpg"):
        list(strict)


def test_eval_loader_with_worker_processes(tmp_path):
    root = make_folder(tmp_path / "data", per_class=2)
    (root / "val" / "cat" / "bad.png").write_bytes(b"nope")
    loader = eval_loader(root, PREP, batch_size=3, num_workers=1)
    assert sum(len(y) for _, y in loader) == 6
    assert loader.skipped == 1


class _FixedLogits(nn.Module):
    """Scores rows from a table indexed by the first pixel of each image."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x):
        return self.table[x[:, 0].long()]


def test_evaluate_counts_top1_and_top5():
    # 6 classes, 4 samples: top-1 right for samples 0 and 1; top-5 misses only sample 3.
    table = torch.tensor(
        [
            [9.0, 5, 4, 3, 2, 1],  # predicts 0
            [1.0, 9, 5, 4, 3, 2],  # predicts 1
            [9.0, 8, 7, 6, 5, 1],  # 2 is in the top 5, not top 1
            [2.0, 3, 4, 5, 6, 1],  # 5 is last
        ]
    )
    images = torch.arange(4, dtype=torch.float32).view(4, 1)
    labels = torch.tensor([0, 1, 2, 5])
    model = _FixedLogits(table).train()
    res = evaluate(model, (images, labels), "cpu", batch_size=3)
    assert res == {"top1": 50.0, "top5": 75.0, "count": 4}
    assert model.training  # mode restored
    loader = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    assert evaluate(model, loader, "cpu", max_batches=1) == {
        "top1": 100.0,
        "top5": 100.0,
        "count": 2,
    }
    with pytest.raises(DataError):
        evaluate(model, [], "cpu")


def test_evaluate_on_an_image_folder(tmp_path):
    root = make_folder(tmp_path / "data", per_class=2)

    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 1.0, 0.0]).expand(x.shape[0], 3)

    res = evaluate(Constant(), eval_loader(root, PREP, batch_size=4, num_workers=0), "cpu")
    assert res["count"] == 6
    assert res["top1"] == pytest.approx(100 / 3)
    assert res["top5"] == 100.0


def test_decision_changes_counts_flips_and_tests_their_direction():
    labels = torch.zeros(200, dtype=torch.long)
    # 76 images only the candidate gets right, 44 only the reference, 10 changed but wrong in both
    # (class 1 -> class 2), the rest equal.
    reference = torch.cat([torch.ones(76), torch.zeros(44), torch.ones(10), torch.zeros(70)]).long()
    candidate = torch.cat([torch.zeros(76), torch.ones(44), 2 * torch.ones(10),
                           torch.zeros(70)]).long()
    change = decision_changes(reference, candidate, labels)
    assert (change["images"], change["changed"], change["gained"], change["lost"]) == (200, 130,
                                                                                         76, 44)
    # Exact two-sided binomial test of 44 of 120 discordant images (scipy's binomtest agrees).
    assert change["p_value"] == pytest.approx(0.0044550, rel=1e-4)
    # The test is two-sided: swapping the models keeps the p-value; no change at all gives 1.
    assert decision_changes(candidate, reference, labels)["p_value"] == change["p_value"]
    assert decision_changes(labels, labels, labels)["p_value"] == 1.0
    # Thousands of flips: the exact tail neither underflows nor overflows.
    right, wrong = torch.zeros(3000).long(), torch.ones(3000).long()
    split = torch.cat([wrong[:1400], right[1400:]]), torch.cat([right[:1400], wrong[1400:]])
    change = decision_changes(*split, torch.zeros(3000).long())
    assert (change["gained"], change["lost"]) == (1400, 1600)
    assert change["p_value"] == pytest.approx(2.786e-4, rel=1e-3)
    with pytest.raises(DataError, match="one prediction of each per label"):
        decision_changes(reference, candidate[:5], labels)
