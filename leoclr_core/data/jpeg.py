"""JPEG-encoded images, decoded a whole batch at a time on the training device.

Why: real ImageNet-style training reads compressed JPEGs, and decoding them is often the most
expensive step of the input pipeline; a few CPU cores per GPU cannot keep up with it. Here the
loader workers only read the files and the training device decodes the batch (`decode_resize_batch`:
nvJPEG on CUDA, one batched call), then square-resizes each image to the batch's size, as workers
would have. The few files a device decoder should not be handed (PNGs, progressive or CMYK JPEGs,
truncated files: `device_decodable`) are decoded by the workers as before.

Batches travel packed (`collate_jpeg_or_pixels`): one flat byte tensor plus the length of each
image, so a DataLoader worker hands the main process one shared-memory buffer per batch instead of
one per image. `EncodedImages` JPEG-encodes any image source once (the benchmarks use it, so that
synthetic scenes cost what photographs cost to feed).
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections import defaultdict
from typing import NamedTuple, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from leoclr_core.data.base import ImageSource, resize_square

log = logging.getLogger("leoclr_core.data")

# torchvision 0.29 marks its image codecs deprecated (in favour of TorchCodec) on every call; they
# still work, and the GPU box's torchvision predates the warning.
warnings.filterwarnings("ignore", message=r".*TorchCodec", category=DeprecationWarning)

_ENCODE_CHUNK = 256  # images encoded per call, so only one chunk of decoded pixels is alive at once


class EncodedImages(Dataset):
    """JPEG-encodes the first `num_images` images of `source` once; samples are encoded bytes.

    A sample is `(bytes, label, skipped)` with `bytes` a 1-D uint8 tensor, the same tuple shape as
    an `ImageSource` sample so the rest of a feed does not care. With `decode=True` a sample is the
    decoded uint8 (3, H, W) image instead: the classic path where loader workers decode on the CPU.
    """

    def __init__(self, source: ImageSource, quality: int = 90, num_images: int | None = None,
                 *, decode: bool = False):
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        n = len(source) if num_images is None else min(int(num_images), len(source))
        if n < 1:
            raise ValueError(f"nothing to encode: {len(source)} images in the source, {num_images} asked for")
        self.quality, self.decode = quality, decode
        self.name, self.split = f"{source.name}-jpeg", source.split
        self.fixed_size = source.fixed_size
        self.labelled, self.classes = source.labelled, source.classes
        self.encoded: list[torch.Tensor] = []
        self.labels: list[int] = []
        for start in range(0, n, _ENCODE_CHUNK):
            samples = [source[i] for i in range(start, min(start + _ENCODE_CHUNK, n))]
            self.encoded.extend(encode_jpeg([s[0] for s in samples], quality=quality))
            self.labels.extend(s[1] for s in samples)

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def nbytes(self) -> int:
        """Total encoded size: what the loader moves instead of raw pixels."""
        return sum(e.numel() for e in self.encoded)

    def encoded_copy(self) -> "EncodedImages":
        """The same images served as JPEG bytes, for a feed that decodes on the training device
        (the contract of the file sources' `encoded_copy`)."""
        other = copy.copy(self)
        other.decode = False
        return other

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        data = self.encoded[index]
        if self.decode:
            return decode_jpeg(data, mode=ImageReadMode.RGB), self.labels[index], 0
        return data, self.labels[index], 0


def unpack(packed: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """The per-image byte tensors of a packed batch (views into the flat buffer, no copy)."""
    flat, lengths = packed
    return list(torch.split(flat, lengths.tolist()))


_QUIET_STREAMS: dict[int, "torch.cuda.Stream"] = {}
_QUIET_LOCK = threading.Lock()


def _quiet_stream(index: int) -> "torch.cuda.Stream":
    """A stream of this module's own on CUDA device `index` that never runs a kernel."""
    with _QUIET_LOCK:
        if index not in _QUIET_STREAMS:
            _QUIET_STREAMS[index] = torch.cuda.Stream(index)
        return _QUIET_STREAMS[index]


def _decode_cuda(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """nvJPEG decode whose output memory no queued kernel can still be using.

    Why: torchvision allocates the decoded images on the caller's current stream but writes them
    from a stream of its own, which waits for nothing on the caller's. The caching allocator hands
    out memory that is free *in the order of the allocating stream*: on a busy stream that can be
    a block whose last kernels (a previous step's activations, a previous batch's views) are still
    queued, and the JPEG bytes then land under them (read back as float16/bfloat16, garbage and
    NaN). Allocated on a stream that never runs a kernel, a block is only ever handed out once
    every stream that used it (recorded below) is past it.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device("cuda", index)
    current = torch.cuda.current_stream(device)
    quiet = _quiet_stream(index)
    with torch.cuda.stream(quiet):
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    current.wait_stream(quiet)  # torchvision made `quiet` wait for its own stream
    for image in images:
        image.record_stream(current)
    return images


# ---------------------------------------------------------------- photographs of any size
_SOF_SEQUENTIAL = (0xC0, 0xC1)  # baseline and extended sequential Huffman
_SOF_OTHER = (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # progressive, lossless, ...


def device_decodable(data: bytes | bytearray | memoryview) -> bool:
    """True for a JPEG a device decoder takes as it is: sequential (baseline) coding of 1 or 3
    components, ending with its end-of-image marker. A cheap read of the marker headers, done by
    the loader workers: everything else (PNGs, progressive or CMYK JPEGs, truncated files) they
    decode themselves, so a truncated file is skipped like any corrupt one, not half-decoded."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8 or data[n - 2] != 0xFF or data[n - 1] != 0xD9:
        return False
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in _SOF_SEQUENTIAL:
            return i + 9 < n and data[i + 9] in (1, 3)  # component count, after length, precision, h, w
        if marker in _SOF_OTHER or marker in (0xDA, 0xD9):  # other coding, or scan data before any frame
            return False
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return False


class JpegBatch(NamedTuple):
    """A batch of image files as a loader hands it over: the JPEGs still encoded (one flat byte
    tensor and their lengths), the rest already decoded and resized by the workers, and where
    each sits in the batch."""

    flat: torch.Tensor  # uint8: every JPEG's bytes, one after the other
    lengths: torch.Tensor  # int64 (J,)
    jpeg_index: torch.Tensor  # int64 (J,): position of each JPEG in the batch
    pixels: torch.Tensor  # uint8 (P, 3, S, S), P may be 0
    pixel_index: torch.Tensor  # int64 (P,)


def collate_jpeg_or_pixels(batch: Sequence[tuple[torch.Tensor, int, int]]):
    """Collate samples that are either encoded JPEGs (1-D uint8) or decoded (3, S, S) uint8 images
    to (JpegBatch, int64 labels, skipped)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    data, labels, skipped = zip(*batch)
    jpegs = [i for i, d in enumerate(data) if d.ndim == 1]
    decoded = [i for i, d in enumerate(data) if d.ndim == 3]
    if len(jpegs) + len(decoded) != len(data):
        shapes = [tuple(d.shape) for d in data][:3]
        raise ValueError(f"samples must be encoded bytes or (3, H, W) images, got {shapes}")
    shapes = {tuple(data[i].shape) for i in decoded}
    if len(shapes) > 1:
        raise ValueError(f"decoded images differ in size {sorted(shapes)[:3]}; build the source with resize_to")
    flat = torch.cat([data[i] for i in jpegs]) if jpegs else torch.empty(0, dtype=torch.uint8)
    pixels = torch.stack([data[i] for i in decoded]) if decoded else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    out = JpegBatch(flat, torch.tensor([data[i].numel() for i in jpegs], dtype=torch.long),
                    torch.tensor(jpegs, dtype=torch.long), pixels, torch.tensor(decoded, dtype=torch.long))
    return out, torch.tensor(labels, dtype=torch.long), int(sum(skipped))


def _decode_each(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode one image at a time; None for those the decoder refuses."""
    out: list[torch.Tensor | None] = []
    for e in encoded:
        try:
            cuda = device.type == "cuda"
            out.append(_decode_cuda([e], device)[0] if cuda else decode_jpeg(e, mode=ImageReadMode.RGB))
        except RuntimeError:
            out.append(None)
    return out


def _index(positions: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Batch positions as an index on `device`, copied without blocking the host (from pinned memory
    on CUDA: a pageable copy would wait for this stream's queued work)."""
    index = torch.as_tensor(positions, dtype=torch.long)
    if device.type == "cuda":
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


def decode_resize_batch(batch: JpegBatch, size: int, device: torch.device | str) -> tuple[torch.Tensor, list[int]]:
    """Decode the JPEGs of `batch` on `device` (nvJPEG on CUDA, in one batched call), square-resize
    each to `size` as the workers do (`resize_square`), and put them with the workers' images into
    one uint8 (B, 3, size, size) batch. Returns it and the batch positions of the JPEGs that failed
    to decode there: each is replaced by another image of the batch (the batch keeps its size, as a
    skipped file does).
    nvJPEG reads the bytes where they are: hand it pageable ones, since it may still read pinned
    ones after this returns, when a loader could already be refilling them."""
    device = torch.device(device)
    encoded = unpack((batch.flat, batch.lengths))
    b = len(encoded) + len(batch.pixel_index)
    out = torch.empty(b, 3, size, size, dtype=torch.uint8, device=device)
    if len(batch.pixel_index):
        if batch.pixels.shape[-2:] != (size, size):
            raise ValueError(f"worker-decoded images are {tuple(batch.pixels.shape[-2:])}, expected {size} px")
        out[_index(batch.pixel_index, device)] = batch.pixels.to(device, non_blocking=True)
    if not encoded:
        return out, []
    images: list[torch.Tensor | None]
    if device.type == "cuda":
        try:
            images = list(_decode_cuda(encoded, device))
        except RuntimeError:  # one bad file fails the whole batched call: find it
            images = _decode_each(encoded, device)
    else:
        images = _decode_each(encoded, device)
    good = [i for i, im in enumerate(images) if im is not None]
    if not good and not len(batch.pixel_index):
        raise RuntimeError(f"none of the {len(images)} JPEGs of a batch could be decoded on {device}")
    # Same-shaped images are resized together: photo collections repeat a few sizes a lot.
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i in good:
        groups[tuple(images[i].shape)].append(i)  # type: ignore[union-attr]
    where = batch.jpeg_index.tolist()
    for members in groups.values():
        stacked = torch.stack([images[i] for i in members])  # type: ignore[misc]
        out[_index([where[i] for i in members], device)] = resize_square(stacked, size)
    failed = [where[i] for i, im in enumerate(images) if im is None]
    if failed:
        log.warning("%d of %d JPEGs in a batch failed to decode on %s; each is replaced by another image "
                    "of the batch", len(failed), len(images), device)
        donor = where[good[0]] if good else int(batch.pixel_index[0])
        out[_index(failed, device)] = out[donor].clone()
    return out, failed
