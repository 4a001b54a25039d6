"""The bounds of every number in a job spec, read from the spec models' JSON schema (the one the API's
OpenAPI document carries), so a test can hold that every number that sizes work has an upper bound
there, not only in a validator. The bounds are shown to readers in docs/job-specs.md
(`python -m leoclr_core.spec.reference`).

Torch-free, like the models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from leoclr_core.spec.models import EvaluateSpec, PretrainSpec, TuneSpec

MODELS = {"pretrain": PretrainSpec, "evaluate": EvaluateSpec, "tune": TuneSpec}
# A search range's ends have no bound of their own: each is validated as a value of the field searched.
UNBOUNDED_BY_DESIGN = frozenset({"space.<field>.low", "space.<field>.high"})


@dataclass(frozen=True)
class Limit:
    kind: str
    path: str
    type: str
    lower: str  # e.g. "≥ 0", "> 0"; "" when unbounded
    upper: str
    default: str
    note: str


def _num(value: Any) -> str:
    return json.dumps(value)


def _bounds(schema: dict[str, Any]) -> tuple[str, str]:
    lower = (f"≥ {_num(schema['minimum'])}" if "minimum" in schema
             else f"> {_num(schema['exclusiveMinimum'])}" if "exclusiveMinimum" in schema else "")
    upper = (f"≤ {_num(schema['maximum'])}" if "maximum" in schema
             else f"< {_num(schema['exclusiveMaximum'])}" if "exclusiveMaximum" in schema else "")
    return lower, upper


def limits(kind: str) -> list[Limit]:
    """One row per number (or tuple of numbers, or bounded list) in a `kind` job spec, in field order.
    A nested job spec (a search's `base`) is not repeated: its own kind's rows apply."""
    schema = MODELS[kind].model_json_schema()
    defs = schema.get("$defs", {})
    rows: list[Limit] = []

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        return defs[ref.rsplit("/", 1)[-1]] if ref else node

    def walk(path: str, prop: dict[str, Any], default: Any, required: bool) -> None:
        options = [o for o in prop.get("anyOf", [prop]) if o.get("type") != "null"]
        nullable = len(options) < len(prop.get("anyOf", [prop]))
        if len(options) != 1:
            return  # a union of several shapes: none in the specs holds a number
        node = resolve(options[0])
        if "properties" in node:
            if path and "kind" in node["properties"]:
                return  # a job spec inside a job spec (tune's base)
            need = set(node.get("required", ()))
            for name, child in node["properties"].items():
                walk(f"{path}.{name}" if path else name, child, child.get("default"), name in need)
            return
        if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
            walk(f"{path}.<field>", node["additionalProperties"], None, True)
            return
        kind_of = node.get("type")
        if kind_of in ("integer", "number"):
            type_, (lower, upper) = kind_of, _bounds(node)
        elif kind_of == "array" and "prefixItems" in node:
            items = node["prefixItems"]
            if any(i.get("type") not in ("integer", "number") for i in items):
                return
            each = {_bounds(i) for i in items}
            if len(each) != 1:
                raise ValueError(f"{kind}: {path}: tuple items with different bounds are not rendered yet")
            (lower, upper), = each
            type_ = f"{len(items)} × {items[0]['type']}"
            lower, upper = (f"each {b}" if b else "" for b in (lower, upper))
        elif kind_of == "array" and "maxItems" in node:
            type_, lower, upper = "list", "", f"≤ {node['maxItems']} items"
        else:
            return
        if nullable:
            type_ += " or null"
        shown = "required" if required and default is None else f"`{json.dumps(default)}`"
        rows.append(Limit(kind, path, type_, lower, upper, shown, prop.get("description", "")))

    walk("", schema, None, False)
    return rows
