"""The workflow guide's six steps with ``phenocoder_lib``, end to end.

Usage::

    python examples/example_workflow.py                       # on a freshly generated synthetic plate
    python examples/example_workflow.py ../shared/data/plate_3d --pixel-size 1.288 --z-step 10 --table-scale 4

Writes everything under ``--out`` (default ``./phenocoder_example``): the plate as SpatialData zarr,
the patch dataset, the model with its training curves and previews, the encoded table, the spatial
statistics and the well embedding figure.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from phenocoder_lib import Phenocoder, set_verbose_logging
from phenocoder_lib.ingest import read_plate, write_sdata
from phenocoder_lib.synthetic import make_synthetic_plate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plate", nargs="?", help="plate export folder (default: generate a synthetic plate)")
    parser.add_argument("--out", default="phenocoder_example", help="output folder")
    parser.add_argument("--pixel-size", type=float, default=None, help="image pixel size in um")
    parser.add_argument("--z-step", type=float, default=None, help="z step in um")
    parser.add_argument("--table-scale", type=float, default=None, help="table units per image pixel")
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--radii", type=float, nargs="+", default=None, help="graph radii in um")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    set_verbose_logging(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # 0. Read the plate export into a SpatialData object (lazily) --------------------------------
    plate = Path(args.plate) if args.plate else None
    if plate is None:
        plate = out / "synthetic_plate"
        if not plate.exists():
            make_synthetic_plate(plate, n_wells=4, ndim=3, image_size=256, n_z=6, nuclei_per_well=180, seed=args.seed)
    sdata = read_plate(plate, pixel_size_um=args.pixel_size, z_step_um=args.z_step, table_scale=args.table_scale)
    write_sdata(sdata, out / "plate.zarr")
    timings["ingest"] = time.perf_counter() - t0

    pheno = Phenocoder(table_key="nuclei_features", sample_key="sample", image_key="IF", seed=args.seed)
    pheno.add_sdata(sdata)

    # 1. Patch dataset ---------------------------------------------------------------------------
    t = time.perf_counter()
    pheno.generate_dataset(
        dataset="dataset_1",
        dir_dataset=out / "datasets",
        patch_size=(args.patch_size, args.patch_size),
        spatial_key_index="spatial_index",
    )
    timings["patches"] = time.perf_counter() - t

    # 2-3. Model and training ---------------------------------------------------------------------
    t = time.perf_counter()
    n_channels = len(sdata.tables["nuclei_features"].var_names)
    pheno.initialize_model(
        n_latent_dim=16,
        n_dense_dim=64,
        conditions=["dataset", "z"],
        input_shape=(args.patch_size, args.patch_size, n_channels),
        conv_layers=(32, 64, 128),
        flip=True,
    )
    pheno.train(n_epochs=args.epochs)
    timings["train"] = time.perf_counter() - t

    # 4. Encode, smoothing latents over a 3-cell-diameter neighbourhood ---------------------------
    t = time.perf_counter()
    radius = args.radii[0] if args.radii else 25.0
    pheno.encode(spatial_key_index="spatial_index", spatial_message_passing_radius=radius)
    timings["encode"] = time.perf_counter() - t

    # 5. Cluster the latents across all wells, then spatial graph statistics --------------------
    t = time.perf_counter()
    reference = pheno.cluster("phenocoder", key_added="leiden", resolution=0.5)
    reference.save(out / "cluster_reference.npz")
    radii = tuple(args.radii) if args.radii else (25.0, 50.0)
    pheno.spatialgraph_stats(cluster_key="leiden", spatial_key="spatial", radii=radii, table_key="phenocoder")
    timings["graph_stats"] = time.perf_counter() - t

    # 6. Embed the wells ------------------------------------------------------------------------------
    t = time.perf_counter()
    pheno.spatialgraph_embedding(n_dim=8, scale=True, umap=True)
    timings["embedding"] = time.perf_counter() - t
    pheno.adata.write_h5ad(out / "graph_stats.h5ad")
    pheno.sdata.tables["phenocoder"].write_h5ad(out / "phenocoder_table.h5ad")
    _plot_embedding(pheno.adata, out / "well_embedding.png")
    timings["total"] = time.perf_counter() - t0
    logging.getLogger("phenocoder_lib").info("timings (s): %s", {k: round(v, 2) for k, v in timings.items()})
    print(f"Done in {timings['total']:.0f} s. Results in {out.resolve()}")
    return {"pheno": pheno, "timings": timings, "out": out}


def _plot_embedding(adata, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = adata.obsm["X_umap"] if "X_umap" in adata.obsm else adata.obsm["X_pca"][:, :2]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(xy[:, 0], xy[:, 1], s=40)
    for name, (x, y) in zip(adata.obs_names, xy, strict=True):
        ax.annotate(str(name), (x, y), fontsize=7)
    ax.set_title("Wells embedded by their spatial graph statistics")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
