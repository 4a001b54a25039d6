"""The REST client's settings: the variables a user sets for `leoclr submit|status|logs|cancel|models`."""

import ast
from pathlib import Path

from leoclr_core.cli.client import ApiClient, ClientSettings

CORE = Path(__file__).resolve().parents[2] / "leoclr_core"


def test_the_client_reads_the_api_address_and_token_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LEOCLR_API_URL", "http://api.example:8080/")
    monkeypatch.setenv("LEOCLR_API_TOKEN", "s3cret")
    monkeypatch.setenv("LEOCLR_DATA_DIR", str(tmp_path))
    client = ApiClient()
    assert client.url == "http://api.example:8080"
    assert client.http.headers["Authorization"] == "Bearer s3cret"


def test_without_a_token_variable_the_client_uses_the_token_the_service_wrote(tmp_path, monkeypatch):
    monkeypatch.delenv("LEOCLR_API_TOKEN", raising=False)
    monkeypatch.delenv("LEOCLR_API_URL", raising=False)
    monkeypatch.setenv("LEOCLR_DATA_DIR", str(tmp_path))
    (tmp_path / "api-token").write_text("from-the-file\n")
    s = ClientSettings()
    assert s.token_file == tmp_path.resolve() / "api-token" and s.api_url == "http://127.0.0.1:8000"
    assert ApiClient(settings=s).http.headers["Authorization"] == "Bearer from-the-file"


def test_the_core_never_imports_the_service():
    """Not even inside a function: the service depends on the core; `serve` comes in through an entry point."""
    found = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.relative_to(CORE)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "service"]
    assert found == []
