"""An embed job on Ray against the same encoder in this process, on the same images, in one run.

    python -m bench.embed [--images 3000] [--backbone resnet18] [--size 32] [--replicas 1]
                          [--cpus-per-replica 1] [--data-workers 1] [--threads 1] [--gpu]

Writes `--images` JPEGs (synthetic-objects scenes, 64 px) into an image folder, saves a randomly
initialised encoder, then embeds the folder twice:
- in process: the evaluation's source (decode, square resize to `--size`) and the encoder, batch by
  batch, on `--threads` torch threads; the same preprocessing the job uses;
- on a local Ray (its own MLflow store in a temporary folder): `distributed.embed.run_embed`, the
  whole job (MLflow run, Ray Data stream, decode tasks, the actor pool, the Parquet write and the
  replace) up to its neighbour sheet.
Each rate is images / wall seconds of the whole pass, start-up included (a job pays it too; the
MLflow store is created before the clock starts, as a service's already exists).
Per CPU, the in-process rate over its threads against the Ray rate over: its replicas' CPUs (the
convention of bench.ray_vs_engine: model CPUs, the decode tasks not counted); every logical CPU the
job asks of Ray (`resources.job_resources`: replicas x cpus, decode tasks, one for reads and the
writer); and the cores of this machine it could use. Prints a table; writes the figures as JSON.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import typer
from PIL import Image
from rich.console import Console
from rich.table import Table

console = Console()


def write_folder(root: Path, n: int, seed: int = 0) -> None:
    from leoclr_core.data import SyntheticObjects
    from leoclr_core.spec.models import SyntheticSpec

    scenes = SyntheticObjects(n, seed, "train", SyntheticSpec(source_size=64))
    for i in range(n):
        image, label, _ = scenes[i]
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())


def in_process(root: Path, checkpoint: Path, size: int, batch: int, threads: int, device: str) -> dict[str, float]:
    """The evaluation's way: ImageFolder (decode, square resize), then [0, 1] into the encoder."""
    from torch.utils.data import DataLoader

    from leoclr_core.data import ImageFolder, collate_images
    from leoclr_core.nn.model import ImageEncoder
    from leoclr_core.spec.models import DataSpec
    from leoclr_core.training.checkpoint import load_backbone

    torch.set_num_threads(threads)
    started = time.perf_counter()
    d = DataSpec(source="imagefolder", path=str(root), image_size=size)
    backbone, _ = load_backbone(checkpoint)
    encoder = ImageEncoder(backbone, d.mean, d.std, size).eval().to(device)
    source = ImageFolder(root, "train", labelled=True, num_test=0, resize_to=size)
    n = 0
    with torch.no_grad():
        for images, _, _ in DataLoader(source, batch_size=batch, collate_fn=collate_images):
            x = images.to(device).float().div_(255.0)
            with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
                n += len(encoder(x).float().cpu())
    seconds = time.perf_counter() - started
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "cpus": threads}


def on_ray(root: Path, checkpoint: Path, size: int, batch: int, replicas: int, cpus: float, data_workers: int,
           gpu: bool, out: Path) -> dict[str, Any]:
    import leoclr_core.distributed  # noqa: F401 - Ray's environment before Ray is imported
    from leoclr_core import tracking
    from leoclr_core.distributed import embed
    from leoclr_core.distributed.session import ray_session
    from leoclr_core.settings import CoreSettings
    from leoclr_core.spec.models import parse_spec
    from leoclr_core.spec.resources import job_resources

    spec = parse_spec({"kind": "embed", "name": "bench-embed", "encoder": {"checkpoint": str(checkpoint)},
                       "data": {"source": "imagefolder", "path": str(root), "num_images": None, "image_size": size},
                       "batch_size": batch, "replicas": replicas, "output_dir": str(out / "embeddings"),
                       "scaling": {"cpus_per_worker": cpus, "data_workers": data_workers, "use_gpu": gpu,
                                   "gpus_per_worker": 1.0 / replicas if gpu else 1.0}})
    asked = job_resources(spec)
    settings = CoreSettings(data_dir=out / "data", mlflow_tracking_uri=None, ray_address=None)  # not the user's
    tracking.client(settings)  # creates the store
    with ray_session(asked["CPU"], settings=settings, log_to_driver=False):
        run = embed.run_embed(spec, settings=settings)  # run.seconds: up to the replace, not the sheet after it
    return {"images": run.images, "seconds": run.seconds, "images_per_s": run.images_per_s, "cpus": asked["CPU"],
            "gpus": asked["GPU"], "skipped": len(run.skipped)}


