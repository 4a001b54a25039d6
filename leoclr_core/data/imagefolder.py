"""A folder of image files: `path/<class>/<img>` (labelled) or any tree of images (unlabelled).

`path` is a local folder or an object-store prefix (`s3://bucket/prefix`, `gs://...`): a prefix is
listed once through pyarrow's filesystems (which take the endpoint and credentials from the
standard variables: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) and its files are read on use, so
both give the same splits of the same files.

Splits: when `path/train` and `path/val` (or `path/test`) exist they are the splits; otherwise
the test split is a seeded hold-out of `num_test` files and train is the rest, so the same seed
always gives the same, disjoint, splits. File lists are sorted, so indices are stable.

Decoding is lazy (in DataLoader workers), or left to the training device: a copy made by
`encoded_copy()` (`ServesEncoded`, shared with Parquet sources) returns the file bytes of every
JPEG a device decoder takes as it is (`jpeg.device_decodable`) and decodes only the other files. A corrupt or truncated file raises CorruptImageError,
which the base class turns into a skip; truncated files are NOT silently padded (PIL's
LOAD_TRUNCATED_IMAGES is left alone), because half a photo is a wrong training sample.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from leoclr_core.data.base import CorruptImageError, ImageSource, check_resize, check_split
from leoclr_core.data.jpeg import device_decodable

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_SPLIT_TAG = 0x1F01DE5  # keeps the hold-out stream apart from other seeded draws


def is_uri(path: str | Path | None) -> bool:
    """An object-store location (s3://, gs://) rather than a local path."""
    return path is not None and "://" in str(path)


class _Listing:
    """Everything under an object-store prefix, listed once (pyarrow.fs: one recursive LIST).
    The filesystem is made again from the URI in each process that reads, never pickled: a
    process takes its credentials from its own environment."""

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        self.uri = uri.rstrip("/")
        self._fs, self.root = pafs.FileSystem.from_uri(self.uri)
        infos = self._fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        self.files: set[tuple[str, ...]] = set()
        self.dirs: set[tuple[str, ...]] = set()
        for info in infos:
            parts = PurePosixPath(info.path).relative_to(self.root).parts
            (self.files if info.type == pafs.FileType.File else self.dirs).add(parts)
            self.dirs.update(parts[:i] for i in range(len(parts)))  # a key's "folders" exist through it
        self.children: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for parts in self.files | self.dirs:
            if parts:
                self.children.setdefault(parts[:-1], []).append(parts)

    def filesystem(self) -> Any:
        if self._fs is None:
            import pyarrow.fs as pafs

            self._fs = pafs.FileSystem.from_uri(self.uri)[0]
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def read(self, parts: tuple[str, ...]) -> bytes:
        with self.filesystem().open_input_stream("/".join((self.root, *parts))) as f:
            return f.read()


class ObjectStorePath:
    """The part of `pathlib.Path` an image folder uses, over an object-store prefix's listing
    (`_Listing`): `str()` is the object's URI, which Ray Data and pyarrow read."""

    def __init__(self, listing: _Listing, parts: tuple[str, ...] = ()) -> None:
        self.listing, self.parts = listing, parts

    @classmethod
    def list(cls, uri: str) -> "ObjectStorePath":
        return cls(_Listing(uri))

    def __truediv__(self, name: str) -> "ObjectStorePath":
        return ObjectStorePath(self.listing, self.parts + PurePosixPath(name).parts)

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else PurePosixPath(self.listing.root).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def expanduser(self) -> "ObjectStorePath":
        return self

    def is_file(self) -> bool:
        return self.parts in self.listing.files

    def is_dir(self) -> bool:
        return self.parts in self.listing.dirs

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def iterdir(self) -> Iterator["ObjectStorePath"]:
        return (ObjectStorePath(self.listing, p) for p in self.listing.children.get(self.parts, []))

    def rglob(self, pattern: str) -> Iterator["ObjectStorePath"]:
        if pattern != "*":
            raise ValueError(f"only rglob('*') is supported under {self}")
        for child in self.iterdir():
            yield child
            yield from child.rglob("*")

    def read_bytes(self) -> bytes:
        return self.listing.read(self.parts)

    def __str__(self) -> str:
        return "/".join((self.listing.uri, *self.parts))

    def __repr__(self) -> str:
        return f"ObjectStorePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectStorePath) and (self.listing.uri, self.parts) == (
            other.listing.uri, other.parts)

    def __hash__(self) -> int:
        return hash((self.listing.uri, self.parts))

    def __lt__(self, other: "ObjectStorePath") -> bool:  # by path components, as pathlib sorts
        return self.parts < other.parts


def folder_path(path: str | Path) -> "Path | ObjectStorePath":
    """A local folder, or an object-store prefix listed once."""
    return ObjectStorePath.list(str(path)) if is_uri(path) else Path(path).expanduser()


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in EXTENSIONS and p.is_file() and not p.name.startswith(".")


def list_images(root: Path) -> list[Path]:
    """Every image file under `root`, recursively, sorted by path (hidden files skipped)."""
    return sorted(p for p in root.rglob("*") if _is_image(p))


def split_roots(root: Path) -> tuple[Path, Path] | None:
    """(train, test) folders when the tree is pre-split, else None. `val` wins over `test`."""
    if not (root / "train").is_dir():
        return None
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / "train", root / name
    return None


