"""Bad input, a catalogue (continued): model settings, inference on new plates, model folders on disk.

One tiny conditional model (conditions ``well`` and ``z``, 16x16 patches, conv (8, 16), one epoch) is
trained on well A01 of a 2-well plate; every case below either raises a built-in exception naming the
argument or file, the value found and the fix, or behaves in the documented graceful way. Failed
calls must leave the model, its folder and the facade's state as they were.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from phenocoder_lib import Phenocoder
from phenocoder_lib.encoding import UnseenConditionWarning
from phenocoder_lib.ingest import read_plate
from phenocoder_lib.models import check_architecture
from phenocoder_lib.warnings import ModelSchemaWarning

PATCH = 16
ARCH = dict(input_shape=(PATCH, PATCH, 2), conv_layers=(8, 16), batch_size=16)


@pytest.fixture(scope="module")
def plate(plate_template) -> Path:
    return plate_template("tiny", "BM")


@pytest.fixture(scope="module")
def trained(plate, tmp_path_factory):
    """A CondCVAE trained on well A01 only (conditions well and z)."""
    p = Phenocoder(sdata=read_plate(plate, wells=["A01"]), seed=0)
    p.generate_dataset("d", tmp_path_factory.mktemp("bad_model_data"), patch_size=PATCH, progress=False)
    p.initialize_model(4, 8, ["well", "z"], **ARCH)
    p.train(n_epochs=1, verbose=0, plot=False)
    return p


# --------------------------------------------------------------------------------------------------
# Settings that disagree with the data: checked before anything is built or written
# --------------------------------------------------------------------------------------------------

MODEL_ERRORS = [
    (
        "patch_size_vs_input_shape",
        {"input_shape": (32, 32, 2)},
        ValueError,
        r"input_shape=\(32, 32, 2\) does not match the datasets' patch_size=\(16, 16\); pass input_shape=\(16, 16, 2\)",
    ),
    (
        "channels_vs_input_shape",
        {"input_shape": (16, 16, 3)},
        ValueError,
        r"input_shape=\(16, 16, 3\) has 3 channels but the datasets have 2",
    ),
    (
        "hw_not_divisible_by_strides",
        {"conv_layers": (8, 16, 32, 64, 128)},
        ValueError,
        r"divisible by 2\*\*len\(conv_layers\) = 32",
    ),
    ("condition_column", {"conditions": ["donor"]}, KeyError, r"unknown condition column 'donor'.*metadata_keys"),
    (
        "conditions_not_a_list",
        {"conditions": "well"},
        TypeError,
        r"conditions='well' must be a list of column names; pass \[\] for a plain CVAE",
    ),
    ("condition_twice", {"conditions": ["well", "well"]}, ValueError, r"conditions=\['well', 'well'\] names a column"),
    ("batch_size", {"batch_size": 0}, ValueError, r"batch_size=0 must be a positive int"),
    ("split_by", {"split_by": "plate"}, ValueError, r"split_by='plate' is not valid; choose 'object' or 'sample'"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), [c[1:] for c in MODEL_ERRORS], ids=[c[0] for c in MODEL_ERRORS])
def test_model_settings_that_disagree_with_the_data(trained, folder_digest, kwargs, exc, match):
    p = trained
    before = (p.model, p.model_name, folder_digest(p.model_dir))
    args = dict(n_latent_dim=4, n_dense_dim=8, conditions=[], **ARCH)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        p.initialize_model(**args)
    assert (p.model, p.model_name, folder_digest(p.model_dir)) == before  # the trained model is untouched
    assert sorted(f.name for f in (p.data_dir / "models").iterdir()) == [p.model_name]


@pytest.mark.parametrize(
    ("shape", "convs", "exc", "match"),
    [
        ((20, 20, 2), (8, 16, 32), ValueError, r"input_shape=\(20, 20, 2\).*divisible by 2\*\*len\(conv_layers\) = 8"),
        ((24, 40, 2), (8, 16, 32), None, None),  # non-square, both divisible by 8: fine
        ((16, 16), (8,), ValueError, r"input_shape=\(16, 16\) must be three positive ints \(height, width, channels\)"),
        ((16, 16, 2), (), ValueError, r"conv_layers=\(\) must hold at least one positive filter count"),
        ("16x16", (8,), TypeError, r"input_shape='16x16' must be \(height, width, channels\)"),
    ],
)
def test_architecture_checks(shape, convs, exc, match):
    if exc is None:
        assert check_architecture(shape, convs, 4, 8, None, 1.0) == (tuple(shape), tuple(convs))
        return
    with pytest.raises(exc, match=match):
        check_architecture(shape, convs, 4, 8, None, 1.0)


# --------------------------------------------------------------------------------------------------
# Inference on a new plate: unseen categories, wrong keys, bad encode arguments
# --------------------------------------------------------------------------------------------------


def test_new_plate_with_an_unseen_category_gets_a_zero_one_hot_and_a_warning(trained, plate):
    p = Phenocoder(sdata=read_plate(plate))
    p.load_model(trained.model_dir)
    with pytest.warns(UnseenConditionWarning, match=r"'A02': 12.*all-zero"):
        out = p.encode(progress=False)
    assert out.n_obs == 24 and np.isfinite(out.X).all()
    report = json.loads(out.uns["phenocoder"]["samples"]["BM_A02"]["unseen_conditions"])
    assert report == {"well": {"unseen": {"A02": 12}}}
    assert "unseen_conditions" not in out.uns["phenocoder"]["samples"]["BM_A01"]
    enc = p.model_oh_enc
    x, _ = enc.transform(pd.DataFrame({"well": ["A01", "A02"], "z": [0, 0]}), warn=False)
    well = [i for i, name in enumerate(enc.feature_names) if name.startswith("well=")]
    assert x[0, well].tolist() == [1.0] and x[1, well].tolist() == [0.0]  # A02: all-zero one-hot


ENCODE_ERRORS = [
    ("table_key", {}, "table_key", "cells", KeyError, r"table_key='cells' is not a table.*Pass the name"),
    (
        "spatial_key",
        {"spatial_message_passing_radius": 10},
        "spatial_key",
        "xy",
        KeyError,
        r"spatial_key='xy' is not a key of \.obsm",
    ),
    (
        "negative_radius",
        {"spatial_message_passing_radius": -1},
        None,
        None,
        ValueError,
        r"spatial_message_passing_radius=-1 must be >= 0",
    ),
    ("unknown_sample", {"samples": ["BM_Z99"]}, None, None, KeyError, r"samples=\['BM_Z99'\] are not in"),
    (
        "scale_disagrees",
        {"scale_percentile": 5},
        None,
        None,
        ValueError,
        r"encode\(scale_percentile=5\) disagrees with the training datasets, which were made with "
        r"scale_percentile=1\.0 .*Pass scale_percentile=1\.0 or leave it out",
    ),
    (
        "index_key_disagrees",
        {"spatial_key_index": "spatial"},
        None,
        None,
        ValueError,
        r"encode\(spatial_key_index='spatial'\) disagrees .*spatial_key_index='spatial_index'",
    ),
    ("batch_size", {"batch_size": 0}, None, None, ValueError, r"batch_size=0 must be a positive int"),
]


@pytest.mark.parametrize(
    ("kwargs", "attr", "value", "exc", "match"), [c[1:] for c in ENCODE_ERRORS], ids=[c[0] for c in ENCODE_ERRORS]
)
def test_encode_bad_input(trained, plate, kwargs, attr, value, exc, match):
    p = Phenocoder(sdata=read_plate(plate, wells=["A01"]))
    p.load_model(trained.model_dir)
    if attr is not None:
        setattr(p, attr, value)
    with pytest.raises(exc, match=match):
        p.encode(progress=False, **kwargs)
    assert "phenocoder" not in p.sdata.tables  # nothing half-written into the SpatialData


# --------------------------------------------------------------------------------------------------
# Model folders: an older settings schema, damaged or missing files
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def model_copy(trained, tmp_path):
    folder = Path(shutil.copytree(trained.model_dir, tmp_path / "model"))
    config = json.loads((folder / "model_config.json").read_text())

    def rewrite(fn):
        new = fn(dict(config))
        (folder / "model_config.json").write_text(json.dumps(new if new is not None else config))
        return folder

    return rewrite


def _drop(*keys, version="absent"):
    def fn(config):
        for key in keys:
            config.pop(key, None)
        if version == "absent":
            config.pop("format_version")
        else:
            config["format_version"] = version
        return config

    return fn


def test_older_schema_is_migrated_with_a_warning(trained, model_copy, plate):
    folder = model_copy(_drop("memory_budget_bytes", "split_by", "keys"))
    p = Phenocoder(sdata=read_plate(plate, wells=["A01"]))
    with pytest.warns(
        ModelSchemaWarning,
        match=r"model_config\.json' has format_version=0; migrated to 1 in memory "
        r"\(defaults for \['split_by', 'memory_budget_bytes'\]\)\. Retrain",
    ):
        p.load_model(folder)
    assert p.model_config["format_version"] == 1 and p.model_config["migrated_from_format_version"] == 0
    assert p.model_config["keys"]["sample_key"] == "sample"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnseenConditionWarning)
        out = p.encode(progress=False)
    trained_out = trained.encode(progress=False)
    np.testing.assert_allclose(out.X, trained_out.X, rtol=1e-5, atol=1e-6)  # same latents as before migration


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            _drop("dataset_settings", "model_class"),
            r"model_config\.json' has format_version=0 \(older than 1\) and lacks "
            r"\['model_class', 'dataset_settings'\], so it cannot be migrated\. Retrain the model",
        ),
        (
            _drop(version=99),
            r"model_config\.json' has format_version=99; this Phenocoder reads versions up to 1\. "
            r"Upgrade phenocoder",
        ),
        (_drop(version="1"), r"has format_version='1'; this Phenocoder reads versions up to 1"),
        (lambda c: ["not", "a", "dict"], r"model_config\.json' holds a list, not a model configuration"),
    ],
)
def test_unreadable_schema_raises_naming_file_version_and_fix(trained, model_copy, edit, match):
    folder = model_copy(edit)
    p = Phenocoder()
    with pytest.raises(ValueError, match=match):
        p.load_model(folder)
    assert p.model is None and p.model_config is None  # nothing half-loaded


def test_damaged_or_missing_model_files(trained, tmp_path):
    folder = Path(shutil.copytree(trained.model_dir, tmp_path / "model"))
    p = Phenocoder()
    p.load_model(trained.model_dir)
    loaded = (p.model, p.model_name)
    (folder / "model_config.json").write_text('{"format_version": 1, "model_na')
    with pytest.raises(ValueError, match=r"model_config\.json' is not valid JSON .*retrain the model or restore"):
        p.load_model(folder)
    (folder / "model_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model_config\.json' does not exist; pass a model folder written by"):
        p.load_model(folder)
    shutil.copy(trained.model_dir / "model_config.json", folder)
    (folder / "model.keras").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"model\.keras' does not exist\. An interrupted run left "
        r"'.*checkpoint\.keras'; pass it as path",
    ):
        p.load_model(folder)
    with pytest.raises(FileNotFoundError, match=r"not a model folder, model_config\.json or \.keras file"):
        p.load_model(folder / "history.json")
    assert (p.model, p.model_name) == loaded  # failed loads keep the model loaded before
    assert p.load_model(folder / "checkpoint.keras") is not None
