"""Neighbour search over an embed job's output and contact sheets (leoclr_core.evaluation.neighbours),
`leoclr neighbours`, and the evaluate job's sheet. Embed outputs are written here as the embed job
writes them (contract.EMBED_*), over the synthetic source so images are found again by row."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from leoclr_core.cli import app
from leoclr_core.contract import EMBED_ID, EMBED_LABEL, EMBED_META_DATA, EMBED_META_ENCODER, EMBED_VECTOR
from leoclr_core.data import CLASS_NAMES, build_source
from leoclr_core.evaluation import neighbours as nb
from leoclr_core.nn.model import build_backbone
from leoclr_core.spec.models import DataSpec, ModelSpec, parse_spec
from leoclr_core.training.checkpoint import save_encoder

runner = CliRunner()
DATA = DataSpec(num_images=40, num_test_images=20, image_size=16,
                synthetic={"source_size": 32, "object_size": (12, 20)})


def write_embeddings(folder, ids, labels, vectors, *, encoder="models:/enc@champion", data=DATA, files=1):
    """An embed output: `files` Parquet files splitting the rows in order, each with the metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {EMBED_META_ENCODER: encoder, EMBED_META_DATA: json.dumps(data.model_dump(mode="json"))}
    cuts = np.array_split(np.arange(len(ids)), files)
    for n, rows in enumerate(cuts):
        table = pa.table({
            EMBED_ID: pa.array([ids[i] for i in rows], pa.string()),
            EMBED_LABEL: pa.array([labels[i] for i in rows], pa.int64()),
            EMBED_VECTOR: pa.FixedSizeListArray.from_arrays(
                pa.array(vectors[rows].reshape(-1), pa.float32()), vectors.shape[1]),
        }).replace_schema_metadata(meta)
        pq.write_table(table, folder / f"part-{n:03d}.parquet")
    return folder


