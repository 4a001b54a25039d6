"""Where views are made and JPEGs decoded: one rule for the in-process feed and Ray's workers."""

import pytest

from leoclr_core.spec.models import parse_spec
from leoclr_core.spec.resources import data_bundles
from leoclr_core.spec.placement import InputPlacement


def _spec(source="imagefolder", decode="auto", device="auto", batched=False, use_gpu=False):
    data = {"source": source, "decode": decode}
    if source == "imagefolder":
        data["path"] = "/nowhere"
    return parse_spec({"data": data, "augment": {"device": device, "batched": batched},
                       "scaling": {"use_gpu": use_gpu}})


@pytest.mark.parametrize("kwargs, device, views, decode", [
    ({}, "cpu", False, False),  # per sample in loader workers
    ({}, "cuda", True, True),  # auto on a GPU: views and JPEGs there
    ({"decode": "cpu"}, "cuda", True, False),
    ({"decode": "gpu"}, "cpu", True, True),  # asked for in so many words: views must follow the images
    ({"device": "gpu"}, "cpu", True, False),
    ({"batched": True}, "cpu", True, False),  # batched views on the CPU device
    ({"device": "cpu"}, "cuda", False, False),
    ({"source": "synthetic-objects"}, "cuda", True, False),  # nothing encoded to decode
])
def test_in_process_placement(kwargs, device, views, decode):
    assert InputPlacement.for_process(_spec(**kwargs), device) == InputPlacement(views, decode)


@pytest.mark.parametrize("kwargs, views, decode", [
    ({}, False, False),  # CPU view workers
    ({"use_gpu": True}, True, True),
    ({"use_gpu": True, "decode": "cpu"}, True, False),
    ({"decode": "gpu"}, True, True),
    ({"batched": True}, False, False),  # batched, but by the CPU view workers
    ({"device": "gpu"}, True, False),
    ({"use_gpu": True, "device": "cpu"}, False, False),
])
def test_ray_worker_placement_and_the_cpus_it_reserves(kwargs, views, decode):
    spec = _spec(**kwargs)
    assert InputPlacement.for_ray_workers(spec) == InputPlacement(views, decode)
    # The CPUs a job asks of Ray follow the placement: no view-worker CPUs when workers make views.
    assert len(data_bundles(spec)) == (1 if views else 1 + spec.scaling.data_workers)
