"""``generate_dataset`` writes the same dataset as before: content digests of a tiny hand-made plate.

The expected digests are recorded values: a refactoring of ``generate_dataset`` must leave them as they
are, and a deliberate change of the output must update them (and say so). They hash decoded values
(patch arrays, the index and statistics as CSV, the settings as sorted JSON), not file bytes, so an
upgrade of zarr or pyarrow that changes the file encoding does not trip them, while any change to what
is extracted, measured or recorded does. The plate is built here from arithmetic, without random
numbers, so the input cannot change either.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from phenocoder_lib.patches import generate_dataset

#: content digest of each case (see the module docstring)
EXPECTED = {
    "uint8_3d": "aec6767072115a50a4b0f0c238da31c1f23d2c60ac946e16794c6bc7d768b21f",
    "uint8_3d_global_odd": "1204abe4f8d446102891b0e14659ef63f8c072c301f9d5ef7cdc06234e49630e",
    "float_2d": "55ca6801b55bf9cd6130a79fae8dec96790503480a6025b515c04e7c425551d3",
    "uint16_2d_unscaled": "a902101d8e6195b1dd3d24425a185b5514d56fa52ed1bfc18c9d13eaeef91b9e",
}


def _plate(kind: str):
    """A SpatialData of two samples whose images and object positions are pure arithmetic."""
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import Image2DModel, Image3DModel, TableModel

    is_3d = kind.endswith("3d")
    dtype = {"uint8_3d": np.uint8, "float_2d": np.float32, "uint16_2d": np.uint16}[kind]
    shape = (2, 3, 24, 20) if is_3d else (2, 24, 20)
    images, obs, index = {}, [], []
    for s, sample in enumerate(["s1", "s2"]):
        grid = np.arange(np.prod(shape), dtype=np.int64).reshape(shape)
        values = (grid * (37 + 6 * s)) % 251 + 3 * (grid % 7 == 0)  # a grainy texture with a few bright pixels
        if dtype == np.float32:
            image = (values / 97.0).astype(np.float32)
        elif dtype == np.uint16:
            image = (values * 211).astype(np.uint16)
        else:
            image = values.astype(np.uint8)
        model = Image3DModel if is_3d else Image2DModel
        images[f"IF_{sample}"] = model.parse(image, dims=("c", "z", "y", "x") if is_3d else ("c", "y", "x"),
                                             c_coords=["DAPI", "GFP"])
        n = 11 + 3 * s
        for i in range(n):
            y, x, z = (i * 7 + s) % 24, (i * 5 + 2 * s) % 20, i % 3 if is_3d else 0  # some at the border
            index.append([y, x, z] if is_3d else [y, x])
            obs.append({"sample": sample, "cell": f"{sample}_{i}", "group": "ab"[i % 2], "size": float(i * 1.5)})
    frame = pd.DataFrame(obs).set_index("cell")
    frame.index.name = None
    frame["group"] = frame["group"].astype("category")
    adata = ad.AnnData(obs=frame, obsm={"spatial_index": np.asarray(index, dtype=np.int64)})
    return sd.SpatialData(images=images, tables={"cells": TableModel.parse(adata)})


CASES = {
    "uint8_3d": ("uint8_3d", dict(patch_size=(8, 8), metadata_keys=["group", "size"])),
    "uint8_3d_global_odd": ("uint8_3d", dict(patch_size=(5, 7), scale_per_sample=False, scale_percentile=3.0)),
    "float_2d": ("float_2d", dict(patch_size=6, metadata_keys=["group"])),
    "uint16_2d_unscaled": ("uint16_2d", dict(patch_size=(4, 9), scale=False)),
}


def _content_digest(ds) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(ds.settings, sort_keys=True).encode())
    h.update(ds.index.to_csv(index=False).encode())
    h.update(ds.stats().to_csv(index=False).encode())
    for sample in ds.samples:
        raw = ds.read(sample, normalized=False)
        h.update(f"{sample} {raw.dtype} {raw.shape}".encode())
        h.update(np.ascontiguousarray(raw).tobytes())
        h.update(np.ascontiguousarray(ds.read(sample)).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_dataset_content_is_unchanged(case, tmp_path):
    kind, kwargs = CASES[case]
    sdata = _plate(kind)
    ds = generate_dataset(sdata, dataset=case, dir_dataset=tmp_path, table_key="cells", sample_key="sample",
                          image_key="IF", **kwargs)
    assert len(ds.index) == 11 + 14 and ds.samples == ["s1", "s2"]
    assert ds.index["padded"].any() and not ds.index["padded"].all()
    assert _content_digest(ds) == EXPECTED[case]
