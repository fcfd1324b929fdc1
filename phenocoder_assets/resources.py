"""Resources: the storage root (local folder or fsspec URL) and MLflow tracking.

Storage layout (``<root>`` = ``PhenocoderStorage.root``, default ``$PHENOCODER_HOME`` or
``.phenocoder/`` under the working directory)::

    <root>/incoming/<plate>/          landing folder watched by the sensor
    <root>/<asset>/<sample>/          one folder per partitioned asset and partition
    <root>/<asset>/_/                 unpartitioned assets (model, cluster_reference, embedding)
    <root>/mlflow.db, mlartifacts/    default MLflow tracking store and artifacts

Every folder is written aside and renamed into place when complete (:meth:`PhenocoderStorage.stage`),
so a failed or killed run leaves the previous result untouched. On object stores (``s3://``,
``gs://``, ...) the new folder is uploaded completely under a temporary name before the old one is
removed and the new one moved into place; the library works on local files, so remote folders are
read through a local cache (:meth:`PhenocoderStorage.local_path`).

Nothing heavy is imported here: MLflow is imported when a run is opened.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from phenocoder_lib.io import replace_dir

#: Environment variable that moves the storage root (and the default MLflow store) elsewhere.
HOME_ENV = "PHENOCODER_HOME"
#: Environment variable for a landing folder outside the root (e.g. a mounted volume).
LANDING_ENV = "PHENOCODER_LANDING"
#: Environment variable for an MLflow tracking server (teams); default: SQLite under the root.
TRACKING_ENV = "PHENOCODER_MLFLOW_TRACKING_URI"
#: Environment variable for the address of the MLflow UI that the ``model`` page links to.
MLFLOW_UI_ENV = "PHENOCODER_MLFLOW_UI_URL"
#: Where ``mlflow ui`` listens by default (and what the demo prints).
DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"
#: MLflow 3 opens an experiment in its model-training view (runs, metrics, charts) rather than its GenAI
#: view (traces) when the experiment carries this tag with this value.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
#: MLflow 3's UI remembers a "GenAI" / "Model training" switch per browser (GenAI by default); a link that
#: carries this query parameter opens in the model-training layout whatever the browser remembered.
_ML_VIEW = "workflowType=machine_learning"
DEFAULT_ROOT = ".phenocoder"
#: Folder name used for unpartitioned assets, so every asset has the same depth.
UNPARTITIONED = "_"
_STAGE_PREFIX = ".stage-"
_STALE_SECONDS = 24 * 3600


def resolve_root(root: str | None) -> str:
    """Return the storage root as an absolute local path or an fsspec URL (``s3://bucket/prefix``)."""
    value = root or os.environ.get(HOME_ENV) or DEFAULT_ROOT
    if _is_url(value) and not value.startswith("file://"):
        _refuse_credentials(value, "the storage root", "give them through the environment (AWS_ACCESS_KEY_ID/"
                            "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...) or the driver's config")
        return value.rstrip("/")
    if value.startswith("file://"):
        value = value[len("file://"):]
    return str(Path(value).expanduser().resolve())


def _is_url(value: str) -> bool:
    return "://" in value


_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@]*)@")


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` part replaced by ``***@`` (for logs, metadata, files)."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}***@", str(url))


def _refuse_credentials(url: str, what: str, how: str) -> str:
    if _USERINFO.match(url):
        raise ValueError(f"{what} {redact_url(url)!r} embeds credentials; remove them from the URL and {how}.")
    return url


class PhenocoderStorage(ConfigurableResource):
    """Where every asset reads and writes its files: one folder per asset and partition.

    ``root`` may be a local folder or any fsspec URL (``s3://bucket/phenocoder``,
    ``gs://...``; install the matching fsspec driver, e.g. ``s3fs``). Unset, it is
    ``$PHENOCODER_HOME`` or ``.phenocoder/`` under the working directory.
    """

    root: str | None = Field(
        default=None,
        description="Storage root: local folder or fsspec URL. Default: $PHENOCODER_HOME or ./.phenocoder.",
    )
    landing: str | None = Field(
        default=None,
        description="Landing folder for new plate exports (local). Default: $PHENOCODER_LANDING or <root>/incoming.",
    )

    # ------------------------------------------------------------------------------------------
    @property
    def root_url(self) -> str:
        """The resolved root (absolute local path or URL)."""
        return resolve_root(self.root)

    @property
    def is_local(self) -> bool:
        """Whether the root is a local folder."""
        return not _is_url(self.root_url)

    @property
    def landing_dir(self) -> Path:
        """The local landing folder watched by the sensor."""
        landing = self.landing or os.environ.get(LANDING_ENV)
        if landing:
            return Path(landing).expanduser().resolve()
        if not self.is_local:
            raise ValueError(
                f"the storage root {self.root_url!r} is remote: set PhenocoderStorage(landing=...) to a local "
                "folder that the sensor can watch (mount the bucket or sync exports there)."
            )
        return Path(self.root_url) / "incoming"

    def url(self, asset: str, partition: str | None = None) -> str:
        """Location of the folder of ``asset`` (and ``partition``) under the root."""
        _check_name(asset, "asset")
        name = UNPARTITIONED if partition is None else _check_name(partition, "partition")
        return f"{self.root_url}/{asset}/{name}"

    def _fs(self) -> Any:
        from fsspec.core import url_to_fs

        fs, _ = url_to_fs(self.root_url)
        return fs

    def exists(self, asset: str, partition: str | None = None) -> bool:
        """Whether a completed folder exists for ``asset``/``partition``."""
        if self.is_local:
            return Path(self.url(asset, partition)).is_dir()
        return bool(self._fs().exists(self.url(asset, partition)))

    def partitions(self, asset: str) -> list[str]:
        """Partition folders present for ``asset`` (completed writes only), sorted."""
        base = f"{self.root_url}/{asset}"
        if self.is_local:
            folder = Path(base)
            names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        else:
            fs = self._fs()
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)] if fs.exists(base) else []
        return sorted(n for n in names if not n.startswith(".") and n != UNPARTITIONED)

    def local_path(self, asset: str, partition: str | None = None) -> Path:
        """Return a local folder with the content of ``asset``/``partition`` (the folder itself when local).

        Raises ``FileNotFoundError`` naming the asset to materialize first when it is absent.
        """
        if not self.exists(asset, partition):
            what = f"{asset!r}" + ("" if partition is None else f" for partition {partition!r}")
            raise FileNotFoundError(
                f"no materialization of {what} under {self.root_url!r}; materialize {asset!r}"
                + ("" if partition is None else f" for {partition!r}") + " first."
            )
        if self.is_local:
            return Path(self.url(asset, partition))
        cache = Path(tempfile.mkdtemp(prefix=f"phenocoder-{asset}-"))
        target = cache / (partition or UNPARTITIONED)
        self._fs().get(self.url(asset, partition) + "/", str(target), recursive=True)
        return target

    @contextlib.contextmanager
    def stage(self, asset: str, partition: str | None = None) -> Iterator[Path]:
        """Yield a local path (not yet created) to write the folder of ``asset``/``partition`` into.

        When the block succeeds the folder replaces the previous one in one rename (local roots);
        on error it is removed and the previous folder is left as it was.
        """
        final = self.url(asset, partition)
        if self.is_local:
            parent = Path(final).parent
            parent.mkdir(parents=True, exist_ok=True)
            _clean_stale_stages(parent)
            work = parent / f"{_STAGE_PREFIX}{uuid.uuid4().hex[:12]}"
        else:
            work = Path(tempfile.mkdtemp(prefix=f"phenocoder-stage-{asset}-"))
        work.mkdir(parents=True, exist_ok=True)
        out = work / (partition or UNPARTITIONED)
        try:
            yield out
            if not out.exists():
                raise RuntimeError(f"the {asset!r} step wrote nothing to {str(out)!r}; nothing to commit.")
            if self.is_local:
                replace_dir(out, Path(final))
            else:
                self._upload_replace(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @contextlib.contextmanager
    def scratch(self, asset: str) -> Iterator[Path]:
        """Yield an empty local folder for work in progress of ``asset``, removed when the block ends.

        On a local root it lies beside the asset's folders (a rename moves its files into a :meth:`stage`;
        a killed run's scratch is cleaned as its stages are); elsewhere it is a temporary folder.
        """
        if self.is_local:
            parent = Path(self.url(asset)).parent
            parent.mkdir(parents=True, exist_ok=True)
            work = parent / f"{_STAGE_PREFIX}scratch-{uuid.uuid4().hex[:12]}"
            work.mkdir()
        else:
            work = Path(tempfile.mkdtemp(prefix=f"phenocoder-scratch-{asset}-"))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _upload_replace(self, src: Path, final: str) -> None:
        fs = self._fs()
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:10]}"
        fs.put(str(src) + "/", tmp, recursive=True)
        if fs.exists(final):
            old = f"{final}.old-{uuid.uuid4().hex[:10]}"
            fs.mv(final, old, recursive=True)
            fs.mv(tmp, final, recursive=True)
            fs.rm(old, recursive=True)
        else:
            fs.mv(tmp, final, recursive=True)


def _check_name(name: str, what: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith(".") or ".." in name:
        raise ValueError(f"{what} name {name!r} cannot be a folder name (no '/', '\\', '..', leading '.').")
    return name


def _clean_stale_stages(folder: Path) -> None:
    """Remove staging folders of killed runs (older than a day; younger ones may be in use)."""
    now = time.time()
    for p in folder.iterdir():
        if p.name.startswith(_STAGE_PREFIX):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > _STALE_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)


class MLflowTracking(ConfigurableResource):
    """MLflow tracking for the ``model`` asset (plain ``mlflow``; no dagster-mlflow).

    Default store: ``sqlite:///<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts`` (MLflow 3
    would otherwise write ``./mlflow.db`` wherever the step process runs). Teams set
    ``tracking_uri`` (or ``$PHENOCODER_MLFLOW_TRACKING_URI``) to a tracking server
    (``http://mlflow.internal:5000``), which then also decides where artifacts go.
    """

    tracking_uri: str | None = Field(
        default=None, description="Default: $PHENOCODER_MLFLOW_TRACKING_URI or sqlite:///<root>/mlflow.db."
    )
    artifact_location: str | None = Field(
        default=None, description="Artifact root of a new experiment. Default: <root>/mlartifacts (file store)."
    )
    experiment_name: str = Field(default="phenocoder", description="MLflow experiment of the training runs.")
    registered_model_name: str = Field(default="phenocoder-cvae", description="Model registry name.")
    champion_alias: str = Field(default="champion", description="Registry alias moved to each new model version.")
    root: str | None = Field(default=None, description="Storage root for the defaults (as PhenocoderStorage.root).")
    ui_url: str | None = Field(
        default=None, description="Address of the MLflow UI that the model page links to. Default: "
        "$PHENOCODER_MLFLOW_UI_URL, else the tracking server's address (http tracking URI), else "
        "http://127.0.0.1:5000 (where `mlflow ui` listens by default).",
    )

    def resolved_tracking_uri(self) -> str:
        """Return the tracking URI in use (config, environment, or the SQLite file under the root)."""
        if self.tracking_uri or os.environ.get(TRACKING_ENV):
            return self.tracking_uri or os.environ[TRACKING_ENV]
        root = resolve_root(self.root)
        if _is_url(root):
            raise ValueError(
                f"the storage root {root!r} is remote: set MLflowTracking(tracking_uri=...) to a tracking server "
                "or a database URL (a SQLite file cannot live in an object store)."
            )
        return f"sqlite:///{root}/mlflow.db"

    def display_tracking_uri(self) -> str:
        """The tracking URI with any ``user:password@`` removed: the form that is logged and stored.

        Credentials for a tracking server belong in the environment (``MLFLOW_TRACKING_USERNAME`` /
        ``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``), which MLflow reads itself.
        """
        return redact_url(self.resolved_tracking_uri())

    def resolved_artifact_location(self) -> str | None:
        """Artifact root for a new experiment (``None``: the tracking server decides)."""
        if self.artifact_location:
            return self.artifact_location
        scheme = self.resolved_tracking_uri().split(":", 1)[0].split("+")[0].lower()
        if scheme in ("http", "https", "databricks"):
            return None  # a tracking server decides where artifacts go
        # a database store (SQLite, PostgreSQL, MySQL) keeps no artifacts: they go under the root
        return Path(resolve_root(self.root), "mlartifacts").as_uri()

    def client(self) -> Any:
        """Return an ``mlflow.MlflowClient`` on the configured store (and set the global URI to match)."""
        import mlflow

        uri = self.resolved_tracking_uri()
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)

    def experiment_id(self) -> str:
        """Id of the configured experiment, created on first use."""
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            try:
                return client.create_experiment(self.experiment_name,
                                                artifact_location=self.resolved_artifact_location(),
                                                tags=dict([EXPERIMENT_KIND_TAG]))
            except Exception:  # created concurrently by another step
                exp = client.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    raise
        key, value = EXPERIMENT_KIND_TAG
        if exp.tags.get(key) != value:  # experiments made before the tag existed (or by hand)
            client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    @contextlib.contextmanager
    def start_run(self, *, run_name: str, tags: dict[str, str]) -> Iterator[Any]:
        """Open one MLflow run in the configured experiment; ends it FAILED if the block raises."""
        import mlflow

        experiment_id = self.experiment_id()
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
            yield run

    def resolved_ui_url(self) -> str:
        """Address of the MLflow UI: ``ui_url``, ``$PHENOCODER_MLFLOW_UI_URL``, the tracking server, the default."""
        for candidate in (self.ui_url, os.environ.get(MLFLOW_UI_ENV)):
            if candidate:
                if not candidate.startswith(("http://", "https://")):
                    raise ValueError(f"the MLflow UI address {candidate!r} (MLflowTracking.ui_url or ${MLFLOW_UI_ENV}) "
                                     "must start with http:// or https://, e.g. http://127.0.0.1:5000.")
                return redact_url(candidate).rstrip("/")
        uri = self.display_tracking_uri()
        return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_MLFLOW_UI_URL

    def run_url(self, run_id: str, experiment_id: str | None = None) -> str:
        """Return the link to the run's page in the MLflow UI (see :meth:`resolved_ui_url`)."""
        experiment_id = experiment_id or self.experiment_id()
        return f"{self.resolved_ui_url()}/#/experiments/{experiment_id}/runs/{run_id}?{_ML_VIEW}"

    def compare_url(self, run_ids: list[str], experiment_id: str) -> str:
        """Return the link to MLflow's side-by-side comparison of ``run_ids`` (parameters and metric curves)."""
        import json
        from urllib.parse import quote

        runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
        experiments = quote(json.dumps([experiment_id], separators=(",", ":")))
        return f"{self.resolved_ui_url()}/#/compare-runs?runs={runs}&experiments={experiments}&{_ML_VIEW}"


def run_name(asset: str, partitions: list[str] | str | None) -> str:
    """MLflow run name of a materialization: the asset, then its partition or the samples it used.

    ``run_name("model", ["DEMO_A01", "DEMO_A02"])`` is ``"model DEMO_A01,DEMO_A02"``; more than three
    samples read ``"model DEMO_A01..DEMO_H12 (96 samples)"``.
    """
    if partitions is None or partitions == []:
        return asset
    if isinstance(partitions, str):
        return f"{asset} {partitions}"
    names = sorted(str(p) for p in partitions)
    if len(names) <= 3:
        return f"{asset} {','.join(names)}"
    return f"{asset} {names[0]}..{names[-1]} ({len(names)} samples)"
