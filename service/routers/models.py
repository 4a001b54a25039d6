"""The model registry (MLflow's): registered encoders, their versions and metrics, and aliases."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Any, Iterator

from fastapi import APIRouter, Depends, HTTPException, Path, status

from service.auth import require_token
from service.deps import MlflowTracking
from service.schemas import MODEL_NAME, AliasIn, Model, ModelList, errors
from service.tracking import NotFound, Unavailable

ModelName = Annotated[str, Path(pattern=MODEL_NAME, description="A registered model's name.")]

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_token)])


@contextmanager
def registry_answers() -> Iterator[None]:
    """MLflow's failures as HTTP answers: no such model or version 404, MLflow down 503."""
    try:
        yield
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except Unavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None


@router.get("", operation_id="listModels", response_model=ModelList, responses=errors(401, 503))
def list_models(tracking: MlflowTracking) -> Any:
    with registry_answers():
        return {"items": tracking.models()}


@router.get("/{name}", operation_id="getModel", response_model=Model, responses=errors(401, 404, 422, 503))
def get_model(name: ModelName, tracking: MlflowTracking) -> Any:
    with registry_answers():
        return tracking.model(name)


@router.post("/{name}/aliases", operation_id="setModelAlias", response_model=Model,
             responses=errors(400, 401, 404, 413, 422, 503))
def set_alias(name: ModelName, body: AliasIn, tracking: MlflowTracking) -> Any:
    """Point `alias` at `version` (e.g. promote a candidate to champion); the alias moves if it existed."""
    with registry_answers():
        try:
            return tracking.set_alias(name, body.alias, body.version)
        except ValueError as exc:  # an alias MLflow reserves ("latest", "v3")
            raise HTTPException(422, str(exc)) from None
