"""Nothing lost, nothing unsafe (platform): killed and parallel materializations, sensor, UIs, secrets.

- A ``patches`` materialization killed with SIGKILL just before its folder is committed leaves the
  previous partition byte-identical and Dagster's latest materialization unchanged; a rerun succeeds
  and removes the stale staging folder.
- Two partitions materialized at the same time by two runs with the multiprocess executor write only
  their own folders; rerunning one leaves the others byte-identical.
- The sensor never follows symbolic links (plate folders, sub-folders, files, the marker) and refuses
  bad names with a logged reason; storage refuses partition names that are not folder names.
- The UIs' printed commands bind to 127.0.0.1; credentials never appear in URLs that are logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, build_sensor_context, instance_for_test

from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage, redact_url, resolve_root
from phenocoder_assets.sensors import incoming_plates_sensor

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("_run_partition.py")
TIMEOUT = 600  # seconds per child run on a loaded 2-core machine


def tree_hashes(root: Path, *, skip: tuple[str, ...] = ("incoming", "dagster", "mlflow.db", "mlartifacts")) -> dict:
    """SHA-1 of every visible file under ``root`` (hidden staging folders are not results)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in skip and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def start_run(tmp_path: Path, home: Path, key: str, selection: list[str], executor: str = "in_process",
              **extra) -> subprocess.Popen:
    args = {"home": str(home), "dagster_home": str(tmp_path / "dagster"), "key": key, "selection": selection,
            "executor": executor, **extra}
    log = open(tmp_path / f"run-{key}-{time.monotonic_ns()}.log", "wb")  # a pipe could fill and block the child
    proc = subprocess.Popen([sys.executable, str(RUNNER), json.dumps(args)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(tmp_path))
    log.close()
    proc.log = log.name
    return proc


def finish(proc: subprocess.Popen) -> None:
    rc = proc.wait(TIMEOUT)
    assert rc == 0, Path(proc.log).read_text(errors="replace")[-4000:]


def run_here(tmp_path: Path, home: Path, key: str, selection: list[str]) -> None:
    """The run of ``finish(start_run(...))`` with the in-process executor, in this process: for the set-up
    runs and reruns, where a process of their own is not what the test is about (it would only add an
    interpreter start and the imports)."""
    name = "phenocoder_test_run_partition"
    runner = sys.modules.get(name)
    if runner is None:  # registered in sys.modules: Dagster's reconstructable() finds its job by module name
        spec = importlib.util.spec_from_file_location(name, RUNNER)
        runner = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runner)
    args = {"home": str(home), "dagster_home": str(tmp_path / "dagster"), "key": key, "selection": selection,
            "executor": "in_process"}
    with contextlib.chdir(tmp_path):
        assert runner.main(args) == 0


@pytest.fixture
def platform_home(tmp_path, copy_plate):
    """A home with the 2-well TINY plate in its landing folder and a persistent Dagster instance."""
    home = tmp_path / "home"
    copy_plate(home / "incoming" / "TINY")
    (tmp_path / "dagster").mkdir()
    with DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions("samples", ["TINY_A01", "TINY_A02"])
    return home


def _materializations(tmp_path: Path, asset: str) -> list:
    with DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        return list(instance.fetch_materializations(AssetKey(asset), limit=1000).records)


# --------------------------------------------------------------------------------------------------
# Nothing lost
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_patches_materialization_keeps_the_previous_partition(tmp_path, platform_home):
    home, key = platform_home, "TINY_A01"
    run_here(tmp_path, home, key, ["sdata", "patches"])
    before = tree_hashes(home / "patches")
    assert {f"{key}/settings.json", f"{key}/index.parquet"} <= set(before)
    (first,) = _materializations(tmp_path, "patches")

    ready = tmp_path / "ready"
    proc = start_run(tmp_path, home, key, ["patches"], hold="phenocoder_assets.resources:replace_dir",
                     ready=str(ready))
    deadline = time.monotonic() + TIMEOUT
    while not ready.exists():
        assert proc.poll() is None, Path(proc.log).read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, "the run never reached its commit"
        time.sleep(0.05)
    stages = [p for p in (home / "patches").iterdir() if p.name.startswith(".stage-")]
    assert len(stages) == 1 and (stages[0] / key / "settings.json").is_file()  # complete, not yet in place
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL

    assert tree_hashes(home / "patches") == before
    assert PhenocoderStorage(root=str(home)).partitions("patches") == [key]  # the staging folder is invisible
    latest = _materializations(tmp_path, "patches")
    assert [r.run_id for r in latest] == [first.run_id]  # Dagster still points at the intact result

    os.utime(stages[0], (time.time() - 2 * 86400,) * 2)  # a day later: the next write removes it
    run_here(tmp_path, home, key, ["patches"])
    assert not [p for p in (home / "patches").iterdir() if p.name.startswith(".")]
    assert set(tree_hashes(home / "patches")) == set(before)
    assert len(_materializations(tmp_path, "patches")) == 2


