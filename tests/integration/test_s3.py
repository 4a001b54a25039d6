"""Data sources and the driver's storage checks on a real S3 server (SeaweedFS, tests/backends.py),
without Ray: an image folder and a Parquet source under s3:// give the splits their local copies
give, and a wrong key fails a job before it trains, naming the location and the likely cause.
The Ray jobs on S3 (checkpoints, data, k-NN) are in test_ray_pretrain.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.backends import S3_SECRET

from .conftest import tiny_spec, upload


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    """One bucket for the module, a prefix per test (SeaweedFS gives every bucket volumes of its own)."""
    return s3.bucket("sources")


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The standard AWS_* variables of the test server in this process (pyarrow reads them)."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3


def test_an_image_folder_on_s3_splits_and_reads_as_its_local_copy(s3_env, bucket, tmp_path):
    from leoclr_core.data import ImageFolder

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in ("ant", "moth", "moth-b"):  # "moth" < "moth-b" by path part, "moth-b/" < "moth/" as strings
        for i in range(6):
            (root / c / "sub").mkdir(parents=True, exist_ok=True)
            where = root / c / (f"{i}.png" if i % 2 else f"sub/{i}.png")
            Image.fromarray(rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)).save(where)
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / "moth" / ".hidden.png").write_bytes(b"skipped")
    uri = upload(s3_env, bucket, root, "data/images")

    for split, labelled in (("train", True), ("test", True), ("train", False)):  # unlabelled: Ray Data's list
        local = ImageFolder(root, split, labelled=labelled, num_test=5, seed=3, resize_to=8)
        remote = ImageFolder(uri + "/", split, labelled=labelled, num_test=5, seed=3, resize_to=8)
        assert remote.class_names == local.class_names
        assert [str(f).removeprefix(uri) for f in remote.files] == \
            [str(f).removeprefix(str(root)) for f in local.files]
        assert remote.targets.tolist() == local.targets.tolist()
        assert all(bool((remote[i][0] == local[i][0]).all()) for i in (0, len(local) - 1))
    with pytest.raises(FileNotFoundError, match=f"{uri}/missing"):
        ImageFolder(f"{uri}/missing")


def test_a_parquet_source_on_s3_finds_its_splits_and_labels(s3_env, bucket, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from leoclr_core.data import ParquetImages
    from leoclr_core.spec.models import DataSpec
    from leoclr_core.training.pretrain import has_test_split

    rng = np.random.default_rng(1)
    root = tmp_path / "pq"
    for split, n in (("train", 12), ("test", 6)):
        (root / split).mkdir(parents=True)
        images = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(buf, format="PNG")
            images.append(buf.getvalue())
        pq.write_table(pa.table({"image": images, "label": [("cat", "dog")[i % 2] for i in range(n)]}),
                       root / split / "part-0.parquet")
    uri = upload(s3_env, bucket, root, "pq")

    test = ParquetImages(uri, "test", resize_to=8)
    assert len(test) == 6 and test.classes == ["cat", "dog"] and test.targets.tolist() == [0, 1] * 3
    assert test[0][0].shape == (3, 8, 8) and len(ParquetImages(uri, "train")) == 12
    assert has_test_split(DataSpec(source="parquet", path=uri))
    assert has_test_split(DataSpec(source="imagefolder", path=f"s3://{bucket}/anything"))
    assert not has_test_split(DataSpec(source="parquet", path=f"{uri}/train/part-0.parquet"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ParquetImages(f"s3://{bucket}/nothing-here", "train")


def test_a_wrong_key_fails_the_job_before_it_trains_naming_the_storage(s3_env, bucket, tmp_path, monkeypatch):
    """Checked by the driver before its MLflow run opens: the checkpoint storage must take a write,
    an s3:// data path a read. The message names the location and the variables to look at, and
    holds no secret."""
    from leoclr_core import tracking
    from leoclr_core.distributed.data import StorageError
    from leoclr_core.distributed.pretrain import check_storage, run_pretrain
    from leoclr_core.settings import core_settings
    from leoclr_core.spec.models import parse_spec

    s3_env.client().put_object(Bucket=bucket, Key="denied/images/a/0.png", Body=b"x")
    at = f"s3://{bucket}/denied"
    checkpoints = tiny_spec("s3-wrong-key", tmp_path, checkpoint={"storage_path": f"{at}/ckpt"})
    data = tiny_spec("s3-wrong-key", tmp_path,
                     data={"source": "imagefolder", "path": f"{at}/images", "num_images": None})
    wrong = "not-" + S3_SECRET[::-1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)

    with pytest.raises(StorageError) as denied:
        run_pretrain(parse_spec(checkpoints))
    message = str(denied.value)
    assert message.startswith(f"checkpoint storage {at}/ckpt: access denied "
                              "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY?"), message
    with pytest.raises(StorageError, match=rf"^data {at}/images: access denied \(AWS_ACCESS_KEY_ID"):
        run_pretrain(parse_spec(data))
    assert S3_SECRET not in message and wrong not in message
    assert tracking.client().get_experiment_by_name("s3-wrong-key") is None  # no run was opened

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    with pytest.raises(FileNotFoundError, match=f"data {at}/nothing: nothing is stored there"):
        run_pretrain(parse_spec({**data, "data": {**data["data"], "path": f"{at}/nothing"}}))
    check_storage(parse_spec({**checkpoints, "data": data["data"]}), core_settings())  # passes
    assert not [k for k in s3_env.keys(bucket, "denied/") if "check" in k]  # and its write probe is gone
