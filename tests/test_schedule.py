"""Scheduled runs need a real Prefect server: start one on 127.0.0.1 with its own PREFECT_HOME,
serve the features flow on a one-minute cron, see a scheduled run COMPLETE, stop everything."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_sources import ml_fixture

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completed_scheduled_runs(api: str) -> list[dict]:
    body = json.dumps({"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}).encode()
    req = urllib.request.Request(
        f"{api}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return [fr for fr in json.load(r) if fr.get("deployment_id")]


def msm4sr(*args: str) -> list[str]:
    return [sys.executable, "-c", "from flows.cli import main; main()", *args]


def test_served_features_flow_runs_on_its_cron(tmp_path: Path) -> None:
    src = ml_fixture(tmp_path / "ml")
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "MSM4SR_WAREHOUSE": str(tmp_path / "wh")}
    (tmp_path / "prefect").mkdir()
    port = free_port()
    start = subprocess.run(
        msm4sr("server", "start", "--port", str(port)),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    api = f"http://127.0.0.1:{port}/api"
    cfg = tmp_path / "schedules.yaml"
    cfg.write_text(
        f"schedules:\n  features_cron: '* * * * *'\n  train_cron: '0 3 * * *'\n  path: {src}\n"
        f"  dataset: sched\n  tag: false\n  embed: false\n"
    )
    serve = subprocess.Popen(
        msm4sr("serve", "--config", str(cfg)),
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        runs: list[dict] = []
        while time.monotonic() < deadline and not runs:
            assert serve.poll() is None, serve.stdout.read() if serve.stdout else ""
            time.sleep(5)
            runs = completed_scheduled_runs(api)
        assert runs, "no scheduled run completed within 4 minutes"
        assert runs[0]["parameters"]["dataset"] == "sched"
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        stop = subprocess.run(
            msm4sr("server", "stop"), env=env, cwd=REPO, capture_output=True, text=True, timeout=60
        )
    assert "stopped" in stop.stdout
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{api}/health", timeout=2)
    # the scheduled run wrote the warehouse
    from features import store
    from features.store import WarehouseConfig

    with store.connect(
        WarehouseConfig(root=tmp_path / "wh", attach=None, data_path=None), create=False
    ) as con:
        assert con.execute("SELECT count(*) FROM items WHERE dataset = 'sched'").fetchone()[0] == 6
