"""What the bench tests share: a spec small enough to run a bench row in a second on a CPU, and one
torch thread (a tiny model gains nothing from threads, and on a busy 2-core box they only contend)."""

import pytest
import torch

TINY_BENCH_SPEC = {
    "kind": "pretrain", "name": "tiny-bench",
    "data": {"num_images": 64, "image_size": 16, "synthetic": {"source_size": 20, "object_size": [8, 14],
                                                                "distractor_size": [5, 8]}},
    "model": {"backbone": "tiny", "width": 4, "proj_hidden_dim": 16, "proj_dim": 8},
    "loss": {"queue_size": 32},
    "augment": {"batched": True},
    "optim": {"batch_size": 16},
}


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
