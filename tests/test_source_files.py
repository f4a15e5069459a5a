"""Sources as configuration: sources YAML files (errors naming the key), every entry point
taking them (ingest, the features flow through Prefect, serve and deploy on a real local Prefect
server), on tiny datasets written in the RecBole, processed-sequence and generic layouts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from features import store
from features.store import WarehouseConfig
from flows.cli import build
from pipeline.sources.base import SourceError
from pipeline.sources.config import find_source, load_sources
from tests.test_recbole import sequences, write_atomic
from tests.test_schedule import completed_scheduled_runs, free_port, msm4sr
from tests.test_seqrec import write_seqrec

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

SHOP_SEQS = {  # the same purchases in every layout
    "c1": ["pen", "ink", "pad", "clip", "tape", "glue"],
    "c2": ["pad", "pen", "tape", "ink", "clip"],
    "c3": ["glue", "clip"],  # too short
}
SHOP_TITLES = {
    "pen": "Ballpoint pen, blue",
    "ink": "Ink cartridge",
    "pad": "Legal pad",
    "clip": "Paper clips",
    "tape": "Clear tape",
    "glue": "Glue stick",
}


def write_shop(root: Path) -> Path:
    """The shop in three layouts under `root`, and a sources file naming all three."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [f"{u},{it},{1000 + 10 * k}" for u, s in SHOP_SEQS.items() for k, it in enumerate(s)]
    (root / "purchases.csv").write_text("customer,sku,when\n" + "\n".join(rows) + "\n")
    items = "".join(f"{k}\t{v}\tOffice\n" for k, v in SHOP_TITLES.items())
    (root / "products.tsv").write_text("sku\tname\taisle\n" + items)
    inter = ["user_id:token\titem_id:token\ttimestamp:float"]
    inter += [f"{u}\t{it}\t{k}" for u, s in SHOP_SEQS.items() for k, it in enumerate(s)]
    item = ["item_id:token\ttitle:token_seq"] + [f"{k}\t{v}" for k, v in SHOP_TITLES.items()]
    write_atomic(root, "shop_rb", inter, item)
    write_seqrec(root, "shop_seq", {u: s for u, s in SHOP_SEQS.items()}, texts=SHOP_TITLES)
    (root / "sources.yaml").write_text(
        "sources:\n"
        "  generic-shop:\n"
        "    kind: generic\n"
        "    interactions: purchases.csv\n"
        "    items: products.tsv\n"
        "    columns: {user: customer, item: sku, ts: when, item_key: sku, title: name,"
        " categories: aisle}\n"
        "    dataset: shop-generic\n"
        "  recbole-shop:\n"
        "    kind: recbole\n"
        "    path: shop_rb\n"
        "    dataset: shop-recbole\n"
        "  seqrec-shop:\n"
        "    kind: seqrec\n"
        "    path: shop_seq\n"
        "    dataset: shop-seqrec\n"
        "    min_interactions: 6\n"
    )
    return root / "sources.yaml"


