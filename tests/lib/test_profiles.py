"""Well profiles: aggregation, per-plate robust normalization against controls, selection, sphering, combining."""

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from phenocoder_lib.profiles import (
    aggregate_table,
    aggregate_wells,
    attach_layout,
    build_profiles,
    combine_profiles,
    normalize_profiles,
    read_layout,
    select_features,
)


def test_aggregate_wells_median_per_group():
    values = np.array([[1.0, 10], [3, 20], [100, 30], [5, 1], [7, 3]])
    out = aggregate_wells(values, ["w1", "w1", "w1", "w2", "w2"], feature_names=["a", "b"], prefix="x_")
    assert list(out.index) == ["w1", "w2"]
    np.testing.assert_allclose(out[["x_a", "x_b"]].to_numpy(), [[3, 20], [6, 2]])
    assert out["n_objects"].tolist() == [3, 2]
    mean = aggregate_wells(values, ["w1", "w1", "w1", "w2", "w2"], method="mean")
    assert mean.loc["w1", "0"] == pytest.approx(104 / 3)


def test_aggregate_wells_rejects_bad_input():
    with pytest.raises(ValueError, match="groups has 1 entries for 2 objects"):
        aggregate_wells(np.ones((2, 2)), ["a"])
    with pytest.raises(ValueError, match="method='max'"):
        aggregate_wells(np.ones((2, 2)), ["a", "b"], method="max")


def test_aggregate_table_uses_the_layer():
    table = ad.AnnData(np.arange(8, dtype=np.float32).reshape(4, 2), obs=pd.DataFrame({"sample": list("aabb")},
                                                                                        index=list("0123")))
    table.layers["mp"] = -table.X
    out = aggregate_table(table, layer="mp")
    np.testing.assert_allclose(out[["0", "1"]].to_numpy(), [[-1, -2], [-5, -6]])
    with pytest.raises(KeyError, match="layer='nope'"):
        aggregate_table(table, layer="nope")


def _frame(rng, *, shift=5.0, scale=2.0):
    """Two plates; plate P2 is brighter (x scale + shift). Four controls and two treated wells per plate."""
    rows = []
    for plate, (a, b) in {"P1": (1.0, 0.0), "P2": (scale, shift)}.items():
        for i in range(4):
            rows.append([f"{plate}_C{i}", plate, f"C{i}", "DMSO", 0.0, True, "", *(a * rng.normal(size=3) + b)])
        for i in range(2):
            v = rng.normal(size=3) + np.array([6.0, 0, 0])
            rows.append([f"{plate}_T{i}", plate, f"T{i}", "drug", 1.0, False, "m", *(a * v + b)])
    return pd.DataFrame(rows, columns=["sample", "plate", "well", "treatment", "dose", "control", "mechanism",
                                       "f0", "f1", "f2"])


def test_normalize_profiles_is_mad_robustize_per_plate():
    frame = _frame(np.random.default_rng(0))
    out, dropped = normalize_profiles(frame, ["f0", "f1", "f2"])
    assert dropped == []
    for plate in ("P1", "P2"):
        part = frame[frame["plate"] == plate]
        ctrl = part[part["control"]]["f0"]
        median, mad = ctrl.median(), 1.4826 * (ctrl - ctrl.median()).abs().median()
        expected = (part["f0"] - median) / mad
        np.testing.assert_allclose(out.loc[part.index, "f0"], expected, rtol=1e-9)
    # the plate effect is gone: controls have median 0 on both plates, treated wells agree across plates
    assert out[out["control"]].groupby("plate")["f0"].median().abs().max() < 1e-9
    treated = out[~out["control"]].groupby("plate")["f0"].mean()
    assert abs(treated["P1"] - treated["P2"]) < 0.5 * treated.abs().min()


def test_normalize_drops_features_constant_in_controls():
    frame = _frame(np.random.default_rng(1))
    frame.loc[frame["control"] & (frame["plate"] == "P1"), "f2"] = 3.0
    out, dropped = normalize_profiles(frame, ["f0", "f1", "f2"])
    assert dropped == ["f2"] and "f2" not in out.columns


def test_normalize_needs_controls_on_every_plate():
    frame = _frame(np.random.default_rng(2))
    frame.loc[frame["plate"] == "P2", "control"] = False
    with pytest.raises(ValueError, match="P2"):
        normalize_profiles(frame, ["f0", "f1", "f2"])


def test_select_features_drops_correlated_and_constant():
    rng = np.random.default_rng(0)
    a = rng.normal(size=400)
    # 'flat': variance 1e-8, below pycytominer's min_variance (1e-6)
    frame = pd.DataFrame({"a": a, "a_copy": 2 * a + 0.001 * rng.normal(size=400), "b": rng.normal(size=400),
                          "flat": 3 + 1e-4 * rng.normal(size=400)})
    kept, dropped = select_features(frame, list(frame.columns))
    assert sorted(dropped) == ["a_copy", "flat"] or sorted(dropped) == ["a", "flat"]
    assert "b" in kept and len(kept) == 2


