"""Loopback servers for the scale-out warehouse tests: a real PostgreSQL (Debian's binaries) and
moto's S3 server, each on 127.0.0.1 with a free port, started once per session and stopped at
its end. Import the fixtures `pg` and `s3` into a test module to use them.

PostgreSQL refuses to run as root: under root, initdb / pg_ctl run as the `postgres` user
(created by Debian's package) on a data folder handed to that user. Missing binaries skip the
tests with the reason, or fail them where MSM4SR_REQUIRE_SERVERS=1 (.ci/run sets it after
installing them with apt-get install postgresql).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
PG_PASSWORD = "msm4sr-test"  # scram-sha-256 over TCP: clients must send it (PGPASSWORD)


def _missing(reason: str) -> NoReturn:
    """Skip (a developer machine without the server), or fail where CI requires the servers."""
    if os.environ.get("MSM4SR_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason} (MSM4SR_REQUIRE_SERVERS=1)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin_dir() -> Path | None:
    """Folder with initdb/pg_ctl/postgres: $PG_BIN, Debian's newest /usr/lib/postgresql/N/bin, PATH."""
    candidates = [os.environ.get("PG_BIN", "")]
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(which).resolve().parent))
    for c in candidates:
        if c and all((Path(c) / b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return Path(c)
    return None


@dataclass
class Postgres:
    bin: Path
    port: int
    host: str = "127.0.0.1"
    user: str = "postgres"
    password: str = PG_PASSWORD

    def env(self) -> dict[str, str]:
        """libpq variables a client needs beside the connection string."""
        return {"PGPASSWORD": self.password}

    def createdb(self, name: str) -> str:
        """CREATE DATABASE `name`; return its libpq connection string (no password in it)."""
        subprocess.run(
            [
                str(self.bin / "psql"),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-qc",
                f'CREATE DATABASE "{name}"',
            ],
            env={**os.environ, **self.env()},
            check=True,
            capture_output=True,
            text=True,
        )
        return f"dbname={name} host={self.host} port={self.port} user={self.user}"


@dataclass
class S3:
    endpoint: str  # http://127.0.0.1:PORT
    key_id: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client (DuckDB, boto3) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            region_name=self.region,
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _as_pg_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """initdb in a new temp folder, start on 127.0.0.1:<free port>, yield, stop and delete."""
    bindir = pg_bin_dir()
    if bindir is None:
        _missing(
            "PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql, or set PG_BIN"
        )
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            _missing(
                "running as root and no `postgres` user to run PostgreSQL as (apt-get install postgresql creates it)"
            )
    root = Path(tempfile.mkdtemp(prefix="msm4sr-pg-"))
    if os.geteuid() == 0:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, log = root / "data", root / "server.log"
    pwfile = root / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if os.geteuid() == 0:
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    port = free_port()
    started = False
    try:
        subprocess.run(
            _as_pg_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--pwfile",
                    str(pwfile),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            text=True,
        )
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
        )
        r = subprocess.run(
            _as_pg_user(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    opts,
                    "start",
                ]
            ),
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start: {r.stdout}{r.stderr}\n{log.read_text() if log.exists() else ''}"
            )
        started = True
        yield Postgres(bindir, port)
    finally:
        if started:
            subprocess.run(
                _as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                capture_output=True,
            )
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def s3_server() -> Iterator[S3]:
    """moto's S3 server (moto[server] from PyPI) on 127.0.0.1:<free port>; yield; terminate."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        _missing("moto[server] not installed (requirements/dev.txt)")
    port = free_port()
    logf = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from moto.server import main; main()",
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=logf,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _NO_PROXY.open(endpoint + "/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    logf.seek(0)
                    raise RuntimeError(
                        f"moto server did not start: {logf.read().decode(errors='replace')}"
                    ) from None
                time.sleep(0.2)
        yield S3(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()


@pytest.fixture(scope="session")
def pg() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server