def test_sources_file_entries_and_builtins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = write_shop(tmp_path / "shop")
    specs = load_sources(f)
    assert sorted(specs) == ["generic-shop", "recbole-shop", "seqrec-shop"]
    assert specs["seqrec-shop"].min_interactions == 6
    assert specs["generic-shop"].resolve("purchases.csv") == (tmp_path / "shop" / "purchases.csv")
    with pytest.raises(SourceError, match="holds several sources: name one of"):
        find_source(None, f)
    monkeypatch.setenv("MSM4SR_DATA", str(tmp_path / "d"))
    ml = find_source("movielens")
    assert (ml.kind, ml.dataset) == ("movielens", "ml-1m")
    assert ml.resolve(ml.path) == tmp_path / "d" / "movielens-1m"
    office = find_source("amazon-office").with_overrides(dataset="office2")
    assert (office.kind, office.dataset, office.columns["item_key"]) == ("generic", "office2", "id")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sources:\n  s: {kind: csv}\n", r"sources\.s\.kind: 'csv' is not one of"),
        (
            "sources:\n  s: {kind: recbole, path: x, colour: red}\n",
            r"sources\.s\.colour: unknown key",
        ),
        (
            "sources:\n  s: {kind: seqrec, path: x, min_interactions: five}\n",
            r"sources\.s\.min_interactions: must be an integer",
        ),
        (
            "sources:\n  s: {kind: generic, items: b}\n",
            r"sources\.s\.interactions: required for kind generic",
        ),
        (
            "sources:\n  s: {kind: generic, interactions: a, items: b, columns: {usr: u}}\n",
            r"sources\.s\.columns\.usr: unknown field",
        ),
        ("kind: movielens\npath: [1, 2]\n", r"one\.yaml: path: must be a non-empty string"),
        ("sources: {}\n", r"sources: a non-empty mapping"),
        ("sources:\n  s: {kind: seqrec\n", r"not valid YAML \(line"),
        ("- kind: movielens\n", r"holds a source \(kind: \.\.\.\) or `sources:`"),
        (
            "sources:\n  s: {kind: movielens, path: x}\nschedules: {}\n",
            r"schedules: unknown top-level key",
        ),
    ],
)
def test_bad_sources_file_is_one_line_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    f = tmp_path / "one.yaml"
    f.write_text(text)
    with pytest.raises(SourceError, match=message) as e:
        load_sources(f)
    assert "\n" not in str(e.value) and str(f) in str(e.value)


def flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))
    app = build()

    def run(*args: str, code: int = 0) -> str:
        res = runner.invoke(app, list(args), catch_exceptions=False)
        assert res.exit_code == code, res.output
        return res.output

    return run


def test_cli_ingests_every_layout_and_exports_recbole(cli, tmp_path: Path) -> None:
    f = write_shop(tmp_path / "shop")
    wh = WarehouseConfig(root=tmp_path / "wh", attach=None, data_path=None)
    out = cli("ingest", "source", "generic-shop", "--source-file", str(f), "--no-progress")
    assert "shop-generic" in out and "2 users, 11 interactions" in out
    cli("ingest", "recbole", str(tmp_path / "shop" / "shop_rb"), "--dataset", "rb", "--no-progress")
    out = cli("ingest", "seqrec", str(tmp_path / "shop" / "shop_seq"), "--min-user", "6")
    assert "1 users, 6 interactions" in out
    expected = {u: s for u, s in SHOP_SEQS.items() if len(s) >= 5}
    assert sequences(wh, "shop-generic") == expected
    assert sequences(wh, "rb") == expected
    assert sequences(wh, "shop_seq") == {"c1": SHOP_SEQS["c1"]}
    out = flat(
        cli(
            "export",
            "recbole",
            str(tmp_path / "rbout"),
            "--dataset",
            "shop-generic",
            "--name",
            "shop",
        )
    )
    assert "(11 interactions)" in out and f"data_path={tmp_path / 'rbout'}, dataset=shop" in out
    cli("ingest", "recbole", str(tmp_path / "rbout" / "shop"), "--dataset", "back")
    assert sequences(wh, "back") == expected
    # bad input: one line, exit 2, no traceback
    (tmp_path / "bad.yaml").write_text("kind: generic\ninteractions: a.csv\n")
    err = flat(cli("ingest", "source", "--source-file", str(tmp_path / "bad.yaml"), code=2))
    assert "bad.yaml: items: required for kind generic" in err and "Traceback" not in err
    err = flat(cli("export", "recbole", str(tmp_path / "x"), "--dataset", "nope", code=2))
    assert "no interactions for dataset='nope'" in err
    err = flat(cli("features", "--source", "nope", "--source-file", str(f), code=2))
    assert "name='nope' is not a source of" in err


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_features_flow_runs_each_layout_from_the_sources_file(
    harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.features import features_flow

    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))
    f = write_shop(tmp_path / "shop")
    wh = WarehouseConfig(root=tmp_path / "wh", attach=None, data_path=None)
    users = {"generic-shop": 2, "recbole-shop": 2, "seqrec-shop": 1}
    for entry, n_users in users.items():
        s = features_flow(source=entry, source_file=str(f), tag=False)
        assert s["ingest"]["n_users"] == n_users, entry
        assert (s["embed"]["n_items"], s["embed"]["n_items_without_text"]) == (6, 0), entry
        assert set(s["seconds_per_stage"]) == {"ingest", "embed"}
    with store.connect(wh, create=False, read_only=True) as con:
        rows = con.execute(
            "SELECT dataset, count(DISTINCT item_id) FROM item_text_features GROUP BY 1 ORDER BY 1"
        ).fetchall()
    # every layout's item texts reached the text features (BERT vectors)
    assert rows == [("shop-generic", 6), ("shop-recbole", 6), ("shop-seqrec", 6)]


