"""``Phenocoder`` methods for clustering, spatial graph statistics and the sample embedding.

Thin wrappers over :mod:`phenocoder_lib.clustering`, :mod:`phenocoder_lib.spatial` and
:mod:`phenocoder_lib.embedding`; heavy modules (numba kernels, scanpy, umap) are imported inside
the methods so that importing the package stays fast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .validation import check_key, require

logger = logging.getLogger(__name__)


class SpatialMixin:
    """``cluster``, ``spatialgraph_stats`` and ``spatialgraph_embedding`` (see :class:`Phenocoder`)."""

    sdata: Any
    adata: Any
    table_key: str | None
    sample_key: str | None
    seed: int

    # ------------------------------------------------------------------------------------------
    def _spatial_table(self, table_key: str | None):
        require(self.sdata is not None, "no SpatialData loaded: call add_sdata(sdata) first.")
        key = self.table_key if table_key is None else table_key
        require(key is not None, "table_key is None: pass table_key=... or set Phenocoder(table_key=...).")
        check_key(self.sdata.tables, key, argument="table_key", what="table of sdata.tables",
                  fix="Run encode() first for the 'phenocoder' table, or pass the name of a feature table.")
        require(self.sample_key is not None, "sample_key is None: set Phenocoder(sample_key=...).")
        return key, self.sdata.tables[key]

    # ------------------------------------------------------------------------------------------
    def cluster(
        self,
        table_key: str | None = None,
        *,
        key_added: str = "leiden",
        use_rep: str | None = None,
        layer: str | None = None,
        scale: bool = True,
        n_pcs: int = 50,
        n_neighbors: int = 15,
        resolution: float = 1.0,
        reference: Any = None,
        transfer_k: int | None = None,
    ):
        """Cluster a table's objects across all samples, or label them from an earlier reference.

        Without ``reference``: pooled PCA -> neighbours -> Leiden (seeded by ``self.seed``), see
        :func:`~phenocoder_lib.clustering.cluster_features`. With ``reference`` (a
        :class:`~phenocoder_lib.clustering.ClusterReference` or the path of its ``.npz``): labels by
        kNN transfer, so earlier samples keep their labels.

        Writes ``sdata.tables[table_key].obs[key_added]`` (categorical) and, when transferring,
        ``obs[key_added + '_confidence']``. Returns the reference (save it with ``.save(path)``).
        """
        from .clustering import ClusterReference, cluster_features, transfer_labels

        _, table = self._spatial_table(table_key)
        if reference is None:
            labels, ref = cluster_features(table, use_rep=use_rep, layer=layer, scale=scale, n_pcs=n_pcs,
                                           n_neighbors=n_neighbors, resolution=resolution, seed=self.seed,
                                           transfer_k=15 if transfer_k is None else transfer_k)
            table.obs[key_added] = labels
            return ref
        ref = ClusterReference.load(reference) if isinstance(reference, (str, Path)) else reference
        labels, confidence = transfer_labels(ref, table, k=transfer_k)
        table.obs[key_added] = labels
        table.obs[f"{key_added}_confidence"] = confidence
        return ref

    # ------------------------------------------------------------------------------------------
    def spatialgraph_stats(
        self,
        cluster_key: str = "leiden",
        spatial_key: str = "spatial",
        radii: float | Sequence[float] = (25, 50),
        table_key: str | None = None,
        stats: str | Iterable[str] | None = None,
        *,
        chull_min_nds: int = 10,
        chull_min_degree: int = 3,
        use_subunits: bool = False,
        dim_subunit: float | Sequence[float] = (500, 500, 100),
        min_obs_per_subunit: int = 100,
        max_obs_per_subunit: int | None = None,
        subunit_origin: Sequence[float] | None = None,
        exact: bool = False,
        n_clustering_samples: int = 1000,
        layer: str | None = None,
        progress: bool = True,
        n_jobs: int = 1,
        verbose: bool = False,
        max_clusters: int = 500,
    ):
        """Spatial graph statistics per sample (or per subunit) into ``self.adata``.

        Reads ``sdata.tables[table_key]`` (default ``self.table_key``): ``.obs[self.sample_key]``,
        the categorical ``.obs[cluster_key]``, ``.obsm[spatial_key]`` and, for ``moran_features``, the
        variables (``.X`` or ``layers[layer]``). The table is not modified. Writes ``self.adata``:
        one row per sample (``obs_names`` = sample ids as str) or per subunit, with the features
        ``radius:{r}_stat:{group}_{column}``; see
        :func:`~phenocoder_lib.spatial.driver.compute_spatial_stats` and
        ``docs/spatial_statistics.md``. ``verbose`` is accepted for compatibility with the earlier
        library and ignored: configure ``logging.getLogger("phenocoder_lib")`` instead.

        If the computation fails (e.g. every sample was skipped), ``self.adata`` is set to ``None``
        before the error propagates, so no stale result survives; invalid arguments raise before
        anything is touched. Returns ``self.adata``.
        """
        from .spatial.driver import compute_spatial_stats

        key, table = self._spatial_table(table_key)
        kwargs = dict(sample_key=self.sample_key, cluster_key=cluster_key, spatial_key=spatial_key, radii=radii,
                      stats=stats, layer=layer, chull_min_nds=chull_min_nds, chull_min_degree=chull_min_degree,
                      exact=exact, n_clustering_samples=n_clustering_samples, use_subunits=use_subunits,
                      dim_subunit=dim_subunit, min_obs_per_subunit=min_obs_per_subunit,
                      max_obs_per_subunit=max_obs_per_subunit, subunit_origin=subunit_origin, seed=self.seed,
                      n_jobs=n_jobs, progress=progress, table_key=key, max_clusters=max_clusters)
        _validate_stats_args(table, **kwargs)
        try:
            result = compute_spatial_stats(table, **kwargs)
        except Exception:
            self.adata = None
            raise
        self.adata = result
        return result

    # ------------------------------------------------------------------------------------------
    def spatialgraph_embedding(
        self,
        n_dim: int,
        scale: bool = True,
        variable_features: bool | int = False,
        batch_correction: bool = False,
        batch_key: str | None = None,
        confounder_key: str | Sequence[str] | None = None,
        n_neighbors: int = 15,
        umap: bool = True,
        obs_keys: str | Sequence[str] | None = None,
    ):
        """Scale, optionally batch-correct, PCA, neighbours and UMAP of ``self.adata``.

        Replaces ``self.adata`` by :func:`~phenocoder_lib.embedding.spatialgraph_embedding` of it;
        batch, confounder and obs keys are looked up per sample in the table the statistics were
        computed from (also at subunit level). Idempotent: the raw statistics stay in
        ``layers['raw']``. Returns ``self.adata``.
        """
        from .embedding import spatialgraph_embedding

        require(self.adata is not None, "self.adata is None: run spatialgraph_stats() first.")
        info = self.adata.uns.get("spatialgraph_stats", {})
        source_obs = None
        table_key = info.get("table_key") or self.table_key
        if self.sdata is not None and table_key in getattr(self.sdata, "tables", {}):
            source_obs = self.sdata.tables[table_key].obs
        self.adata = spatialgraph_embedding(
            self.adata, n_dim, scale=scale, variable_features=variable_features,
            batch_correction=batch_correction, batch_key=batch_key, confounder_key=confounder_key,
            n_neighbors=n_neighbors, umap=umap, obs_keys=obs_keys, source_obs=source_obs,
            sample_key=info.get("sample_key") or self.sample_key, seed=self.seed)
        return self.adata


def _validate_stats_args(table, **kwargs) -> None:
    """Argument checks that must fail before ``self.adata`` is touched."""
    from .spatial.driver import check_max_clusters
    from .spatial.stats import normalize_radii, normalize_stats, validate_hull_params
    from .validation import check_categorical, check_obs_column, check_obsm

    check_obs_column(table.obs, kwargs["sample_key"], argument="sample_key")
    cats = check_categorical(table.obs, kwargs["cluster_key"], argument="cluster_key")
    coords = check_obsm(table, kwargs["spatial_key"], argument="spatial_key", n_cols=(2, 3))
    normalize_stats(kwargs["stats"])
    radii = normalize_radii(kwargs["radii"])
    check_max_clusters(len(cats.categories), kwargs["max_clusters"], cluster_key=kwargs["cluster_key"],
                       n_radii=len(radii), n_samples=int(table.obs[kwargs["sample_key"]].nunique()))
    validate_hull_params(kwargs["chull_min_nds"], kwargs["chull_min_degree"], coords.shape[1])
