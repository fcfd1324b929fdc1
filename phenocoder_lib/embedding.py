"""Embedding of per-sample (or per-subunit) spatial statistics: scale, correct, PCA, neighbours, UMAP.

:func:`spatialgraph_embedding` is a pure function: it returns a new AnnData and never modifies its
input. It is idempotent: the raw statistics are kept in ``layers['raw']`` and every call starts
from them, so calling it twice (or on its own output) gives the same result.

Steps (``docs/spatial_statistics.md`` has the details):

1. ``obs_keys``, ``batch_key`` and ``confounder_key`` not already in ``.obs`` are mapped from the
   source table per sample (``source_obs.groupby(sample_key)``): rows are matched by the
   ``<sample_key>`` column at subunit level and by the index at sample level.
2. Rows with ``obs['status'] != 'ok'`` (skipped samples/subunits) are kept but left out of every
   fit; their embeddings are NaN and they have no graph edges.
3. Scaling (``scale=True``): z-score per feature with NaN-aware mean and sd (ddof 1, as
   ``scanpy.pp.scale``; a constant feature gets sd 1), then **NaN -> 0, i.e. the feature mean**.
   Without scaling, NaN is replaced by the feature mean. Features that are NaN for every fitted
   row are set to 0 (they carry no information). ``var['mean']``, ``var['std']``,
   ``var['n_nan']`` record this.
4. ``variable_features``: keep the features with the largest coefficient of variation of the raw
   values (``True``: the top half, or an int: that many); ``var['highly_variable']``.
5. ``batch_correction``: ridge regression (alpha 1, no intercept) of every feature on one-hot batch
   and confounder columns, then the fitted *batch* part is subtracted (confounders are kept), as
   ``bbknn.ridge_regression`` does. If ``bbknn`` is importable the neighbour graph comes from
   ``bbknn.bbknn`` (batch-balanced); otherwise from ``scanpy.pp.neighbors`` on the corrected data.
6. PCA with ``n_comps = min(n_dim, n_fit - 1, n_features)``; neighbours with
   ``min(n_neighbors, n_fit - 1)``; UMAP (``min_dist=0.1``, seeded). Spectral initialisation needs
   enough points for its eigensolver; for fewer than :data:`MIN_SPECTRAL_OBS` rows (e.g. the 3 wells
   of a small plate) the initialisation falls back to the first two principal components (or
   ``'random'``) with an :class:`~phenocoder_lib.spatial.EmbeddingWarning`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .validation import check_obs_column, require
from .warnings import EmbeddingWarning

logger = logging.getLogger(__name__)

__all__ = ["spatialgraph_embedding", "ridge_batch_correction", "map_sample_obs", "MIN_SPECTRAL_OBS"]

#: Below this many rows UMAP's spectral initialisation is not attempted.
MIN_SPECTRAL_OBS = 10


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def map_sample_obs(adata, source_obs: pd.DataFrame, sample_key: str, keys: Sequence[str]) -> pd.DataFrame:
    """Per-row values of ``keys`` looked up per sample in ``source_obs`` (one value per sample).

    The sample of a row is ``adata.obs[sample_key]`` when that column exists (subunit level), else
    the row name (sample level). A key whose value varies within a sample raises ``ValueError``.
    """
    check_obs_column(source_obs, sample_key, argument="sample_key")
    rows = adata.obs[sample_key].astype(str) if sample_key in adata.obs.columns else \
        pd.Series(adata.obs_names.astype(str), index=adata.obs_names)
    out = pd.DataFrame(index=adata.obs_names)
    src_samples = source_obs[sample_key].astype(str)
    for key in keys:
        check_obs_column(source_obs, key, argument="obs_keys/batch_key/confounder_key")
        grouped = source_obs[key].groupby(src_samples, observed=True)
        n_unique = grouped.nunique(dropna=False)
        varying = n_unique.index[n_unique > 1].tolist()
        if varying:
            raise ValueError(f"obs key {key!r} is not constant within samples {varying[:10]}; only per-sample "
                             "values can be mapped to sample/subunit rows.")
        per_sample = grouped.first()
        values = rows.map(per_sample)
        missing = rows[values.isna() & ~rows.isin(per_sample.index)].unique().tolist()
        if missing:
            raise ValueError(f"samples {missing[:10]} of the statistics are not in the source table column "
                             f"{sample_key!r}; was the table changed after spatialgraph_stats?")
        col = values.to_numpy()
        if isinstance(source_obs[key].dtype, pd.CategoricalDtype):
            col = pd.Categorical(col, categories=source_obs[key].cat.categories)
        out[key] = col
    return out


def ridge_batch_correction(x: np.ndarray, obs: pd.DataFrame, batch_key: Sequence[str],
                           confounder_key: Sequence[str] = (), alpha: float = 1.0) -> np.ndarray:
    """Remove the batch part of a ridge fit ``x ~ onehot(batch) + onehot/numeric(confounders)``.

    Same model as ``bbknn.ridge_regression``: ridge with ``alpha`` and no intercept on the one-hot
    columns of the batch and confounder keys (numeric confounders enter as standardised columns);
    the fitted batch coefficients times the batch one-hot matrix are subtracted, so differences
    explained by the confounders are kept.
    """
    from sklearn.linear_model import Ridge

    cols, is_batch = [], []
    for key in list(batch_key) + list(confounder_key):
        v = obs[key]
        if pd.api.types.is_numeric_dtype(v) and not isinstance(v.dtype, pd.CategoricalDtype) and key not in batch_key:
            z = v.to_numpy(dtype=np.float64)
            sd = np.nanstd(z)
            cols.append(((z - np.nanmean(z)) / (sd if sd > 0 else 1.0))[:, None])
            is_batch.append(np.array([False]))
        else:
            dummies = pd.get_dummies(v.astype(str), dtype=np.float64).to_numpy()
            cols.append(dummies)
            is_batch.append(np.full(dummies.shape[1], key in batch_key))
    design = np.hstack(cols)
    mask = np.concatenate(is_batch)
    model = Ridge(alpha=alpha, fit_intercept=False).fit(design, x)
    return x - design[:, mask] @ model.coef_[:, mask].T


def spatialgraph_embedding(
    adata,
    n_dim: int,
    *,
    scale: bool = True,
    variable_features: bool | int = False,
    batch_correction: bool = False,
    batch_key: str | None = None,
    confounder_key: str | Sequence[str] | None = None,
    n_neighbors: int = 15,
    umap: bool = True,
    obs_keys: str | Sequence[str] | None = None,
    source_obs: pd.DataFrame | None = None,
    sample_key: str | None = None,
    seed: int = 0,
):
    """Embed spatial statistics (rows = samples or subunits): see the module docstring.

    Parameters
    ----------
    adata
        Output of :func:`~phenocoder_lib.spatial.compute_spatial_stats` (or any AnnData of
        features). Not modified.
    n_dim
        Principal components (bounded by the number of fitted rows - 1 and of features).
    scale, variable_features, batch_correction, batch_key, confounder_key, n_neighbors, umap
        As in the workflow guide (module docstring).
    obs_keys
        Per-sample columns of the source table to copy into ``.obs``.
    source_obs
        ``.obs`` of the source (object) table, needed for ``obs_keys`` and for batch/confounder
        keys not already in ``adata.obs``.
    sample_key
        Sample column of ``source_obs`` (default: ``adata.uns['spatialgraph_stats']['sample_key']``).
    seed
        Seed of PCA, neighbours and UMAP.

    Returns
    -------
    anndata.AnnData
        A copy with ``layers['raw']``, transformed ``.X``, ``var['mean'|'std'|'n_nan']``,
        ``obsm['X_pca']``, ``varm['PCs']``, ``uns['pca']``, ``obsp['distances'|'connectivities']``,
        ``uns['neighbors']``, ``obsm['X_umap']``, ``uns['umap']`` and the mapped ``.obs`` columns.

    """
    import scipy.sparse as sp

    from ._lazy import import_scanpy

    sc = import_scanpy()

    require(adata is not None, "no statistics to embed: run spatialgraph_stats() first.", ValueError)
    require(int(n_dim) >= 1, f"n_dim={n_dim!r} must be a positive int.")
    require(int(n_neighbors) >= 2, f"n_neighbors={n_neighbors!r} must be >= 2.")
    if batch_correction and not batch_key:
        raise ValueError("batch_correction=True needs batch_key=<obs column of the source table>, e.g. 'plate'.")
    obs_keys_l = _as_list(obs_keys)
    batch_l = _as_list(batch_key) if batch_correction else []
    conf_l = _as_list(confounder_key) if batch_correction else []
    if sample_key is None:
        sample_key = adata.uns.get("spatialgraph_stats", {}).get("sample_key")

    out = adata.copy()
    raw = np.asarray(out.layers["raw"] if "raw" in out.layers else out.X, dtype=np.float64)
    if sp.issparse(raw):
        raw = raw.toarray()
    out.layers["raw"] = raw.copy()
    for key in ("X_pca", "X_umap"):
        out.obsm.pop(key, None)
    for key in ("pca", "neighbors", "umap"):
        out.uns.pop(key, None)
    for key in ("distances", "connectivities"):
        out.obsp.pop(key, None)
    out.varm.pop("PCs", None)

    needed = [k for k in dict.fromkeys(obs_keys_l + batch_l + conf_l) if k not in out.obs.columns]
    if needed:
        if source_obs is None or sample_key is None:
            raise ValueError(f"obs keys {needed} are not in adata.obs; pass source_obs (the object table's "
                             ".obs) and sample_key so they can be mapped per sample.")
        mapped = map_sample_obs(out, source_obs, sample_key, needed)
        for key in needed:
            out.obs[key] = mapped[key].to_numpy()

    fit = np.ones(out.n_obs, dtype=bool)
    if "status" in out.obs.columns:
        fit = (out.obs["status"].astype(str) == "ok").to_numpy()
        if (~fit).any():
            logger.info("embedding: %d skipped rows left out of the fit: %s", int((~fit).sum()),
                        list(out.obs_names[~fit][:10]))
    n_fit = int(fit.sum())
    require(n_fit >= 2, f"the embedding needs at least 2 rows with computed statistics, found {n_fit}.")

    x = raw[fit]
    n_nan = np.isnan(x).sum(axis=0)
    all_nan = n_nan == n_fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns handled just below
        mean = np.nanmean(x, axis=0)
        std = np.nanstd(x, axis=0, ddof=1)
    raw_std = std.copy()
    mean[all_nan] = 0.0
    std[~(std > 0)] = 1.0
    if scale:
        x = (x - mean) / std
        x[np.isnan(x)] = 0.0
    else:
        x = np.where(np.isnan(x), mean, x)
    out.var["mean"] = mean
    out.var["std"] = std
    out.var["n_nan"] = n_nan

    use = ~all_nan
    if variable_features:
        with np.errstate(divide="ignore", invalid="ignore"):
            cv = raw_std / np.abs(mean)
        cv[~np.isfinite(cv) | all_nan | ~(raw_std > 0)] = -np.inf
        n_top = int(variable_features) if not isinstance(variable_features, bool) else max(1, int(use.sum()) // 2)
        top = np.argsort(-cv, kind="stable")[:n_top]
        hv = np.zeros(out.n_vars, dtype=bool)
        hv[top] = True
        hv &= np.isfinite(cv)
        out.var["highly_variable"] = hv
        out.var["dispersions"] = np.where(np.isfinite(cv), cv, np.nan)
        use &= hv
    require(use.any(), "no usable features: every feature is NaN (or none is variable) in the fitted rows.")

    if batch_correction:
        for key in batch_l + conf_l:
            if out.obs[key][fit].isna().any():
                raise ValueError(f"batch/confounder key {key!r} has missing values; fill them first.")
        x = ridge_batch_correction(x, out.obs.loc[fit], batch_l, conf_l)

    xfull = np.full(raw.shape, np.nan)
    xfull[fit] = x
    out.X = xfull

    # fit on the computed rows only, then scatter back
    import anndata as ad

    sub = ad.AnnData(X=x[:, use].astype(np.float64), obs=out.obs.loc[fit].copy())
    n_comps = int(min(n_dim, n_fit - 1, int(use.sum())))
    if n_comps < n_dim:
        warnings.warn(f"n_dim={n_dim} reduced to {n_comps} (fitted rows - 1 = {n_fit - 1}, features = "
                      f"{int(use.sum())}).", EmbeddingWarning, stacklevel=2)
    n_comps = max(n_comps, 1)
    solver = "full" if min(sub.shape) <= 2000 else "arpack"
    sc.pp.pca(sub, n_comps=n_comps, svd_solver=solver, random_state=seed, zero_center=True)
    k = int(min(n_neighbors, n_fit - 1))
    if k < n_neighbors:
        logger.info("n_neighbors=%d reduced to %d (rows - 1)", n_neighbors, k)
    used_bbknn = False
    if batch_correction:
        try:
            import bbknn  # noqa: F401
        except ImportError:
            logger.info("bbknn is not installed: neighbours from scanpy on the ridge-corrected data")
        else:
            n_per_batch = int(sub.obs[batch_l[0]].value_counts().min())
            bbknn.bbknn(sub, batch_key=batch_l[0], neighbors_within_batch=max(1, min(k, n_per_batch - 1)),
                        n_pcs=n_comps)
            used_bbknn = True
    if not used_bbknn:
        sc.pp.neighbors(sub, n_neighbors=max(k, 2), use_rep="X_pca", random_state=seed)
    init = "spectral"
    if umap:
        if n_fit < MIN_SPECTRAL_OBS:
            init = "X_pca2" if n_comps >= 2 else "random"
            if init == "X_pca2":
                sub.obsm["X_pca2"] = np.ascontiguousarray(sub.obsm["X_pca"][:, :2])
            source = "the first two PCs" if init != "random" else "random positions"
            warnings.warn(f"UMAP: {n_fit} rows are too few for spectral initialisation (needs >= "
                          f"{MIN_SPECTRAL_OBS}); initialised from {source} instead.", EmbeddingWarning, stacklevel=2)
        sc.tl.umap(sub, min_dist=0.1, random_state=seed, init_pos=init)
        sub.obsm.pop("X_pca2", None)

    # scatter back
    idx = np.flatnonzero(fit)
    pcs = np.full((out.n_obs, n_comps), np.nan, dtype=np.float64)
    pcs[idx] = sub.obsm["X_pca"]
    out.obsm["X_pca"] = pcs
    loadings = np.zeros((out.n_vars, n_comps))
    loadings[use] = sub.varm["PCs"]
    out.varm["PCs"] = loadings
    out.uns["pca"] = dict(sub.uns["pca"])
    for key in ("distances", "connectivities"):
        g = sp.csr_matrix(sub.obsp[key])
        coo = g.tocoo()
        out.obsp[key] = sp.csr_matrix((coo.data, (idx[coo.row], idx[coo.col])), shape=(out.n_obs, out.n_obs))
    out.uns["neighbors"] = dict(sub.uns["neighbors"])
    if umap:
        um = np.full((out.n_obs, sub.obsm["X_umap"].shape[1]), np.nan)
        um[idx] = sub.obsm["X_umap"]
        out.obsm["X_umap"] = um
        out.uns["umap"] = dict(sub.uns["umap"])
    out.uns["spatialgraph_embedding"] = {
        "n_dim": int(n_dim), "n_comps": int(n_comps), "scale": bool(scale),
        "variable_features": variable_features if isinstance(variable_features, bool) else int(variable_features),
        "batch_correction": bool(batch_correction), "batch_key": batch_l, "confounder_key": conf_l,
        "neighbors": "bbknn" if used_bbknn else "scanpy", "n_neighbors": int(k), "umap": bool(umap),
        "umap_init": init if umap else "", "n_fit": n_fit, "n_skipped": int((~fit).sum()), "seed": int(seed),
        "nan_imputation": "feature mean (0 after scaling)",
    }
    return out

