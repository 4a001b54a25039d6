"""Where a pretrain job's views are made and its JPEGs decoded: decided here, once, for the
in-process feed (`for_process`) and for Ray's training workers (`for_ray_workers`), whose answer
also sizes the CPUs a job reserves for Ray Data's view workers (`spec.resources`). Torch-free (it
reads the spec only): the API's admission gate asks it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from leoclr_core.spec.models import ENCODED_SOURCES, PretrainSpec


@dataclass(frozen=True)
class InputPlacement:
    """`views_on_device`: uint8 images reach the training device and `BatchedViews` makes all views
    of a batch there (else views are made on CPUs: per sample by loader workers, or by Ray Data's
    view workers). `decode_on_device`: the JPEGs of an image folder or Parquet source travel still
    encoded and are decoded on the training device (nvJPEG on CUDA), which implies `views_on_device`."""

    views_on_device: bool
    decode_on_device: bool

    @classmethod
    def decide(cls, spec: PretrainSpec, *, gpu: bool, batched_here: bool) -> "InputPlacement":
        """The rule. `gpu`: the training device is a GPU. `batched_here`: `augment.batched` puts the
        batched views on the training device (in process; on Ray, CPU view workers batch instead).

        Views: `augment.device` gpu, or auto on a GPU or with `data.decode` gpu (images sent
        undecoded can only be viewed where they are decoded). Decoding: an encoded source with
        `data.decode` gpu, or auto on a GPU, when the device makes the views."""
        aug, data = spec.augment, spec.data
        encoded = data.source in ENCODED_SOURCES
        asks_device_decode = encoded and data.decode == "gpu"
        views = (aug.device == "gpu" or (batched_here and aug.batched)
                 or (aug.device == "auto" and (gpu or asks_device_decode)))
        decode = views and encoded and data.decode != "cpu" and (data.decode == "gpu" or gpu)
        return cls(views_on_device=views, decode_on_device=decode)

    @classmethod
    def for_process(cls, spec: PretrainSpec, device_type: str) -> "InputPlacement":
        """The in-process feed on a device of `device_type` ("cuda", "cpu", ...)."""
        return cls.decide(spec, gpu=device_type == "cuda", batched_here=True)

    @classmethod
    def for_ray_workers(cls, spec: PretrainSpec) -> "InputPlacement":
        """Ray's training workers, on GPUs when `scaling.use_gpu`."""
        return cls.decide(spec, gpu=spec.scaling.use_gpu, batched_here=False)
