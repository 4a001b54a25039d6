"""Image sources: the synthetic scenes, CIFAR-10 and image folders, and the corrupt-file contract."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leoclr_core.data import (
    SOURCES,
    AllImagesCorruptError,
    Cifar10,
    ImageFolder,
    SyntheticObjects,
    build_source,
    collate_images,
)
from leoclr_core.spec.models import DATA_SOURCES, DataSpec, SyntheticSpec


# ---------------------------------------------------------------- synthetic-objects
def test_synthetic_is_deterministic_per_seed_and_split():
    spec = SyntheticSpec(distractors=1)
    a = SyntheticObjects(300, seed=3, split="train", spec=spec)
    b = SyntheticObjects(300, seed=3, split="train", spec=spec)
    assert a.images.tobytes() == b.images.tobytes()
    assert np.array_equal(a.labels, b.labels)
    other_seed = SyntheticObjects(300, seed=4, split="train", spec=spec)
    test = SyntheticObjects(300, seed=3, split="test", spec=spec)
    for other in (other_seed, test):
        # Not a relabelling or a shuffle of the same scenes: no image is shared at all.
        shared = {im.tobytes() for im in a.images} & {im.tobytes() for im in other.images}
        assert not shared


def test_synthetic_shapes_dtypes_and_getitem():
    ds = SyntheticObjects(40, seed=0, spec=SyntheticSpec(source_size=48, object_size=(20, 30)))
    assert ds.images.shape == (40, 48, 48, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and len(ds) == 40
    assert ds.fixed_size == 48 and ds.num_classes == 10 and ds.class_names[0] == "disc"
    image, label, skipped = ds[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 48, 48)
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(ds.images[5]))
    assert label == ds.labels[5] and skipped == 0
    assert ds[-1][1] == ds.labels[-1]
    with pytest.raises(IndexError):
        ds[40]
    # Images are not flat: the object, clutter and background all vary the pixels.
    assert ds.images.reshape(40, -1).std(axis=1).min() > 5


def test_synthetic_labels_balanced_in_range_and_shuffled():
    ds = SyntheticObjects(103, seed=0, spec=SyntheticSpec(num_classes=4))
    counts = np.bincount(ds.labels, minlength=4)
    assert counts.sum() == 103 and counts.max() - counts.min() <= 1 and ds.labels.max() == 3
    assert ds.num_classes == 4 and len(ds.class_names) == 4
    assert not np.array_equal(ds.labels, np.arange(103) % 4)


def test_synthetic_distractors_are_other_classes_and_boxes_are_inside():
    spec = SyntheticSpec(num_classes=3, distractors=3)
    ds = SyntheticObjects(200, seed=2, spec=spec)
    m = ds.meta
    assert m.distractor_classes.shape == (200, 3) and m.distractor_boxes.shape == (200, 3, 4)
    assert (m.distractor_classes != ds.labels[:, None]).all()
    assert ((m.distractor_classes >= 0) & (m.distractor_classes < 3)).all()
    for boxes in (m.object_boxes, m.distractor_boxes.reshape(-1, 4)):
        assert (boxes >= 0).all() and (boxes <= 64).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # The main object is mostly inside the image: its clipped box keeps most of its size.
    side = m.object_boxes[:, 2:] - m.object_boxes[:, :2]
    assert side.min() >= 0.85 * spec.object_size[0]


def test_synthetic_colour_carries_no_class_information():
    # Mean colour per class must not separate the classes: compare class means to the spread.
    ds = SyntheticObjects(600, seed=0, spec=SyntheticSpec(num_classes=3))
    mean_rgb = ds.images.reshape(600, -1, 3).mean(axis=1)
    per_class = np.stack([mean_rgb[ds.labels == c].mean(axis=0) for c in range(3)])
    assert np.abs(per_class - mean_rgb.mean(axis=0)).max() < 0.35 * mean_rgb.std(axis=0).min()


def test_synthetic_rejects_impossible_values():
    with pytest.raises(ValueError, match="num_images"):
        SyntheticObjects(0)
    with pytest.raises(ValueError, match="split"):
        SyntheticObjects(4, split="val")
    with pytest.raises(ValueError, match="resize_to"):
        SyntheticObjects(4, resize_to=0)


def test_resize_and_collate():
    ds = SyntheticObjects(8, seed=0, resize_to=32)
    assert ds.fixed_size == 32 and ds[0][0].shape == (3, 32, 32)
    images, labels, skipped = collate_images([ds[i] for i in range(4)])
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.long and labels.tolist() == ds.labels[:4].tolist() and skipped == 0
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_images)
    assert [b[0].shape[0] for b in loader] == [3, 3, 2]


def test_collate_refuses_mixed_sizes():
    a = (torch.zeros(3, 8, 8, dtype=torch.uint8), 0, 0)
    b = (torch.zeros(3, 9, 8, dtype=torch.uint8), 0, 0)
    with pytest.raises(ValueError, match="resize_to"):
        collate_images([a, b])


# ---------------------------------------------------------------- cifar10
def _write_cifar(folder: Path, per_batch: int = 4, with_meta: bool = True) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i * per_batch + j) % 10 for j in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    if with_meta:
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [f"c{k}".encode() for k in range(10)]}, f)


def test_cifar_reads_torchvision_layout_with_chw_pixels(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f)
    row = raw[b"data"][1]
    train = Cifar10(tmp_path, "train")
    assert len(train) == 20 and train.class_names == [f"c{k}" for k in range(10)]
    image, label, skipped = train[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and skipped == 0
    assert label == 1
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major.
    assert image[0, 0, 0] == row[0] and image[0, 0, 1] == row[1] and image[0, 1, 0] == row[32]
    assert image[1, 0, 0] == row[1024] and image[2, 31, 31] == row[3071]
    assert train.targets.tolist() == [j % 10 for j in range(20)]


def test_cifar_split_cap_and_direct_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, with_meta=False)
    test = Cifar10(folder, "test")  # pointing straight at the batches folder works too
    assert len(test) == 4 and test[0][1] == (5 * 4) % 10
    assert test.class_names[0] == "airplane"  # no batches.meta: the standard names
    capped = Cifar10(tmp_path, "train", num_images=6)
    assert len(capped) == 6 and capped.targets.tolist() == [0, 1, 2, 3, 4, 5]
    assert Cifar10(tmp_path, "train", labelled=False)[0][1] == -1


def test_cifar_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Cifar10(tmp_path / "nowhere", "train")


# ---------------------------------------------------------------- imagefolder
def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (10, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _labelled_tree(root: Path, per_class: int = 3) -> None:
    for c, colour in (("zebra", (250, 0, 0)), ("ant", (0, 250, 0)), ("moth", (0, 0, 250))):
        for i in range(per_class):
            _png(root / c / f"img{i}.PNG" if i == 0 else root / c / "sub" / f"img{i}.png", colour)


def test_imagefolder_labelled_holdout_split(tmp_path):
    _labelled_tree(tmp_path)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    train = ImageFolder(tmp_path, "train", num_test=2, seed=0)
    test = ImageFolder(tmp_path, "test", num_test=2, seed=0)
    assert train.class_names == ["ant", "moth", "zebra"] and train.num_classes == 3
    assert len(train) == 7 and len(test) == 2 and not set(train.files) & set(test.files)
    assert train.files == sorted(train.files)
    for ds in (train, test):
        for i in range(len(ds)):
            image, label, _ = ds[i]
            channel = {0: 1, 1: 2, 2: 0}[label]  # ant is green, moth blue, zebra red
            assert image.shape == (3, 8, 10) and int(image[channel].float().mean()) == 250
    again = ImageFolder(tmp_path, "test", num_test=2, seed=0)
    other = [ImageFolder(tmp_path, "test", num_test=2, seed=s).files for s in range(1, 6)]
    assert again.files == test.files and any(o != test.files for o in other)
    capped = ImageFolder(tmp_path, "train", num_test=2, num_images=4, seed=0)
    assert len(capped) == 4 and set(capped.files) <= set(train.files)
    with pytest.raises(ValueError, match="too few"):
        ImageFolder(tmp_path, "train", num_test=9)


def test_imagefolder_presplit_and_unlabelled(tmp_path):
    _labelled_tree(tmp_path / "train", per_class=2)
    _png(tmp_path / "val" / "moth" / "a.jpg", (9, 9, 9))
    test = ImageFolder(tmp_path, "test", num_test=100)
    assert len(test) == 1 and test[0][1] == 1 and test.class_names == ["ant", "moth", "zebra"]
    assert len(ImageFolder(tmp_path, "train")) == 6
    unlabelled = ImageFolder(tmp_path, "train", labelled=False, resize_to=5)
    assert unlabelled.num_classes is None and not unlabelled.labelled
    image, label, _ = unlabelled[0]
    assert label == -1 and image.shape == (3, 5, 5) and unlabelled.fixed_size == 5
    _png(tmp_path / "val" / "newt" / "b.png", (1, 1, 1))
    with pytest.raises(ValueError, match="newt"):
        ImageFolder(tmp_path, "test")


def test_corrupt_and_truncated_files_are_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "imgs"
    root.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "a_truncated.jpg", quality=95)
    blob = (root / "a_truncated.jpg").read_bytes()
    (root / "a_truncated.jpg").write_bytes(blob[: len(blob) // 2])
    (root / "b_garbage.png").write_bytes(b"definitely not a png" * 10)
    _png(root / "c_good.png", (1, 2, 3))
    ds = ImageFolder(root, "train", labelled=False, num_test=0)
    assert [p.name for p in ds.files] == ["a_truncated.jpg", "b_garbage.png", "c_good.png"]
    with caplog.at_level(logging.WARNING, logger="leoclr_core.data"):
        image, label, skipped = ds[0]
        assert skipped == 2 and image.shape == (3, 8, 10) and image[:, 0, 0].tolist() == [1, 2, 3]
        assert ds[1][2] == 1 and ds[2][2] == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "leoclr_core.data"]
    assert len(warned) == 2 and "a_truncated.jpg" in warned[0]  # once per bad file, not per hit
    _, _, total = collate_images([ds[i] for i in range(3)])
    assert total == 3


def test_all_corrupt_raises_clearly(tmp_path):
    for name in ("x.jpg", "y.png"):
        (tmp_path / name).write_bytes(b"\x00garbage")
    ds = ImageFolder(tmp_path, "train", labelled=False, num_test=0)
    with pytest.raises(AllImagesCorruptError, match="all 2 images"):
        ds[0]


def test_imagefolder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(tmp_path / "missing")
    _png(tmp_path / "loose.png", (0, 0, 0))
    with pytest.raises(ValueError, match="class sub-folders"):
        ImageFolder(tmp_path, num_test=0)


# ---------------------------------------------------------------- build_source
def test_registry_matches_spec():
    assert set(SOURCES) == set(DATA_SOURCES)


def test_build_source_dispatch(tmp_path):
    data = DataSpec(num_images=30, num_test_images=10, seed=5, synthetic=SyntheticSpec(num_classes=5))
    train, test = build_source(data, "train"), build_source(data, "test")
    assert isinstance(train, SyntheticObjects) and len(train) == 30 and len(test) == 10
    assert train.seed == 5 and train.num_classes == 5 and test.split == "test"
    _write_cifar(tmp_path / "c" / "cifar-10-batches-py")
    cifar = build_source(DataSpec(source="cifar10", path=str(tmp_path / "c"), num_test_images=3), "test")
    assert isinstance(cifar, Cifar10) and len(cifar) == 3
    _labelled_tree(tmp_path / "f")
    spec = DataSpec(source="imagefolder", path=str(tmp_path / "f"), num_images=None, num_test_images=3)
    folder = build_source(spec, "train", resize_to=16)
    assert isinstance(folder, ImageFolder) and len(folder) == 6 and folder[0][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="split"):
        build_source(data, "validation")


def test_build_source_missing_path_is_clear(tmp_path):
    for source in ("cifar10", "imagefolder"):
        with pytest.raises(FileNotFoundError, match="no-such-dir"):
            build_source(DataSpec(source=source, path=str(tmp_path / "no-such-dir")), "train")


def _png_bytes(rng, h=20, w=24) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet_split(root, rng, n_train=30, n_test=9, bad_rows=1):
    """root/train/part.parquet and root/test/part.parquet: PNG bytes + string labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split, n in (("train", n_train), ("test", n_test)):
        (root / split).mkdir(parents=True)
        images = [_png_bytes(rng) for _ in range(n)]
        if split == "train":
            for i in range(bad_rows):
                images[i] = b"\x89PNG broken"
        labels = [("cat", "dog", "fox")[i % 3] for i in range(n)]
        pq.write_table(pa.table({"image": images, "label": labels}), root / split / "part.parquet")


