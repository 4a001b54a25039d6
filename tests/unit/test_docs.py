"""The documentation a user reads: generated pages match the code, the README stays a front page, and
every relative link leads somewhere."""

import re
from pathlib import Path

import pytest

from leoclr_core.spec import reference
from service import envdoc

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
MAX_README_LINES = 150

# A commit hash as people paste them: 7-40 hex digits with both a letter and a digit, standing alone
# (one of digits only reads as a number, so it is caught only after the word "commit").
HEX = re.compile(r"(?<![\w./-])[0-9a-f]{7,40}(?![\w/-])")
AFTER_COMMIT = re.compile(r"\bcommits?\s+([0-9a-f]{7,40})\b", re.IGNORECASE)
TMP_PATH = re.compile(r"(?<![\w.$])/tmp\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# A file of this repository named in running text or a command: `service/envdoc.py`, python -m bench.engine
REPO_PATH = re.compile(r"`((?:leoclr_core|service|bench|tests|configs|deploy|docker)/[\w./-]*\w/?)`")
MODULE = re.compile(r"python3? -m ((?:leoclr_core|service|bench)(?:\.\w+)*)")
UP_PATH = re.compile(r"`(\.\./[^`\s]*)`")  # a path written out rather than linked, e.g. `../shared/x.md`


def _hashes(text: str) -> list[str]:
    mixed = [m for m in HEX.findall(text) if re.search(r"[a-f]", m) and re.search(r"[0-9]", m)]
    return sorted(set(mixed) | set(AFTER_COMMIT.findall(text)))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*$", page.read_text(), flags=re.MULTILINE)}


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_job_specs_page_is_generated_from_the_spec_models():
    assert reference.DOC == ROOT / "docs" / "job-specs.md"
    assert reference.DOC.read_text() == reference.render(), \
        "docs/job-specs.md is stale: run python -m leoclr_core.spec.reference"


def test_job_specs_page_lists_every_field_of_every_kind():
    text = reference.render()
    for kind, model in reference.KIND_MODELS.items():
        assert f"## `{kind}`" in text
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{kind}.{name} is missing from docs/job-specs.md"
    # bounds and defaults come from the schema, not from prose
    assert "| `epochs` | integer | `20` | > 0, ≤ 100000 |" in text
    assert "| `decode` | `auto` \\| `cpu` \\| `gpu` | `\"auto\"` |" in text


def test_configuration_page_is_generated_from_the_settings():
    assert envdoc.DOC == ROOT / "docs" / "configuration.md"
    assert envdoc.table_in(envdoc.DOC.read_text()) == envdoc.env_table(), \
        "docs/configuration.md is stale: run python -m service.envdoc"


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md: {len(lines)} lines; reference material goes to docs/"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_no_commit_hash_or_tmp_path_in_a_page(page):
    text = page.read_text()
    assert not _hashes(text), f"{_name(page)} names commits: {_hashes(text)}"
    assert not TMP_PATH.search(text), f"{_name(page)} names a /tmp path"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_leads_to_a_file_in_the_repository(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(ROOT) or not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    written = UP_PATH.findall(page.read_text())
    outside = [p for p in written if not (page.parent / p).resolve().is_relative_to(ROOT)]
    assert not broken, f"{_name(page)}: links to nothing: {broken}"
    assert not outside, f"{_name(page)}: names files outside the repository: {outside}"


def _module_exists(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").exists() or (base / "__main__.py").exists()


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_file_and_module_a_page_names_exists(page):
    # Modules move; a page that names one by its path must move with it.
    text = page.read_text()
    missing = [p for p in REPO_PATH.findall(text) if not (ROOT / p).exists()]
    missing += [m for m in MODULE.findall(text) if not _module_exists(m)]
    assert not missing, f"{_name(page)} names what is not in the repository: {missing}"


def test_the_checks_catch_what_they_are_for():
    # The notebook this README replaced: commit hashes, /tmp folders, a link outside the repository.
    assert _hashes("at commit a2725f8; d510d1e and commit 9111748") == ["9111748", "a2725f8", "d510d1e"]
    assert not _hashes("1048576 bytes, 4294967295, deadbeef, sha-e2e")
    assert TMP_PATH.search("data directory `/tmp/mr`")
    assert not TMP_PATH.search("$OUT/matrix and a.tmp/x")
    assert _slug("## `tune`".lstrip("# ")) == "tune" and _slug("A search through the service") == \
        "a-search-through-the-service"
    assert REPO_PATH.findall("`service/app.py` and `leoclr_core/distributed/` and `a/b`") == \
        ["service/app.py", "leoclr_core/distributed/"]
    assert MODULE.findall("python -m bench.engine SPEC; python3 -m leoclr_core.spec.reference") == \
        ["bench.engine", "leoclr_core.spec.reference"]
    assert not _module_exists("leoclr_core.spec.nowhere") and _module_exists("leoclr_core.cli")
    assert UP_PATH.findall("see `../shared/LEOCLR.md`") == ["../shared/LEOCLR.md"]
    assert LINK.findall("[x](../shared/LEOCLR.md) ![p](a.png) [w](https://x.org)") == \
        ["../shared/LEOCLR.md", "a.png", "https://x.org"]
