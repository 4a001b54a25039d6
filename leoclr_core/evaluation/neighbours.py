"""Nearest neighbours in an embed job's output, and contact sheets of them: what a person looks at
before promoting an encoder (does it group by shape, or by colour?).

The collection is the Parquet dataset an embed job writes (contract.EMBED_*: one row per image, its
id, label and embedding; the encoder URI and the data spec in every file's schema metadata). A
search streams it file by file, batch by batch, keeping only the running top k per query, so a
collection larger than memory can be searched. Images are found again from the data spec: by path
under the data root (image folders), by row (Parquet, built-in sources).

torch, numpy, pyarrow and PIL only: an encoder from the registry is loaded by the caller (the CLI
passes `tracking.load_encoder`), so this module never imports MLflow.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from leoclr_core.contract import EMBED_ID, EMBED_LABEL, EMBED_META_DATA, EMBED_META_ENCODER, EMBED_VECTOR
from leoclr_core.spec.models import DataSpec

log = logging.getLogger(__name__)

BATCH_ROWS = 65536  # rows scored at once while streaming: (queries x BATCH_ROWS) float32 scores
# Layout of a sheet, in pixels: square tiles, a caption of two lines under each, a gap after the query.
TILE, PAD, CAPTION, GAP, TITLE = 96, 4, 28, 10, 20
# Caption colours: a neighbour of the query's class, of another class, and everything else.
SAME, OTHER, PLAIN = (0, 110, 0), (190, 0, 0), (40, 40, 40)
REGISTRY_SCHEMES = ("models:/", "runs:/")
# An encoder from the registry normalises its own input: it is fed [0, 1] images as they are.
IDENTITY_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@dataclass
class Embeddings:
    ids: list[str]
    labels: list[int | None]
    vectors: np.ndarray  # float32 (N, D)
    encoder: str
    data: dict


Hit = tuple[str, "int | None", float]  # (id, label, cosine similarity)


# ---------------------------------------------------------------- reading an embed job's output
@dataclass
class _Collection:
    """An embed output on disk: its files (in order), their filesystem, and what the metadata says."""

    where: str
    fs: object  # pyarrow.fs.FileSystem
    files: list[str]
    encoder: str
    data: dict
    dim: int

    def batches(self, columns: Sequence[str]) -> Iterator:
        import pyarrow.parquet as pq

        for f in self.files:
            with self.fs.open_input_file(f) as handle:  # type: ignore[attr-defined]
                yield from pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS, columns=list(columns))

    def chunks(self) -> Iterator[tuple[list[str], list[int | None], np.ndarray]]:
        for b in self.batches([EMBED_ID, EMBED_LABEL, EMBED_VECTOR]):
            col = b.column(EMBED_VECTOR)
            if col.null_count:
                raise ValueError(f"'{self.where}': {col.null_count} rows have no {EMBED_VECTOR!r}")
            vectors = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            ids, labels = b.column(EMBED_ID).to_pylist(), b.column(EMBED_LABEL).to_pylist()
            yield ids, labels, vectors.reshape(-1, self.dim)


def _open(path: str | Path) -> _Collection:
    """The embed output at `path` (a folder of .parquet files, or one file; local or a URI), checked."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    where = str(path)
    if "://" in where:
        fs, root = pafs.FileSystem.from_uri(where)
    else:
        fs, root = pafs.LocalFileSystem(), str(Path(where).expanduser().resolve())
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"embeddings '{where}' do not exist")
    if info.type == pafs.FileType.File:
        files = [root]
    else:
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        # Writers keep their temporary and marker files under names starting with "." or "_".
        files = sorted(i.path for i in found if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                       and not any(p.startswith((".", "_")) for p in Path(i.path).relative_to(root).parts))
    if not files:
        raise ValueError(f"'{where}' holds no .parquet files: it is not the output of an embed job")
    encoder, data, dim = None, None, None
    for f in files:
        with fs.open_input_file(f) as handle:
            schema = pq.ParquetFile(handle).schema_arrow
        meta = schema.metadata or {}
        missing = [c for c in (EMBED_ID, EMBED_LABEL, EMBED_VECTOR) if c not in schema.names]
        missing += [f"metadata {m}" for m in (EMBED_META_ENCODER, EMBED_META_DATA) if m.encode() not in meta]
        if missing:
            raise ValueError(f"'{f}' is not the output of an embed job: it lacks {', '.join(missing)}")
        vec = schema.field(EMBED_VECTOR).type
        if not (pa.types.is_fixed_size_list(vec) and vec.value_type == pa.float32()):
            raise ValueError(f"'{f}': column {EMBED_VECTOR!r} is {vec}, not fixed_size_list<float32>")
        if dim is not None and vec.list_size != dim:
            raise ValueError(f"'{f}' holds {vec.list_size}-d embeddings, other files of '{where}' {dim}-d")
        enc = meta[EMBED_META_ENCODER.encode()].decode()
        if encoder is not None and enc != encoder:
            raise ValueError(f"'{f}' was embedded by {enc}, other files of '{where}' by {encoder}")
        encoder, dim = enc, vec.list_size
        data = data or json.loads(meta[EMBED_META_DATA.encode()])
    return _Collection(where, fs, files, str(encoder), dict(data or {}), int(dim or 0))


