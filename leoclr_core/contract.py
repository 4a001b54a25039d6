"""Names the training side writes and the service reads: MLflow tags, progress metrics, the
environment a service job's driver gets. One place, no torch, so both sides import it."""

from __future__ import annotations

# Environment of a driver started by the service (a Ray Job).
ENV_JOB_SPEC = "LEOCLR_JOB_SPEC"  # the job spec as JSON
ENV_JOB_ID = "LEOCLR_JOB_ID"  # the service's job id, tagged on the job's MLflow run and model version

# Ray's environment, read when Ray is imported: local clusters use token auth (Ray 2.60's default) and
# their clients must say so too; Ray Train v2 is the API the distributed layer is written against.
# Every process that imports Ray (a driver, the API's Jobs client, a head the service starts) gets
# these from `ray_environment`, and nowhere else.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_TRAIN_V2_ENABLED": "1"}


def ray_environment(env: dict[str, str]) -> dict[str, str]:
    """A copy of `env` with RAY_ENV's values where `env` leaves them unset (a child process's env)."""
    return {**RAY_ENV, **env}


def apply_ray_environment() -> None:
    """RAY_ENV into this process's environment where unset: call it before the first `import ray`."""
    import os

    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)


# A finished job's result (what the CLI prints and GET /v1/jobs/{id} returns as `result`): a JSON
# artifact of the job's MLflow run, written by the driver last. The service reads it from there.
RESULT_ARTIFACT = "leoclr/result.json"

# An embed job's output: a Parquet dataset (a folder of files), one row per image. `id`: the image's
# path relative to the data root (image folders), `row-<n>` (Parquet and built-in sources); `label`:
# int64, null when unknown; `embedding`: fixed_size_list<float32>[D]. The files' schema metadata
# carries the encoder URI and the data spec (JSON), so a reader can find the images again.
EMBED_ID, EMBED_LABEL, EMBED_VECTOR = "id", "label", "embedding"
EMBED_META_ENCODER, EMBED_META_DATA = "leoclr.encoder", "leoclr.data"

# MLflow tags.
TAG_JOB = "leoclr.job"  # the job's name
TAG_KIND = "leoclr.kind"
TAG_STORAGE = "leoclr.storage"
TAG_SERVICE_JOB = "leoclr.service_job"  # the service's job id
TAG_RUN_ID = "leoclr.run_id"  # on a model version: the run that made it
TAG_TRIAL = "leoclr.trial"  # on a search's child run: its trial's name
TAG_STOPPED_EARLY = "leoclr.stopped_early"  # on a child run the scheduler stopped: "true"
TAG_CHECKPOINT_EPOCH = "leoclr.checkpoint_epoch"  # on a pretrain run: the epoch of checkpoints/latest
TAG_ENCODER = "leoclr.encoder"  # on an evaluate run: the encoder URI it evaluated
TAG_EMBEDDINGS = "leoclr.embeddings"  # on an embed run: the URI of its output dataset
TAG_BEST_TRIAL, TAG_BEST_RUN_ID = "leoclr.best_trial", "leoclr.best_run_id"  # on a search's parent run

# Tags of a registered model version, one per number: `metric.<name>` the final metrics of the run
# that made it, `eval.<evaluate job>.<name>` the results of each evaluate job that evaluated it.
VERSION_METRIC_PREFIX = "metric."
VERSION_EVAL_PREFIX = "eval."

# Tags of a model version a promotion decided on (leoclr_core.tracking.promote): the alias, the
# metric, the candidate's and the holder's values, the holder's version (empty: none), the decision
# (promoted, kept or first), when (ISO 8601, UTC) and the fingerprint of the evaluation data both
# values were measured on. `promotion.score.<fingerprint>.<metric>`: a value measured on a version
# with that evaluation data, which a later decision reuses instead of evaluating the version again.
PROMOTION_PREFIX = "promotion."
TAG_PROMOTION_ALIAS, TAG_PROMOTION_METRIC = "promotion.alias", "promotion.metric"
TAG_PROMOTION_CANDIDATE, TAG_PROMOTION_HOLDER = "promotion.candidate", "promotion.holder"
TAG_PROMOTION_HOLDER_VERSION, TAG_PROMOTION_DECISION = "promotion.holder_version", "promotion.decision"
TAG_PROMOTION_AT, TAG_PROMOTION_DATA = "promotion.at", "promotion.data"
PROMOTION_SCORE_PREFIX = "promotion.score."
PROMOTED, KEPT, FIRST = "promoted", "kept", "first"
# The registry lock that serialises promotions of one model: a registered model of this name prefix
# (which no spec's model name can start with) created by the holder, deleted on release.
PROMOTION_LOCK_PREFIX = "_leoclr-lock."

# Metric keys of a pretrain run: per log window `train/<key>` (x-axis: global step), per epoch
# `epoch/<key>` (x-axis: epoch), evaluations and `skipped_files` as they are, and progress.
TRAIN_PREFIX, EPOCH_PREFIX, PROGRESS_PREFIX = "train/", "epoch/", "progress/"
M_STEP, M_TOTAL, M_EPOCH, M_EPOCHS, M_ETA = (
    "progress/step", "progress/total_steps", "progress/epoch", "progress/epochs", "progress/eta_s")
M_LOSS, M_IPS, M_KNN = "train/loss", "train/instances_per_s", "knn_top1"
M_EPOCH_LOSS, M_EPOCH_IPS = "epoch/loss", "epoch/instances_per_s"


def numbers(values: dict[str, object]) -> dict[str, int | float]:
    """The numeric entries of a record (bools are not numbers here): what is logged or tagged as a metric."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def promotion_from_tags(tags: dict[str, str]) -> dict[str, object] | None:
    """The promotion decision a model version's tags record (what the API shows as `promotion`);
    None when no decision was made for it."""
    decision = tags.get(TAG_PROMOTION_DECISION)
    if not decision:
        return None

    def number(key: str) -> float | None:
        value = tags.get(key)
        return float(value) if value not in (None, "") else None

    return {"decision": decision, "alias": tags.get(TAG_PROMOTION_ALIAS), "metric": tags.get(TAG_PROMOTION_METRIC),
            "candidate": number(TAG_PROMOTION_CANDIDATE), "holder": number(TAG_PROMOTION_HOLDER),
            "holder_version": tags.get(TAG_PROMOTION_HOLDER_VERSION) or None, "at": tags.get(TAG_PROMOTION_AT),
            "data": tags.get(TAG_PROMOTION_DATA) or None}


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A link for humans: the UI page on a tracking server, the run's URI on a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"runs:/{run_id}"
