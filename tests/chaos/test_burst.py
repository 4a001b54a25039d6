"""A burst of 20 tiny jobs submitted at once to a service on this machine: the admission gate runs at
most LEOCLR_MAX_RUNNING_JOBS of them at a time and holds the rest `queued`, starting them in the
order they were submitted as others finish, so none starves, every one succeeds, and the memory
the service and its Ray head hold stays under a stated ceiling."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import GIB, MemorySampler, tiny_job

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.timeout(1200)]

JOBS, LIMIT, CPUS = 20, 3, 6  # a tiny job asks Ray for 2 CPUs: 3 fit a 6-CPU head
# What the service's processes (API, Ray head, drivers, Ray Train and Ray Data workers) may grow by
# over their idle baseline, counted as PSS. Measured here: about 2.9 GiB per running tiny job (each
# has its own driver, Train controller, worker and Ray Data coordinator, every one importing torch),
# so 3 at a time take about 9 GiB; the ceiling leaves room for that on a 24 GB machine shared with
# other work, and fails a service that runs more jobs than its limit long before the machine is out.
CEILING = 12 * GIB


def test_a_burst_of_20_jobs_is_gated_none_starves_and_memory_stays_under_the_ceiling(make_service, figures):
    svc = make_service(CPUS, LEOCLR_MAX_RUNNING_JOBS=str(LIMIT))
    with MemorySampler(svc.mark) as mem, ThreadPoolExecutor(JOBS) as pool:
        began = time.monotonic()
        accepted = [j["id"] for j in pool.map(svc.submit, [tiny_job(f"chaos-burst-{i}") for i in range(JOBS)])]
        started: dict[str, float] = {}  # job id -> when it was first seen out of `queued`
        max_running, deadline = 0, began + 1000
        while True:
            jobs = svc.jobs()
            now = time.monotonic()
            for i, job in jobs.items():
                if job["status"] != "queued":
                    started.setdefault(i, now)
            running = sum(j["status"] == "running" for j in jobs.values())
            max_running = max(max_running, running)
            grown = mem.last_tree - mem.base_tree
            if running > LIMIT or grown > CEILING:  # stop the burst before it takes the machine's memory
                svc.cancel_all()
                figures(f"burst (failed): {running} running (limit {LIMIT}) {now - began:.0f} s after the burst, "
                        f"service memory +{grown / GIB:.1f} GiB (ceiling +{CEILING / GIB:.0f} GiB)")
                pytest.fail(f"{running} jobs running (LEOCLR_MAX_RUNNING_JOBS={LIMIT}), the service's memory "
                            f"+{grown / GIB:.1f} GiB over its baseline (ceiling +{CEILING / GIB:.0f} GiB)\n{svc.log()}")
            if all(jobs.get(i, {}).get("status") in ("succeeded", "failed", "cancelled", "lost") for i in accepted):
                break
            if now > deadline:
                svc.cancel_all()
                pytest.fail(f"not all {JOBS} jobs finished within 1000 s: "
                            f"{ {i: jobs.get(i, {}).get('status') for i in accepted} }\n{svc.log()}")
            time.sleep(1)
        wall = time.monotonic() - began

    order = sorted(accepted, key=lambda i: jobs[i]["created_at"])  # the order the API accepted them in
    overtaken = {i: sum(started[k] < started[i] for k in order[n + 1:]) for n, i in enumerate(order)}
    waits = [started[i] - began for i in order]
    outcome = {i: jobs[i]["status"] for i in accepted}
    figures(f"burst: accepted {JOBS}, reported {sum(i in jobs for i in accepted)}, "
            f"succeeded {list(outcome.values()).count('succeeded')}, max running {max_running} (limit {LIMIT}), "
            f"longest wait in queue {max(waits):.0f} s, all finished in {wall:.0f} s; "
            f"service memory peak +{(mem.peak_tree - mem.base_tree) / GIB:.1f} GiB over {mem.base_tree / GIB:.1f} GiB "
            f"(ceiling +{CEILING / GIB:.0f} GiB), machine used peak +{(mem.peak_machine - mem.base_machine) / GIB:.1f} "
            f"GiB over {mem.base_machine / GIB:.1f} GiB (shared with other work)")
    failed = {i: (s, (jobs[i].get("error") or "")[-500:]) for i, s in outcome.items() if s != "succeeded"}
    assert not failed, f"jobs of the burst that did not succeed: {failed}\n{svc.log()}"
    # First come, first started: a job may be overtaken only by later ones the gate let in with it
    # (Ray starts the drivers it is given in its own order), never by a queue's worth of them.
    starved = {i: n for i, n in overtaken.items() if n >= LIMIT}
    assert not starved, f"jobs started after {LIMIT} or more jobs submitted after them: {starved}"
    assert mem.peak_tree - mem.base_tree <= CEILING
