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
   ``bbknn.ridge_regression`` does.
6. Neighbours: ``neighbors='scanpy'`` (the default) runs ``scanpy.pp.neighbors`` on the PCA of the
   (corrected) data; ``neighbors='bbknn'`` builds the batch-balanced graph of ``bbknn.bbknn`` on the
   first batch key (needs ``batch_correction=True`` and the optional ``bbknn`` package). Which one
   ran is recorded in ``uns['spatialgraph_embedding']['neighbors']``; installing a package never
   changes it.
7. PCA with ``n_comps = min(n_dim, n_fit - 1, n_features)``; neighbours with
   ``min(n_neighbors, n_fit - 1)``; UMAP (``min_dist=0.1``, seeded). Spectral initialisation needs
   enough points for its eigensolver; for fewer than :data:`MIN_SPECTRAL_OBS` rows (e.g. the 3 wells
   of a small plate) the initialisation falls back to the first two principal components (or
   ``'random'``) with an :class:`~phenocoder_lib.spatial.EmbeddingWarning`.

With ``neighbors='scanpy'`` and fewer than 8,192 fitted rows (scanpy's brute-force neighbour range), PCA,
neighbours and UMAP run without importing scanpy, umap's ``__init__`` or pynndescent (about 10 s of
imports and numba compilation in every new process): sklearn's PCA,
:func:`~phenocoder_lib.clustering.umap_connectivities` and :func:`~phenocoder_lib.umap_layout.umap_layout`
(umap-learn's own layout kernels) compute scanpy's numbers bit for bit. One difference: scanpy's
``tl.umap`` zeroes, in the stored ``connectivities`` itself, the edges too weak for its layout to sample
(below max/500); here the stored graph is the one the neighbour search built.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from .validation import check_bool, check_choice, check_int, check_obs_column, check_type, require
from .warnings import EmbeddingWarning

logger = logging.getLogger(__name__)

__all__ = ["spatialgraph_embedding", "ridge_batch_correction", "map_sample_obs", "warm_up", "MIN_SPECTRAL_OBS",
           "NeighborMethod"]

#: How the neighbour graph is built (see the module docstring, step 6).
NeighborMethod = Literal["scanpy", "bbknn"]

#: Below this many rows UMAP's spectral initialisation is not attempted.
MIN_SPECTRAL_OBS = 10
# scanpy's brute-force neighbour range (clustering._EXACT_KNN_BELOW): below it, no scanpy import is needed
_SCANPY_FREE_BELOW = 8192


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def map_sample_obs(adata, source_obs: pd.DataFrame, sample_key: str, keys: Sequence[str]) -> pd.DataFrame:
    """Return per-row values of ``keys`` looked up per sample in ``source_obs`` (one value per sample).

    Parameters
    ----------
    adata
        Rows to fill (samples or subunits). The sample of a row is ``adata.obs[sample_key]`` when
        that column exists (subunit level), else the row name (sample level).
    source_obs
        ``.obs`` of the object table the statistics were computed from.
    sample_key
        Sample column of ``source_obs``.
    keys
        Columns of ``source_obs`` to map; each must hold one value per sample.

    Returns
    -------
    pandas.DataFrame
        Indexed like ``adata.obs_names``, one column per key (categorical keys stay categorical).

    Raises
    ------
    KeyError
        When ``sample_key`` or a key is not a column of ``source_obs``.
    ValueError
        When a key varies within a sample, or a row's sample is not in ``source_obs``.

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
    """Return ``x`` without the batch part of a ridge fit ``x ~ onehot(batch) + onehot/numeric(confounders)``.

    Same model as ``bbknn.ridge_regression``: ridge with ``alpha`` and no intercept on the one-hot
    columns of the batch and confounder keys (numeric confounders enter as standardised columns);
    the fitted batch coefficients times the batch one-hot matrix are subtracted, so differences
    explained by the confounders are kept.

    Parameters
    ----------
    x
        ``(n, f)`` values to correct.
    obs
        ``n`` rows with the batch and confounder columns.
    batch_key
        Batch columns (one-hot encoded).
    confounder_key
        Confounder columns: one-hot, or one standardised column when numeric.
    alpha
        Ridge penalty.

    Returns
    -------
    numpy.ndarray
        ``(n, f)`` corrected values.

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
    neighbors: NeighborMethod = "scanpy",
):
    """Embed spatial statistics (rows = samples or subunits): see the module docstring.

    Parameters
    ----------
    adata
        Output of :func:`~phenocoder_lib.spatial.compute_spatial_stats` (or any AnnData of
        features). Not modified.
    n_dim
        Principal components, a whole number >= 1 (bounded by the number of fitted rows - 1 and
        of features).
    scale
        Z-score every feature before the PCA (NaN then becomes the feature mean).
    variable_features
        ``True`` keeps the most variable half of the features, an int that many; ``False`` keeps all.
    batch_correction
        Subtract the ridge-fitted batch part of ``batch_key`` (confounders kept).
    batch_key
        Column with the batch (e.g. ``'plate'``); needed with ``batch_correction``.
    confounder_key
        Column(s) whose effect the batch correction keeps.
    n_neighbors
        Neighbours of the graph (>= 2; bounded by the fitted rows - 1).
    umap
        Compute the UMAP coordinates.
    obs_keys
        Per-sample columns of the source table to copy into ``.obs``.
    source_obs
        ``.obs`` of the source (object) table, needed for ``obs_keys`` and for batch/confounder
        keys not already in ``adata.obs``.
    sample_key
        Sample column of ``source_obs`` (default: ``adata.uns['spatialgraph_stats']['sample_key']``).
    seed
        Seed of PCA, neighbours and UMAP.
    neighbors
        ``'scanpy'`` (default) or ``'bbknn'`` (batch-balanced graph; needs ``batch_correction`` and
        the optional ``bbknn`` package, ``pip install 'phenocoder[bbknn]'``).

    Returns
    -------
    anndata.AnnData
        A copy with ``layers['raw']``, transformed ``.X``, ``var['mean'|'std'|'n_nan']``,
        ``obsm['X_pca']``, ``varm['PCs']``, ``uns['pca']``, ``obsp['distances'|'connectivities']``,
        ``uns['neighbors']``, ``obsm['X_umap']``, ``uns['umap']``, the mapped ``.obs`` columns and
        the settings in ``uns['spatialgraph_embedding']``.

    Raises
    ------
    ValueError
        For invalid arguments, or fewer than two rows or no usable feature to fit.
    ImportError
        For ``neighbors='bbknn'`` when ``bbknn`` is not installed.

    """
    opts = _check_options(adata, n_dim, scale=scale, variable_features=variable_features,
                          batch_correction=batch_correction, batch_key=batch_key, confounder_key=confounder_key,
                          n_neighbors=n_neighbors, umap=umap, obs_keys=obs_keys, sample_key=sample_key,
                          seed=seed, neighbors=neighbors)
    out, raw = _fresh_copy(adata)
    _add_obs_keys(out, opts, source_obs)
    fit = _fitted_rows(out)
    x, use, raw_std = _impute_and_scale(out, raw[fit], scale=opts.scale)
    use = _select_variable_features(out, use, raw_std, opts.variable_features)
    x = _correct_batches(out, x, fit, opts)
    _store_transformed(out, raw, x, fit)
    sub, n_comps = _pca(out, x, fit, use, opts)
    k = _neighbor_graph(sub, n_comps, opts)
    init = _umap(sub, n_comps, opts)
    _scatter_back(out, sub, fit, use, n_comps, umap=opts.umap)
    out.uns["spatialgraph_embedding"] = _settings(opts, n_comps=n_comps, k=k, init=init, fit=fit)
    return out


