"""JPEG-encoded images held in memory, and a batched decode on the training device.

Why: real ImageNet-style training reads compressed JPEGs, and decoding them is often the most
expensive step of the input pipeline. Feeding raw uint8 pixels (as the synthetic source does)
hides that cost. `EncodedImages` JPEG-encodes any image source once, so a loader can ship the
small encoded bytes, and `decode_batch` turns a whole batch back into pixels in one call: with
nvJPEG on a CUDA device (the loader's CPU workers then only move bytes), on the CPU otherwise.

Batches travel packed (`collate_encoded`): one flat byte tensor plus the length of each image,
so a DataLoader worker hands the main process one shared-memory buffer per batch instead of one
per image; `unpack` cuts it back into the list of per-image byte tensors that decoding takes.
"""

from __future__ import annotations

import threading
import warnings
from typing import Sequence

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from leoclr_core.data.base import ImageSource

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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        data = self.encoded[index]
        if self.decode:
            return decode_jpeg(data, mode=ImageReadMode.RGB), self.labels[index], 0
        return data, self.labels[index], 0


def collate_encoded(batch: Sequence[tuple[torch.Tensor, int, int]]):
    """Pack samples to ((flat uint8 bytes, int64 lengths), int64 labels, skipped)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    data, labels, skipped = zip(*batch)
    lengths = torch.tensor([d.numel() for d in data], dtype=torch.long)
    packed = (torch.cat(data), lengths)
    return packed, torch.tensor(labels, dtype=torch.long), int(sum(skipped))


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


def decode_batch(encoded: Sequence[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Decode a batch of same-sized JPEGs to uint8 (B, 3, H, W) on `device`.

    On CUDA this is one batched nvJPEG call (the bytes stay on the CPU; nvJPEG reads them there;
    pass pageable, not pinned, bytes: nvJPEG may still read pinned ones after this returns);
    elsewhere each image is decoded on the CPU and the stack moved to `device`.
    """
    device = torch.device(device)
    encoded = list(encoded)
    if not encoded:
        raise ValueError("decode_batch needs at least one encoded image")
    if device.type == "cuda":
        images = _decode_cuda(encoded, device)
    else:
        images = [decode_jpeg(e, mode=ImageReadMode.RGB) for e in encoded]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"decoded images differ in size {sorted(shapes)[:3]}; encode same-sized images")
    return torch.stack(images).to(device, non_blocking=True)