def _chunks(source: str | Path | Embeddings) -> tuple[Iterator[tuple[list[str], list, np.ndarray]], int]:
    """(ids, labels, vectors) chunks of a collection, and its dimension."""
    if isinstance(source, Embeddings):
        vectors = np.asarray(source.vectors, np.float32)
        return iter([(source.ids, source.labels, vectors)]), vectors.shape[1]
    c = _open(source)
    return c.chunks(), c.dim


def load_embeddings(path: str | Path, limit: int | None = None) -> Embeddings:
    """The whole collection (or its first `limit` rows) in memory."""
    c = _open(path)
    ids: list[str] = []
    labels: list[int | None] = []
    parts = [np.zeros((0, c.dim), np.float32)]
    for i, lab, v in c.chunks():
        ids += i
        labels += lab
        parts.append(v)
        if limit is not None and len(ids) >= limit:
            break
    n = len(ids) if limit is None else min(limit, len(ids))
    return Embeddings(ids[:n], labels[:n], np.concatenate(parts)[:n], c.encoder, c.data)


def _find(source: str | Path | Embeddings, wanted: Sequence[str | int]) -> tuple[dict, int, list[str]]:
    """The rows named by id (str) or position in the collection (int): {key: (id, label, vector)},
    with the collection's size and its first ids (for an error message)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = pa.array(sorted({w for w in wanted if isinstance(w, str)}), pa.string())
    positions = np.array(sorted({w for w in wanted if not isinstance(w, str)}), np.int64)
    chunks, _ = _chunks(source)
    found: dict[str | int, tuple[str, int | None, np.ndarray]] = {}
    offset, first = 0, []
    for ids, labels, vectors in chunks:
        first = first or ids[:3]
        hit = pc.is_in(pa.array(ids, pa.string()), value_set=names).to_numpy(zero_copy_only=False)
        at = positions[(positions >= offset) & (positions < offset + len(ids))] - offset
        for j in set(np.nonzero(hit)[0].tolist()) | set(at.tolist()):
            row = (ids[j], labels[j], np.asarray(vectors[j], np.float32))
            for key in (ids[j], offset + j):
                found[key] = row
        offset += len(ids)
    return found, offset, first


def _rows(source: str | Path | Embeddings, wanted: Sequence[str | int]) -> Embeddings:
    """The rows named by id or position, in the order asked; a clear error for one not there."""
    found, n, first = _find(source, wanted)
    missing = [w for w in wanted if w not in found]
    if missing:
        where = "the collection" if isinstance(source, Embeddings) else f"'{source}'"
        raise ValueError(f"no row {missing[0]!r} in {where} ({n} rows; ids look like {first})")
    rows = [found[w] for w in wanted]
    encoder, data = (source.encoder, source.data) if isinstance(source, Embeddings) else _meta(source)
    ids, labels, vectors = zip(*rows)
    return Embeddings(list(ids), list(labels), np.stack(vectors), encoder, data)


def _meta(path: str | Path) -> tuple[str, dict]:
    c = _open(path)
    return c.encoder, c.data


# ---------------------------------------------------------------- search
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _search(source: str | Path | Embeddings, queries: np.ndarray, k: int) -> list[list[Hit]]:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    queries = np.asarray(queries, np.float32)
    chunks, dim = _chunks(source)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}) to match the collection, got {queries.shape}")
    q = _unit(queries)
    n = len(q)
    best_s = np.empty((n, 0), np.float32)
    best_id = np.empty((n, 0), object)
    best_lab = np.empty((n, 0), object)
    for ids, labels, vectors in chunks:
        s = q @ _unit(vectors).T
        # A row bit-identical to a query is the query itself (or an exact copy of it): not a neighbour.
        for qi, rj in zip(*np.nonzero(s >= 1.0 - 1e-3)):
            if np.array_equal(queries[qi], vectors[rj]):
                s[qi, rj] = -np.inf
        top = np.argpartition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k] if s.shape[1] > k else \
            np.broadcast_to(np.arange(s.shape[1]), (n, s.shape[1]))
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        best_id = np.concatenate([best_id, np.asarray(ids, object)[top]], axis=1)
        best_lab = np.concatenate([best_lab, np.asarray(labels, object)[top]], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_id, best_lab = (np.take_along_axis(a, keep, 1) for a in (best_s, best_id, best_lab))
    return [[(str(i), (None if lab is None else int(lab)), float(sc))
             for sc, i, lab in zip(best_s[r], best_id[r], best_lab[r]) if sc != -np.inf] for r in range(n)]


def nearest(path_or_embeddings: str | Path | Embeddings, queries: np.ndarray,
            k: int) -> list[list[tuple[int | str, float]]]:
    """Per query, the `k` rows of highest cosine similarity as (id, score), best first. A row whose
    embedding is bit-identical to the query's (the query itself, when it is a row) is left out."""
    return [[(i, s) for i, _, s in hits] for hits in _search(path_or_embeddings, queries, k)]


