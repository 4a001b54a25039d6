"""docs/job-specs.md: every field of every job kind with its type, default, bounds and description,
generated from the spec models, so the page says what the code accepts.

    python -m leoclr_core.spec.reference            rewrite docs/job-specs.md
    python -m leoclr_core.spec.reference --check    exit 1 if docs/job-specs.md is not the generated text

Types and bounds come from the models' JSON schema (the one the API's OpenAPI document carries). A
field's description is its `Field(description=...)` and the comment written beside or right above it
in models.py: the reason a field exists is kept where the field is defined, and read from there.
Torch-free, like the models.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import re
import sys
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from leoclr_core.spec import models
from leoclr_core.spec.models import EmbedSpec, EvaluateSpec, PretrainSpec, TuneSpec

DOC = Path(__file__).resolve().parents[2] / "docs" / "job-specs.md"
KIND_MODELS: dict[str, type[BaseModel]] = {
    "pretrain": PretrainSpec, "evaluate": EvaluateSpec, "tune": TuneSpec, "embed": EmbedSpec,
}


@dataclass(frozen=True)
class Row:
    name: str
    type: str
    default: str
    bounds: str
    description: str


@cache
def _source() -> tuple[ast.Module, list[str], dict[int, str]]:
    """models.py parsed, its lines, and its comments by line number."""
    source = inspect.getsource(models)
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    return ast.parse(source), source.splitlines(), comments


@cache
def _field_comments(cls_name: str) -> dict[str, str]:
    """The comments beside each field of a class in models.py, after the comment lines right above it."""
    tree, lines, comments = _source()
    found: dict[str, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name == cls_name):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line >= 1 and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            last = stmt.end_lineno or stmt.lineno
            beside = [comments[n] for n in range(stmt.lineno, last + 1) if n in comments]
            text = " ".join(above + beside)
            if text:
                found[stmt.target.id] = text
    return found


def _num(value: Any) -> str:
    return json.dumps(value)


def _bounds(schema: dict[str, Any]) -> str:
    parts = []
    if "minimum" in schema:
        parts.append(f"≥ {_num(schema['minimum'])}")
    if "exclusiveMinimum" in schema:
        parts.append(f"> {_num(schema['exclusiveMinimum'])}")
    if "maximum" in schema:
        parts.append(f"≤ {_num(schema['maximum'])}")
    if "exclusiveMaximum" in schema:
        parts.append(f"< {_num(schema['exclusiveMaximum'])}")
    if "maxItems" in schema and "prefixItems" not in schema:
        parts.append(f"≤ {schema['maxItems']} items")
    return ", ".join(parts)


class _Page:
    """Walks the kinds' schemas; each section model gets one table, named by the path it first appears at."""

    def __init__(self) -> None:
        self.sections: dict[str, tuple[str, type[BaseModel]]] = {}  # class name -> (path, class)
        self.order: list[str] = []

    def section(self, path: str, cls: type[BaseModel]) -> str:
        if cls.__name__ not in self.sections:
            self.sections[cls.__name__] = (path, cls)
            self.order.append(cls.__name__)
        return self.sections[cls.__name__][0]

    def type_of(self, path: str, schema: dict[str, Any]) -> tuple[str, str]:
        """(type, bounds) of one field's schema."""
        options = schema.get("anyOf", [schema])
        shown = [o for o in options if o.get("type") != "null"]
        nullable = len(shown) < len(options)
        types, bounds = [], []
        for option in shown:
            if "$ref" in option:
                name = option["$ref"].rsplit("/", 1)[-1]
                if name in KIND_MODELS_BY_CLASS:
                    types.append(f"a `{KIND_MODELS_BY_CLASS[name]}` spec")
                else:
                    types.append(_section_link(self.section(path, getattr(models, name))))
            elif "const" in option:
                types.append(f"`{option['const']}`")
            elif "enum" in option:
                types.append(" \\| ".join(f"`{v}`" for v in option["enum"]))
            elif option.get("type") == "object" and isinstance(option.get("additionalProperties"), dict):
                inner = getattr(models, option["additionalProperties"]["$ref"].rsplit("/", 1)[-1])
                types.append(f"map: spec path → {_section_link(self.section(path + '.<field>', inner))}")
            elif option.get("type") == "array" and "prefixItems" in option:
                items = option["prefixItems"]
                types.append(f"{len(items)} × {items[0]['type']}")
                each = {_bounds(i) for i in items}
                if each != {""}:
                    bounds.append("each " + " / ".join(sorted(each)))
            elif option.get("type") == "array":
                types.append("list")
                bounds.append(_bounds(option))
            else:
                types.append(option.get("type", "any"))
                bounds.append(_bounds(option))
        kind = " or ".join(types) + (" or null" if nullable else "")
        return kind, ", ".join(b for b in bounds if b)

    def rows(self, cls: type[BaseModel], prefix: str) -> list[Row]:
        schema = cls.model_json_schema()
        comments = _field_comments(cls.__name__)
        for base in cls.__mro__[1:]:
            if isinstance(base, type) and issubclass(base, BaseModel) and base is not BaseModel:
                comments = {**_field_comments(base.__name__), **comments}
        out = []
        for name, field in cls.model_fields.items():
            path = f"{prefix}.{name}" if prefix else name
            type_, bounds = self.type_of(path, schema["properties"][name])
            if field.is_required():
                default = "required"
            elif isinstance(field.default, BaseModel):
                default = "its fields' defaults"
            else:
                default = f"`{json.dumps(field.default)}`"
            text = field.description or comments.get(name, "")
            out.append(Row(name, type_, default, bounds, text))
        return out


