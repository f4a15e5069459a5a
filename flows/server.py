"""A local Prefect server for scheduled runs and the UI: start / stop / status.

The temporary server Prefect starts for a plain flow call has no scheduler, so schedules need
`prefect server start` in the background; this wraps it with a pid file under PREFECT_HOME and
a health check, and points PREFECT_API_URL at it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerInfo:
    pid: int
    url: str  # the API URL, e.g. http://127.0.0.1:4200/api
    log: Path


def _home() -> Path:
    return Path(os.environ["PREFECT_HOME"])


def _pidfile() -> Path:
    return _home() / "msm4sr-server.pid"


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def running() -> ServerInfo | None:
    """The server this project started, if it is still alive."""
    f = _pidfile()
    if not f.exists():
        return None
    pid_s, url = f.read_text().split()
    pid = int(pid_s)
    try:
        os.kill(pid, 0)
    except OSError:
        f.unlink(missing_ok=True)
        return None
    return ServerInfo(pid, url, _home() / "server.log")


def start(host: str = "127.0.0.1", port: int = 4200, wait_s: float = 120.0) -> ServerInfo:
    """Start `prefect server start` in the background (no-op if ours is running)."""
    info = running()
    if info:
        return info
    url = f"http://{host}:{port}/api"
    log = _home() / "server.log"
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", host, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stop() ends it and its children
        )
    _pidfile().write_text(f"{proc.pid} {url}\n")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _pidfile().unlink(missing_ok=True)
            raise RuntimeError(f"prefect server exited with code {proc.returncode}; see {log}")
        if healthy(url):
            return ServerInfo(proc.pid, url, log)
        time.sleep(0.5)
    stop()
    raise RuntimeError(f"prefect server did not answer on {url} within {wait_s:.0f}s; see {log}")


def stop(timeout_s: float = 20.0) -> bool:
    """Stop the server this project started (its whole process group). False if none ran."""
    info = running()
    if info is None:
        return False
    try:
        os.killpg(info.pid, signal.SIGTERM)
    except OSError:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(info.pid, 0)
        except OSError:
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(info.pid, signal.SIGKILL)
        except OSError:
            pass
    _pidfile().unlink(missing_ok=True)
    return True