def fixed_queries(n_rows: int, count: int = 4, seed: int = 0) -> list[int]:
    """`count` distinct row positions out of `n_rows`, the same for the same arguments (a job's sheet
    shows the same queries on every run, so two encoders' sheets compare)."""
    if n_rows < 1 or count < 1:
        raise ValueError(f"need at least one row and one query, got n_rows={n_rows}, count={count}")
    picks = np.random.default_rng(seed).choice(n_rows, min(count, n_rows), replace=False)
    return sorted(int(i) for i in picks)


# ---------------------------------------------------------------- finding the images again
class ImageLookup:
    """The images of a collection by id, from the data spec its files carry; class names when the
    source has them. Ids: paths under the data root (image folders), `row-<n>` (the n-th image of
    the source's `split`, default train)."""

    def __init__(self, data: dict):
        data = dict(data)
        self.split = data.pop("split", "train")
        self.spec = DataSpec.model_validate(data)
        self._source = None
        self._classes: list[str] | None | bool = False  # False: not looked up yet

    @property
    def classes(self) -> list[str] | None:
        if self._classes is False:
            self._classes = self._find_classes()
        return self._classes  # type: ignore[return-value]

    def _find_classes(self) -> list[str] | None:
        d = self.spec
        if not d.labelled:
            return None
        if d.source == "parquet":
            import pyarrow.dataset as ds

            from leoclr_core.data.parquet import parquet_split_paths

            train = parquet_split_paths(d.path)[0] if "://" not in str(d.path) else d.path
            table = ds.dataset(str(train), format="parquet")
            if not d.label_column or d.label_column not in table.schema.names:
                return None
            return sorted({str(v) for v in table.to_table(columns=[d.label_column]).column(0).to_pylist()})
        if d.source == "imagefolder":
            if "://" in str(d.path):
                return None  # captions then show the label number and the path
            from leoclr_core.data.imagefolder import _class_dirs, split_roots

            root = Path(str(d.path)).expanduser()
            roots = split_roots(root)
            return _class_dirs(roots[0] if roots else root)
        return self._built().classes

    def _built(self):
        if self._source is None:
            from leoclr_core.data import build_source

            self._source = build_source(self.spec, self.split)
        return self._source

    def image(self, id_: str) -> Image.Image:
        d = self.spec
        if d.source == "imagefolder":
            return _open_image(_read_under(str(d.path), id_))
        if not id_.startswith("row-") or not id_[4:].isdigit():
            raise ValueError(f"id {id_!r} of a {d.source} source should be row-<n>")
        n = int(id_[4:])
        if d.source == "parquet":
            import pyarrow.dataset as ds

            from leoclr_core.data.parquet import cell_bytes, parquet_split_paths

            where = d.path if "://" in str(d.path) else parquet_split_paths(d.path)[self.split != "train"]
            if where is None:
                raise ValueError(f"parquet source '{d.path}' has no {self.split} split")
            cell = ds.dataset(str(where), format="parquet").take([n], columns=[d.image_column]).column(0)[0]
            return _open_image(cell_bytes(cell.as_py()))
        return tensor_image(self._built()[n][0])

    def caption(self, id_: str, label: int | None) -> str:
        names = self.classes
        if label is not None and names is not None and 0 <= label < len(names):
            return names[label]
        return id_ if label is None else f"{label} {id_}"