KIND_MODELS_BY_CLASS = {cls.__name__: kind for kind, cls in KIND_MODELS.items()}


def _cell(text: str) -> str:
    """One line of Markdown: pipes would end the cell, and `<name>` would be read as HTML."""
    text = " ".join(text.split())
    for char in "|<>":
        text = text.replace(char, "\\" + char)
    return text


def _section_link(path: str) -> str:
    """A link to a section's table, by the anchor GitHub gives its heading."""
    anchor = re.sub(r"[^\w\- ]", "", path.lower()).replace(" ", "-")
    return f"section [`{path}`](#{anchor})"


def _table(rows: list[Row]) -> str:
    lines = ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
    for r in rows:
        bounds = r.bounds or "—"
        lines.append(f"| `{r.name}` | {r.type} | {r.default} | {bounds} | {_cell(r.description)} |")
    return "\n".join(lines) + "\n"


HEADER = """\
# Job specs

Every field of every job kind, generated by `python -m leoclr_core.spec.reference` from the spec
models (`leoclr_core/spec/models.py`); do not edit by hand: `python -m leoclr_core.spec.reference --check`
and `tests/unit/test_docs.py` fail when this page is stale.

A spec is YAML or JSON; `kind` selects the model (over REST the body of `POST /v1/jobs` is the same
union on `kind`, so `/openapi.json` carries every field below with its bounds). Unknown fields are
refused, and so is any value out of bounds, with the field's path and the reason:

```
$ leoclr pretrain configs/demo.yaml --set optim.lr=-1 --set model.backbone=vgg
error: invalid job spec:
  model.backbone: Input should be 'tiny', 'resnet18', 'resnet34' or 'resnet50'
  optim.lr: Input should be greater than 0
```

Every number must be finite: NaN and Infinity (which JSON parsers such as Python's accept) are
refused, in search spaces too. Every number that sizes work has an upper bound far above any real
run (ImageNet-21k-scale data, thousands of epochs, thousands of workers), so a bound refuses only a
spec that could never finish; why each bound was chosen is said where it is defined, at the top of
`leoclr_core/spec/models.py`. Checks across fields are in the descriptions. Ready specs are in
`configs/`.
"""


def render() -> str:
    page = _Page()
    parts = [HEADER]
    for kind, cls in KIND_MODELS.items():
        doc = " ".join((cls.__doc__ or "").split())
        parts.append(f"## `{kind}`\n")
        if doc:
            parts.append(doc + "\n")
        parts.append(_table(page.rows(cls, "")))
    parts.append("## Sections\n")
    pending = list(page.order)
    while pending:  # a section's own sections follow it
        path, cls = page.sections[pending.pop(0)]
        before = len(page.order)
        table = _table(page.rows(cls, path))
        pending[:0] = page.order[before:]
        doc = " ".join((cls.__doc__ or "").split())
        parts.append(f"### `{path}`\n")
        if doc:
            parts.append(doc + "\n")
        parts.append(table)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    current = DOC.read_text() if DOC.exists() else None
    if "--check" in args:
        if current != text:
            print(f"{DOC} is stale; run python -m leoclr_core.spec.reference", file=sys.stderr)
            return 1
        return 0
    if current != text:
        DOC.write_text(text)
        print(f"rewrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