def _class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _seeded_perm(n: int, seed: int, key: int) -> np.ndarray:
    ss = np.random.SeedSequence([_SPLIT_TAG, seed % 2**64], spawn_key=(key,))
    return np.random.Generator(np.random.PCG64(ss)).permutation(n)


class ServesEncoded:
    """For a source of encoded image files (`ImageSource` subclasses with `resize_to`):
    `encoded_copy()` gives the same split serving each device-decodable JPEG as its 1-D uint8 file
    bytes (decoded and resized later by `jpeg.decode_resize_batch`) and every other file decoded
    and resized as usual (`encoded_or_decoded`)."""

    encoded = False
    resize_to: int | None

    def encoded_copy(self):
        if self.resize_to is None:
            raise ValueError(f"an encoded {type(self).__name__} needs resize_to: its decoded files must stack")
        other = copy.copy(self)
        other._bad = set()  # type: ignore[attr-defined]
        other.encoded = True
        return other

    def encoded_or_decoded(self, raw: bytes) -> torch.Tensor:
        if device_decodable(raw):
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return decode_image(io.BytesIO(raw), self.resize_to)


class ImageFolder(ServesEncoded, ImageSource):
    """Images decoded with PIL, converted to RGB; see the module docstring for layout and splits."""

    name = "imagefolder"

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        *,
        labelled: bool = True,
        num_images: int | None = None,
        num_test: int = 1000,
        seed: int = 0,
        resize_to: int | None = None,
    ) -> None:
        super().__init__()
        self.split = check_split(split)
        if num_images is not None and num_images < 1:
            raise ValueError(f"num_images must be a positive int or None (all), got {num_images!r}")
        if num_test < 0:
            raise ValueError(f"num_test must be >= 0, got {num_test}")
        self.root = folder_path(path)
        self.remote = isinstance(self.root, ObjectStorePath)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder '{self.root}' does not exist or is not a directory")
        self.labelled = bool(labelled)
        self.resize_to = check_resize(resize_to)
        self.fixed_size = self.resize_to

        roots = split_roots(self.root)
        class_root = roots[0] if roots else self.root
        self.class_names = _class_dirs(class_root) if self.labelled else None
        if self.labelled and not self.class_names:
            raise ValueError(
                f"'{class_root}' has no class sub-folders; use <path>/<class>/<image> or labelled: false"
            )
        self.classes = self.class_names

        if roots:
            files = self._collect(roots[0] if split == "train" else roots[1])
            cap = num_images if split == "train" else num_test
            files = self._subset(files, cap, seed, key=0 if split == "train" else 1)
        else:
            files = self._collect(self.root)
            if num_test >= len(files):
                raise ValueError(
                    f"'{self.root}' has {len(files)} images, too few to hold out num_test_images={num_test} "
                    "for the test split and still train on the rest"
                )
            held = np.zeros(len(files), bool)
            held[_seeded_perm(len(files), seed, key=2)[:num_test]] = True
            files = [f for f, h in zip(files, held) if h == (split == "test")]
            if split == "train":
                files = self._subset(files, num_images, seed, key=0)
        if not files:
            raise ValueError(
                f"no {split} images found under '{self.root}' "
                f"(extensions {', '.join(EXTENSIONS)}; num_test_images={num_test})"
            )
        self.files = [p for p, _ in files]
        self.labels = np.array([lab for _, lab in files], dtype=np.int64)

    def _collect(self, root: Path) -> list[tuple[Path, int]]:
        if not self.labelled:
            return [(p, -1) for p in list_images(root)]
        out: list[tuple[Path, int]] = []
        known = {name: i for i, name in enumerate(self.class_names or [])}
        for name in _class_dirs(root):
            if name not in known:
                raise ValueError(f"class folder '{root / name}' is not among the training classes {list(known)}")
            out += [(p, known[name]) for p in list_images(root / name)]
        return out

    @staticmethod
    def _subset(files: list, cap: int | None, seed: int, key: int) -> list:
        """A seeded subset of `cap` files, kept in sorted order (the first N would be one class)."""
        if cap is None or cap >= len(files):
            return files
        keep = np.sort(_seeded_perm(len(files), seed, key)[:cap])
        return [files[i] for i in keep]

    @property
    def targets(self) -> np.ndarray:
        return self.labels.copy() if self.labelled else np.full(len(self), -1, np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def describe_item(self, index: int) -> str:
        return str(self.files[index])

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index], int(self.labels[index])
        if not self.encoded and not self.remote:
            return decode_image(path, self.resize_to), label
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CorruptImageError(f"{type(exc).__name__}: {exc}") from exc
        if self.encoded:
            return self.encoded_or_decoded(raw), label
        return decode_image(io.BytesIO(raw), self.resize_to), label


def decode_image(file: str | Path | io.BytesIO, draft_size: int | None = None) -> torch.Tensor:
    """A uint8 (3, H, W) RGB tensor from an image file or its bytes; CorruptImageError if unreadable.
    `draft_size` lets JPEG decode at a reduced scale near it (the caller still resizes)."""
    try:
        with Image.open(file) as im:
            if draft_size is not None:
                im.draft("RGB", (draft_size, draft_size))
            im.load()  # forces full decoding here, so truncation is caught here
            rgb = im.convert("RGB")
    except _DECODE_ERRORS as exc:  # UnidentifiedImageError is an OSError
        raise CorruptImageError(f"{type(exc).__name__}: {exc}") from exc
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
