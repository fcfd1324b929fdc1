"""What the UI shows, without a browser: descriptions, metadata docs, rounding, pictures, links, config bounds."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from dagster import DagsterInvalidConfigError, build_sensor_context, instance_for_test, materialize
from pydantic import ValidationError

from phenocoder_assets import configs, metadata_docs, previews
from phenocoder_assets.assets._common import round_floats, round_sig
from phenocoder_assets.definitions import ASSETS
from phenocoder_assets.resources import DEFAULT_MLFLOW_UI_URL, MLFLOW_UI_ENV, MLflowTracking, run_name

REPO = Path(__file__).resolve().parents[2]


def _png(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# -- descriptions and the metadata table ---------------------------------------------------------


def test_docs_metadata_page_is_the_generated_table():
    assert (REPO / "docs" / "metadata.md").read_text() == metadata_docs.markdown_table()


@pytest.mark.parametrize("definition", ASSETS, ids=lambda a: a.key.to_user_string())
def test_descriptions_keep_angle_brackets_in_code_and_list_every_key(definition):
    name = definition.key.to_user_string()
    text = definition.descriptions_by_key[definition.key]
    # outside code spans no "<word>" is left for the UI's Markdown renderer to swallow as an HTML tag
    assert not re.search(r"<[a-z_]+>", re.sub(r"`[^`]*`", "", text)), text
    assert "`<root>/" in text
    for key in metadata_docs.METADATA[name]:
        assert f"- `{key}`: " in text


def test_explain_matches_families_and_refuses_unknown_keys():
    assert "Wall-clock seconds" in metadata_docs.explain("model", "seconds_train")
    assert "planted truth" in metadata_docs.explain("embedding", "planted_truth/cell_type_ari")
    assert metadata_docs.explain("patches", "n_padded").startswith("Patches of objects near the image border")
    assert metadata_docs.explain("patches", "no_such_key") is None


# -- numbers and pictures ---------------------------------------------------------------------------


def test_round_sig_keeps_four_significant_digits():
    assert round_sig(1907.3880615234375) == 1907.0
    assert round_sig(0.0010000000474974513) == 0.001
    assert round_sig(-0.000123456) == -0.0001235
    assert round_sig(0.0) == 0.0 and np.isnan(round_sig(float("nan")))
    assert round_floats({"a": [1.23456, 2], "b": (0.5555555,)}) == {"a": [1.235, 2], "b": [0.5556]}


def test_fit_png_downscales_wide_and_heavy_pictures():
    wide = _png(2000, 500)
    small = previews.fit_png(wide)
    assert previews.png_size(small) == (previews.MAX_WIDTH_PX, 160)
    assert len(small) <= previews.MAX_INLINE_BYTES
    heavy = _png(600, 600, seed=1)  # noise compresses badly: ~1 MB at full size
    assert len(heavy) > 300_000
    fitted = previews.fit_png(heavy, max_bytes=200_000)
    assert len(fitted) <= 200_000 and previews.png_size(fitted)[0] < 600
    tiny = _png(50, 40)
    assert previews.fit_png(tiny) is tiny


def test_png_markdown_never_refuses_and_inlines_a_fitting_picture():
    text = previews.png_markdown(_png(3000, 3000, seed=2), "big")
    assert "too large" not in text
    data = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)\)", text).group(1))
    width, height = previews.png_size(data)
    assert width <= previews.MAX_WIDTH_PX and len(data) <= previews.MAX_INLINE_BYTES and width == height


def test_heatmap_and_training_curves_are_pictures():
    matrix = np.array([[2.0, -1.0, np.nan], [-1.0, 3.0, 0.5], [np.nan, 0.5, -2.0]])
    png = previews.heatmap(matrix, ["0", "1", "2"], title="t", colorbar="z")
    assert png.startswith(b"\x89PNG") and previews.png_size(png)[0] > 200
    history = {"loss": [3.0, 2.0], "val_loss": [3.5, 2.5], "reconstruction_loss": [2.9, 1.9],
               "kl_loss": [0.1, 0.1], "learning_rate": [1e-3, 1e-3]}
    width, height = previews.png_size(previews.training_curves(history))
    assert 500 <= width <= previews.MAX_WIDTH_PX and height > 300


# -- MLflow naming and links ------------------------------------------------------------------------


def test_mlflow_ui_url_comes_from_the_setting(monkeypatch, tmp_path):
    monkeypatch.delenv(MLFLOW_UI_ENV, raising=False)
    monkeypatch.delenv("PHENOCODER_MLFLOW_TRACKING_URI", raising=False)
    tracking = MLflowTracking(root=str(tmp_path))
    assert tracking.resolved_ui_url() == DEFAULT_MLFLOW_UI_URL == "http://127.0.0.1:5000"
    monkeypatch.setenv(MLFLOW_UI_ENV, "http://127.0.0.1:5123/")
    assert tracking.run_url("abc", "7") == "http://127.0.0.1:5123/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert MLflowTracking(root=str(tmp_path), ui_url="https://mlflow.lab").resolved_ui_url() == "https://mlflow.lab"
    assert MLflowTracking(tracking_uri="http://tracking:5000").resolved_ui_url() == "http://127.0.0.1:5123"
    monkeypatch.delenv(MLFLOW_UI_ENV)
    assert MLflowTracking(tracking_uri="http://tracking:5000").resolved_ui_url() == "http://tracking:5000"
    url = tracking.compare_url(["r1", "r2"], "7")
    assert url == ("http://127.0.0.1:5000/#/compare-runs?runs=%5B%22r1%22%2C%22r2%22%5D&experiments=%5B%227%22%5D"
                   "&workflowType=machine_learning")
    with pytest.raises(ValueError, match=r"MLflow UI address '127\.0\.0\.1:5000'.*must start with http://"):
        MLflowTracking(root=str(tmp_path), ui_url="127.0.0.1:5000").resolved_ui_url()


def test_run_names_say_asset_and_samples():
    assert run_name("model", ["DEMO_A02", "DEMO_A01"]) == "model DEMO_A01,DEMO_A02"
    assert run_name("model", [f"P_A{i:02d}" for i in range(1, 13)]) == "model P_A01..P_A12 (12 samples)"
    assert run_name("latents", "DEMO_A01") == "latents DEMO_A01"
    assert run_name("model", []) == "model"


def test_experiment_is_tagged_for_model_training(tmp_path):
    import mlflow

    tracking = MLflowTracking(root=str(tmp_path))
    # an experiment made before the tag existed is tagged on first use
    client = mlflow.MlflowClient(tracking.resolved_tracking_uri())
    client.create_experiment("phenocoder", artifact_location=(tmp_path / "art").as_uri())
    experiment_id = tracking.experiment_id()
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    fresh = MLflowTracking(root=str(tmp_path), experiment_name="other")
    assert client.get_experiment(fresh.experiment_id()).tags["mlflow.experimentKind"] == "custom_model_development"


# -- config bounds and choices ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (configs.LatentsConfig, {"spatial_message_passing_radius": -5}, "spatial_message_passing_radius"),
        (configs.GraphStatsConfig, {"radii": [25.0, 0.0]}, "radii.1"),
        (configs.GraphStatsConfig, {"radii": []}, "radii"),
        (configs.PatchesConfig, {"patch_size": [0, 16]}, "patch_size.0"),
        (configs.PatchesConfig, {"patch_size": [16]}, "patch_size"),
        (configs.ModelConfig, {"batch_size": 0}, "batch_size"),
        (configs.ModelConfig, {"validation_fraction": 1.0}, "validation_fraction"),
        (configs.ModelConfig, {"split_by": "well"}, "split_by"),
        (configs.ClusterReferenceConfig, {"knn": "annoy"}, "knn"),
        (configs.ClusterReferenceConfig, {"resolution": 0}, "resolution"),
        (configs.EmbeddingConfig, {"n_dim": 0}, "n_dim"),
        (configs.IngestConfig, {"pixel_size_um": -1.0}, "pixel_size_um"),
    ],
)
def test_config_refuses_out_of_bounds_values_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValidationError) as info:
        cls(**kwargs)
    assert field in str(info.value).splitlines()[1]


def test_every_config_default_is_within_its_bounds():
    for cls in (configs.IngestConfig, configs.PatchesConfig, configs.ModelConfig, configs.LatentsConfig,
                configs.ClusterReferenceConfig, configs.ClustersConfig, configs.GraphStatsConfig,
                configs.EmbeddingConfig):
        cls()
    assert configs.GraphStatsConfig(stats=["centrality"]).stats == ["centrality"]


def test_a_bad_choice_is_refused_before_the_run_starts(tmp_path):
    """Choices are part of Dagster's config schema: the launchpad (and materialize) refuse them up front."""
    from phenocoder_assets.assets.clusters import cluster_reference
    from phenocoder_assets.resources import PhenocoderStorage

    with instance_for_test() as instance:
        with pytest.raises(DagsterInvalidConfigError, match=r"config:knn not in enum type Literal\['faiss'"):
            materialize([cluster_reference], instance=instance, resources={"storage": PhenocoderStorage(
                root=str(tmp_path))}, run_config={"ops": {"cluster_reference": {"config": {"knn": "annoy"}}}})
        assert instance.get_runs() == []  # no run was created