@pytest.mark.slow
def test_parallel_partitions_touch_only_their_own_folders(tmp_path, platform_home, copy_plate):
    home = platform_home
    copy_plate(home / "incoming" / "OTHER")
    with DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions("samples", ["OTHER_A01"])
    run_here(tmp_path, home, "OTHER_A01", ["sdata", "patches"])
    bystander = tree_hashes(home)

    # two partitions at once, each run with the multiprocess executor (one process per step)
    runs = {key: start_run(tmp_path, home, key, ["sdata", "patches"], executor="multiprocess")
            for key in ("TINY_A01", "TINY_A02")}
    for proc in runs.values():
        finish(proc)
    after = tree_hashes(home)
    assert {k: v for k, v in after.items() if "OTHER_A01" in k} == bystander
    new = set(after) - set(bystander)
    assert new and all(re.match(r"^(sdata|patches)/TINY_A0[12]/", f) for f in new)
    for key in runs:
        own = [f for f in new if f.split("/")[1] == key]
        assert {f"sdata/{key}/summary.json", f"patches/{key}/settings.json"} <= set(own)
        assert json.loads((home / "sdata" / key / "summary.json").read_text())["sample"] == key
    assert not [p for p in home.rglob(".*") if p.name.startswith((".stage-", ".tmp"))]
    with DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        records = {r.dagster_run.tags.get("dagster/partition"): r for r in instance.get_run_records()}
    a, b = records["TINY_A01"], records["TINY_A02"]
    assert a.start_time < b.end_time and b.start_time < a.end_time, "the two runs did not overlap"

    # rerun one partition: every other partition's files stay byte-identical
    others = {k: v for k, v in after.items() if "TINY_A01" not in k}
    run_here(tmp_path, home, "TINY_A01", ["sdata", "patches"])
    again = tree_hashes(home)
    assert {k: v for k, v in again.items() if "TINY_A01" not in k} == others
    counts = {}
    for record in _materializations(tmp_path, "sdata"):
        counts[record.partition_key] = counts.get(record.partition_key, 0) + 1
    assert counts == {"OTHER_A01": 1, "TINY_A01": 2, "TINY_A02": 1}


@pytest.mark.slow
def test_a_plate_run_ingests_in_worker_processes_under_the_multiprocess_executor(tmp_path, platform_home):
    """The production path: the step process (a child of Dagster's forkserver) starts its own forkserver and
    ingest workers, and the run records every well with its summary and data version."""
    home = platform_home
    finish(start_run(tmp_path, home, "", ["sdata"], executor="multiprocess", keys=["TINY_A01", "TINY_A02"],
                     sdata_config={"workers": 2}))
    records = _materializations(tmp_path, "sdata")
    assert sorted(r.partition_key for r in records) == ["TINY_A01", "TINY_A02"]
    for key in ("TINY_A01", "TINY_A02"):
        folder = home / "sdata" / key
        assert json.loads((folder / "summary.json").read_text())["n_objects"] > 0
        assert (folder / "sdata.zarr" / "zarr.json").is_file() and (folder / "preview.png").is_file()
        assert json.loads((folder / "data_version.json").read_text())
    assert not [p for p in home.rglob(".*") if p.name.startswith((".stage-", ".tmp"))]  # scratch removed
    with DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        (run,) = instance.get_run_records()
        logs = [e.message for e in instance.all_logs(run.dagster_run.run_id)]
    assert any("ingesting 2 wells in 2 worker processes" in m for m in logs)


