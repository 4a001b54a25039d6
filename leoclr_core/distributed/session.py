"""Connecting to Ray: the cluster at `RAY_ADDRESS`, or a local one started for the run and stopped after.

A local cluster binds to 127.0.0.1 and uses token authentication (Ray 2.60's default for local
clusters; the token lives in ~/.ray/auth_token). Its logical CPU count is at least what the job
asks for, so a spec written for a bigger machine still schedules (slowly) on a laptop.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

import ray

from leoclr_core import contract
from leoclr_core.settings import CoreSettings, core_settings

log = logging.getLogger(__name__)


def connect(address: str, log_to_driver: bool = True) -> Any:
    """`ray.init` on an existing cluster (see this package's __init__ for loopback addresses)."""
    return ray.init(address=address, log_to_driver=log_to_driver)


@contextmanager
def ray_session(num_cpus: float | None = None, settings: CoreSettings | None = None,
                log_to_driver: bool = True) -> Iterator[str]:
    """Yields the address in use. Reuses an already initialised Ray (tests, notebooks) and leaves it up."""
    contract.apply_ray_environment()
    if ray.is_initialized():
        yield "existing"
        return
    s = settings or core_settings()
    if s.ray_address:
        ctx = connect(s.ray_address, log_to_driver=log_to_driver)
    else:
        cpus = max(os.cpu_count() or 1, int(-(-(num_cpus or 0) // 1)))
        # The dashboard also serves the state API, which Ray Train's placement-group cleaner polls.
        # address="local": a new Ray even when another runs on this machine (a `ray start` head, or
        # one that died and left its address behind), which plain ray.init() would try to join.
        ctx = ray.init(address="local", num_cpus=cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
                       dashboard_host="127.0.0.1", log_to_driver=log_to_driver)
    try:
        yield getattr(ctx, "address_info", {}).get("address", s.ray_address or "local")
    finally:
        ray.shutdown()
