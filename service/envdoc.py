"""The table of environment variables in docs/configuration.md, generated from the settings classes.

Every setting is a field of `ServiceSettings` (which extends the client commands' `ClientSettings`,
which extends the training side's `CoreSettings`), with its variable's name as the alias and a
description; the table is made from those fields, so it lists what the code reads, with the
defaults the code has.

    python -m service.envdoc            rewrite the table between the markers in docs/configuration.md
    python -m service.envdoc --check    exit 1 if the table there is not the generated one
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import AliasChoices
from pydantic.fields import FieldInfo

from service.settings import ServiceSettings

START, END = "<!-- env-table:start -->", "<!-- env-table:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def variable_names(field: FieldInfo) -> list[str]:
    """The environment variables a settings field is read from."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    return [alias] if isinstance(alias, str) else []


def _cell(text: str) -> str:
    """One line of Markdown: pipes would end the cell, and `<data dir>` would be read as HTML."""
    text = " ".join(text.split())
    for char in "|<>":
        text = text.replace(char, "\\" + char)
    return text


def env_table() -> str:
    rows = ["| variable | default | description |", "|---|---|---|"]
    for name, field in ServiceSettings.model_fields.items():
        names = variable_names(field)
        if not names or not field.description:
            raise ValueError(f"ServiceSettings.{name} needs an environment variable alias and a description")
        default = "unset" if field.default is None else f"`{field.default}`"
        rows.append(f"| {', '.join(f'`{n}`' for n in names)} | {default} | {_cell(field.description)} |")
    return "\n".join(rows)


def table_in(text: str) -> str:
    """The text between the markers (ValueError if they are missing or out of order)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {START} ... {END} section")
    return text[start + len(START):end].strip()


def with_table(text: str) -> str:
    table_in(text)  # the markers must be there
    start, end = text.index(START) + len(START), text.index(END)
    return f"{text[:start]}\n{env_table()}\n{text[end:]}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = DOC.read_text()
    if "--check" in args:
        if table_in(text) != env_table():
            print(f"{DOC}: the environment table is stale; run python -m service.envdoc", file=sys.stderr)
            return 1
        return 0
    updated = with_table(text)
    if updated != text:
        DOC.write_text(updated)
        print(f"rewrote the environment table in {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