class SourceLookup(ImageLookup):
    """Images by `row-<n>` from an image source already in hand (an evaluate job's test split)."""

    def __init__(self, source):
        self._source, self._classes, self.spec, self.split = source, source.classes, None, source.split

    def image(self, id_: str) -> Image.Image:
        return tensor_image(self._source[int(id_.removeprefix("row-"))][0])


def _read_under(root: str, rel: str) -> bytes:
    """The file `rel` under `root` (a folder or a URI); ids never reach outside the root."""
    if "://" in root:
        import pyarrow.fs as pafs

        fs, base = pafs.FileSystem.from_uri(root)
        with fs.open_input_file(f"{base.rstrip('/')}/{rel}") as f:
            return f.read()
    base = Path(root).expanduser().resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"id {rel!r} points outside the data root '{base}'")
    return path.read_bytes()


def _open_image(raw: bytes) -> Image.Image:
    with Image.open(io.BytesIO(raw)) as im:
        return im.convert("RGB")


def tensor_image(image: torch.Tensor) -> Image.Image:
    """A uint8 (3, H, W) tensor as a PIL image."""
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


# ---------------------------------------------------------------- drawing
def sheet_size(rows: int, k: int, title: bool = True) -> tuple[int, int]:
    """(width, height) of a sheet of `rows` queries and `k` neighbours each."""
    return (PAD + (k + 1) * (TILE + PAD) + GAP,
            (TITLE if title else 0) + PAD + rows * (TILE + CAPTION + PAD))


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(image: Image.Image) -> Image.Image:
    # Small images are enlarged without smoothing, so a 32-pixel image shows its real pixels.
    method = Image.Resampling.NEAREST if max(image.size) < TILE else Image.Resampling.LANCZOS
    return ImageOps.contain(image.convert("RGB"), (TILE, TILE), method=method)


Tile = tuple[Image.Image | None, str, str, tuple[int, int, int]]  # image, caption lines, colour


