"""Image folders decoded on the training device: workers read JPEG bytes, the device decodes them.

On this machine the device is the CPU, which runs the same code as CUDA but for the decoder call
itself (torchvision's CPU decoder instead of nvJPEG).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leoclr_core.data import ImageFolder
from leoclr_core.data.jpeg import collate_jpeg_or_pixels, decode_resize_batch, device_decodable
from leoclr_core.training.engine import resolve_runtime
from leoclr_core.nn.methods import build_method
from leoclr_core.spec.models import SpecError, parse_spec
from leoclr_core.training.feed import ViewFeed, job_source
from leoclr_core.spec.placement import InputPlacement

pytestmark = pytest.mark.filterwarnings("ignore:.*TorchCodec:DeprecationWarning")
SIZE = 16


def _photo(h: int, w: int, seed: int) -> Image.Image:
    """A smooth colour image: JPEG round trips stay close, so decoders can be compared tightly."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(low).resize((w, h), Image.BILINEAR)


def _jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92, **options)
    return out.getvalue()


def _cut_scan(jpeg: bytes) -> bytes:
    """Headers intact, scan data gone: passes the header read, fails in the decoder."""
    return jpeg[: jpeg.find(b"\xff\xda")] + b"\xff\xd9"


def test_device_decodable_takes_only_sequential_rgb_or_grey_jpegs():
    photo = _photo(30, 40, 0)
    png = io.BytesIO()
    photo.save(png, format="PNG")
    baseline = _jpeg(photo)
    assert device_decodable(baseline) and device_decodable(_jpeg(photo.convert("L")))
    assert not device_decodable(_jpeg(photo, progressive=True))
    assert not device_decodable(_jpeg(photo.convert("CMYK")))
    assert not device_decodable(baseline[: len(baseline) // 2])  # truncated: no end-of-image marker
    assert not device_decodable(png.getvalue()) and not device_decodable(b"")


def _folder(root: Path) -> None:
    """Two JPEG sizes, a PNG, a progressive JPEG and a truncated one."""
    root.mkdir(parents=True)
    for i, (h, w) in enumerate([(30, 40), (30, 40), (24, 20), (30, 40)]):
        (root / f"a{i}.jpg").write_bytes(_jpeg(_photo(h, w, i)))
    _photo(18, 22, 7).save(root / "b.png")
    (root / "c_progressive.jpg").write_bytes(_jpeg(_photo(26, 26, 8), progressive=True))
    whole = _jpeg(_photo(30, 40, 9))
    (root / "d_truncated.jpg").write_bytes(whole[: len(whole) // 2])


def test_encoded_folder_serves_jpeg_bytes_and_decodes_the_rest(tmp_path, caplog):
    _folder(tmp_path / "imgs")
    plain = ImageFolder(tmp_path / "imgs", "train", labelled=False, num_test=0, resize_to=SIZE)
    encoded = plain.encoded_copy()
    names = [p.name for p in encoded.files]
    assert names[:4] == ["a0.jpg", "a1.jpg", "a2.jpg", "a3.jpg"]
    sample = encoded[0][0]
    assert sample.ndim == 1 and bytes(sample.numpy()) == encoded.files[0].read_bytes()
    for name in ("b.png", "c_progressive.jpg"):
        image, _, skipped = encoded[names.index(name)]
        assert image.shape == (3, SIZE, SIZE) and skipped == 0, name
    with caplog.at_level(logging.WARNING, logger="leoclr_core.data"):
        image, _, skipped = encoded[names.index("d_truncated.jpg")]  # skipped; wraps round to a0
    assert skipped == 1 and torch.equal(image, sample)
    assert not plain.encoded  # the copy is separate
    with pytest.raises(ValueError, match="resize_to"):
        ImageFolder(tmp_path / "imgs", "train", labelled=False, num_test=0).encoded_copy()


def test_device_decode_matches_worker_decode_in_every_position(tmp_path):
    _folder(tmp_path / "imgs")
    plain = ImageFolder(tmp_path / "imgs", "train", labelled=False, num_test=0, resize_to=SIZE)
    encoded = plain.encoded_copy()
    order = [4, 0, 2, 5, 1]  # PNG and progressive JPEG (worker-decoded) between device-decoded ones
    batch, labels, skipped = collate_jpeg_or_pixels([encoded[i] for i in order])
    assert batch.jpeg_index.tolist() == [1, 2, 4] and batch.pixel_index.tolist() == [0, 3]
    images, failed = decode_resize_batch(batch, SIZE, "cpu")
    expected = torch.stack([plain[i][0] for i in order])
    assert images.shape == (5, 3, SIZE, SIZE) and images.dtype == torch.uint8 and failed == []
    # Same libjpeg decode, same resize: equal up to a rounding step.
    assert (images.int() - expected.int()).abs().max() <= 1
    assert labels.tolist() == [-1] * 5 and skipped == 0


def test_a_jpeg_the_device_cannot_decode_is_replaced_and_counted(tmp_path, caplog):
    good = [torch.frombuffer(bytearray(_jpeg(_photo(30, 40, s))), dtype=torch.uint8) for s in range(2)]
    broken = torch.frombuffer(bytearray(_cut_scan(_jpeg(_photo(30, 40, 5)))), dtype=torch.uint8)
    batch, _, _ = collate_jpeg_or_pixels([(good[0], 0, 0), (broken, 1, 0), (good[1], 2, 0)])
    with caplog.at_level(logging.WARNING, logger="leoclr_core.data"):
        images, failed = decode_resize_batch(batch, SIZE, "cpu")
    assert failed == [1] and images.shape == (3, 3, SIZE, SIZE)
    assert torch.equal(images[1], images[0]) and not torch.equal(images[2], images[0])
    assert any("1 of 3 JPEGs" in r.getMessage() for r in caplog.records)
    all_broken, _, _ = collate_jpeg_or_pixels([(broken, 0, 0)])
    with pytest.raises(RuntimeError, match="none of the 1 JPEGs"):
        decode_resize_batch(all_broken, SIZE, "cpu")


def _spec(tmp_path: Path, augment_device: str = "gpu", **data):
    return parse_spec({
        "data": {"source": "imagefolder", "path": str(tmp_path / "imgs"), "labelled": False,
                 "num_test_images": 0, "image_size": 12, "num_images": None, **data},
        "model": {"width": 8, "proj_hidden_dim": 16, "proj_dim": 8},
        "loss": {"queue_size": 4}, "optim": {"batch_size": 4, "epochs": 1},
        "augment": {"device": augment_device}, "scaling": {"loader_workers": 0},
        "output_dir": str(tmp_path / "out"),
    })


def test_feed_decodes_an_image_folder_on_the_device(tmp_path):
    _folder(tmp_path / "imgs")
    spec = _spec(tmp_path, decode="gpu")
    runtime = resolve_runtime(spec.scaling, "cpu")
    method = build_method(spec.method, spec.model, spec.loss, spec.optim.batch_size)
    feed = ViewFeed(spec, method, runtime, job_source(spec.data, "train"))
    assert feed.placement.decode_on_device and feed.steps_per_epoch == 1
    (views,) = list(feed.epoch(0))
    assert len(views) == 3 and all(v.shape == (4, 3, 12, 12) and torch.isfinite(v).all() for v in views)
    assert not InputPlacement.for_process(_spec(tmp_path, decode="auto"), "cpu").decode_on_device  # auto: CUDA
    assert not InputPlacement.for_process(_spec(tmp_path, decode="cpu"), "cpu").decode_on_device


def test_parquet_rows_of_jpegs_are_decoded_on_the_device_like_a_folders_files(tmp_path):
    """The same files as Parquet rows: JPEG rows are served as their bytes and decode to what the
    workers would have made, the rest is decoded by the workers, the truncated row is skipped; a
    feed with `decode: gpu` decodes them on the device."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from leoclr_core.data.parquet import ParquetImages

    _folder(tmp_path / "imgs")
    files = sorted((tmp_path / "imgs").iterdir())
    pq.write_table(pa.table({"jpeg": [f.read_bytes() for f in files]}), tmp_path / "rows.parquet")
    plain = ParquetImages(tmp_path / "rows.parquet", image_column="jpeg", label_column=None, resize_to=SIZE)
    encoded = plain.encoded_copy()
    samples = [encoded[i] for i in range(6)]  # the truncated 7th row: skipped, wraps round to row 0
    assert [s[0].ndim for s in samples] == [1, 1, 1, 1, 3, 3]  # a0-a3.jpg, b.png, c_progressive.jpg
    assert bytes(samples[0][0].numpy()) == files[0].read_bytes()
    assert encoded[6][2] == 1 and torch.equal(encoded[6][0], samples[0][0])
    batch, _, _ = collate_jpeg_or_pixels(samples)
    images, failed = decode_resize_batch(batch, SIZE, "cpu")
    expected = torch.stack([plain[i][0] for i in range(6)])
    assert failed == [] and (images.int() - expected.int()).abs().max() <= 1

    spec = parse_spec({
        "data": {"source": "parquet", "path": str(tmp_path / "rows.parquet"), "image_column": "jpeg",
                 "label_column": None, "num_images": None, "image_size": 12, "decode": "gpu"},
        "model": {"width": 8, "proj_hidden_dim": 16, "proj_dim": 8},
        "loss": {"queue_size": 4}, "optim": {"batch_size": 4, "epochs": 1},
        "scaling": {"loader_workers": 0}, "output_dir": str(tmp_path / "out")})
    runtime = resolve_runtime(spec.scaling, "cpu")
    method = build_method(spec.method, spec.model, spec.loss, spec.optim.batch_size)
    feed = ViewFeed(spec, method, runtime, job_source(spec.data, "train"))
    assert feed.placement == InputPlacement(views_on_device=True, decode_on_device=True)
    (views,) = list(feed.epoch(0))
    assert len(views) == 3 and all(v.shape == (4, 3, 12, 12) and torch.isfinite(v).all() for v in views)


def test_decode_gpu_is_honoured_on_a_cpu_when_the_views_are_left_to_auto(tmp_path):
    """`decode: gpu` asks for the training device, whatever it is: the views follow the images there
    instead of the setting being dropped for per-sample views in the loader."""
    _folder(tmp_path / "imgs")
    runtime = resolve_runtime(scaling=_spec(tmp_path).scaling, device="cpu")
    for decode, on_device in (("gpu", True), ("auto", False), ("cpu", False)):
        spec = _spec(tmp_path, augment_device="auto", decode=decode)
        method = build_method(spec.method, spec.model, spec.loss, spec.optim.batch_size)
        feed = ViewFeed(spec, method, runtime, job_source(spec.data, "train"))
        assert feed.placement == InputPlacement(on_device, on_device), decode


def test_spec_refuses_device_decode_where_it_cannot_apply(tmp_path):
    with pytest.raises(SpecError, match=r"decode 'gpu' is for sources of encoded images \(imagefolder, parquet\)"):
        parse_spec({"data": {"decode": "gpu"}})
    with pytest.raises(SpecError, match="augment.device 'gpu' or 'auto'"):
        parse_spec({"data": {"source": "imagefolder", "path": str(tmp_path), "decode": "gpu"},
                    "augment": {"device": "cpu"}})


def test_ray_rows_carry_jpeg_bytes_that_decode_as_ray_data_would(tmp_path):
    """On Ray, `keep_jpegs` (a Ray Data task) passes the device's JPEGs through as their file bytes
    and decodes the rest; a training worker rebuilds the batch and decodes it on its device to the
    images Ray Data's own decode would have streamed."""
    from types import SimpleNamespace

    from leoclr_core.distributed.data import IMAGE, decode_batch, image_name, jpeg_batch, keep_jpegs

    _folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "e_cut.jpg").write_bytes(_cut_scan(_jpeg(_photo(30, 40, 10))))
    files = sorted((tmp_path / "imgs").iterdir())
    batch = {"bytes": np.array([f.read_bytes() for f in files], dtype=object),
             "path": np.array([str(f) for f in files], dtype=object)}
    reported: list[str] = []
    counter = SimpleNamespace(add=SimpleNamespace(remote=reported.extend))
    rows = keep_jpegs(batch, SIZE, counter)
    assert reported == [str(tmp_path / "imgs" / "d_truncated.jpg")]  # dropped in the task
    kept = [Path(p).name for p in rows["path"].to_pylist()]
    assert kept == ["a0.jpg", "a1.jpg", "a2.jpg", "a3.jpg", "b.png", "c_progressive.jpg", "e_cut.jpg"]
    assert rows["jpeg"].to_pylist() == [True] * 4 + [False, False, True]
    assert rows["blob"][0].as_py() == files[0].read_bytes()

    numpy_batch = {name: rows[name].to_numpy(zero_copy_only=False) for name in rows.column_names}
    images, failed = decode_resize_batch(jpeg_batch(numpy_batch, SIZE), SIZE, "cpu")
    assert failed == [6]  # the cut scan passes the header read and fails in the decoder
    reference = torch.from_numpy(decode_batch(batch, SIZE, None)[IMAGE]).permute(0, 3, 1, 2)
    assert images.shape == (7, 3, SIZE, SIZE) and reference.shape[0] == 6  # the cut scan fails there too
    assert (images[:6].int() - reference.int()).abs().max() <= 1
    empty = keep_jpegs({"bytes": np.array([b"junk"], dtype=object), "path": np.array(["x.jpg"], dtype=object)},
                       SIZE, None)
    assert empty.num_rows == 0 and empty.schema == rows.schema  # concatenates with the others

    # Parquet rows: the image column by name, no paths; a row is named by a digest of its bytes,
    # the same name whether the task or the worker's decoder finds it broken.
    reported.clear()
    parquet = keep_jpegs({"jpeg": batch["bytes"]}, SIZE, counter, column="jpeg")
    assert parquet["jpeg"].to_pylist() == rows["jpeg"].to_pylist() and set(parquet["path"].to_pylist()) == {""}
    truncated = (tmp_path / "imgs" / "d_truncated.jpg").read_bytes()
    assert reported == [image_name(truncated, "")] and reported[0].startswith("row sha1:")