def main(
    images: int = typer.Option(3000, help="Images in the folder."),
    backbone: str = typer.Option("resnet18", help="tiny, resnet18, resnet34 or resnet50."),
    size: int = typer.Option(32, help="data.image_size: what the encoder sees."),
    batch: int = typer.Option(256, help="Images per model call."),
    replicas: int = typer.Option(1, help="Ray: model replicas."),
    cpus_per_replica: float = typer.Option(1.0, help="Ray: CPUs (torch threads) per replica."),
    data_workers: int = typer.Option(1, help="Ray: decode tasks at a time (1 CPU each)."),
    threads: int = typer.Option(1, help="In process: torch threads."),
    gpu: bool = typer.Option(False, help="Both on the GPU (replicas share it)."),
    output: Path = typer.Option(Path("runs/bench-embed.json"), "--output", "-o"),
) -> None:
    logging.basicConfig(level=logging.WARNING)
    from leoclr_core.nn.model import build_backbone
    from leoclr_core.spec.models import ModelSpec
    from leoclr_core.training.checkpoint import save_encoder

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = work / "images"
        write_folder(root, images)
        model = ModelSpec(backbone=backbone, cifar_stem=size <= 64)
        torch.manual_seed(0)
        net, _ = build_backbone(model)
        checkpoint = save_encoder(work / "encoder.pt", net, model)
        device = "cuda" if gpu else "cpu"
        local = in_process(root, checkpoint, size, batch, threads, device)
        ray = on_ray(root, checkpoint, size, batch, replicas, cpus_per_replica, data_workers, gpu, work)
    cores = os.cpu_count() or 1
    per_cpu_local = local["images_per_s"] / local["cpus"]
    result = {
        "machine": {"cores": cores, "cpu": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name(0) if gpu else None, "torch": torch.__version__},
        "config": {"images": images, "backbone": backbone, "image_size": size, "batch": batch, "replicas": replicas,
                   "cpus_per_replica": cpus_per_replica, "data_workers": data_workers, "threads": threads},
        "in_process": local, "ray": ray,
        "ratio": ray["images_per_s"] / local["images_per_s"],
        "ratio_per_replica_cpu": (ray["images_per_s"] / (replicas * cpus_per_replica)) / per_cpu_local,
        "ratio_per_cpu_asked": (ray["images_per_s"] / ray["cpus"]) / per_cpu_local,
        "ratio_per_core_used": (ray["images_per_s"] / min(ray["cpus"], cores)) / per_cpu_local,
    }
    table = Table("path", "images", "seconds", "images/s", "CPUs", "images/s per CPU")
    table.add_row(f"in process ({threads} thread(s))", str(local["images"]), f"{local['seconds']:.1f}",
                  f"{local['images_per_s']:.1f}", f"{local['cpus']:g}", f"{per_cpu_local:.1f}")
    table.add_row(f"Ray ({replicas} replica(s) x {cpus_per_replica:g} CPU, {data_workers} decode)", str(ray["images"]),
                  f"{ray['seconds']:.1f}", f"{ray['images_per_s']:.1f}", f"{ray['cpus']:g} asked",
                  f"{ray['images_per_s'] / ray['cpus']:.1f}")
    console.print(table)
    console.print(f"Ray / in process: {result['ratio']:.2f} overall; per CPU: {result['ratio_per_replica_cpu']:.2f} "
                  f"per replica CPU, {result['ratio_per_cpu_asked']:.2f} per CPU asked, "
                  f"{result['ratio_per_core_used']:.2f} per core of this {cores}-core machine it could use")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    console.print(f"figures: {output}")


if __name__ == "__main__":
    typer.run(main)
