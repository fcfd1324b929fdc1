"""The code location: loads fast without TensorFlow, and has the asset graph the UI shows."""

from __future__ import annotations

import json
import subprocess
import sys

from dagster import AssetKey, DefaultScheduleStatus, DefaultSensorStatus, instance_for_test

PER_SAMPLE = {"sdata", "patches", "latents", "clusters", "graph_stats"}
CROSS_SAMPLE = {"model", "cluster_reference", "embedding", "well_profiles"}
EDGES = {
    "sdata": set(), "patches": {"sdata"}, "model": {"patches"}, "latents": {"sdata", "patches", "model"},
    "cluster_reference": {"latents"}, "clusters": {"latents", "cluster_reference"},
    # embedding -> latents: Dagster reports only a direct dependency's change as STALE
    "graph_stats": {"latents", "clusters"}, "embedding": {"graph_stats", "latents"},
    "well_profiles": {"latents", "graph_stats"},
}


def test_import_is_fast_and_light():
    code = ("import sys, time, json; t = time.perf_counter(); import phenocoder_assets.definitions as d; "
            "dt = time.perf_counter() - t; heavy = [m for m in ('tensorflow', 'keras', 'mlflow', 'spatialdata', "
            "'scanpy', 'anndata', 'matplotlib') if m in sys.modules]; print(json.dumps([dt, heavy]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    seconds, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == []
    assert "tensorflow" not in heavy
    assert seconds < 10, f"importing the code location took {seconds:.1f} s"


def test_graph_shape_partitions_and_checks():
    with instance_for_test():  # resolve the definitions inside a test instance (dagster pitfall)
        from phenocoder_assets.definitions import defs

        graph = defs.resolve_asset_graph()
        keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
        assert keys == PER_SAMPLE | CROSS_SAMPLE
        for name, parents in EDGES.items():
            assert {p.to_user_string() for p in graph.get(AssetKey(name)).parent_keys} == parents, name
        for name in PER_SAMPLE:
            pdef = graph.get(AssetKey(name)).partitions_def
            assert pdef is not None and pdef.name == "samples", name
        for name in CROSS_SAMPLE:
            assert graph.get(AssetKey(name)).partitions_def is None, name
        checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
        assert checks == {("patches", "every_object_has_a_patch"), ("latents", "every_object_has_a_latent"),
                          ("latents", "latents_finite"), ("graph_stats", "graph_stats_complete"),
                          ("well_profiles", "well_profiles_complete"),
                          *((name, "every_well_processed") for name in PER_SAMPLE)}
        from phenocoder_assets.assets.model import model

        assert model.op.pool == "gpu"


def test_sensor_schedule_and_jobs():
    with instance_for_test():
        from phenocoder_assets.definitions import defs

        sensor = defs.resolve_sensor_def("incoming_plates_sensor")
        assert sensor.default_status == DefaultSensorStatus.RUNNING
        assert sensor.job_name == "sample_pipeline"
        refresh_stale = defs.resolve_sensor_def("refresh_stale_sensor")
        assert refresh_stale.default_status == DefaultSensorStatus.STOPPED  # started deliberately
        assert {t.job_name for t in refresh_stale.targets} == {"sample_pipeline", "refresh_summaries"}
        schedule = defs.resolve_schedule_def("nightly_refresh")
        assert schedule.default_status == DefaultScheduleStatus.RUNNING
        assert schedule.cron_schedule == "0 3 * * *"
        refresh = defs.resolve_job_def("refresh_summaries")
        assert {k.to_user_string() for k in refresh.asset_layer.selected_asset_keys} == {"embedding"}
        pipeline = defs.resolve_job_def("sample_pipeline")
        assert {k.to_user_string() for k in pipeline.asset_layer.selected_asset_keys} == PER_SAMPLE
        train = defs.resolve_job_def("train_model")
        assert {k.to_user_string() for k in train.asset_layer.selected_asset_keys} == {"model"}
        assert train.tags["phenocoder/gpu"] == "true"
        assert set(defs.resources) == {"storage", "mlflow"}


def test_every_asset_takes_a_config_with_the_library_parameters():
    from phenocoder_assets import configs

    assert {"patch_size", "scale", "scale_percentile", "scale_per_sample", "metadata_keys", "n_patches"} <= \
        set(configs.PatchesConfig.model_fields)
    assert {"n_latent_dim", "n_dense_dim", "conditions", "dropout", "batch_size", "conv_layers", "beta", "flip",
            "shuffle", "n_epochs", "learning_rate", "min_learning_rate", "factor_learning_rate",
            "learning_rate_patience", "early_stopping_patience", "plot", "n_preview", "plot_frac"} <= \
        set(configs.ModelConfig.model_fields)
    assert {"batch_size", "spatial_message_passing_radius"} <= set(configs.LatentsConfig.model_fields)
    assert {"radii", "stats", "chull_min_nds", "chull_min_degree", "use_subunits", "dim_subunit",
            "min_obs_per_subunit", "max_obs_per_subunit"} <= set(configs.GraphStatsConfig.model_fields)
    assert {"n_dim", "scale", "variable_features", "batch_correction", "batch_key", "confounder_key",
            "n_neighbors", "umap", "obs_keys"} <= set(configs.EmbeddingConfig.model_fields)
    # the model's arguments are exactly the facade's
    import inspect

    from phenocoder_lib import Phenocoder

    init = set(inspect.signature(Phenocoder.initialize_model).parameters) - {"self"}
    # verbose, the on_epoch_end callback and resume (continue a killed training) are runtime choices, not settings
    train = set(inspect.signature(Phenocoder.train).parameters) - {"self", "verbose", "on_epoch_end", "resume"}
    config = configs.ModelConfig()
    assert set(config.model_kwargs([32, 32, 4])) == init
    assert set(config.train_kwargs()) == train


def test_workspace_yaml_points_at_the_definitions():
    from pathlib import Path

    import yaml

    workspace = yaml.safe_load((Path(__file__).resolve().parents[2] / "workspace.yaml").read_text())
    target = workspace["load_from"][0]["python_module"]
    assert target["module_name"] == "phenocoder_assets.definitions" and target["attribute"] == "defs"


def test_cli_help_and_argument_checks(capsys):
    import pytest

    from phenocoder_assets.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--home" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--wells", "1"])
    assert "--wells must be >= 2" in capsys.readouterr().err