def _post(api: str, route: str, body: dict) -> object:
    req = urllib.request.Request(
        f"{api}{route}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.load(r)


def test_serve_and_deploy_take_a_sources_file_and_runs_read_its_latest_content(
    tmp_path: Path,
) -> None:
    f = write_shop(tmp_path / "shop")
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "MSM4SR_WAREHOUSE": str(tmp_path / "wh")}
    (tmp_path / "prefect").mkdir()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"

    def cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            msm4sr(*args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    start = cli("server", "start", "--port", str(port))
    assert start.returncode == 0, start.stdout + start.stderr
    sched = tmp_path / "schedules.yaml"
    sched.write_text(
        f"schedules:\n  features_cron: '* * * * *'\n  train_cron: '0 3 * * *'\n"
        f"  source_file: {f}\n  source: recbole-shop\n  tag: false\n  embed: false\n"
    )
    serve = subprocess.Popen(
        msm4sr("serve", "--config", str(sched)),
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    wh = WarehouseConfig(root=tmp_path / "wh", attach=None, data_path=None)
    try:
        deadline = time.monotonic() + 240
        runs: list[dict] = []
        while time.monotonic() < deadline and not runs:
            assert serve.poll() is None, serve.stdout.read() if serve.stdout else ""
            time.sleep(5)
            runs = completed_scheduled_runs(api)
        assert runs, "no scheduled run completed within 4 minutes"
        assert runs[0]["parameters"]["source_file"] == str(f)
        assert sequences(wh, "shop-recbole")["c2"] == SHOP_SEQS["c2"]
        # The entry now points at the processed-sequence layout: the next run reads that.
        f.write_text(
            f.read_text()
            .replace(
                "path: shop_rb\n    dataset: shop-recbole",
                "path: shop_seq\n    dataset: shop-changed",
            )
            .replace("kind: recbole", "kind: seqrec")
        )
        dep = runs[0]["deployment_id"]
        _post(api, f"/deployments/{dep}/create_flow_run", {})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(completed_scheduled_runs(api)) < 2:
            time.sleep(3)
        assert len(completed_scheduled_runs(api)) >= 2
        assert sequences(wh, "shop-changed") == {u: s for u, s in SHOP_SEQS.items() if len(s) >= 5}

        # deploy: a work pool's deployments carry the file, read by the workers at run time
        _post(api, "/work_pools/", {"name": "pool1", "type": "process"})
        env["PREFECT_API_URL"] = api
        dep_out = cli(
            "deploy",
            "--pool",
            "pool1",
            "--source-file",
            str(f),
            "--source-kind",
            "generic-shop",
            "--features-cron",
            "",
            "--train-cron",
            "",
        )
        assert dep_out.returncode == 0, dep_out.stdout + dep_out.stderr
        deps = _post(api, "/deployments/filter", {"work_pools": {"name": {"any_": ["pool1"]}}})
        params = {d["name"]: d["parameters"] for d in deps}  # type: ignore[union-attr]
        assert (
            params["features"]["source_file"] == str(f)
            and params["features"]["source"] == "generic-shop"
        )
        assert params["train"]["dataset"] == "shop-generic"
        bad = cli("deploy", "--pool", "pool1", "--source-file", str(f), "--source-kind", "nope")
        assert bad.returncode == 2 and "name='nope' is not a source of" in flat(bad.stderr)
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        env.pop("PREFECT_API_URL", None)
        stop = cli("server", "stop", timeout=60)
    assert "stopped" in stop.stdout
