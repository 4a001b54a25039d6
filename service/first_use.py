"""One lock for the first use of the API's two heavy clients, Ray's Jobs client and MLflow's.

Both are imported on first use (the API starts in well under a second without them), from whichever
thread needs them first: the reconcile loop pings Ray while a request, or the tracking store's
preparation, reads MLflow. Importing both packages at once from two threads can deadlock on the
modules both import (protobuf, grpc, ...); Python breaks such a deadlock by handing one thread a
partly initialised module, after which Ray's client failed for the life of the process ("partially
initialized module 'ray' has no attribute '_private'": every job stayed queued). Their first imports
and first uses therefore go through this lock, one at a time.
"""

from __future__ import annotations

import threading

FIRST_USE = threading.RLock()