def _render(rows: list[list[Tile]], k: int, out: Path, title: str) -> Path:
    width, height = sheet_size(len(rows), k, bool(title))
    sheet = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(sheet), _font()
    y = PAD
    if title:
        draw.text((PAD, 4), title[:160], fill=PLAIN, font=font)
        y += TITLE
    for row in rows:
        for col, (image, line1, line2, colour) in enumerate(row[: k + 1]):
            x = PAD + col * (TILE + PAD) + (GAP if col else 0)
            if image is None:
                draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], fill=(200, 200, 200))
                draw.text((x + 4, y + TILE // 2 - 6), "image not found", fill=PLAIN, font=font)
            else:
                fitted = _fit(image)
                sheet.paste(fitted, (x + (TILE - fitted.width) // 2, y + (TILE - fitted.height) // 2))
            draw.text((x, y + TILE + 2), line1[:18], fill=colour, font=font)
            draw.text((x, y + TILE + 14), line2[:18], fill=colour, font=font)
        y += TILE + CAPTION + PAD
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def contact_sheet(query: Image.Image, neighbours: list[tuple[Image.Image, str, float]], out: Path,
                  title: str = "") -> Path:
    """A PNG of one row: the query, then each neighbour with its label (or id) and score."""
    row: list[Tile] = [(query, "query", "", PLAIN)]
    row += [(im, label, f"{score:.3f}", PLAIN) for im, label, score in neighbours]
    return _render([row], max(len(neighbours), 1), out, title)


def _found_again(lookup: ImageLookup, id_: str) -> Image.Image | None:
    try:
        return lookup.image(id_)
    except (OSError, ValueError, IndexError) as exc:  # moved or deleted since the embed job: a grey tile
        log.warning("image %s not found again: %s", id_, exc)
        return None


def _row(lookup: ImageLookup, query: Image.Image | None, caption: str, label: int | None,
         hits: list[Hit]) -> list[Tile]:
    tiles: list[Tile] = [(query, "query", caption, PLAIN)]
    for id_, lab, score in hits:
        colour = PLAIN if label is None or lab is None else (SAME if lab == label else OTHER)
        tiles.append((_found_again(lookup, id_), lookup.caption(id_, lab), f"{score:.3f}", colour))
    return tiles


def _title(encoder: str, k: int) -> str:
    return f"{k} nearest neighbours (cosine) - encoder {encoder}"


def sheet_for_queries(embeddings_path: str | Path | Embeddings, query_ids: list[str | int], k: int, out: Path,
                      *, lookup: ImageLookup | None = None) -> Path:
    """One PNG, a row per query: the query (a row of the collection, by id or by position) and its
    `k` nearest other rows. Captions: class names when the source has them, else ids; green when
    a neighbour has the query's label, red when not. `lookup`: where the images are (default:
    found again through the data spec in the files' metadata)."""
    if not query_ids:
        raise ValueError("no queries given")
    q = _rows(embeddings_path, query_ids)
    hits = _search(embeddings_path, q.vectors, k)
    lookup = lookup or ImageLookup(q.data)
    rows = []
    for id_, label, found in zip(q.ids, q.labels, hits):
        rows.append(_row(lookup, _found_again(lookup, id_), lookup.caption(id_, label), label, found))
    return _render(rows, k, out, _title(q.encoder, k))


# ---------------------------------------------------------------- queries that are image files
def query_encoder(uri: str, data: DataSpec,
                  load_registered: Callable[[str], torch.nn.Module] | None = None,
                  ) -> Callable[[list[Image.Image]], np.ndarray]:
    """A function embedding images as the encoder `uri` does (the files' EMBED_META_ENCODER): whole
    image square-resized to the data's image size, normalised as the encoder expects.
    `load_registered` loads models:/ and runs:/ URIs (the tracking layer's `load_encoder`)."""
    from leoclr_core.evaluation.probes import prepare_images

    if uri.startswith(REGISTRY_SCHEMES):
        if load_registered is None:
            raise ValueError(f"encoder {uri} is in the registry: loading it needs the tracking layer")
        encoder, (mean, std) = load_registered(uri), IDENTITY_NORM
    else:
        from leoclr_core.training.checkpoint import load_backbone

        encoder, _ = load_backbone(uri)
        mean, std = data.mean, data.std
    encoder.eval()

    @torch.no_grad()
    def embed(images: list[Image.Image]) -> np.ndarray:
        # One at a time: query files have any size, and are few.
        pixels = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None] for im in images]
        return np.concatenate([encoder(prepare_images(x, data.image_size, mean, std)).float().numpy()
                               for x in pixels])

    return embed


def sheet_for(embeddings_path: str | Path, queries: list[str], k: int, out: Path,
              load_registered: Callable[[str], torch.nn.Module] | None = None) -> Path:
    """`leoclr neighbours`: each query a row id of the collection or, failing that, an image file
    (embedded with the collection's encoder). One row per query."""
    if not queries:
        raise ValueError("no queries given")
    c = _open(embeddings_path)
    found, _, _ = _find(embeddings_path, queries)
    for f in queries:
        if f not in found and not Path(f).is_file():
            raise ValueError(f"query {f!r} is neither a row id of '{embeddings_path}' nor an image file")
    lookup = ImageLookup(c.data)
    embed = None
    heads: list[tuple[Image.Image | None, str, int | None]] = []  # each query's tile: image, caption, label
    vectors = []
    for qq in queries:
        if qq in found:
            id_, label, vector = found[qq]
            heads.append((_found_again(lookup, id_), lookup.caption(id_, label), label))
        else:
            try:
                image = _open_image(Path(qq).read_bytes())
            except OSError as exc:
                raise ValueError(f"query {qq!r} is not a readable image: {exc}") from None
            embed = embed or query_encoder(c.encoder, lookup.spec, load_registered)
            vector = embed([image])[0]
            heads.append((image, Path(qq).name, None))
        vectors.append(vector)
    hits = _search(embeddings_path, np.stack(vectors), k)
    rows = [_row(lookup, *head, near) for head, near in zip(heads, hits)]
    return _render(rows, k, out, _title(c.encoder, k))
