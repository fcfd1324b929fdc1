"""Bad input, a catalogue, through the Dagster assets (the library side: ``tests/lib/test_bad_input_*.py``).

One tiny plate is materialized once (sdata, patches, a one-epoch model trained on well A01 with the
condition ``dataset``, latents). Each case then launches a run with a bad Config or a damaged plate and
asserts that the run fails with the library's clear error (type, argument or file, value, fix) in the
step failure event, and that the earlier materialization's files are byte-identical and no
materialization was recorded. The sensor cases check that unfinished exports are not picked up.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance, build_sensor_context, materialize

from phenocoder_assets.definitions import ASSETS
from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage
from phenocoder_assets.sensors import MARKER, incoming_plates_sensor

PLATE = "TINY"
A01, A02 = f"{PLATE}_A01", f"{PLATE}_A02"
PATCHES = {"patch_size": [16, 16]}
MODEL = {
    "samples": [A01],
    "conditions": ["dataset"],
    "n_epochs": 1,
    "n_latent_dim": 4,
    "n_dense_dim": 8,
    "conv_layers": [8, 16],
    "batch_size": 8,
    "plot": False,
    "dropout": None,
}

pytestmark = pytest.mark.slow


class Platform:
    """A home with the tiny plate materialized once; ``run`` materializes one asset (one partition)."""

    def __init__(self, home: Path, instance: DagsterInstance) -> None:
        self.home, self.instance = home, instance
        self.resources = {"storage": PhenocoderStorage(root=str(home)), "mlflow": MLflowTracking(root=str(home))}

    def run(self, asset: str, partition: str | None = None, config: dict | None = None):
        run_config = {"ops": {asset: {"config": config}}} if config else None
        return materialize(
            ASSETS,
            selection=[asset],
            partition_key=partition,
            instance=self.instance,
            resources=self.resources,
            run_config=run_config,
            raise_on_error=False,
        )

    def folder(self, asset: str, partition: str | None = None) -> Path:
        return self.home / asset / (partition or "_")


@pytest.fixture(scope="module")
def platform(tmp_path_factory, tiny_plate_template):
    home = tmp_path_factory.mktemp("bad_assets") / "home"
    shutil.copytree(tiny_plate_template, home / "incoming" / PLATE)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("samples", [A01, A02])
        p = Platform(home, instance)
        for sample in (A01, A02):
            assert p.run("sdata", sample, {"preview": False}).success
            assert p.run("patches", sample, PATCHES).success
        assert p.run("model", config=MODEL).success
        assert p.run("latents", A01).success
        yield p


def _failure(result) -> str:
    """``ExceptionType: message`` of the failed step, with its causes (what the Dagster UI shows)."""
    assert not result.success
    parts = []
    for event in result.get_step_failure_events():
        error = event.event_specific_data.error
        while error is not None:
            parts.append(f"{error.cls_name}: {error.message.strip()}")
            error = error.cause
    return "\n".join(parts)


def _assert_fails_and_keeps(platform, folder_digest, asset, partition, config, match):
    """The run fails with ``match`` in its error, the earlier files are byte-identical, nothing recorded."""
    target = platform.folder(asset, partition)
    before = folder_digest(target)
    event = platform.instance.get_latest_materialization_event(AssetKey(asset))
    result = platform.run(asset, partition, config)
    text = _failure(result)
    assert re.search(match, text, flags=re.DOTALL), text
    assert folder_digest(target) == before
    assert not list(target.parent.glob(".stage-*")), "staging folder left behind"
    latest = platform.instance.get_latest_materialization_event(AssetKey(asset))
    assert latest.run_id == event.run_id  # the failed run recorded no materialization
    return text


# --------------------------------------------------------------------------------------------------
# Wrong keys and settings through the asset Config
# --------------------------------------------------------------------------------------------------

CONFIG_ERRORS = [
    (
        "patches_obsm_key",
        "patches",
        A01,
        {**PATCHES, "spatial_key_index": "xy"},
        r"KeyError: spatial_key_index='xy' is not a key of \.obsm; available: \[.*'spatial_index'.*\]\. "
        r"Store coordinates",
    ),
    (
        "patches_metadata_key",
        "patches",
        A01,
        {**PATCHES, "metadata_keys": ["donor"]},
        r"metadata_keys='donor' is not a column of \.obs",
    ),
    (
        "patch_size_zero",
        "patches",
        A01,
        {"patch_size": [0, 16]},
        r"ValidationError: 1 validation error for PatchesConfig\npatch_size\.0\n  Input should be greater than 0 ",
    ),
    ("patch_size_three_values", "patches", A01, {"patch_size": [16, 16, 3]},
     r"ValidationError: 1 validation error for PatchesConfig\npatch_size\n  Value error, patch_size needs 2 values "
     r"\(height, width\), got \[16, 16, 3\]"),
    (
        "ingest_column",
        "sdata",
        A01,
        {"y_column": "centroid_y", "preview": False},
        r"KeyError: .*table '.*A01\.csv' lacks columns \['centroid_y'\].*PlateLayout\(label_column=\.\.\., y_column",
    ),
    (
        "ingest_pattern",
        "sdata",
        A01,
        {"image_pattern": r"_(?P<well>X\d\d)_C(?P<channel>\d)\.png$", "preview": False},
        r"FileNotFoundError: no image file in '.*imgs' matches the pattern .*pass PlateLayout\(image_pattern=\.\.\.\)",
    ),
    (
        "ingest_scale",
        "sdata",
        A01,
        {"pixel_size_um": -1.0, "preview": False},
        r"ValidationError: 1 validation error for IngestConfig\npixel_size_um\n  Input should be greater than 0 ",
    ),
    (
        "hw_not_divisible",
        "model",
        None,
        {**MODEL, "conv_layers": [8, 16, 32, 64, 128]},
        r"ValueError: input_shape=\(16, 16, 2\).*divisible by 2\*\*len\(conv_layers\) = 32",
    ),
    (
        "condition_column",
        "model",
        None,
        {**MODEL, "conditions": ["donor"]},
        r"KeyError: .*unknown condition column 'donor'",
    ),
    (
        "model_samples",
        "model",
        None,
        {**MODEL, "samples": ["TINY_Z99"]},
        r"ValueError: ModelConfig.samples=\['TINY_Z99'\] names unknown samples; registered samples are: TINY_A01, "
        r"TINY_A02\. Fix the names",
    ),
    (
        "latents_spatial_key",
        "latents",
        A01,
        {"spatial_key": "xy", "spatial_message_passing_radius": 10.0},
        r"KeyError: spatial_key='xy' is not a key of \.obsm",
    ),
    (
        "latents_radius",
        "latents",
        A01,
        {"spatial_message_passing_radius": -1.0},
        # refused by the config's bound before the step reads anything
        r"ValidationError: 1 validation error for LatentsConfig\nspatial_message_passing_radius\n"
        r"  Input should be greater than 0 \[type=greater_than, input_value=-1\.0",
    ),
]


@pytest.mark.parametrize(
    ("asset", "partition", "config", "match"), [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS]
)
def test_bad_config_fails_clearly_and_keeps_the_earlier_result(
    platform, folder_digest, asset, partition, config, match
):
    _assert_fails_and_keeps(platform, folder_digest, asset, partition, config, match)


# --------------------------------------------------------------------------------------------------
# Damaged plates: the sdata asset reads a damaged copy (IngestConfig.plate_dir) of the same well
# --------------------------------------------------------------------------------------------------


def _truncate_image(root: Path) -> None:
    victim = sorted((root / "imgs").glob("*_A01_*"))[0]
    victim.write_bytes(victim.read_bytes()[:100])


def _drop_channel(root: Path) -> None:
    sorted((root / "imgs").glob("*_A01_*"))[-1].unlink()


def _drop_mask(root: Path) -> None:
    sorted((root / "labels").glob("*_A01_*"))[0].unlink()


def _labels_not_in_masks(root: Path) -> None:
    table = root / "tables" / "A01.csv"
    df = pd.read_csv(table)
    df.loc[0, "label"] = 777
    df.to_csv(table, index=False)


def _stray_slice_table(root: Path) -> None:  # a table for a z-slice without images: a missing slice
    shutil.copy(root / "tables" / "A01.csv", root / "tables" / "A01_7.csv")


DAMAGE = [
    (
        "truncated_image",
        _truncate_image,
        r"OSError: cannot read image file '.*_A01_.*\.png': .*Re-export or remove the file",
    ),
    (
        "missing_channel",
        _drop_channel,
        r"FileNotFoundError: plate 'TINY' is incomplete: 1 image or label files are missing, e\.g\. \['A01 z=0 "
        r"channel=C0\d'\]\. Wait until the export has finished",
    ),
    ("missing_mask", _drop_mask, r"FileNotFoundError: plate 'TINY' is incomplete: .*\['label A01 z=0'\]"),
    (
        "missing_z_slice",
        _stray_slice_table,
        r"FileNotFoundError: plate 'TINY' is incomplete: tables name z-slices \[7\] that have no images",
    ),
    (
        "labels_not_in_masks",
        _labels_not_in_masks,
        r"ValueError: table '.*A01\.csv' names 1 label ids that do not occur in its mask '.*': \[777\].*"
        r"check_labels=False",
    ),
]


@pytest.mark.parametrize(("damage", "match"), [c[1:] for c in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_damaged_plate_fails_clearly_and_keeps_the_earlier_sdata(
    platform, folder_digest, tiny_plate_template, tmp_path, damage, match
):
    root = Path(shutil.copytree(tiny_plate_template, tmp_path / PLATE))
    damage(root)
    _assert_fails_and_keeps(platform, folder_digest, "sdata", A01, {"plate_dir": str(root), "preview": False}, match)


# --------------------------------------------------------------------------------------------------
# The sensor: exports still being written, or marked complete but damaged, are not picked up
# --------------------------------------------------------------------------------------------------


def _sensor(platform, landing: Path):
    storage = PhenocoderStorage(root=str(platform.home), landing=str(landing))
    return incoming_plates_sensor(build_sensor_context(instance=platform.instance, resources={"storage": storage}))


def test_sensor_ignores_exports_still_being_written_or_incomplete(platform, tiny_plate_template, tmp_path):
    landing = tmp_path / "landing"
    wip = Path(shutil.copytree(tiny_plate_template, landing / "WIP"))
    (wip / MARKER).unlink()  # the exporter is still writing
    broken = Path(shutil.copytree(tiny_plate_template, landing / "BROKEN"))
    sorted((broken / "imgs").glob("*_A02_*"))[0].unlink()  # marked complete, but a channel is missing
    result = _sensor(platform, landing)
    message = result.skip_reason.skip_message
    assert not result.run_requests and not result.dynamic_partitions_requests
    assert f"'WIP': no {MARKER} marker yet" in message
    assert "'BROKEN': plate 'BROKEN' is incomplete" in message and "A02 z=0 channel=" in message
    (wip / MARKER).write_text("")  # the export finishes: now it is picked up, BROKEN still is not
    done = _sensor(platform, landing)
    (plate_run,) = done.run_requests  # one run over the plate's wells (PHENOCODER_SENSOR_RUNS=plate)
    assert (plate_run.partition_key_range.start, plate_run.partition_key_range.end) == ("WIP_A01", "WIP_A02")
    assert [list(r.partition_keys) for r in done.dynamic_partitions_requests] == [["WIP_A01", "WIP_A02"]]


# --------------------------------------------------------------------------------------------------
# Inference on a new plate: a category unseen at training time
# --------------------------------------------------------------------------------------------------


def test_unseen_category_at_inference_is_encoded_as_zero_one_hot(platform):
    import anndata as ad

    from phenocoder_lib.encoding import UnseenConditionWarning

    unseen = "<not in any training dataset>"  # a new well's dataset: every condition value is unseen
    with pytest.warns(
        UnseenConditionWarning,
        match=rf"sample 'TINY_A02': 'dataset': categories not seen in training "
        rf"\{{'{unseen}': 12\}} encoded as all-zero",
    ):
        result = platform.run("latents", A02)
    assert result.success
    latents = ad.read_h5ad(platform.folder("latents", A02) / "latents.h5ad")
    assert latents.n_obs == 12 and np.isfinite(latents.X).all()
    info = latents.uns["phenocoder"]["samples"][A02]
    assert json.loads(info["unseen_conditions"]) == {"dataset": {"unseen": {unseen: 12}}}
    assert (
        "unseen_conditions"
        not in ad.read_h5ad(platform.folder("latents", A01) / "latents.h5ad").uns["phenocoder"]["samples"][A01]
    )
