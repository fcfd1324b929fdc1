"""Consistent clusters across samples: pooled Leiden once, label transfer for every later sample.

:func:`cluster_features` clusters objects of all samples together (optional standardisation ->
PCA -> kNN graph -> Leiden, igraph flavour, seeded) and returns a :class:`ClusterReference` that
holds everything needed to label new objects the same way: the standardisation, the PCA loadings,
and a (seeded, optionally subsampled) reference set of PCA coordinates with their labels.
:func:`transfer_labels` projects new objects with the stored loadings and takes a majority vote of
their ``k`` nearest reference objects, so a new plate never changes the labels, and therefore the
spatial statistics, of earlier wells. The reference is saved as one ``.npz`` (arrays plus a JSON
header), read back with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._validation import check_key, require

logger = logging.getLogger(__name__)

__all__ = ["ClusterReference", "cluster_features", "transfer_labels", "feature_matrix"]

_FORMAT = "phenocoder.cluster_reference/1"


@dataclass
class ClusterReference:
    """Everything needed to assign the clusters of a pooled Leiden run to new objects."""

    categories: list[str]
    var_names: list[str]
    source: dict[str, Any]
    scale_mean: np.ndarray | None
    scale_std: np.ndarray | None
    pca_mean: np.ndarray
    pca_components: np.ndarray
    ref_embedding: np.ndarray
    ref_labels: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pcs(self) -> int:
        """Number of principal components of the reference space."""
        return int(self.pca_components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardise (if fitted so) and project onto the stored principal axes."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.var_names):
            raise ValueError(f"expected {len(self.var_names)} features per object (as in the reference: "
                             f"{self.var_names[:5]}...), found shape {x.shape}.")
        if self.scale_mean is not None:
            x = (x - self.scale_mean) / self.scale_std
        return ((x - self.pca_mean) @ self.pca_components.T).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` (no pickle): arrays plus a JSON header."""
        path = Path(path)
        header = {"format": _FORMAT, "categories": self.categories, "var_names": self.var_names,
                  "source": self.source, "params": self.params, "scaled": self.scale_mean is not None}
        arrays = {"header": np.array(json.dumps(header)), "pca_mean": self.pca_mean,
                  "pca_components": self.pca_components, "ref_embedding": self.ref_embedding,
                  "ref_labels": self.ref_labels}
        if self.scale_mean is not None:
            arrays["scale_mean"] = self.scale_mean
            arrays["scale_std"] = self.scale_std
        from ._io import atomic_file

        with atomic_file(path) as tmp, open(tmp, "wb") as fh:  # complete or absent, never half-written
            np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ClusterReference:
        """Read a reference written by :meth:`save` (``allow_pickle=False``)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"cluster reference {str(path)!r} does not exist; write it with "
                                    "ClusterReference.save() after cluster_features().")
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            if header.get("format") != _FORMAT:
                raise ValueError(f"{str(path)!r} is not a cluster reference (format {header.get('format')!r}, "
                                 f"expected {_FORMAT!r}).")
            scaled = header["scaled"]
            return cls(categories=list(header["categories"]), var_names=list(header["var_names"]),
                       source=dict(header["source"]), params=dict(header["params"]),
                       scale_mean=z["scale_mean"] if scaled else None,
                       scale_std=z["scale_std"] if scaled else None,
                       pca_mean=z["pca_mean"], pca_components=z["pca_components"],
                       ref_embedding=z["ref_embedding"], ref_labels=z["ref_labels"])


def feature_matrix(adata, *, use_rep: str | None = None, layer: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Dense float64 features of ``adata``: ``.obsm[use_rep]``, ``.layers[layer]`` or ``.X``."""
    import scipy.sparse as sp

    require(use_rep is None or layer is None,
            f"pass use_rep or layer, not both (got use_rep={use_rep!r}, layer={layer!r}).")
    if use_rep is not None:
        check_key(adata.obsm, use_rep, argument="use_rep", what="key of .obsm")
        x = adata.obsm[use_rep]
        names = list(x.columns.astype(str)) if isinstance(x, pd.DataFrame) else \
            [f"{use_rep}_{i}" for i in range(np.asarray(x).shape[1])]
        x = np.asarray(x)
    else:
        if layer is not None:
            check_key(adata.layers, layer, argument="layer", what="layer")
            x = adata.layers[layer]
        else:
            x = adata.X
            require(x is not None, "the table has no .X; pass layer=... or use_rep=...")
        names = [str(v) for v in adata.var_names]
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
    if x.dtype.kind not in "iufb":
        raise TypeError(f"features must be numeric, found dtype {x.dtype}.")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"{bad} objects have NaN/inf features; impute or drop them before clustering.")
    return x, names


