"""The Ray layer: Ray Train workers, Ray Data streaming, Ray on the command line.

Imports Ray; the method layer (everything outside this package and `tracking`) never does.
"""

import os

from leoclr_core import contract


def _loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "::1")


# Ray reads its environment when it is imported, so it is set here, before any module of this
# package imports it (contract.RAY_ENV: token auth, Ray Train v2). With no cluster address, or a
# loopback one, this process's own Ray address is 127.0.0.1: Ray would otherwise rewrite 127.0.0.1
# to the machine's outward IP, where a cluster bound to 127.0.0.1 does not listen. (The variable
# only changes how this process resolves "localhost"; a remote RAY_ADDRESS leaves it alone.)
contract.apply_ray_environment()
if _loopback(os.environ.get("RAY_ADDRESS") or "127.0.0.1"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
