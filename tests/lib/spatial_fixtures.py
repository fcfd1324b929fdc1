"""Small seeded synthetic tables for the spatial tests (import explicitly; not a conftest)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd


def make_table(
    n: int = 600,
    *,
    n_samples: int = 3,
    n_clusters: int = 4,
    extra_categories: int = 1,
    dims: int = 3,
    side: float = 120.0,
    n_vars: int = 5,
    seed: int = 0,
    sample_ids: list | None = None,
) -> ad.AnnData:
    """Objects uniform in a box per sample, random labels, variables with a spatial trend in var 0."""
    rng = np.random.default_rng(seed)
    samples = sample_ids if sample_ids is not None else [f"S{i}" for i in range(n_samples)]
    sample = np.asarray(samples, dtype=object)[rng.integers(0, len(samples), n)]
    labels = rng.integers(0, n_clusters, n).astype(str)
    categories = [str(c) for c in range(n_clusters + extra_categories)]
    coords = rng.uniform(0, side, (n, dims))
    x = rng.normal(size=(n, n_vars))
    x[:, 0] += coords[:, 0] / side * 3
    obs = pd.DataFrame({"sample": sample, "leiden": pd.Categorical(labels, categories=categories)},
                       index=[f"cell{i}" for i in range(n)])
    if sample_ids is not None:
        obs["sample"] = pd.Series(sample, index=obs.index).astype(type(samples[0]))
    adata = ad.AnnData(X=x.astype(np.float32), obs=obs)
    adata.var_names = [f"feat_{i}" for i in range(n_vars)]
    adata.obsm["spatial"] = coords
    return adata


def one_sample(n: int = 300, *, n_clusters: int = 4, dims: int = 3, side: float = 100.0, seed: int = 0,
               n_vars: int = 4) -> ad.AnnData:
    return make_table(n, n_samples=1, n_clusters=n_clusters, extra_categories=0, dims=dims, side=side,
                      seed=seed, n_vars=n_vars)