def warm_up(*, n_rows: int = 40, seed: int = 0) -> float:
    """Compile the numba kernels that the neighbour graph and UMAP need, by embedding a small random table.

    umap-learn's layout kernels (and, from 8,192 rows or with bbknn, scanpy's pynndescent path) compile
    their numba functions in every new process on first call: most of the time of a small embedding.
    Calling this early (e.g. in a background thread while the model trains, as ``phenocoder demo`` does)
    takes that cost off the critical path; the embedding itself is unchanged. The table is large enough for
    spectral initialisation and small enough that nothing is reduced, so the call warns about nothing.

    Parameters
    ----------
    n_rows
        Rows of the random table (>= :data:`MIN_SPECTRAL_OBS`).
    seed
        Seed of the table and of the embedding.

    Returns
    -------
    Seconds spent.

    """
    import time

    import anndata as ad

    n_rows = check_int(n_rows, argument="n_rows", minimum=MIN_SPECTRAL_OBS)
    t0 = time.perf_counter()
    x = np.random.default_rng(seed).normal(size=(n_rows, 8))
    spatialgraph_embedding(ad.AnnData(X=x), 4, n_neighbors=10, seed=seed)
    return time.perf_counter() - t0


@dataclass(frozen=True)
class _Options:
    """Validated arguments of :func:`spatialgraph_embedding`."""

    n_dim: int
    scale: bool
    variable_features: bool | int
    batch_correction: bool
    batch_keys: list[str]
    confounder_keys: list[str]
    n_neighbors: int
    umap: bool
    obs_keys: list[str]
    sample_key: str | None
    seed: int
    neighbors: str


