"""Facade methods for data: ``add_sdata`` and ``generate_dataset`` (step 1 of the workflow guide)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import patches as _patches


class DatasetMixin:
    """``add_sdata`` and ``generate_dataset``; see :class:`phenocoder_lib.Phenocoder`."""

    def add_sdata(self, sdata: Any) -> None:
        """Attach a SpatialData object (images ``f"{image_key}_{sample}"``, tables, labels)."""
        if not hasattr(sdata, "tables") or not hasattr(sdata, "images"):
            raise TypeError(f"sdata must be a spatialdata.SpatialData object, got {type(sdata).__name__}.")
        self.sdata = sdata

    def _require_sdata(self) -> Any:
        if self.sdata is None:
            raise ValueError("No SpatialData attached: call pheno.add_sdata(sdata) first.")
        return self.sdata

    def generate_dataset(
        self,
        dataset: str,
        dir_dataset: str | Path,
        patch_size: int | Sequence[int] = (128, 128),
        spatial_key_index: str | None = None,
        scale: bool = True,
        metadata_keys: Sequence[str] | None = None,
        scale_percentile: float = 1.0,
        scale_per_sample: bool = True,
        n_samples: int | None = None,
        n_patches: int | None = None,
        *,
        progress: bool = True,
    ) -> _patches.PatchDataset:
        """Extract a patch around every object and store the dataset ``<dir_dataset>/<dataset>/``.

        See :func:`phenocoder_lib.patches.generate_dataset` for the parameters and the layout.
        Sets ``data_dir = dir_dataset`` and appends ``dataset`` to ``datasets`` (calling it again with
        another name accumulates datasets for training; the same name replaces that dataset).
        ``spatial_key_index`` defaults to ``spatial_key``'s index twin ``"spatial_index"`` when the
        table has it, else to ``spatial_key``.
        """
        sdata = self._require_sdata()
        if spatial_key_index is None:
            table = sdata.tables.get(self.table_key)
            has_index = table is not None and "spatial_index" in table.obsm
            spatial_key_index = "spatial_index" if has_index else self.spatial_key
        dir_dataset = Path(dir_dataset)
        if self.data_dir is not None and Path(self.data_dir) != dir_dataset and self.datasets:
            raise ValueError(
                f"dir_dataset={str(dir_dataset)!r} differs from the folder of the earlier datasets "
                f"({str(self.data_dir)!r}, datasets {self.datasets}); keep all datasets of a model in one folder."
            )
        result = _patches.generate_dataset(
            sdata,
            dataset=dataset,
            dir_dataset=dir_dataset,
            table_key=self.table_key,
            sample_key=self.sample_key,
            image_key=self.image_key,
            patch_size=patch_size,
            spatial_key_index=spatial_key_index,
            scale=scale,
            scale_percentile=scale_percentile,
            scale_per_sample=scale_per_sample,
            metadata_keys=metadata_keys,
            n_samples=n_samples,
            n_patches=n_patches,
            seed=self.seed,
            progress=progress,
        )
        self.data_dir = dir_dataset
        if dataset not in self.datasets:
            self.datasets.append(dataset)
        return result

    def open_datasets(self) -> list[_patches.PatchDataset]:
        """The patch datasets generated so far (``data_dir / name`` for each of ``datasets``)."""
        if self.data_dir is None or not self.datasets:
            raise ValueError("No patch dataset yet: call pheno.generate_dataset(...) first.")
        return [_patches.PatchDataset.open(Path(self.data_dir) / name) for name in self.datasets]