def cluster_features(
    adata,
    *,
    use_rep: str | None = None,
    layer: str | None = None,
    scale: bool = True,
    n_pcs: int = 50,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    n_iterations: int = 2,
    seed: int = 0,
    max_reference: int | None = 200_000,
    transfer_k: int = 15,
) -> tuple[pd.Categorical, ClusterReference]:
    """Cluster the objects of all samples together (PCA -> kNN -> Leiden, seeded).

    Parameters
    ----------
    adata
        Objects (all samples pooled). Not modified.
    use_rep, layer
        Features: ``.obsm[use_rep]``, ``.layers[layer]`` or (default) ``.X``.
    scale
        Standardise each feature (mean 0, sd 1, ddof 0; constant features get sd 1) before PCA.
    n_pcs
        Principal components, bounded by ``n_obs - 1`` and ``n_features``.
    n_neighbors, resolution, n_iterations
        scanpy ``pp.neighbors`` and ``tl.leiden(flavor='igraph')`` settings.
    seed
        Seed for PCA, neighbours, Leiden and the reference subsample.
    max_reference
        Keep at most this many objects (seeded uniform subsample) as the transfer reference.
    transfer_k
        Neighbours voting in :func:`transfer_labels`.

    Returns
    -------
    (labels, reference)
        Categorical labels (categories ``'0'``, ``'1'``, ...) in the row order of ``adata``, and the
        :class:`ClusterReference`.

    """
    import anndata as ad
    from sklearn.decomposition import PCA

    from ._lazy import import_scanpy

    sc = import_scanpy()

    x, names = feature_matrix(adata, use_rep=use_rep, layer=layer)
    n, f = x.shape
    require(n >= 3, f"clustering needs at least 3 objects, found {n}.")
    mean = std = None
    if scale:
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        std[~(std > 0)] = 1.0
        x = (x - mean) / std
    n_comp = int(max(1, min(n_pcs, n - 1, f)))
    if n_comp < n_pcs:
        logger.info("n_pcs=%d reduced to %d (n_obs=%d, n_features=%d)", n_pcs, n_comp, n, f)
    pca = PCA(n_components=n_comp, svd_solver="full" if min(n, f) <= 1000 else "randomized", random_state=seed)
    emb = pca.fit_transform(x).astype(np.float32)
    tmp = ad.AnnData(X=np.zeros((n, 0), dtype=np.float32))
    tmp.obsm["X_pca"] = emb
    k = int(max(2, min(n_neighbors, n - 1)))
    sc.pp.neighbors(tmp, n_neighbors=k, use_rep="X_pca", random_state=seed)
    sc.tl.leiden(tmp, resolution=resolution, flavor="igraph", n_iterations=n_iterations, directed=False,
                 random_state=seed, key_added="leiden")
    labels = tmp.obs["leiden"].astype(str).to_numpy()
    categories = sorted(set(labels), key=lambda s: (len(s), s))
    cat = pd.Categorical(labels, categories=categories)
    keep = np.arange(n)
    if max_reference is not None and n > int(max_reference):
        keep = np.sort(np.random.default_rng(seed).choice(n, size=int(max_reference), replace=False))
    source = {"use_rep": use_rep or "", "layer": layer or ""}
    params = {"scale": bool(scale), "n_pcs": n_comp, "n_neighbors": k, "resolution": float(resolution),
              "n_iterations": int(n_iterations), "seed": int(seed), "transfer_k": int(transfer_k),
              "n_fit": int(n), "n_reference": int(keep.shape[0])}
    reference = ClusterReference(categories=categories, var_names=names, source=source, scale_mean=mean,
                                 scale_std=std, pca_mean=pca.mean_.astype(np.float64),
                                 pca_components=pca.components_.astype(np.float64),
                                 ref_embedding=emb[keep], ref_labels=cat.codes[keep].astype(np.int32),
                                 params=params)
    logger.info("Leiden: %d clusters on %d objects (%d PCs)", len(categories), n, n_comp)
    return cat, reference


def transfer_labels(reference: ClusterReference, adata=None, *, x: np.ndarray | None = None,
                    k: int | None = None) -> tuple[pd.Categorical, np.ndarray]:
    """Label new objects with the reference clusters (kNN majority vote in the reference PCA space).

    Parameters
    ----------
    reference
        From :func:`cluster_features` (or :meth:`ClusterReference.load`).
    adata
        New objects; features are read as recorded in the reference (``use_rep``/``layer``/``.X``)
        and must have the same feature names in the same order.
    x
        Alternatively, the feature matrix itself.
    k
        Voting neighbours (default: the reference's ``transfer_k``).

    Returns
    -------
    (labels, confidence)
        Categorical labels with the reference categories, and the vote fraction of the winner.
        Ties go to the label of the nearest tied neighbour.

    """
    from sklearn.neighbors import NearestNeighbors

    require((adata is None) != (x is None), "pass either adata or x.")
    if adata is not None:
        src = reference.source
        x, names = feature_matrix(adata, use_rep=src.get("use_rep") or None, layer=src.get("layer") or None)
        if not src.get("use_rep") and names != reference.var_names:
            raise ValueError(f"features differ from the reference: expected {reference.var_names[:5]}... "
                             f"({len(reference.var_names)}), found {names[:5]}... ({len(names)}).")
    emb = reference.transform(x)
    k = int(reference.params.get("transfer_k", 15) if k is None else k)
    k = max(1, min(k, reference.ref_embedding.shape[0]))
    nn = NearestNeighbors(n_neighbors=k).fit(reference.ref_embedding)
    dist, idx = nn.kneighbors(emb)
    votes_lab = reference.ref_labels[idx]  # (m, k), neighbours sorted by distance
    n_cat = len(reference.categories)
    counts = np.zeros((emb.shape[0], n_cat), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(emb.shape[0]), k), votes_lab.ravel()), 1)
    best = counts.max(axis=1)
    tied = counts == best[:, None]
    # nearest neighbour whose label is among the tied winners
    first = np.argmax(tied[np.arange(emb.shape[0])[:, None], votes_lab], axis=1)
    winner = votes_lab[np.arange(emb.shape[0]), first]
    labels = pd.Categorical.from_codes(winner, categories=reference.categories)
    return labels, best / k
