"""Parquet files of encoded images: one row per image, the image's file bytes in `image_column`,
an optional label in `label_column` (ints or strings).

`path` is a Parquet file or a folder of them, local or an object-store URI (`s3://bucket/prefix`,
`gs://...`; pyarrow's filesystems take the endpoint and credentials from the standard variables:
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Splits: when `path/train` and `path/val` (or
`path/test`) exist they are the splits; otherwise every row is training data and there is no
test split (k-NN during pretraining is then skipped). Rows are read with pyarrow (imported on
use, so the training core still runs where pyarrow is absent); on Ray, the training split
streams through Ray Data's Parquet reader instead. Like an image folder, rows of JPEGs can be
left to the training device to decode (`encoded_copy()`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from leoclr_core.data.base import ImageSource, check_resize, check_split
from leoclr_core.data.imagefolder import ServesEncoded, decode_image, is_uri


def parquet_split_paths(path: str | Path) -> tuple[Path | str, Path | str | None]:
    """(train, test) locations of a Parquet source (paths, or URIs for an object-store source);
    test is None when it is not pre-split."""
    if is_uri(path):
        return _uri_split_paths(str(path))
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"parquet source '{root}' does not exist")
    if root.is_dir() and (root / "train").exists():
        for name in ("val", "test"):
            if (root / name).exists():
                return root / "train", root / name
    return root, None


def _uri_split_paths(uri: str) -> tuple[str, str | None]:
    import pyarrow.fs as pafs

    uri = uri.rstrip("/")
    fs, root = pafs.FileSystem.from_uri(uri)
    names = ("", "train", "val", "test")
    infos = fs.get_file_info([f"{root}/{n}" if n else root for n in names])
    found = {n for n, i in zip(names, infos) if i.type != pafs.FileType.NotFound}
    if "" not in found:
        raise FileNotFoundError(f"parquet source '{uri}' does not exist")
    if "train" in found:
        for name in ("val", "test"):
            if name in found:
                return f"{uri}/train", f"{uri}/{name}"
    return uri, None


class ParquetImages(ServesEncoded, ImageSource):
    name = "parquet"

    def __init__(self, path: str | Path, split: str = "train", *, image_column: str = "image",
                 label_column: str | None = "label", labelled: bool = True, num_images: int | None = None,
                 resize_to: int | None = None) -> None:
        import pyarrow.parquet as pq

        super().__init__()
        self.split = check_split(split)
        self.resize_to = check_resize(resize_to)
        self.fixed_size = self.resize_to
        train, test = parquet_split_paths(path)
        where = train if split == "train" else test
        if where is None:
            raise ValueError(f"parquet source '{path}' has no test split: add {path}/train and {path}/test (or val)")
        table = pq.read_table(where)
        if image_column not in table.column_names:
            raise ValueError(f"parquet source '{where}' has no column {image_column!r} (columns: {table.column_names})")
        if num_images is not None:
            table = table.slice(0, num_images)
        if len(table) == 0:
            raise ValueError(f"parquet source '{where}' holds no rows")
        self.images: list[bytes] = [cell_bytes(v) for v in table.column(image_column).to_pylist()]
        self.labelled = bool(labelled and label_column and label_column in table.column_names)
        if self.labelled:
            raw = table.column(label_column).to_pylist()
            # Class names from the training split, so both splits index classes the same way.
            names = sorted({str(v) for v in pq.read_table(train, columns=[label_column]).column(0).to_pylist()})
            known = {n: i for i, n in enumerate(names)}
            unknown = sorted({str(v) for v in raw} - set(known))
            if unknown:
                raise ValueError(f"labels {unknown[:5]} of '{where}' are not among the training labels")
            self.classes = names
            self.labels = np.array([known[str(v)] for v in raw], dtype=np.int64)
        else:
            self.classes = None
            self.labels = np.full(len(self.images), -1, np.int64)
        self.where = where

    @property
    def targets(self) -> np.ndarray:
        return self.labels.copy()

    def __len__(self) -> int:
        return len(self.images)

    def describe_item(self, index: int) -> str:
        return f"{self.where}[row {index}]"

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        raw, label = self.images[index], int(self.labels[index])
        if self.encoded:  # see ServesEncoded
            return self.encoded_or_decoded(raw), label
        return decode_image(io.BytesIO(raw), self.resize_to), label


def cell_bytes(value: object) -> bytes:
    """Image bytes from a binary cell, or from a struct cell like {"bytes": ..., "path": ...}
    (the layout Hugging Face datasets write)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        return b""  # decoded as corrupt, skipped and counted like any unreadable image
    return bytes(value)
