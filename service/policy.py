"""What a spec submitted over the API may touch on the cluster's file systems.

A job runs with the service's identity, so a spec from a client must not read or write wherever
it likes: local data paths must resolve (symlinks and `..` included) under a configured data
root, outputs under the data directory, encoders come from the registry or a run. Object-store
URIs (s3://, gs://) are left to the store's own permissions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REMOTE = ("s3://", "gs://")
MODEL_SCHEMES = ("models:/", "runs:/")


class PolicyError(ValueError):
    pass


def _inside(path: str, roots: list[Path], field: str, what: str) -> None:
    if path.startswith(REMOTE):
        return
    if "://" in path:
        raise PolicyError(f"{field}: {path!r} has a scheme this service does not read ({', '.join(REMOTE)} or a path)")
    if "\0" in path:  # Path.resolve would raise ValueError: a 500 instead of the 422 it deserves
        raise PolicyError(f"{field}: contains a NUL character")
    resolved = Path(path).expanduser().resolve()
    if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
        raise PolicyError(f"{field}: {path!r} is outside the {what} ({', '.join(map(str, roots))})")


def check_spec(spec: Any, data_roots: list[Path], home: Path) -> None:
    """Raise PolicyError naming the first field that reaches outside what the service allows."""
    if spec.kind == "tune":  # its base spec, and every value a search may give a trial
        if spec.output_dir:
            _inside(spec.output_dir, [home.expanduser().resolve()], "output_dir", "service's data directory")
        check_spec(spec.base, data_roots, home)
        for path, dim in spec.space.items():
            for value in dim.samples():
                try:
                    check_spec(spec.trial_spec({path: value}), data_roots, home)
                except PolicyError as exc:
                    raise PolicyError(f"space.{path}: {exc}") from None
        return
    roots = [r.expanduser().resolve() for r in data_roots]
    home = home.expanduser().resolve()
    if spec.data.path:
        _inside(spec.data.path, roots, "data.path", "data roots (LEOCLR_DATA_ROOTS)")
    if spec.output_dir:
        _inside(spec.output_dir, [home], "output_dir", "service's data directory")
    checkpoint = getattr(spec, "checkpoint", None)
    if checkpoint is not None and getattr(checkpoint, "storage_path", None):
        _inside(checkpoint.storage_path, [home], "checkpoint.storage_path", "service's data directory")
    encoder = getattr(spec, "encoder", None)
    if encoder is not None:
        if encoder.checkpoint:
            _inside(encoder.checkpoint, [*roots, home], "encoder.checkpoint", "data roots or the data directory")
        if encoder.model_uri and not encoder.model_uri.startswith(MODEL_SCHEMES):
            raise PolicyError(f"encoder.model_uri: {encoder.model_uri!r} must be a models:/ or runs:/ URI")