def _check_options(adata, n_dim, *, scale, variable_features, batch_correction, batch_key, confounder_key,
                   n_neighbors, umap, obs_keys, sample_key, seed, neighbors) -> _Options:
    """Check every argument before any work, and resolve the defaults."""
    require(adata is not None, "adata=None: there are no statistics to embed; run spatialgraph_stats() first.")
    n_dim = check_int(n_dim, argument="n_dim", minimum=1, fix="Pass the number of principal components, e.g. 10.")
    n_neighbors = check_int(n_neighbors, argument="n_neighbors", minimum=2)
    check_type(variable_features, (bool, np.bool_, int, np.integer), argument="variable_features",
               expected="True, False or an int >= 1 (the number of features to keep)")
    if not isinstance(variable_features, (bool, np.bool_)):
        variable_features = check_int(variable_features, argument="variable_features", minimum=1)
    else:
        variable_features = bool(variable_features)
    batch_correction = check_bool(batch_correction, argument="batch_correction")
    check_choice(neighbors, NeighborMethod, argument="neighbors")
    if batch_correction and not batch_key:
        raise ValueError(f"batch_correction=True needs batch_key=<obs column of the source table>, e.g. 'plate'; "
                         f"found batch_key={batch_key!r}.")
    if neighbors == "bbknn":
        require(batch_correction, "neighbors='bbknn' balances the graph over the batches of batch_key: pass "
                "batch_correction=True and batch_key=..., or neighbors='scanpy'.")
        try:
            import bbknn  # noqa: F401
        except ImportError as err:
            raise ImportError("neighbors='bbknn' needs the optional bbknn package: pip install 'phenocoder[bbknn]' "
                              "(or pip install bbknn), or pass neighbors='scanpy'.") from err
    if sample_key is None:
        sample_key = adata.uns.get("spatialgraph_stats", {}).get("sample_key")
    return _Options(
        n_dim=n_dim, scale=check_bool(scale, argument="scale"), variable_features=variable_features,
        batch_correction=batch_correction,
        batch_keys=_as_list(batch_key) if batch_correction else [],
        confounder_keys=_as_list(confounder_key) if batch_correction else [],
        n_neighbors=n_neighbors, umap=check_bool(umap, argument="umap"), obs_keys=_as_list(obs_keys),
        sample_key=sample_key, seed=check_int(seed, argument="seed"), neighbors=neighbors)


def _fresh_copy(adata) -> tuple[Any, np.ndarray]:
    """Return a copy without earlier embedding results, and the raw statistics (kept in ``layers['raw']``).

    Starting every call from ``layers['raw']`` is what makes the embedding idempotent.
    """
    import scipy.sparse as sp

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
    return out, raw


def _add_obs_keys(out, opts: _Options, source_obs: pd.DataFrame | None) -> None:
    """Copy the obs, batch and confounder keys not yet in ``out.obs`` from the source table, per sample."""
    keys = opts.obs_keys + opts.batch_keys + opts.confounder_keys
    needed = [k for k in dict.fromkeys(keys) if k not in out.obs.columns]
    if not needed:
        return
    if source_obs is None or opts.sample_key is None:
        raise ValueError(f"obs keys {needed} are not in adata.obs; pass source_obs (the object table's "
                         ".obs) and sample_key so they can be mapped per sample.")
    mapped = map_sample_obs(out, source_obs, opts.sample_key, needed)
    for key in needed:
        out.obs[key] = mapped[key].to_numpy()


def _fitted_rows(out) -> np.ndarray:
    """Return the rows with computed statistics (``obs['status'] == 'ok'``); skipped rows stay out of every fit."""
    fit = np.ones(out.n_obs, dtype=bool)
    if "status" in out.obs.columns:
        fit = (out.obs["status"].astype(str) == "ok").to_numpy()
        if (~fit).any():
            logger.info("embedding: %d skipped rows left out of the fit: %s", int((~fit).sum()),
                        list(out.obs_names[~fit][:10]))
    n_fit = int(fit.sum())
    require(n_fit >= 2, f"the embedding needs at least 2 rows with computed statistics, found {n_fit}.")
    return fit


