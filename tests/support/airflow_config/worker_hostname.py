"""The host name a test Celery worker reports for its task instances: `REMOVEBG_TEST_WORKER_HOSTNAME`.

Both test workers run on one machine, so `socket.getfqdn()` would name them alike. Each worker's
environment sets its own name and `[core] hostname_callable` points here, standing in for two hosts.
"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return os.environ.get("REMOVEBG_TEST_WORKER_HOSTNAME") or socket.getfqdn()
