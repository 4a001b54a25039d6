"""Embed jobs on a real Ray and MLflow: the dataset they write holds what the encoder gives in this
process for the same images (atol 1e-4: the same float32 math, batched differently), unreadable
images are skipped and listed, and a re-run replaces the output instead of adding to it."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from leoclr_core import contract, tracking
from leoclr_core.data import ImageFolder
from leoclr_core.distributed.embed import replace_output, run_embed
from leoclr_core.nn.model import build_backbone
from leoclr_core.spec.models import ModelSpec, parse_spec
from leoclr_core.training.checkpoint import save_encoder

from .conftest import tiny_spec

SIZE = 16
ATOL = 1e-4


def _png(rng: np.random.Generator, side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two class folders of small PNGs of mixed sizes, and one file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("circle", "square"):
        (root / cls).mkdir()
        for i in range(12):
            (root / cls / f"{i:02d}.png").write_bytes(_png(rng, 20 + i))
    (root / "circle" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture(scope="module")
def registered(ray_cluster, tmp_path_factory):
    """A tiny encoder in the registry: models:/<name>@candidate."""
    spec = parse_spec(tiny_spec("embed-source", tmp_path_factory.mktemp("reg")))
    run_id = tracking.start_job_run(spec, "/s/embed-source")
    torch.manual_seed(0)
    backbone, _ = build_backbone(spec.model)
    reg = tracking.log_encoder(run_id, backbone, spec.model, spec.data, spec.register)
    tracking.end_run(run_id)
    return reg.registry_uri


def _read(path) -> pa.Table:
    return pads.dataset(str(path), format="parquet").to_table()


def _embed_spec(name: str, out, **fields):
    return parse_spec({"kind": "embed", "name": name, "batch_size": 8, "output_dir": str(out), **fields})


def test_embeddings_match_the_encoder_in_process_and_unreadable_images_are_listed(folder, registered, tmp_path):
    spec = _embed_spec("embed-folder", tmp_path / "out",
                       encoder={"model_uri": registered},
                       data={"source": "imagefolder", "path": str(folder), "num_images": None, "image_size": SIZE})
    run = run_embed(spec)
    assert run.skipped == ["circle/broken.png"] and run.images == 24 and run.total == 25

    table = _read(run.output)
    meta = table.schema.metadata
    name, version = tracking.resolve_version(registered)
    assert meta[contract.EMBED_META_ENCODER.encode()].decode() == f"models:/{name}/{version}"
    assert parse_spec({"kind": "embed", "encoder": {"model_uri": registered},
                       "data": json.loads(meta[contract.EMBED_META_DATA.encode()])}).data == spec.data
    assert table.schema.field(contract.EMBED_VECTOR).type == pa.list_(pa.float32(), run.dim)
    got = {i: (lab, np.asarray(v, np.float32)) for i, lab, v in zip(*(table.column(c).to_pylist() for c in (
        contract.EMBED_ID, contract.EMBED_LABEL, contract.EMBED_VECTOR)))}

    # In process: the evaluation's source (decoded, square-resized), in [0, 1], through the same encoder.
    source = ImageFolder(folder, "train", labelled=True, num_test=0, resize_to=SIZE)
    encoder = tracking.load_encoder(registered)
    expected = {}
    for i, path in enumerate(source.files):
        if path.name == "broken.png":
            continue
        image, label, skipped = source[i]
        assert skipped == 0
        with torch.no_grad():
            vector = encoder(image[None].float() / 255.0)[0].numpy()
        expected[str(path.relative_to(folder))] = (label, vector)
    assert sorted(got) == sorted(expected)
    for key, (label, vector) in expected.items():
        assert got[key][0] == label, key
        np.testing.assert_allclose(got[key][1], vector, atol=ATOL, err_msg=key)

    c = tracking.client()
    mlrun = c.get_run(run.run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags[contract.TAG_EMBEDDINGS] == run.output
    assert mlrun.data.metrics["images"] == 24 and mlrun.data.metrics["skipped_files"] == 1
    assert mlrun.data.metrics[contract.M_STEP] == 24 and mlrun.data.metrics[contract.M_TOTAL] == 25
    artifacts = {a.path for folder_ in ("leoclr", "neighbours") for a in c.list_artifacts(run.run_id, folder_)}
    assert {"leoclr/skipped.json", "neighbours/neighbours.png"} <= artifacts
    listed = json.loads(open(c.download_artifacts(run.run_id, "leoclr/skipped.json", str(tmp_path))).read())
    assert listed == {"skipped": ["circle/broken.png"]} and run.result(spec)["skipped"] == ["circle/broken.png"]


def test_a_rerun_replaces_the_output_and_parquet_rows_are_numbered(ray_cluster, tmp_path):
    model = ModelSpec(backbone="tiny", width=8)
    torch.manual_seed(1)
    backbone, _ = build_backbone(model)
    checkpoint = save_encoder(tmp_path / "encoder.pt", backbone, model)
    rng = np.random.default_rng(1)
    cells = [_png(rng, 18) for _ in range(9)] + [b"not an image"] + [_png(rng, 18) for _ in range(5)]
    labels = ["cat", "dog", "emu"] * 5
    src = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": cells, "label": labels}), src, row_group_size=4)
    spec = _embed_spec("embed-parquet", tmp_path / "out", encoder={"checkpoint": str(checkpoint)},
                       data={"source": "parquet", "path": str(src), "num_images": 14, "image_size": SIZE})

    first = run_embed(spec)
    again = run_embed(spec)
    assert again.output == first.output and again.run_id != first.run_id
    assert not (tmp_path / "out.partial").exists()
    table = _read(again.output)
    ids = table.column(contract.EMBED_ID).to_pylist()
    assert sorted(ids, key=lambda i: int(i[4:])) == [f"row-{n}" for n in range(14) if n != 9]  # each once
    assert again.skipped == ["row-9"] and again.total == 14
    by_id = dict(zip(ids, table.column(contract.EMBED_LABEL).to_pylist()))
    assert by_id["row-0"] == 0 and by_id["row-4"] == 1 and by_id["row-13"] == 1  # sorted names: cat, dog, emu

    mean = torch.tensor(spec.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.data.std).view(1, 3, 1, 1)
    from leoclr_core.data import ParquetImages

    source = ParquetImages(src, "train", num_images=14, resize_to=SIZE)
    image, _, _ = source[3]
    with torch.no_grad():
        vector = backbone.eval()((image[None].float() / 255.0 - mean) / std)[0].numpy()
    row = ids.index("row-3")
    np.testing.assert_allclose(np.asarray(table.column(contract.EMBED_VECTOR)[row].as_py()), vector, atol=ATOL)


def test_an_output_that_is_not_an_embeddings_dataset_is_never_replaced(tmp_path):
    staging, output = tmp_path / "new.partial", tmp_path / "precious"
    staging.mkdir()
    pq.write_table(pa.table({"id": ["a"]}), staging / "part.parquet")
    output.mkdir()
    (output / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not an embeddings dataset"):
        replace_output(str(staging), str(output))
    assert (output / "thesis.tex").read_text() == "years of work"
    (output / "thesis.tex").unlink()
    pq.write_table(pa.table({"x": [1]}), output / "other.parquet")  # Parquet, but not written by an embed job
    with pytest.raises(ValueError, match="not an embeddings dataset"):
        replace_output(str(staging), str(output))
