"""Does a batched JPEG decode on the GPU land in memory that queued kernels still write? A direct
test of the race blamed for the ResNet-50 NaNs (`jpeg._decode_cuda`), without training.

Each round queues a long chain of matrix products on the current stream, then, behind it, a fill
of many small blocks sized like a decoded image, frees those blocks while the fills are still
queued, and decodes a batch of JPEGs at once. The caching allocator may hand a freed block to any
later allocation on the same stream, because that stream's own order keeps it safe. So:

- `plain`: torchvision's decoder called on the current stream. If it writes its output from a
  stream of its own that does not wait for the current one, the queued fills land on decoded
  pixels after the decode, and the image comes out as the fill byte.
- `quiet`: the decode the feeds use (`_decode_cuda`, under a stream of our own). It must never
  come out wrong.

Every decoded image is compared with the same batch decoded on an idle device.

    python -m bench.decode_check [--device cuda] [--rounds 10] [--batch 64] [--size 256]
        [--chain 200] [--json PATH]

The chain (200 products of 4096 x 4096 in float16; its time is printed) must outlast the
decode, or the fills run before the decoder writes and a race would go unseen. It prints one line
per mode and a verdict, and exits 0 whenever it ran: it is a diagnosis, not a gate. On a CPU both
modes are the same synchronous decode (the products shrink to 64 x 64) and come out clean.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from leoclr_core.data.jpeg import _decode_cuda

MODES = ("plain", "quiet")
FILL = 0xAB  # the byte a queued fill writes: an image made of it was overwritten


def log(msg: str) -> None:
    print(f"[decode-check] {msg}", file=sys.stderr, flush=True)


def sample_jpegs(n: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """`n` smooth random colour images of `size` px, JPEG-encoded (quality 90) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (n, 3, 6, 6), generator=g).float()
    images = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return encode_jpeg(list(images.round().clamp(0, 255).to(torch.uint8)), quality=90)


def decode(mode: str, encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type != "cuda":
        return [decode_jpeg(e, mode=ImageReadMode.RGB) for e in encoded]
    if mode == "quiet":
        return _decode_cuda(encoded, device)
    return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))


def queue_fills(device: torch.device, work: torch.Tensor, block_numel: int, count: int, chain: int) -> None:
    """Queue `chain` products of `work`, then a fill of `count` fresh uint8 blocks of `block_numel`
    behind them, and free the blocks (their fills still queued on a GPU)."""
    x = work
    for _ in range(chain):
        x = torch.mm(x, work)
    blocks = [torch.empty(block_numel, dtype=torch.uint8, device=device) for _ in range(count)]
    for b in blocks:
        b.fill_(FILL)
    del blocks, x


def compare(decoded: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> tuple[int, int, int]:
    """(images that differ, of them made only of the fill byte, the largest absolute difference)."""
    wrong = filled = worst = 0
    for got, want in zip(decoded, reference):
        got = got.cpu()
        diff = int((got.int() - want.int()).abs().max()) if got.shape == want.shape else 255
        if diff:
            wrong += 1
            filled += int(bool((got == FILL).all()))
            worst = max(worst, diff)
    return wrong, filled, worst


def run_check(device: str | torch.device = "cuda", rounds: int = 10, batch: int = 64, size: int = 256,
              chain: int = 200, work_size: int = 4096) -> dict:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    if device.type != "cuda":  # everything runs in order there: the products only cost time
        work_size = min(work_size, 64)
    encoded = sample_jpegs(batch, size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reference = [im.cpu() for im in decode("plain", encoded, device)]  # on an idle device
    sync()
    work = torch.randn(work_size, work_size, device=device).to(torch.float16 if device.type == "cuda" else torch.float32)
    work.div_(work_size ** 0.5)  # products stay finite
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "rounds": rounds, "batch": batch, "size": size, "chain": chain,
                    "date": time.strftime("%Y-%m-%d"), "modes": {}}
    # Alone, on an idle device: the chain must take longer than the decode (see the module's doc).
    for name, fn in (("chain_ms", lambda: queue_fills(device, work, 3 * size * size, batch, chain)),
                     ("decode_ms", lambda: decode("quiet", encoded, device))):
        fn()  # warm-up (cuBLAS handles, nvJPEG state)
        sync()
        started = time.perf_counter()
        fn()
        sync()
        result[name] = round((time.perf_counter() - started) * 1e3, 2)
    for mode in MODES:
        wrong_images = filled_images = worst = bad_rounds = 0
        started = time.perf_counter()
        for _ in range(rounds):
            queue_fills(device, work, 3 * size * size, batch, chain)
            images = decode(mode, encoded, device)
            sync()
            wrong, filled, diff = compare(images, reference)
            wrong_images, filled_images = wrong_images + wrong, filled_images + filled
            worst, bad_rounds = max(worst, diff), bad_rounds + int(wrong > 0)
            del images
        result["modes"][mode] = {"images": rounds * batch, "wrong": wrong_images, "filled": filled_images,
                                 "rounds_wrong": bad_rounds, "max_abs_diff": worst,
                                 "seconds": round(time.perf_counter() - started, 3)}
    return result


def verdict(result: dict) -> str:
    plain, quiet = result["modes"]["plain"], result["modes"]["quiet"]
    if quiet["wrong"]:
        return "the feeds' decode (quiet) came out wrong: the fix does not hold"
    if plain["wrong"]:
        return "race shown: the plain decode was overwritten by queued kernels; the feeds' decode was not"
    if result["device"] == "cpu":
        return "no race can show on a CPU (everything runs in order): this checked the harness only"
    if result["chain_ms"] <= result["decode_ms"]:
        return (f"inconclusive: the chain ({result['chain_ms']} ms) did not outlast the decode "
                f"({result['decode_ms']} ms); raise --chain")
    return "no race shown: neither decode came out wrong (the NaNs would need another cause)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.decode_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--chain", type=int, default=200, help="matrix products queued ahead of the fills")
    p.add_argument("--work-size", type=int, default=4096, help="side of the square matrix multiplied")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    for name in ("rounds", "batch", "size", "chain", "work_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_check(args.device, args.rounds, args.batch, args.size, args.chain, args.work_size)
    except RuntimeError as exc:
        log(f"error: {exc}")
        return 2
    for mode, m in result["modes"].items():
        log(f"{mode}: {m['wrong']} of {m['images']} images wrong ({m['filled']} all fill byte) in "
            f"{m['rounds_wrong']} of {result['rounds']} rounds, max diff {m['max_abs_diff']}, {m['seconds']} s")
    result["verdict"] = verdict(result)
    log(f"chain alone {result['chain_ms']} ms, decode alone {result['decode_ms']} ms")
    log(f"{result['device']}: {result['verdict']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