# -- the sensor logs news, not every tick -----------------------------------------------------------


def test_sensor_logs_a_waiting_plate_once(tmp_path, copy_plate, caplog):
    from phenocoder_assets.resources import PhenocoderStorage
    from phenocoder_assets.sensors import incoming_plates_sensor

    home = tmp_path / "home"
    copy_plate(home / "incoming" / "LATE", marker=False)

    import logging

    def tick(instance, cursor):
        ctx = build_sensor_context(instance=instance, cursor=cursor,
                                   resources={"storage": PhenocoderStorage(root=str(home))})
        spy = logging.getLogger("phenocoder-test-sensor-spy")  # what the tick writes to its log
        spy.setLevel(logging.INFO)
        ctx._logger = spy
        caplog.clear()
        with caplog.at_level("INFO", logger=spy.name):
            result = incoming_plates_sensor(ctx)
        return result, [r.getMessage() for r in caplog.records if "landing folder" in r.getMessage()]

    with instance_for_test() as instance:
        first, logged = tick(instance, None)
        assert any("waiting for 'LATE': no EXPORT_COMPLETE marker yet" in m for m in logged), logged
        second, logged = tick(instance, first.cursor)
        assert logged == [] and second.cursor == first.cursor
        (home / "incoming" / "BAD NAME").mkdir()  # news: a refused folder
        third, logged = tick(instance, second.cursor)
        assert any("refused 'BAD NAME'" in m for m in logged) and any("'LATE'" in m for m in logged)
