"""The well_profiles asset on a small synthetic screen plate: scored with a layout.csv, nothing claimed without."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from _instances import DEMO_DAGSTER_YAML
from dagster import AssetKey, DagsterInstance, materialize

pytestmark = pytest.mark.slow

PLATE = "SCREEN00P1"


@pytest.fixture(scope="module")
def screen_home(tmp_path_factory):
    """The demo graph materialized on one plate of a screen (3 controls, 2 treatments x 2 replicates)."""
    from phenocoder_assets.cli import run_demo
    from phenocoder_assets.resources import PhenocoderStorage
    from phenocoder_lib.synthetic import make_synthetic_screen

    base = tmp_path_factory.mktemp("profiles")
    screen = make_synthetic_screen(base / "screen", n_plates=1, n_controls=3, replicates=2, doses=(1.0,),
                                   treatments=("morph_large", "spatial_clustering"), image_size=160,
                                   nuclei_per_well=30, seed=0)
    home = base / "home"
    (home / "dagster").mkdir(parents=True)
    (home / "dagster" / "dagster.yaml").write_text(DEMO_DAGSTER_YAML)
    landing = PhenocoderStorage(root=str(home)).landing_dir
    landing.mkdir(parents=True, exist_ok=True)
    shutil.copytree(screen.plates[0], landing / PLATE)
    saved = {k: os.environ.get(k) for k in ("PHENOCODER_HOME", "DAGSTER_HOME")}
    try:
        result = run_demo(home, epochs=2, patch_size=16, plate=PLATE, quiet=True)
        yield result
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _materialize(result, instance):
    from phenocoder_assets.definitions import ASSETS
    from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage

    resources = {"storage": PhenocoderStorage(root=str(result.home)), "mlflow": MLflowTracking(root=str(result.home))}
    res = materialize(ASSETS, selection=["well_profiles"], instance=instance, resources=resources,
                      run_config={"ops": {"well_profiles": {"config": {"null_size": 500, "seed": 0}}}})
    assert res.success
    checks = res.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("well_profiles_complete", True)]
    return res.get_asset_materialization_events()[0].materialization.metadata


def test_profiles_are_scored_with_a_layout_and_not_without(screen_home):
    import pandas as pd

    assert len(screen_home.samples) == 7
    with DagsterInstance.from_config(str(screen_home.dagster_home)) as instance:
        meta = _materialize(screen_home, instance)
        assert meta["scored"].value is True
        assert meta["profiling/n_wells_with_layout"].value == 7
        # the demo encodes without spatial message passing (the default): no message-passed profile
        assert not [k for k in meta if k.startswith("profiling/latents_message_passing/")]
        for rep in ("latents", "graph_stats", "combined"):
            for metric in ("map_activity", "fraction_retrieved_activity", "percent_replicating"):
                value = meta[f"profiling/{rep}/{metric}"].value
                assert 0.0 <= value <= 1.0, (rep, metric, value)
        out = screen_home.home / "well_profiles" / "_"
        latents = pd.read_parquet(out / "latents.parquet")
        assert sorted(latents.index) == screen_home.samples
        assert latents["n_objects"].min() >= 20
        # the arrangement features of the validate --json path: every well, three cell types fitted on controls
        arrangement = pd.read_parquet(out / "arrangement.parquet")
        assert sorted(arrangement.index) == screen_home.samples
        assert {"arrangement:homotypic_k4", "arrangement:radial_sd:2"} <= set(arrangement.columns)
        assert arrangement["arrangement:homotypic_k4"].between(0, 1).all()
        doc = json.loads((out / "evaluation.json").read_text())
        assert set(doc["representations"]["combined"]["subsets"]) == {"morphology", "spatial"}

        layout = screen_home.plate_dir / "layout.csv"
        hidden = layout.with_suffix(".hidden")
        layout.rename(hidden)  # now a plain export: nothing may be claimed
        try:
            meta = _materialize(screen_home, instance)
        finally:
            hidden.rename(layout)
        assert meta["scored"].value is False
        assert not [k for k in meta if k.startswith("profiling/")]
        assert not (out / "evaluation.json").exists()
        latest = instance.get_latest_materialization_event(AssetKey("well_profiles"))
        assert latest.asset_materialization.metadata["scored"].value is False
