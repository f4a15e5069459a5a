"""Offline-safe Prefect settings, applied before prefect is imported (by flows/__init__.py).

Users set nothing: telemetry off, Prefect's state under the warehouse folder, loopback never
proxied. A variable the user already set wins.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def apply() -> None:
    warehouse = Path(os.environ.get("MSM4SR_WAREHOUSE", REPO_ROOT / "warehouse"))
    os.environ.setdefault("PREFECT_HOME", str(warehouse / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Two flows started at once both start a temporary server on the same database; the
    # default 20 s start-up limit is too short for the second while the first migrates it.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A proxy must never see loopback traffic to the local Prefect server (runs time out otherwise).
    for var in ("NO_PROXY", "no_proxy"):
        have = [h for h in os.environ.get(var, "").split(",") if h]
        os.environ[var] = ",".join(dict.fromkeys(have + ["127.0.0.1", "localhost"]))
    # A server started by `msm4sr server start` is used by every later command (one database,
    # the scheduler and the UI see all runs); otherwise each flow starts a temporary server.
    if not os.environ.get("PREFECT_API_URL"):
        pidfile = Path(os.environ["PREFECT_HOME"]) / "msm4sr-server.pid"
        if pidfile.exists():
            pid, url = pidfile.read_text().split()
            try:
                os.kill(int(pid), 0)
                os.environ["PREFECT_API_URL"] = url
            except OSError:
                pass
    # ultralytics: never phone home, never pip-install at run time.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