def brute_force(vectors, queries, k, exclude=()):
    """Reference: every cosine similarity, sorted; rows in `exclude[q]` left out."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    out = []
    for q, row in enumerate(sims):
        order = [j for j in np.argsort(-row, kind="stable") if not exclude or j not in exclude[q]]
        out.append([(f"row-{j}", float(row[j])) for j in order[:k]])
    return out


def assert_same(got, want):
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in want]
    np.testing.assert_allclose([[s for _, s in r] for r in got], [[s for _, s in r] for r in want], atol=1e-5)


@pytest.fixture
def random_rows():
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((257, 24)).astype(np.float32)
    return [f"row-{i}" for i in range(257)], [int(i % 10) for i in range(257)], vectors


def test_nearest_in_memory_matches_a_brute_force_reference(random_rows):
    ids, labels, vectors = random_rows
    queries = np.random.default_rng(4).standard_normal((6, 24)).astype(np.float32)
    emb = nb.Embeddings(ids, labels, vectors, "enc", {})
    assert_same(nb.nearest(emb, queries, 9), brute_force(vectors, queries, 9))


def test_nearest_streams_several_files_in_small_batches(random_rows, tmp_path, monkeypatch):
    ids, labels, vectors = random_rows
    folder = write_embeddings(tmp_path / "emb", ids, labels, vectors, files=4)
    monkeypatch.setattr(nb, "BATCH_ROWS", 10)  # 7 batches per file: the running top k is merged often
    queries = np.random.default_rng(5).standard_normal((5, 24)).astype(np.float32)
    assert_same(nb.nearest(folder, queries, 12), brute_force(vectors, queries, 12))


def test_a_query_that_is_a_row_is_not_its_own_neighbour(random_rows, tmp_path, monkeypatch):
    ids, labels, vectors = random_rows
    folder = write_embeddings(tmp_path / "emb", ids, labels, vectors, files=3)
    monkeypatch.setattr(nb, "BATCH_ROWS", 16)
    rows = [0, 100, 256]
    got = nb.nearest(folder, vectors[rows], 5)
    assert_same(got, brute_force(vectors, vectors[rows], 5, exclude=[{r} for r in rows]))
    assert all(f"row-{r}" not in [i for i, _ in hits] for r, hits in zip(rows, got))


def test_load_embeddings_reads_the_rows_in_order_and_stops_at_the_limit(random_rows, tmp_path):
    ids, labels, vectors = random_rows
    folder = write_embeddings(tmp_path / "emb", ids, labels, vectors, files=3)
    emb = nb.load_embeddings(folder)
    assert emb.ids == ids and emb.labels == labels and emb.encoder == "models:/enc@champion"
    np.testing.assert_array_equal(emb.vectors, vectors)
    assert DataSpec.model_validate(emb.data) == DATA
    assert nb.load_embeddings(folder, limit=100).ids == ids[:100]


def test_fixed_queries_are_distinct_in_range_and_the_same_every_time():
    picks = nb.fixed_queries(50, 4)
    assert picks == nb.fixed_queries(50, 4) and len(set(picks)) == 4 and all(0 <= p < 50 for p in picks)
    assert nb.fixed_queries(2, 4) == [0, 1]
    with pytest.raises(ValueError, match="at least one row"):
        nb.fixed_queries(0)


def tile_centre(row, col, title=True):
    x = nb.PAD + col * (nb.TILE + nb.PAD) + (nb.GAP if col else 0) + nb.TILE // 2
    y = (nb.TITLE if title else 0) + nb.PAD + row * (nb.TILE + nb.CAPTION + nb.PAD) + nb.TILE // 2
    return x, y


def test_a_contact_sheet_has_the_query_then_k_tiles_of_the_expected_size(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    query, *others = [Image.new("RGB", (32, 24), c) for c in colours]
    out = nb.contact_sheet(query, [(im, f"n{i}", 0.9 - i / 10) for i, im in enumerate(others)],
                           tmp_path / "s.png", title="t")
    sheet = Image.open(out)
    assert sheet.format == "PNG" and sheet.size == nb.sheet_size(1, 5)
    assert [sheet.getpixel(tile_centre(0, c)) for c in range(6)] == colours


def test_a_sheet_for_queries_shows_the_source_images_found_again_by_row(tmp_path):
    source = build_source(DATA, "train")
    # Embeddings = the images' own pixels: a row's nearest rows are the images that look most like it.
    vectors = source.images.reshape(len(source), -1).astype(np.float32)
    ids = [f"row-{i}" for i in range(len(source))]
    folder = write_embeddings(tmp_path / "emb", ids, source.labels.tolist(), vectors, files=2)
    out = nb.sheet_for_queries(folder, ["row-7", 3], 4, tmp_path / "sheet.png")
    sheet = Image.open(out)
    assert sheet.size == nb.sheet_size(2, 4)
    hits = nb.nearest(folder, vectors[[7, 3]], 4)
    for r, (query, found) in enumerate(zip([7, 3], hits)):
        shown = [query] + [int(i.removeprefix("row-")) for i, _ in found]
        for c, row in enumerate(shown):  # a 32-pixel image is enlarged 3x without smoothing
            x, y = tile_centre(r, c)
            assert sheet.getpixel((x, y)) == tuple(source.images[row][16, 16]), (r, c)


def test_an_image_lookup_names_classes_of_the_synthetic_source():
    lookup = nb.ImageLookup(DATA.model_dump(mode="json"))
    assert lookup.classes == list(CLASS_NAMES) and lookup.caption("row-1", 2) == "triangle"
    assert lookup.caption("row-1", None) == "row-1"
    with pytest.raises(ValueError, match="row-<n>"):
        lookup.image("cat/1.png")


@pytest.fixture
def tiny_encoder(tmp_path):
    model = ModelSpec(width=4)
    backbone, _ = build_backbone(model)
    torch.manual_seed(0)
    return save_encoder(tmp_path / "enc" / "encoder.pt", backbone.eval(), model)


@pytest.fixture
def embedded(tmp_path, tiny_encoder):
    """An embed output of the synthetic train split by a real (untrained) encoder checkpoint."""
    source = build_source(DATA, "train")
    embed = nb.query_encoder(str(tiny_encoder), DATA)
    vectors = embed([nb.tensor_image(source[i][0]) for i in range(len(source))])
    ids = [f"row-{i}" for i in range(len(source))]
    return write_embeddings(tmp_path / "emb", ids, source.labels.tolist(), vectors, encoder=str(tiny_encoder),
                            files=2), source


def test_the_cli_writes_a_sheet_for_a_row_id_and_for_an_image_file(embedded, tmp_path):
    folder, source = embedded
    image = tmp_path / "q.png"
    nb.tensor_image(source[5][0]).save(image)
    out = tmp_path / "sheet.png"
    result = runner.invoke(app, ["neighbours", str(folder), "--query", "row-12", "--query", str(image),
                                 "-k", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    sheet = Image.open(out)
    assert sheet.size == nb.sheet_size(2, 3)
    assert sheet.getpixel(tile_centre(0, 0)) == tuple(source.images[12][16, 16])
    assert sheet.getpixel(tile_centre(1, 0)) == tuple(source.images[5][16, 16])


def test_the_cli_refuses_an_unknown_row_and_a_folder_that_is_not_an_embed_output(embedded, tmp_path):
    folder, _ = embedded
    result = runner.invoke(app, ["neighbours", str(folder), "-q", "row-999", "-o", str(tmp_path / "s.png")])
    assert result.exit_code == 2
    assert "'row-999' is neither a row id of" in " ".join(result.output.split())
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(pa.table({"image": [b"x"]}), other / "images.parquet")
    result = runner.invoke(app, ["neighbours", str(other), "--query", "row-0"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "is not the output of an embed job: it lacks id, label, embedding" in said
    result = runner.invoke(app, ["neighbours", str(tmp_path / "nowhere"), "--query", "row-0"])
    assert result.exit_code == 2 and "do not exist" in " ".join(result.output.split())
    assert not (tmp_path / "s.png").exists()


def test_an_unknown_row_id_is_named_when_asked_for_by_id(embedded):
    folder, _ = embedded
    with pytest.raises(ValueError, match=r"no row 'row-77' in .* \(40 rows; ids look like \['row-0'"):
        nb.sheet_for_queries(folder, ["row-77"], 3, folder / "x.png")


def test_an_evaluate_job_draws_a_sheet_of_fixed_test_images(tmp_path, tiny_encoder):
    from leoclr_core.evaluation.job import SHEET_K, SHEET_QUERIES, evaluate_job

    spec = parse_spec({"kind": "evaluate", "name": "e", "output_dir": str(tmp_path / "eval"),
                       "encoder": {"checkpoint": str(tiny_encoder)}, "protocol": "knn",
                       "data": DATA.model_dump(mode="json"), "eval": {"knn_k": 5}})
    result = evaluate_job(spec)
    sheet = Image.open(result["neighbours_sheet"])
    assert result["neighbours_sheet"] == str(tmp_path / "eval" / "neighbours.png")
    assert sheet.size == nb.sheet_size(SHEET_QUERIES, SHEET_K)
    test = build_source(DATA, "test")
    for r, row in enumerate(nb.fixed_queries(len(test), SHEET_QUERIES)):
        assert sheet.getpixel(tile_centre(r, 0)) == tuple(test.images[row][16, 16])
    elsewhere = spec.model_copy(update={"output_dir": str(tmp_path / "none")})
    no_outputs = evaluate_job(elsewhere, write_outputs=False)
    assert "neighbours_sheet" not in no_outputs and not (tmp_path / "none").exists()


def test_log_artifact_file_uploads_into_the_named_folder(tmp_path):
    from leoclr_core import tracking
    from leoclr_core.settings import CoreSettings

    settings = CoreSettings(data_dir=str(tmp_path / "data"))
    c = tracking.client(settings)
    run = c.create_run(tracking.ensure_experiment(c, "sheets", settings)).info.run_id
    png = nb.contact_sheet(Image.new("RGB", (8, 8)), [], tmp_path / "neighbours.png")
    tracking.log_artifact_file(run, png, "neighbours", settings=settings)
    assert [a.path for a in c.list_artifacts(run, "neighbours")] == ["neighbours/neighbours.png"]