def test_build_profiles_records_steps_and_spheres():
    frame = _frame(np.random.default_rng(3))
    prof = build_profiles(frame, ["f0", "f1", "f2"], representation="toy", feature_selection=None, sphere=True)
    assert prof.representation == "toy" and prof.n_wells == 12
    assert [s["step"] for s in prof.steps][-1].startswith("spherize")
    ctrl = prof.values[prof.data["control"].to_numpy()]
    # ZCA-cor fit on the controls: their correlation matrix becomes the identity
    np.testing.assert_allclose(np.corrcoef(ctrl.T), np.eye(3), atol=1e-4)


def test_combine_profiles_weights_blocks_equally():
    frame = _frame(np.random.default_rng(4))
    big = build_profiles(frame, ["f0", "f1", "f2"], feature_selection=None)
    small = build_profiles(frame, ["f0"], feature_selection=None)
    comb = combine_profiles({"big": big, "small": small})
    assert comb.features == ["big|f0", "big|f1", "big|f2", "small|f0"]
    np.testing.assert_allclose(comb.data["big|f1"], big.data["f1"] / np.sqrt(3))
    np.testing.assert_allclose(comb.data["small|f0"], small.data["f0"])
    with pytest.raises(ValueError, match="at least two blocks"):
        combine_profiles({"big": big})


def test_layout_roundtrip_and_attach(tmp_path):
    (tmp_path / "layout.csv").write_text("well,treatment,dose,control,mechanism\nA01,DMSO,0,true,\n"
                                         "A02,drug,1.5,false,m1\n")
    layout = read_layout(tmp_path)
    assert layout["control"].tolist() == [True, False] and layout["dose"].tolist() == [0.0, 1.5]
    feats = pd.DataFrame({"f": [1.0, 2.0, 3.0], "n_objects": [5, 6, 7]}, index=["X_A01", "X_A02", "X_A03"])
    samples = pd.DataFrame({"sample": ["X_A01", "X_A02", "X_A03"], "plate": "X", "well": ["A01", "A02", "A03"]})
    out = attach_layout(feats, samples, layout)
    assert out["sample"].tolist() == ["X_A01", "X_A02"]  # A03 has no layout entry
    assert out["f"].tolist() == [1.0, 2.0] and "n_objects" not in out.columns
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "layout.csv").write_text("well,treatment,dose\nA01,DMSO,0\n")
    with pytest.raises(ValueError, match="lacks columns \\['control'\\]"):
        read_layout(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no plate layout"):
        read_layout(tmp_path / "nowhere")


def test_normalize_fills_missing_values_with_the_control_median_and_drops_mostly_missing():
    frame = _frame(np.random.default_rng(5))
    frame.loc[frame["well"] == "T0", "f1"] = np.nan  # absent in 2 of 12 wells: kept, set to 0
    frame.loc[frame.index[:5], "f2"] = np.inf  # missing in 5 of 12 wells: dropped
    out, dropped = normalize_profiles(frame, ["f0", "f1", "f2"], max_missing=0.25)
    assert dropped == ["f2"]
    assert (out.loc[frame["well"] == "T0", "f1"] == 0).all()
    assert np.isfinite(out[["f0", "f1"]].to_numpy()).all()


def test_drop_outliers_removes_features_that_explode_after_normalization():
    rng = np.random.default_rng(6)
    frame = _frame(rng)
    # zero up to rounding in the controls: a MAD of ~1e-16 turns a treated value of 1e-3 into z ~ 1e13
    frame["tiny"] = np.where(frame["control"], rng.normal(scale=1e-16, size=len(frame)),
                             [1e-3, -1e-3] * (len(frame) // 2))
    prof = build_profiles(frame, ["f0", "f1", "f2", "tiny"])
    assert "tiny" not in prof.features and "f0" in prof.features
    assert np.abs(prof.values).max() < 500


def test_aggregate_by_cluster_keeps_clusters_apart():
    from phenocoder_lib.profiles import aggregate_by_cluster

    obs = pd.DataFrame({"sample": list("aaaabb"), "leiden": list("010100")}, index=[str(i) for i in range(6)])
    table = ad.AnnData(np.array([[1.0], [10], [3], [30], [5], [7]]), obs=obs)
    out = aggregate_by_cluster(table, cluster_key="leiden", min_fraction=0.0)
    assert list(out.columns) == ["0|leiden=0", "0|leiden=1"]
    np.testing.assert_allclose(out.loc["a"], [2, 20])
    assert out.loc["b", "0|leiden=0"] == 6 and np.isnan(out.loc["b", "0|leiden=1"])


def test_building_profiles_leaves_pandas_copy_on_write_as_the_caller_set_it():
    # pycytominer switches copy-on-write on for the whole process when it is imported; in a fresh process
    # (pycytominer not yet imported) the profile functions must hand pandas back as they found it, or arrays from
    # Series.to_numpy() become read-only for the rest of the caller's program.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        import numpy as np
        import pandas as pd
        sys.path.insert(0, sys.argv[1])
        from test_profiles import _frame
        from phenocoder_lib.profiles import build_profiles
        assert "pycytominer" not in sys.modules
        pd.set_option("mode.copy_on_write", False)
        frame = _frame(np.random.default_rng(3))
        prof = build_profiles(frame, ["f0", "f1", "f2"], representation="toy", sphere=True)
        assert "pycytominer" in sys.modules and prof.n_wells == 12
        values = pd.Series(["a", "b"]).astype(str).to_numpy()
        values[0] = "c"
        print(pd.get_option("mode.copy_on_write"), values.tolist())
    """)
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "False ['c', 'b']"