def test_parquet_source_reads_splits_labels_and_skips_corrupt_rows(tmp_path):
    from leoclr_core.data import ParquetImages
    from leoclr_core.spec.models import DataSpec
    from leoclr_core.training.pretrain import has_test_split

    write_parquet_split(tmp_path / "pq", np.random.default_rng(0))
    train = ParquetImages(tmp_path / "pq", "train", resize_to=16)
    test = ParquetImages(tmp_path / "pq", "test", resize_to=16)
    assert (len(train), len(test)) == (30, 9) and train.classes == ["cat", "dog", "fox"]
    assert list(test.targets[:3]) == [0, 1, 2]
    image, label, skipped = train[0]  # row 0 is corrupt: the next row is returned, the skip counted
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and skipped == 1 and label == 1
    assert has_test_split(DataSpec(source="parquet", path=str(tmp_path / "pq")))


def test_parquet_source_without_a_test_split_trains_but_has_no_k_nn(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from leoclr_core.data import ParquetImages
    from leoclr_core.spec.models import DataSpec
    from leoclr_core.training.pretrain import has_test_split

    rng = np.random.default_rng(1)
    pq.write_table(pa.table({"img": [_png_bytes(rng) for _ in range(5)]}), tmp_path / "flat.parquet")
    src = ParquetImages(tmp_path / "flat.parquet", "train", image_column="img", resize_to=8)
    assert len(src) == 5 and not src.labelled and src[0][1] == -1
    assert not has_test_split(DataSpec(source="parquet", path=str(tmp_path / "flat.parquet")))
    with pytest.raises(ValueError, match="no test split"):
        ParquetImages(tmp_path / "flat.parquet", "test", image_column="img")
    with pytest.raises(ValueError, match="no column 'image'"):
        ParquetImages(tmp_path / "flat.parquet", "train")
