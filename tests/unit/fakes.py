"""What the service's unit tests share: a stand-in for Ray Jobs, a spec, and an app on a temp folder."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings

SPEC = {"kind": "pretrain", "name": "api-demo", "data": {"num_images": 512}, "loss": {"queue_size": 128},
        "optim": {"batch_size": 64}}
TOKEN = "secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeRunner:
    """Ray Jobs as far as the API sees it: submissions recorded, a status the test sets, no training."""

    log_text = ""

    def __init__(self, fail: bool = False):
        self.submitted, self.stopped, self.fail, self.state = [], [], fail, "running"

    def submit(self, job_id, spec):
        if self.fail:
            raise ConnectionError("cluster unreachable")
        self.submitted.append((job_id, spec))
        return f"leoclr-{job_id}"

    def status(self, submission_id):
        return self.state

    def stop(self, submission_id):
        self.stopped.append(submission_id)
        return self.state not in ("succeeded", "failed", "cancelled", "lost")

    def logs(self, submission_id):
        return self.log_text

    async def tail(self, submission_id):
        for line in self.log_text.splitlines(keepends=True):
            yield line

    def ping(self):  # the Jobs API answers
        return None

    def cluster_resources(self):  # room for any test job
        return {"CPU": 64.0, "GPU": 8.0}


@pytest.fixture()
def make_client(tmp_path):
    def make(runner=None, **settings):
        s = ServiceSettings(data_dir=tmp_path, api_token=TOKEN, **settings)
        # fresh_s=0: every read asks the runner, as these tests change its answers between reads
        return TestClient(create_app(s, runner if runner is not None else FakeRunner(), fresh_s=0))
    return make
