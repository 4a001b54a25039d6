"""Schemathesis against the app in-process, its job store on SQLite and on PostgreSQL: every
operation of the OpenAPI document, with generated valid and invalid input, under all of
Schemathesis's checks (no 5xx; every status, content type, header and body as documented; invalid
input refused, valid input accepted; auth not ignored).

Each operation alone, with valid and with invalid input; then sequences that follow the document's
links. Ray Jobs is the FakeRunner, so an accepted job starts no training. Bounded: about 1,000 requests.
The counts (examples per operation and mode, failures) are printed, so the figures can be quoted.
"""

from __future__ import annotations

from collections import Counter

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi

from sqlalchemy import delete

from service.app import create_app
from service.settings import ServiceSettings
from service.store import Job

from .fakes import AUTH, SPEC, TOKEN, FakeRunner, fresh_mlflow_db

EXAMPLES = 35  # per operation and mode: x 11 operations x 2 modes, about 700 requests
ON_JOBS = 25  # per operation on a job: valid input naming jobs that exist, one running, one finished
SCENARIOS = 30  # stateful: sequences that follow the document's links (create a job, then read, cancel...)

CONFIG = {
    "auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}},
    # A spec the JSON schema admits may still break a rule across fields (crop_ratio low <= high) or
    # the data-root policy: refused with 422 naming the field, which the spec tests check one by one.
    "operations": [{"include-name": "POST /v1/jobs",
                    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "422"]}}}],
}


def test_the_api_keeps_its_openapi_contract(tmp_path, capsys, job_database):
    s = ServiceSettings(data_dir=tmp_path, api_token=TOKEN, database_url=job_database)
    fresh_mlflow_db(tmp_path / "mlflow.db")
    app = create_app(s, FakeRunner(), reconcile_interval=3600, fresh_s=0)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict(CONFIG))
    load_all_checks()
    checks = CHECKS.get_all()
    examples: Counter[str] = Counter()
    statuses: dict[str, Counter[int]] = {}
    failures: dict[str, str] = {}
    with asgi.get_client(app) as http:  # generated ids name no job: these do
        jobs = [http.post("/v1/jobs", json={**SPEC, "name": f"fuzz-{i}"}, headers=AUTH).json()["id"] for i in (0, 1)]
        http.post(f"/v1/jobs/{jobs[1]}/cancel", headers=AUTH)

    for result in schema.get_all_operations():
        operation = result.ok()
        # an operation without parameters or body has no invalid input to send
        plans = [(GenerationMode.POSITIVE.value, operation.as_strategy(), EXAMPLES)]
        if operation.path_parameters or operation.query or operation.headers or operation.body:
            plans.append((GenerationMode.NEGATIVE.value, operation.as_strategy(GenerationMode.NEGATIVE), EXAMPLES))
        if "{job_id}" in operation.path:
            on_job = st.sampled_from(jobs).flatmap(lambda i: operation.as_strategy(path_parameters={"job_id": i}))
            plans.append(("existing job", on_job, ON_JOBS))
        for mode, strategy, n in plans:
            label = f"{operation.label} [{mode}]"

            # database=None: nothing written under the checkout; a failure prints its seed to replay it
            @given(case=strategy)
            @settings(max_examples=n, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
            def exercise(case):
                examples[label] += 1
                response = case.call_and_validate(checks=checks)
                statuses.setdefault(label, Counter())[response.status_code] += 1

            try:
                exercise()
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every operation runs; all are reported
                failures[label] = str(exc)

    # Stateful: calls chained by the OpenAPI links (a job created, then read, cancelled, its logs...),
    # so operations on a job that exists are exercised too, and the checks only a sequence can make
    # (a resource gone after a success, one created but not readable) run.
    class Sequences(schema.as_state_machine()):
        def setup(self):
            # Each sequence starts from the same store: Hypothesis replays a sequence and expects the
            # same answers, which a job or Idempotency-Key left by an earlier sequence would change.
            with app.state.store.sessions() as session:
                session.execute(delete(Job).where(Job.id.not_in(jobs)))
                session.commit()

        def after_call(self, response, case):
            label = f"{case.operation.label} [stateful]"
            examples[label] += 1
            statuses.setdefault(label, Counter())[response.status_code] += 1

    try:
        Sequences.run(settings=settings(max_examples=SCENARIOS, stateful_step_count=6, deadline=None, database=None,
                                        suppress_health_check=list(HealthCheck)))
    except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001
        failures["stateful sequences"] = str(exc)

    app.state.store.close()
    with capsys.disabled():
        print(f"\nschemathesis {schemathesis.__version__}, {len(checks)} checks: {sum(examples.values())} examples "
              f"over {len(examples)} operation x mode pairs, {len(failures)} failing")
        for label, n in sorted(examples.items()):
            answers = ", ".join(f"{code} x{k}" for code, k in sorted(statuses.get(label, {}).items()))
            print(f"  {label}: {n} examples ({answers}){', FAILED' if label in failures else ''}")
    assert not failures, "\n\n".join(f"{label}:\n{why}" for label, why in failures.items())
