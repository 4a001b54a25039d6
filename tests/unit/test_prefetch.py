"""The prefetcher that prepares batches ahead of the training step (on a side stream on GPUs).

The thread and its hand-over are device independent, so they are tested here on the CPU with
`threaded=True`; the stream and event calls only run on CUDA.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from leoclr_core.views.batched import BatchedViews
from leoclr_core.data.prefetch import Prefetcher
from leoclr_core.spec.models import AugmentSpec


def batches(n: int):
    for i in range(n):
        yield torch.full((2, 3), float(i))


def double(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (t * 2,)


def test_threaded_yields_what_inline_yields_in_order():
    inline = [b[0] for b in Prefetcher(batches(7), double, "cpu")]
    threaded = [b[0] for b in Prefetcher(batches(7), double, "cpu", threaded=True)]
    assert len(inline) == len(threaded) == 7
    for a, b in zip(inline, threaded):
        assert torch.equal(a, b)
    assert [int(b[0, 0]) for b in threaded] == [0, 2, 4, 6, 8, 10, 12]


def test_seeded_views_are_the_same_through_the_thread():
    """A generator used inside `prepare` is drawn in item order: views do not depend on the thread."""
    maker = BatchedViews(AugmentSpec(), 16, (0.5,) * 3, (0.25,) * 3)
    images = [torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(5)]

    def views(threaded: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(11)
        return [torch.cat(v) for v in Prefetcher(images, lambda b: maker(b, generator=gen), "cpu",
                                                 threaded=threaded)]

    for a, b in zip(views(False), views(True)):
        assert torch.equal(a, b)


def test_error_in_prepare_is_raised_at_the_item_that_hit_it():
    def prepare(t):
        if int(t[0, 0]) == 3:
            raise ValueError("corrupt batch 3")
        return (t,)

    seen = []
    with pytest.raises(ValueError, match="corrupt batch 3"):
        for (b,) in Prefetcher(batches(6), prepare, "cpu", threaded=True):
            seen.append(int(b[0, 0]))
    assert seen == [0, 1, 2]


def test_error_in_the_source_is_raised_too():
    def broken():
        yield torch.zeros(1)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(Prefetcher(broken(), lambda t: (t,), "cpu", threaded=True))


def test_runs_at_most_depth_batches_ahead_and_stops_when_the_loop_breaks():
    pulled = []

    def source():
        for i in range(1000):
            pulled.append(i)
            yield torch.tensor([i])

    it = iter(Prefetcher(source(), lambda t: (t,), "cpu", depth=2, threaded=True))
    first = next(it)
    time.sleep(0.3)  # give the producer every chance to run ahead
    # one consumed, two queued, one held by the producer waiting for room
    assert int(first[0]) == 0 and len(pulled) <= 4
    it.close()  # what a `for` loop that breaks does
    time.sleep(0.2)
    assert len(pulled) <= 5
    assert not any(t.name == "leoclr-prefetch" and t.is_alive() for t in threading.enumerate())


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetcher([], double, "cpu", depth=0)
