"""The job spec, torch-free so the service imports it: one pydantic model per job kind (`models`), the
bounds a spec may ask for (`limits`), and the Ray resources a spec needs (`resources`)."""

from leoclr_core.spec.models import (
    KINDS,
    EmbedSpec,
    EvaluateSpec,
    PretrainSpec,
    SpecError,
    TuneSpec,
    load_spec,
    parse_spec,
)

__all__ = ["KINDS", "EmbedSpec", "EvaluateSpec", "PretrainSpec", "SpecError", "TuneSpec", "load_spec", "parse_spec"]
