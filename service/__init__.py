"""The control plane: a FastAPI job service over Ray Jobs, with the MLflow registry behind it.

This package never imports torch, and mlflow only on first use (the API answers within about a
second of its start): it validates specs with `leoclr_core.spec.models` and talks to Ray through
`ray.job_submission` only.
"""

from leoclr_core import contract

contract.apply_ray_environment()  # read when Ray is imported: the Jobs client authenticates