# --------------------------------------------------------------------------------------------------
# Nothing unsafe: the sensor
# --------------------------------------------------------------------------------------------------


def _evaluate(home: Path):
    with instance_for_test() as instance:
        ctx = build_sensor_context(instance=instance, resources={"storage": PhenocoderStorage(root=str(home))})
        return incoming_plates_sensor(ctx)


def test_sensor_follows_no_symlink_anywhere(tmp_path, copy_plate, capfd):
    home = tmp_path / "home"
    landing = home / "incoming"
    outside = copy_plate(tmp_path / "OUTSIDE")
    inside = copy_plate(landing / "GOOD")
    # a symlink to a plate that is itself inside the landing folder is refused too (links are never followed)
    (landing / "ALIAS").symlink_to(inside, target_is_directory=True)
    sub = copy_plate(landing / "SUBLINK")  # a sub-folder replaced by a link to the outside
    import shutil

    shutil.rmtree(sub / "labels")
    (sub / "labels").symlink_to(outside / "labels", target_is_directory=True)
    marker = copy_plate(landing / "MARKERLINK")  # the completion marker is a link to a file outside
    (marker / "EXPORT_COMPLETE").unlink()
    (marker / "EXPORT_COMPLETE").symlink_to(outside / "EXPORT_COMPLETE")
    table = copy_plate(landing / "TABLELINK")  # a table replaced by a link to a secret file
    secret = tmp_path / "secret.csv"
    secret.write_text("password,1\n")
    victim = next((table / "tables").iterdir())
    victim.unlink()
    victim.symlink_to(secret)
    result = _evaluate(home)
    assert sorted({r.tags["phenocoder/plate"] for r in result.run_requests}) == ["GOOD"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["GOOD_A01", "GOOD_A02"]
    refused = _logged_refusals(capfd)
    for name in ("ALIAS", "SUBLINK", "MARKERLINK", "TABLELINK"):
        assert any(name in m and "symbolic link" in m for m in refused), (name, refused)


BAD_PLATE_NAMES = ["bad..name", "two words", "semi;colon", "quote'd", "-dash-first", "x|y", "wörd", "a,b",
                   "tab\tname", "new\nline"]


def test_sensor_refuses_bad_plate_names_with_a_logged_reason(tmp_path, copy_plate, capfd):
    home = tmp_path / "home"
    for name in BAD_PLATE_NAMES:
        copy_plate(home / "incoming" / name)
    result = _evaluate(home)
    assert not result.run_requests and not result.dynamic_partitions_requests
    refused = _logged_refusals(capfd)
    assert len(refused) == len(BAD_PLATE_NAMES)
    for name in BAD_PLATE_NAMES:
        assert any(repr(name) in line and "not a valid plate id" in line for line in refused), name


def _logged_refusals(capfd) -> list[str]:
    """The sensor's warnings, as the daemon's log shows them."""
    out, err = capfd.readouterr()
    return [line for line in (out + err).splitlines() if "WARNING" in line and "refused" in line]


def test_hidden_entries_and_files_in_the_landing_folder_are_ignored(tmp_path, copy_plate):
    home = tmp_path / "home"
    copy_plate(home / "incoming" / ".partial-upload")
    (home / "incoming" / "README.txt").write_text("drop plates here")
    result = _evaluate(home)
    assert not result.run_requests and not result.dynamic_partitions_requests


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "a\\b", ""])
def test_storage_refuses_names_that_are_not_folder_names(tmp_path, name):
    storage = PhenocoderStorage(root=str(tmp_path))
    with pytest.raises(ValueError, match="cannot be a folder name"):
        storage.url("patches", name)
    with pytest.raises(ValueError, match="cannot be a folder name"):
        with storage.stage("patches", name):
            pass
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "patches").exists()


# --------------------------------------------------------------------------------------------------
# Nothing unsafe: UIs on loopback, no secrets in code or logs
# --------------------------------------------------------------------------------------------------


