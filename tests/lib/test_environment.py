"""The resolved dependency set works together at realistic sizes (see the pins in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.slow
def test_scanpy_neighbors_on_12000_objects():
    # scanpy 1.11.5 + pynndescent 0.7 fail here with "'csr_array' object has no attribute 'getnnz'";
    # small inputs take scanpy's exact path and do not show it.
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(np.random.default_rng(0).normal(size=(12_000, 16)).astype(np.float32))
    sc.pp.pca(adata, n_comps=10)
    sc.pp.neighbors(adata, n_neighbors=15, random_state=0)
    assert adata.obsp["connectivities"].shape == (12_000, 12_000)
    assert adata.obsp["connectivities"].nnz > 12_000 * 10


def test_library_import_is_light():
    code = (
        "import sys, phenocoder_lib, phenocoder_lib.phenocoder, phenocoder_lib.ingest, phenocoder_lib.patches;"
        "heavy = [m for m in ('tensorflow', 'keras', 'squidpy', 'umap', 'dagster') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_clustering_does_not_import_tensorflow():
    code = (
        "import sys, numpy as np, anndata as ad;"
        "from phenocoder_lib.clustering import cluster_features;"
        "a = ad.AnnData(np.random.default_rng(0).normal(size=(300, 8)).astype('float32'));"
        "labels, ref = cluster_features(a, resolution=0.5);"
        "print(len(labels)); sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "300"