def _impute_and_scale(out, x: np.ndarray, *, scale: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the fitted rows imputed and scaled, the usable features and the raw standard deviations.

    NaN becomes the feature mean (0 after z-scoring); a feature NaN in every fitted row is unusable.
    Records ``var['mean'|'std'|'n_nan']``.
    """
    n_nan = np.isnan(x).sum(axis=0)
    all_nan = n_nan == x.shape[0]
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
    return x, ~all_nan, raw_std


def _select_variable_features(out, use: np.ndarray, raw_std: np.ndarray, variable_features: bool | int) -> np.ndarray:
    """Return the features to fit: the usable ones, restricted to the most variable when asked.

    Variability is the coefficient of variation of the raw values (``var['dispersions']``);
    ``var['highly_variable']`` marks the kept features.
    """
    if variable_features:
        mean = out.var["mean"].to_numpy()
        all_nan = ~use
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
        use = use & hv
    require(use.any(), "no usable features: every feature is NaN (or none is variable) in the fitted rows.")
    return use


def _correct_batches(out, x: np.ndarray, fit: np.ndarray, opts: _Options) -> np.ndarray:
    """Return ``x`` with the ridge-fitted batch part removed (unchanged without ``batch_correction``)."""
    if not opts.batch_correction:
        return x
    for key in opts.batch_keys + opts.confounder_keys:
        if out.obs[key][fit].isna().any():
            raise ValueError(f"batch/confounder key {key!r} has missing values; fill them first.")
    return ridge_batch_correction(x, out.obs.loc[fit], opts.batch_keys, opts.confounder_keys)


def _store_transformed(out, raw: np.ndarray, x: np.ndarray, fit: np.ndarray) -> None:
    """Write the transformed values to ``.X``; skipped rows are NaN."""
    xfull = np.full(raw.shape, np.nan)
    xfull[fit] = x
    out.X = xfull


def _pca(out, x: np.ndarray, fit: np.ndarray, use: np.ndarray, opts: _Options) -> tuple[Any, int]:
    """Return the fitted rows and features as an AnnData with their PCA, and the number of components.

    The components are bounded by the fitted rows - 1 and the features (an ``EmbeddingWarning``
    says when ``n_dim`` was reduced).
    """
    import anndata as ad

    n_fit = int(fit.sum())
    sub = ad.AnnData(X=x[:, use].astype(np.float64), obs=out.obs.loc[fit].copy())
    n_comps = int(min(opts.n_dim, n_fit - 1, int(use.sum())))
    if n_comps < opts.n_dim:
        warnings.warn(f"n_dim={opts.n_dim} reduced to {n_comps} (fitted rows - 1 = {n_fit - 1}, features = "
                      f"{int(use.sum())}).", EmbeddingWarning, stacklevel=3)
    n_comps = max(n_comps, 1)
    solver = "full" if min(sub.shape) <= 2000 else "arpack"
    if _without_scanpy(opts, n_fit):  # what scanpy.pp.pca computes and stores, from sklearn directly
        from sklearn.decomposition import PCA

        pca = PCA(n_components=n_comps, svd_solver=solver, random_state=opts.seed)
        sub.obsm["X_pca"] = pca.fit_transform(sub.X).astype(np.float32)
        sub.varm["PCs"] = pca.components_.T
        sub.uns["pca"] = {"params": {"zero_center": True, "use_highly_variable": False, "mask_var": None},
                          "variance": pca.explained_variance_, "variance_ratio": pca.explained_variance_ratio_}
    else:
        from ._lazy import import_scanpy

        import_scanpy().pp.pca(sub, n_comps=n_comps, svd_solver=solver, random_state=opts.seed, zero_center=True)
    return sub, n_comps


def _without_scanpy(opts: _Options, n_fit: int) -> bool:
    """Whether PCA, neighbours and UMAP run without scanpy: ``neighbors='scanpy'`` below 8,192 fitted rows.

    There scanpy searches neighbours by brute force, and the same computation without it (sklearn's PCA,
    :func:`~phenocoder_lib.clustering.umap_connectivities`, :func:`~phenocoder_lib.umap_layout.umap_layout`)
    gives identical results without importing scanpy, umap and pynndescent (about 10 s in every new
    process). Above, scanpy's pynndescent search runs; ``'bbknn'`` always goes through scanpy.
    """
    return opts.neighbors == "scanpy" and n_fit < _SCANPY_FREE_BELOW


def _neighbor_graph(sub, n_comps: int, opts: _Options) -> int:
    """Build the neighbour graph of the fitted rows with ``opts.neighbors``; return the neighbours used."""
    from ._lazy import import_scanpy

    k = int(min(opts.n_neighbors, sub.n_obs - 1))
    if k < opts.n_neighbors:
        logger.info("n_neighbors=%d reduced to %d (rows - 1)", opts.n_neighbors, k)
    if opts.neighbors == "bbknn":
        import bbknn

        n_per_batch = int(sub.obs[opts.batch_keys[0]].value_counts().min())
        bbknn.bbknn(sub, batch_key=opts.batch_keys[0], neighbors_within_batch=max(1, min(k, n_per_batch - 1)),
                    n_pcs=n_comps)
    elif _without_scanpy(opts, sub.n_obs):
        _exact_neighbors(sub, max(k, 2), opts.seed)
    else:
        import_scanpy().pp.neighbors(sub, n_neighbors=max(k, 2), use_rep="X_pca", random_state=opts.seed)
    return k


def _exact_neighbors(sub, k: int, seed: int) -> None:
    """Store what ``scanpy.pp.neighbors(use_rep='X_pca')`` stores below 8,192 rows.

    Brute-force kNN distances (self excluded) and UMAP connectivities, with the same ``uns['neighbors']``.
    """
    import scipy.sparse as sp
    from sklearn.neighbors import KNeighborsTransformer

    from .clustering import knn_arrays, umap_connectivities

    n = sub.n_obs
    dist = KNeighborsTransformer(algorithm="brute", n_neighbors=min(k, n - 1), metric="euclidean"
                                 ).fit_transform(sub.obsm["X_pca"])
    idx, d = knn_arrays(dist, k)
    sub.obsp["distances"] = sp.csr_matrix((d[:, 1:].ravel().copy(), idx[:, 1:].ravel().copy(),
                                           np.arange(0, n * (k - 1) + 1, k - 1)), shape=(n, n))
    sub.obsp["connectivities"] = umap_connectivities(idx, d, n_obs=n, n_neighbors=k, libm_exp=True)
    sub.uns["neighbors"] = {"connectivities_key": "connectivities", "distances_key": "distances",
                            "params": {"n_neighbors": k, "method": "umap", "random_state": seed,
                                       "metric": "euclidean", "use_rep": "X_pca"}}


def _umap(sub, n_comps: int, opts: _Options) -> str:
    """Compute the UMAP of the fitted rows (when asked); return its initialisation.

    Spectral initialisation needs at least :data:`MIN_SPECTRAL_OBS` rows; below that the first two
    principal components (or random positions) initialise it, with an ``EmbeddingWarning``.
    """
    from ._lazy import import_scanpy

    init = "spectral"
    if not opts.umap:
        return init
    n_fit = sub.n_obs
    if n_fit < MIN_SPECTRAL_OBS:
        init = "X_pca2" if n_comps >= 2 else "random"
        if init == "X_pca2":
            sub.obsm["X_pca2"] = np.ascontiguousarray(sub.obsm["X_pca"][:, :2])
        source = "the first two PCs" if init != "random" else "random positions"
        warnings.warn(f"UMAP: {n_fit} rows are too few for spectral initialisation (needs >= "
                      f"{MIN_SPECTRAL_OBS}); initialised from {source} instead.", EmbeddingWarning, stacklevel=3)
    if _without_scanpy(opts, n_fit):
        from .umap_layout import umap_layout

        start = np.ascontiguousarray(sub.obsm["X_pca2"], dtype=np.float32) if init == "X_pca2" else init
        sub.obsm["X_umap"], params = umap_layout(sub.obsp["connectivities"], sub.obsm["X_pca"], min_dist=0.1,
                                                 init=start, seed=opts.seed)
        sub.uns["umap"] = {"params": params}
    else:
        import_scanpy().tl.umap(sub, min_dist=0.1, random_state=opts.seed, init_pos=init)
    sub.obsm.pop("X_pca2", None)
    return init


def _scatter_back(out, sub, fit: np.ndarray, use: np.ndarray, n_comps: int, *, umap: bool) -> None:
    """Copy PCA, graph and UMAP of the fitted rows into ``out`` (NaN rows and no edges for skipped rows)."""
    import scipy.sparse as sp

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


def _settings(opts: _Options, *, n_comps: int, k: int, init: str, fit: np.ndarray) -> dict[str, Any]:
    """Return the settings recorded in ``uns['spatialgraph_embedding']`` (JSON-compatible)."""
    return {
        "n_dim": int(opts.n_dim), "n_comps": int(n_comps), "scale": bool(opts.scale),
        "variable_features": opts.variable_features, "batch_correction": bool(opts.batch_correction),
        "batch_key": opts.batch_keys, "confounder_key": opts.confounder_keys,
        "neighbors": opts.neighbors, "n_neighbors": int(k), "umap": bool(opts.umap),
        "umap_init": init if opts.umap else "", "n_fit": int(fit.sum()), "n_skipped": int((~fit).sum()),
        "seed": int(opts.seed), "nan_imputation": "feature mean (0 after scaling)",
    }