def test_printed_ui_commands_bind_to_loopback(tmp_path, capsys):
    from phenocoder_assets.cli import DemoResult, print_instructions

    result = DemoResult(home=tmp_path, dagster_home=tmp_path / "dagster", plate_dir=tmp_path / "incoming" / "DEMO",
                        samples=["DEMO_A01"])
    print_instructions(result)
    text = capsys.readouterr().out
    dagster = [line for line in text.splitlines() if re.match(r"^\s*dagster dev\b", line)]
    mlflow = [line for line in text.splitlines() if re.search(r"mlflow (ui|server)", line)]
    assert dagster and all("-h 127.0.0.1" in line for line in dagster)
    assert mlflow and all("--host 127.0.0.1" in line for line in mlflow)
    assert "0.0.0.0" not in text


@pytest.mark.parametrize("doc", ["README.md", "docs/platform.md"])
def test_documented_ui_commands_bind_to_loopback(doc):
    """Every command line in the docs' code blocks that starts a UI binds it to 127.0.0.1."""
    in_code, commands = False, []
    for line in (REPO / doc).read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif in_code:
            commands.append(line)
    dagster = [c for c in commands if re.search(r"\bdagster dev\b|\bdagster-webserver\b", c)]
    mlflow = [c for c in commands if re.search(r"\bmlflow (ui|server)\b", c)]
    assert dagster and mlflow
    assert all("-h 127.0.0.1" in c for c in dagster), dagster
    assert all("--host 127.0.0.1" in c for c in mlflow), mlflow
    assert not [c for c in commands if "0.0.0.0" in c]


def test_readme_says_how_to_expose_the_uis_safely():
    text = (REPO / "README.md").read_text() + (REPO / "docs/platform.md").read_text()
    assert "ssh -L" in text and "reverse proxy" in text and "auth" in text


@pytest.mark.parametrize(("url", "shown"), [
    ("https://alice:s3cr3t@mlflow.example.org", "https://***@mlflow.example.org"),
    ("postgresql://user:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("http://token@host:5000/path", "http://***@host:5000/path"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("http://host:5000/a@b", "http://host:5000/a@b"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_tracking_credentials_never_reach_links_or_records(monkeypatch):
    monkeypatch.setenv("PHENOCODER_MLFLOW_TRACKING_URI", "https://alice:s3cr3t@mlflow.example.org")
    tracking = MLflowTracking()
    assert tracking.resolved_tracking_uri().endswith("@mlflow.example.org")  # MLflow itself gets the real URI
    assert "s3cr3t" not in tracking.display_tracking_uri()
    monkeypatch.setattr(MLflowTracking, "experiment_id", lambda self: "7")
    assert tracking.run_url("abc") == ("https://***@mlflow.example.org/#/experiments/7/runs/abc"
                                       "?workflowType=machine_learning")
    source = (REPO / "phenocoder_assets/assets/_model_impl.py").read_text()
    assert "resolved_tracking_uri()" not in source  # what is recorded is the display form


def test_storage_urls_with_credentials_are_refused_without_echoing_them():
    with pytest.raises(ValueError, match="embeds credentials") as info:
        resolve_root("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/prefix")
    assert "wJalrXUtnFEMI" not in str(info.value) and "environment" in str(info.value)
    assert resolve_root("s3://bucket/prefix") == "s3://bucket/prefix"


_SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"(?i)(password|secret|token|api_key)\s*=\s*['\"][^'\"]{6,}['\"]"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)\b(https?|postgres(ql)?|mysql)://[^/\s:@'\"]+:[^/\s@'\"]+@"),  # user:password@ in a URL
]


def test_no_secrets_in_code_or_config():
    files = [p for folder in ("phenocoder_lib", "phenocoder_assets", "deploy", "examples", "benchmarks")
             for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in {".py", ".yaml", ".yml", ".toml",
                                                                                 ".md", ".json", ".cfg"}]
    files += [REPO / "pyproject.toml", REPO / "workspace.yaml", REPO / "README.md"]
    assert len(files) > 20
    hits = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in files for pat in _SECRET_PATTERNS
            for m in pat.finditer(p.read_text(errors="replace"))]
    assert hits == []