def test_cli_validate_help_and_argument_checks(capsys):
    import pytest

    from phenocoder_assets.cli import main

    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    out = capsys.readouterr().out
    assert "--wells-per-treatment" in out and "--strict" in out and "--seed" in out
    with pytest.raises(SystemExit):
        main(["validate", "--wells-per-treatment", "1"])
    assert "--wells-per-treatment must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["validate", "--epochs", "0"])
    assert "--epochs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    assert "--json" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["validate", "--json", "--plates", "0"])
    assert "--plates must be >= 1" in capsys.readouterr().err


def test_demo_warm_up_compiles_in_a_child_process_only_when_the_kernels_are_not_cached(monkeypatch):
    import subprocess

    import phenocoder_lib.pipeline as pipeline
    from phenocoder_assets import cli

    children, in_process = [], []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: children.append(args))
    monkeypatch.setattr(pipeline, "warm_up_kernels", lambda: in_process.append(1) or {})
    for cached in (False, True):
        monkeypatch.setattr(pipeline, "kernels_cached", lambda cached=cached: cached)
        cli._warm_up_kernels()
    assert len(children) == 1 and children[0][1:] == ["-c", cli._COMPILE_KERNELS]
    assert in_process == [1, 1]  # then loaded (or compiled) in the demo's process, cached or not
    monkeypatch.setattr(pipeline, "kernels_cached", lambda: 1 / 0)
    cli._warm_up_kernels()  # a failing warm-up never fails the demo
