"""The control plane: a FastAPI job service over Ray Jobs, with the MLflow registry behind it.

This package never imports torch (the API process starts in about a second and stays small):
it validates specs with `leoclr_core.spec.models` and talks to Ray through `ray.job_submission` only.
"""

import os

os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when Ray is imported: the Jobs client authenticates
