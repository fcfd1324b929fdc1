"""Save/load in a fresh process, reproducibility under a seed, and a cheap package import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from phenocoder_lib import Phenocoder
from phenocoder_lib.encoding import UnseenConditionWarning
from phenocoder_lib.ingest import read_plate

PATCH = 16
ARCH = dict(input_shape=(PATCH, PATCH, 4), conv_layers=(8, 16), batch_size=32)


def test_importing_the_package_does_not_import_tensorflow():
    code = ("import sys, phenocoder_lib, phenocoder_lib.phenocoder, phenocoder_lib.model_config, "
            "phenocoder_lib.conditions, "
            "phenocoder_lib.encoding, phenocoder_lib.plotting; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'matplotlib.pyplot') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def plate_root(plate_template):
    return plate_template("model", "plate")


@pytest.fixture(scope="module")
def pheno(plate_root, tmp_path_factory):
    p = Phenocoder(sdata=read_plate(plate_root), seed=5)
    p.generate_dataset("d1", tmp_path_factory.mktemp("data"), patch_size=PATCH, metadata_keys=["well"],
                       progress=False)
    return p


def _train(p: Phenocoder, conditions):
    p.initialize_model(4, 16, conditions, flip=True, **ARCH)
    history = p.train(n_epochs=2, verbose=0, plot=False)
    weights = [w.copy() for w in p.model.get_weights()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnseenConditionWarning)
        latents = p.encode(progress=False, spatial_message_passing_radius=15.0)
    return history, weights, latents.copy()


_CHILD = textwrap.dedent("""
    import json, sys, warnings
    import numpy as np
    from phenocoder_lib import Phenocoder
    from phenocoder_lib.ingest import read_plate

    root, out = sys.argv[1], sys.argv[2]
    folders = sys.argv[3:]
    assert "tensorflow" not in sys.modules
    result = {}
    for i, folder in enumerate(folders):
        p = Phenocoder(sdata=read_plate(root), seed=123)  # another seed: the model's own must be used
        p.load_model(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = p.encode(progress=False, spatial_message_passing_radius=15.0)
        np.save(f"{out}/latents_{i}.npy", table.X)
        np.save(f"{out}/mp_{i}.npy", table.layers["spatial_message_passing"])
        result[folder] = {"class": type(p.model).__name__, "datasets": p.datasets, "data_dir": str(p.data_dir),
                          "conditions": p.model_config["conditions"], "dropout": p.model.dropout,
                          "beta": p.model.beta, "n_val": p.model_config["split"]["n_val"],
                          "history": p.history is not None, "obs_names": list(map(str, table.obs_names))}
    json.dump(result, open(f"{out}/result.json", "w"))
""")


@pytest.mark.slow
def test_save_load_round_trip_in_a_fresh_process(pheno, plate_root, trained_cvae, tmp_path):
    # the plain CVAE is the session's (tests/conftest.py: trained and encoded in this process); the CondCVAE is
    # trained here. Both plates are the same synthetic plate (kind "model").
    plain, plain_dir = trained_cvae.latents, trained_cvae.model_dir
    _, _, cond = _train(pheno, ["dataset", "z", "well"])
    cond_dir = pheno.model_dir
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    subprocess.run([sys.executable, str(script), str(plate_root), str(tmp_path), str(plain_dir), str(cond_dir)],
                   check=True, capture_output=True, text=True)
    result = json.loads((tmp_path / "result.json").read_text())
    for i, (folder, table, cls, data_dir) in enumerate([(plain_dir, plain, "CVAE", trained_cvae.data_dir),
                                                        (cond_dir, cond, "CondCVAE", pheno.data_dir)]):
        info = result[str(folder)]
        assert info["class"] == cls
        assert info["datasets"] == ["d1"] and info["data_dir"] == str(data_dir.resolve())
        assert (info["dropout"], info["beta"]) == (0.25, 0.01)
        assert info["history"] and info["obs_names"] == list(map(str, table.obs_names))
        np.testing.assert_array_equal(np.load(tmp_path / f"latents_{i}.npy"), table.X)
        np.testing.assert_array_equal(np.load(tmp_path / f"mp_{i}.npy"), table.layers["spatial_message_passing"])
    assert result[str(cond_dir)]["conditions"] == ["dataset", "z", "well"]


@pytest.mark.slow
def test_training_is_reproducible_under_a_seed(pheno):
    h1, w1, t1 = _train(pheno, ["dataset", "z"])
    h2, w2, t2 = _train(pheno, ["dataset", "z"])
    assert h1["val_loss"] == h2["val_loss"] and h1["loss"] == h2["loss"]
    for a, b in zip(w1, w2, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(t1.X, t2.X)


@pytest.mark.slow
def test_checkpoint_and_continued_training(pheno, tmp_path):
    _train(pheno, [])
    folder = pheno.model_dir
    fresh = Phenocoder(sdata=pheno.sdata)
    model = fresh.load_model(folder / "checkpoint.keras")
    assert type(model).__name__ == "CVAE"
    history = fresh.train(n_epochs=1, verbose=0, plot=False)  # rebuilds the same split from the datasets
    assert len(history["loss"]) == 1
    assert fresh.model_config["split"] == pheno.model_config["split"]
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        fresh.load_model(tmp_path)
