"""Synthetic plates with planted ground truth, written in the layout of a real plate export.

Every demo and test runs the real ingest path on these folders. What is planted:

- cell types that differ in morphology (radius, elongation, texture) and in channel signature
  (each type is bright in its own channel pattern);
- wells assigned to treatments (round robin over ``treatments``) that change the cell-type mix and the
  spatial arrangement: ``"control"`` wells place types independently (mixed neighbourhoods),
  other treatments grow types in spatial clumps (clustered neighbourhoods) with a shifted mix.

The truth is saved beside the export: ``ground_truth/objects.csv`` (well, label, cell_type) and
``ground_truth/wells.csv`` (well, treatment). ``plate.json`` records the physical scale and
``EXPORT_COMPLETE`` marks the export as finished (as a microscope export would).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .ingest import EXPORT_COMPLETE_MARKER, PLATE_METADATA_FILE

logger = logging.getLogger(__name__)

_BARCODE = "SYNTH000001"


@dataclass(frozen=True)
class SyntheticPlate:
    """What :func:`make_synthetic_plate` wrote.

    Parameters
    ----------
    root
        The plate export folder.
    wells
        Well names in writing order (``A01``, ``A02``, ...).
    treatments
        Well -> treatment name.
    n_objects
        Nuclei written over all wells (those that kept at least one pixel).
    is_3d
        Whether the export holds z-stacks.
    n_channels
        Channels per field.
    cell_types
        Planted cell-type names (``type_0``, ...), as ``ground_truth/objects.csv`` names them.

    """

    root: Path
    wells: list[str]
    treatments: dict[str, str]
    n_objects: int
    is_3d: bool
    n_channels: int
    cell_types: list[str]


def _well_names(n: int) -> list[str]:
    rows = "ABCDEFGHIJKLMNOP"
    return [f"{rows[(i // 12) % 16]}{i % 12 + 1:02d}" for i in range(n)]


def make_synthetic_plate(
    root: str | Path,
    *,
    n_wells: int = 3,
    ndim: int = 3,
    n_channels: int = 4,
    image_size: int = 256,
    n_z: int = 6,
    nuclei_per_well: int = 150,
    n_cell_types: int = 3,
    treatments: tuple[str, ...] = ("control", "treated"),
    dtype: str = "uint8",
    pixel_size_um: float = 1.0,
    z_step_um: float = 2.0,
    seed: int = 0,
    write_marker: bool = True,
) -> SyntheticPlate:
    """Write a synthetic plate export to ``root`` and return what was written.

    Parameters
    ----------
    root
        Output folder (created; must be empty or absent).
    n_wells, ndim, n_channels, image_size, n_z, nuclei_per_well
        Plate shape: wells, 2-D or 3-D, channels, image height/width in pixels, z-slices (3-D), nuclei.
    n_cell_types
        Number of planted cell types (at most 8).
    treatments
        Treatment names, assigned to wells round robin; the first is the mixed ("control") arrangement.
    dtype
        ``"uint8"`` (written as PNG) or ``"uint16"`` (written as TIFF).
    pixel_size_um, z_step_um
        Physical scale recorded in ``plate.json``.
    seed
        Everything is derived from this seed.
    write_marker
        Write the ``EXPORT_COMPLETE`` marker (leave it out to simulate an export still being written).

    Returns
    -------
    :class:`SyntheticPlate` describing the export written to ``root``.

    """
    import imageio.v3 as iio

    if ndim not in (2, 3):
        raise ValueError(f"ndim={ndim!r} must be 2 or 3.")
    if dtype not in ("uint8", "uint16"):
        raise ValueError(f"dtype={dtype!r} must be 'uint8' or 'uint16'.")
    if not 1 <= n_cell_types <= 8:
        raise ValueError(f"n_cell_types={n_cell_types!r} must be between 1 and 8.")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"root={str(root)!r} is not empty; choose a new folder for the synthetic plate.")
    n_z = n_z if ndim == 3 else 1
    rng = np.random.default_rng(seed)
    wells = _well_names(n_wells)
    well_treatment = {w: treatments[i % len(treatments)] for i, w in enumerate(wells)}
    types = [f"type_{k}" for k in range(n_cell_types)]

    # Per-type phenotype: radius (px), elongation, texture frequency, channel signature.
    radius = np.linspace(3.5, 6.0, n_cell_types) if n_cell_types > 1 else np.array([5.0])
    elongation = np.resize([1.0, 1.8, 1.3, 2.2, 1.1, 1.6, 1.4, 2.0], n_cell_types)
    texture = np.resize([0.0, 0.6, 0.25, 0.9, 0.4, 0.1, 0.75, 0.5], n_cell_types)
    signature = np.full((n_cell_types, n_channels), 0.15)
    for k in range(n_cell_types):
        signature[k, 0] = 0.8  # nuclear stain, all types
        if n_channels > 1:
            signature[k, 1 + k % (n_channels - 1)] = 0.95
            signature[k, 1 + (k + 1) % (n_channels - 1)] += 0.35 * (k % 2)
    vmax = 255 if dtype == "uint8" else 4095
    ext = "png" if dtype == "uint8" else "tif"

    for sub in ("imgs", "labels", "tables", "ground_truth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    truth_rows = []
    n_total = 0
    min_dist = 2 * (radius * np.sqrt(elongation)).max() + 1.5
    for well in wells:
        treatment = well_treatment[well]
        treated = treatment != treatments[0]
        centres = _place_nuclei(rng, nuclei_per_well, image_size, n_z if ndim == 3 else 1, min_dist)
        n = len(centres)
        mix = np.ones(n_cell_types)
        if treated:
            mix[0] *= 0.4
            mix[-1] *= 2.5
        mix /= mix.sum()
        if treated and n_cell_types > 1:
            # clustered arrangement: types grow around seeds, so neighbourhoods are homogeneous
            n_seeds = max(2, n // 25)
            seeds_xy = rng.uniform(0, image_size, size=(n_seeds, 2))
            seed_type = rng.choice(n_cell_types, size=n_seeds, p=mix)
            d = ((centres[:, None, 1:] - seeds_xy[None]) ** 2).sum(-1)
            cell_type = seed_type[d.argmin(1)]
        else:
            cell_type = rng.choice(n_cell_types, size=n, p=mix)
        image = np.zeros((n_channels, n_z, image_size, image_size), np.float32)
        labels = np.zeros((n_z, image_size, image_size), np.uint16 if n < 65535 else np.uint32)
        for i, (cz, cy, cx) in enumerate(centres):
            k = cell_type[i]
            _paint(image, labels, i + 1, cz, cy, cx, radius[k], elongation[k], texture[k], signature[k],
                   rng, ndim == 3)
        noise = rng.normal(0.03, 0.015, size=image.shape).astype(np.float32)
        image = np.clip(image + noise, 0, 1) * vmax
        image = np.rint(image).astype(dtype)
        for z in range(n_z):
            ztag = f"Z{z + 1:02d}" if ndim == 3 else ""
            stem = f"{_BARCODE}_260101_120000_{well}_T0001F001L01"
            for c in range(n_channels):
                iio.imwrite(root / "imgs" / f"{stem}A{n_channels - c:02d}{ztag}C{c + 1:02d}.{ext}", image[c, z])
            iio.imwrite(root / "labels" / f"{stem}A{n_channels:02d}{ztag}C01.tif", labels[z])
            df = slice_measurements(labels[z], image[:, z])
            df["well"] = well
            df["z_stack"] = z + 1
            name = f"{well}_{z + 1:02d}.csv" if ndim == 3 else f"{well}.csv"
            df.to_csv(root / "tables" / name, index=False)
        present = np.unique(labels)
        present = present[present > 0]
        for lab in present:
            truth_rows.append((well, int(lab), types[cell_type[lab - 1]]))
        n_total += len(present)
    pd.DataFrame(truth_rows, columns=["well", "label", "cell_type"]).to_csv(
        root / "ground_truth" / "objects.csv", index=False)
    pd.DataFrame({"well": wells, "treatment": [well_treatment[w] for w in wells]}).to_csv(
        root / "ground_truth" / "wells.csv", index=False)
    meta = {"pixel_size_um": pixel_size_um, "z_step_um": z_step_um, "table_scale": 1.0,
            "generator": "phenocoder_lib.synthetic", "seed": seed, "cell_types": types}
    (root / PLATE_METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if write_marker:
        (root / EXPORT_COMPLETE_MARKER).write_text("")
    result = SyntheticPlate(root, wells, well_treatment, n_total, ndim == 3, n_channels, types)
    logger.info("wrote synthetic plate %s: %s", root, {k: v for k, v in asdict(result).items() if k != "root"})
    return result


def slice_measurements(labels: np.ndarray, image: np.ndarray) -> pd.DataFrame:
    """Regionprops-style measurements of one 2-D label slice, vectorized with ``np.bincount``.

    Columns as skimage's ``regionprops_table`` names them: ``label``, ``centroid-0``, ``centroid-1``,
    ``area``, ``eccentricity``, ``intensity_mean-{c}``, ``major_axis_length``, ``minor_axis_length``
    (axis lengths and eccentricity from the second central moments, as skimage defines them).

    Parameters
    ----------
    labels
        (y, x) integer label mask, 0 = background.
    image
        (channels, y, x) intensities of the same slice.

    Returns
    -------
    One row per label present (ascending); an empty frame with the same columns when there is no object.

    """
    lab = labels.ravel().astype(np.int64)
    inside = lab > 0
    ids = lab[inside]
    if ids.size == 0:
        cols = ["label", "centroid-0", "centroid-1", "area", "eccentricity",
                *[f"intensity_mean-{c}" for c in range(image.shape[0])], "major_axis_length", "minor_axis_length"]
        return pd.DataFrame(columns=cols)
    yy, xx = np.divmod(np.flatnonzero(inside), labels.shape[1])
    n = int(ids.max()) + 1
    area = np.bincount(ids, minlength=n).astype(np.float64)
    present = np.flatnonzero(area)
    area = area[present]

    def mean(weights):
        return np.bincount(ids, weights=weights, minlength=n)[present] / area

    cy, cx = mean(yy), mean(xx)
    vyy = mean(yy.astype(float) ** 2) - cy**2
    vxx = mean(xx.astype(float) ** 2) - cx**2
    vxy = mean(yy * xx * 1.0) - cy * cx
    half_trace, det_term = (vyy + vxx) / 2, np.sqrt(((vyy - vxx) / 2) ** 2 + vxy**2)
    l1, l2 = half_trace + det_term, np.maximum(half_trace - det_term, 0)
    out = {"label": present, "centroid-0": cy, "centroid-1": cx, "area": area,
           "eccentricity": np.sqrt(np.where(l1 > 0, 1 - l2 / np.where(l1 > 0, l1, 1), 0))}
    for c in range(image.shape[0]):
        out[f"intensity_mean-{c}"] = mean(image[c].ravel()[inside].astype(np.float64))
    out["major_axis_length"] = 4 * np.sqrt(l1)
    out["minor_axis_length"] = 4 * np.sqrt(l2)
    return pd.DataFrame(out)


def _place_nuclei(rng: np.random.Generator, n: int, size: int, n_z: int, min_dist: float) -> np.ndarray:
    """Jittered-grid placement: up to ``n`` non-overlapping (z, y, x) centres."""
    step = min_dist
    margin = step / 2
    g = np.arange(margin, size - margin + 1e-9, step)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    cells = np.stack([yy.ravel(), xx.ravel()], 1)
    if n > len(cells):
        logger.warning("only %d nuclei fit in a %d px image (asked for %d); increase image_size", len(cells), size, n)
        n = len(cells)
    chosen = cells[rng.choice(len(cells), size=n, replace=False)]
    jitter = rng.uniform(-0.15 * step, 0.15 * step, size=chosen.shape)
    yx = np.clip(chosen + jitter, 0, size - 1)
    z = rng.uniform(0.5, max(n_z - 1.5, 0.5), size=n) if n_z > 1 else np.zeros(n)
    return np.column_stack([z, yx])


def _rotated_window(cy: float, cx: float, ext: int, theta: float, h: int, w: int):
    """Return the clipped pixel window of half-width ``ext`` around (cy, cx) and its rotated coordinates.

    ``u, v`` are the window pixels' coordinates along the nucleus axes rotated by ``theta``.
    """
    y0, y1 = max(int(cy) - ext, 0), min(int(cy) + ext + 1, h)
    x0, x1 = max(int(cx) - ext, 0), min(int(cx) + ext + 1, w)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return (y0, y1, x0, x1), u, v


def _paint(image, labels, lab, cz, cy, cx, r, elong, tex, sig, rng, is_3d) -> None:
    n_c, n_z, h, w = image.shape
    a, b = r * elong**0.5, r / elong**0.5  # semi-axes, same area as a circle of radius r
    theta = rng.uniform(0, np.pi)
    rz = 1.2 if is_3d else 0.5
    (y0, y1, x0, x1), u, v = _rotated_window(cy, cx, int(np.ceil(a)) + 1, theta, h, w)
    phase = rng.uniform(0, 2 * np.pi)
    pattern = 1.0 - tex * 0.5 * (1 + np.sin(1.6 * u + phase) * np.sin(1.6 * v))
    for z in range(n_z):
        dz = (z - cz) / rz if is_3d else 0.0
        inside = (u / a) ** 2 + (v / b) ** 2 + dz**2 <= 1.0
        if not inside.any():
            continue
        free = inside & (labels[z, y0:y1, x0:x1] == 0)
        labels[z, y0:y1, x0:x1][free] = lab
        shade = np.sqrt(np.clip(1 - dz**2, 0, 1))
        for c in range(n_c):
            image[c, z, y0:y1, x0:x1][free] = sig[c] * pattern[free] * shade


def read_ground_truth(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the planted truth that :func:`make_synthetic_plate` (or the screen) saved beside an export.

    Parameters
    ----------
    root
        The synthetic plate export folder (holding ``ground_truth/``).

    Returns
    -------
    ``(objects, wells)``: ``objects`` has ``well, label, cell_type`` (one row per nucleus), ``wells`` has
    ``well, treatment``.

    """
    root = Path(root)
    objects = pd.read_csv(root / "ground_truth" / "objects.csv", dtype={"well": str})
    wells = pd.read_csv(root / "ground_truth" / "wells.csv", dtype={"well": str})
    return objects, wells


# --------------------------------------------------------------------------------------------------------------
# A harder screen: several plates with plate effects, controls on every plate, replicates, doses, three kinds
# of phenotype. See make_synthetic_screen and docs/profiling.md.
# --------------------------------------------------------------------------------------------------------------

#: Screen treatments: name -> (kind, mechanism). Kinds: "morphology" (strong, visible per cell),
#: "subtle" (texture or shape at unchanged mean intensity and area), "spatial" (arrangement only: every cell
#: and the cell-type mix unchanged). Mechanisms group treatments for the consistency mAP.
SCREEN_TREATMENTS: dict[str, tuple[str, str]] = {
    "morph_large": ("morphology", "nuclear_morphology"),
    "morph_elongated": ("morphology", "nuclear_morphology"),
    "texture_granular": ("subtle", "chromatin_envelope"),
    "shape_irregular": ("subtle", "chromatin_envelope"),
    "spatial_mixing": ("spatial", "dispersal"),
    "spatial_clustering": ("spatial", "aggregation"),
    "spatial_ring": ("spatial", "aggregation"),
}
#: Name of the negative-control treatment.
SCREEN_CONTROL = "DMSO"
_SCREEN_RADIUS = np.array([3.5, 4.75, 6.0])
_SCREEN_ELONGATION = np.array([1.0, 1.8, 1.3])
_SCREEN_TEXTURE = np.array([0.0, 0.6, 0.25])


@dataclass(frozen=True)
class SyntheticScreen:
    """What :func:`make_synthetic_screen` wrote: one plate export per plate, each with a ``layout.csv``.

    Parameters
    ----------
    root
        The screen folder (holding ``screen_layout.csv`` and one folder per plate).
    plates
        The plate export folders, in plate order.
    layout
        Every well of every plate: ``plate, well, treatment, dose, control, mechanism, kind``.
    n_objects
        Nuclei written over all plates.
    treatments
        Treatment name -> (kind, mechanism) of the treatments on the screen.

    """

    root: Path
    plates: list[Path]
    layout: pd.DataFrame
    n_objects: int
    treatments: dict[str, tuple[str, str]]


def make_synthetic_screen(
    root: str | Path,
    *,
    n_plates: int = 3,
    n_controls: int = 6,
    replicates: int = 2,
    doses: tuple[float, ...] = (0.5, 1.0),
    treatments: tuple[str, ...] | None = None,
    image_size: int | None = None,
    nuclei_per_well: int = 90,
    n_channels: int = 4,
    seed: int = 0,
) -> SyntheticScreen:
    """Write a multi-plate 2-D screen with plate effects and planted phenotypes of three kinds.

    Every plate is a complete plate export (the layout of :func:`make_synthetic_plate`: ``imgs/``,
    ``labels/``, ``tables/``, ``plate.json``, ``EXPORT_COMPLETE``, ``ground_truth/``) in ``root/<plate>``,
    with a ``layout.csv`` beside the sub-folders (well, treatment, dose, control, mechanism, kind).

    What is planted (docs/profiling.md lists the expected winner of each):

    - three cell types (radius, elongation, texture, channel signature) in equal numbers in every well;
    - plate effects: per plate and channel a gain (0.8-1.2) and a background offset (0.02-0.06), and a
      linear illumination ramp (+-12 % across the field, random direction); a small per-well gain jitter;
    - per plate ``n_controls`` negative-control wells (``DMSO``; types placed at random) and, per treatment
      and dose, ``replicates`` wells; well positions are shuffled per plate;
    - ``morph_large`` (radius x (1 + 0.3 dose)), ``morph_elongated`` (elongation x (1 + 0.6 dose));
    - ``texture_granular`` (a fine speckle of amplitude 0.8 dose) and ``shape_irregular`` (five lobes of
      amplitude 0.18 dose at the same area): every cell's mean intensity is normalized to its type's value,
      so mean intensities cannot see either;
    - ``spatial_mixing`` (types on alternating lattice positions: heterotypic neighbours),
      ``spatial_clustering`` (types in patches of a smooth random field) and ``spatial_ring`` (the largest type
      on a ring around the field centre): cell positions, cells and the type mix are those of a control well;
      only who sits where changes. ``dose`` is the fraction of cells that follow the arrangement (the rest are
      shuffled among themselves).

    Parameters
    ----------
    root
        Output folder (created; must be empty or absent).
    n_plates, n_controls, replicates, doses
        Screen design: plates, control wells per plate, replicate wells per (treatment, dose) per plate, doses.
    treatments
        Subset of :data:`SCREEN_TREATMENTS` (default: all).
    image_size, nuclei_per_well, n_channels
        Field size (px; default :func:`screen_image_size` of ``nuclei_per_well``: 256 px for 90 nuclei, the
        same density for any number), nuclei per well (at most the lattice allows), channels (>= 2).
    seed
        Everything is derived from this seed.

    Returns
    -------
    :class:`SyntheticScreen` describing the plates written under ``root``.

    """
    import imageio.v3 as iio

    treatments = tuple(SCREEN_TREATMENTS) if treatments is None else tuple(treatments)
    unknown = [t for t in treatments if t not in SCREEN_TREATMENTS]
    if unknown:
        raise ValueError(f"treatments={unknown} are not screen treatments; choose from {list(SCREEN_TREATMENTS)}.")
    for name, value, low in (("n_plates", n_plates, 1), ("n_controls", n_controls, 2), ("replicates", replicates, 1),
                             ("n_channels", n_channels, 2), ("nuclei_per_well", nuclei_per_well, 10)):
        if int(value) < low:
            raise ValueError(f"{name}={value!r} must be >= {low}.")
    if not doses or any(not 0 < d <= 1 for d in doses):
        raise ValueError(f"doses={doses!r} must be one or more values in (0, 1].")
    image_size = screen_image_size(nuclei_per_well) if image_size is None else int(image_size)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"root={str(root)!r} is not empty; choose a new folder for the synthetic screen.")
    rng = np.random.default_rng(seed)
    n_types = 3
    signature = np.full((n_types, n_channels), 0.15)
    for k in range(n_types):
        signature[k, 0] = 0.8
        signature[k, 1 + k % (n_channels - 1)] = 0.95
        signature[k, 1 + (k + 1) % (n_channels - 1)] += 0.35 * (k % 2)
    step = screen_lattice_step(doses)
    design = screen_design(treatments, doses, n_controls=n_controls, replicates=replicates)
    wells = _well_names(len(design))
    layouts, n_total, plates = [], 0, []
    for p in range(n_plates):
        plate_id = f"SCREEN{seed:02d}P{p + 1}"
        plate_root = root / plate_id
        for sub in ("imgs", "labels", "tables", "ground_truth"):
            (plate_root / sub).mkdir(parents=True, exist_ok=True)
        gain = rng.uniform(0.8, 1.2, size=n_channels)
        offset = rng.uniform(0.02, 0.06, size=n_channels)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size - 0.5
        illumination = 1 + 0.24 * (np.cos(angle) * xx + np.sin(angle) * yy)  # linear: +-12 % across the field
        order = rng.permutation(len(design))
        truth_rows, well_rows = [], []
        for well, (treatment, dose) in zip(wells, [design[i] for i in order], strict=True):
            kind, mechanism = SCREEN_TREATMENTS.get(treatment, ("control", ""))
            centres, cell_type = screen_well_layout(rng, treatment, dose, nuclei_per_well=nuclei_per_well,
                                                    image_size=image_size, step=step, n_types=n_types)
            image = np.zeros((n_channels, image_size, image_size), np.float32)
            labels = np.zeros((image_size, image_size), np.uint16)
            for i, (cy, cx) in enumerate(centres):
                k = cell_type[i]
                r, el, speckle, lobes = _SCREEN_RADIUS[k], _SCREEN_ELONGATION[k], 0.0, 0.0
                if treatment == "morph_large":
                    r *= 1 + 0.3 * dose
                elif treatment == "morph_elongated":
                    el *= 1 + 0.6 * dose
                elif treatment == "texture_granular":
                    speckle = 0.8 * dose
                elif treatment == "shape_irregular":
                    lobes = 0.18 * dose
                paint_screen_cell(image, labels, i + 1, cy, cx, r, el, _SCREEN_TEXTURE[k], speckle, lobes,
                                  signature[k], rng)
            well_gain = rng.normal(1.0, 0.03)
            # signal x 0.35 keeps the brightest speckle below saturation after gain and illumination (a clipped
            # pixel would change a cell's mean intensity, which the subtle phenotypes must leave unchanged)
            image = (0.35 * image + offset[:, None, None]) * gain[:, None, None] * illumination[None] * well_gain
            image = image + rng.normal(0.0, 0.015, size=image.shape).astype(np.float32)
            image = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
            stem = f"{plate_id}_260101_120000_{well}_T0001F001L01"
            for c in range(n_channels):
                iio.imwrite(plate_root / "imgs" / f"{stem}A{n_channels - c:02d}C{c + 1:02d}.png", image[c])
            iio.imwrite(plate_root / "labels" / f"{stem}A{n_channels:02d}C01.tif", labels)
            df = slice_measurements(labels, image)
            df["well"] = well
            df["z_stack"] = 1
            df.to_csv(plate_root / "tables" / f"{well}.csv", index=False)
            present = np.unique(labels)
            present = present[present > 0]
            truth_rows += [(well, int(lab), f"type_{cell_type[lab - 1]}") for lab in present]
            n_total += len(present)
            well_rows.append({"plate": plate_id, "well": well, "treatment": treatment, "dose": dose,
                              "control": treatment == SCREEN_CONTROL, "mechanism": mechanism, "kind": kind})
        layout = pd.DataFrame(well_rows)
        layout.drop(columns="plate").to_csv(plate_root / "layout.csv", index=False)
        pd.DataFrame(truth_rows, columns=["well", "label", "cell_type"]).to_csv(
            plate_root / "ground_truth" / "objects.csv", index=False)
        layout[["well", "treatment"]].to_csv(plate_root / "ground_truth" / "wells.csv", index=False)
        meta = {"pixel_size_um": 1.0, "z_step_um": 1.0, "table_scale": 1.0, "generator":
                "phenocoder_lib.synthetic.make_synthetic_screen", "seed": seed,
                "cell_types": [f"type_{k}" for k in range(n_types)],
                "plate_effects": {"gain": gain.round(4).tolist(), "offset": offset.round(4).tolist(),
                                  "illumination_angle": round(float(angle), 4)}}
        (plate_root / PLATE_METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (plate_root / EXPORT_COMPLETE_MARKER).write_text("")
        layouts.append(layout)
        plates.append(plate_root)
    layout = pd.concat(layouts, ignore_index=True)
    layout.to_csv(root / "screen_layout.csv", index=False)
    logger.info("wrote synthetic screen %s: %d plates, %d wells, %d objects", root, n_plates, len(layout), n_total)
    return SyntheticScreen(root, plates, layout, n_total, {t: SCREEN_TREATMENTS[t] for t in treatments})


def screen_design(treatments: Sequence[str], doses: Sequence[float], *, n_controls: int,
                  replicates: int) -> list[tuple[str, float]]:
    """The wells of one screen plate, in layout order: the controls, then every treatment-dose ``replicates`` times.

    Parameters
    ----------
    treatments, doses
        The treatments (keys of :data:`SCREEN_TREATMENTS`) and their doses.
    n_controls, replicates
        Control wells (treatment :data:`SCREEN_CONTROL`, dose 0) and wells per treatment-dose on the plate.

    Returns
    -------
    ``(treatment, dose)`` of each well (the screen shuffles their positions per plate).

    """
    return [(SCREEN_CONTROL, 0.0)] * n_controls + [(t, d) for t in treatments for d in doses] * replicates


def screen_image_size(nuclei_per_well: int) -> int:
    """Field side (px) of a screen well: 256 px for 90 nuclei, and the same density for any other number.

    Parameters
    ----------
    nuclei_per_well
        Nuclei per well.

    Returns
    -------
    ``ceil(256 sqrt(nuclei_per_well / 90))``.

    """
    return int(np.ceil(256 * np.sqrt(int(nuclei_per_well) / 90)))


def screen_lattice_step(doses: Sequence[float]) -> float:
    """Lattice spacing (px) of the screen's wells: the largest planted nucleus at the highest dose plus a gap.

    One lattice for every well, so the density never differs between treatments.

    Parameters
    ----------
    doses
        The screen's doses (the largest sets the size of ``morph_large`` and ``morph_elongated`` nuclei).

    Returns
    -------
    Distance between neighbouring lattice positions in pixels.

    """
    top = max(float(d) for d in doses)
    max_semi_axis = float(np.max(_SCREEN_RADIUS * (1 + 0.3 * top) * np.sqrt(_SCREEN_ELONGATION * (1 + 0.6 * top))))
    return 2 * max_semi_axis + 2.0


def screen_well_layout(rng: np.random.Generator, treatment: str, dose: float, *, nuclei_per_well: int,
                       image_size: int, step: float, n_types: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Positions and cell types of one screen well: a jittered lattice and the treatment's type arrangement.

    Parameters
    ----------
    rng
        Random generator (advanced in place).
    treatment, dose
        The well's treatment (a key of :data:`SCREEN_TREATMENTS` or the control) and dose; only the spatial
        treatments change who sits where, ``dose`` being the fraction of cells that follow the arrangement.
    nuclei_per_well, image_size, step
        Nuclei (at most the lattice holds), field side and lattice spacing (:func:`screen_lattice_step`) in px.
    n_types
        Number of cell types (equal numbers in every well, roughly equal under ``spatial_mixing``).

    Returns
    -------
    ``(centres, types)``: (n, 2) nucleus centres (y, x) in px and (n,) int cell type of each.

    """
    centres, grid = _lattice(rng, nuclei_per_well, image_size, step)
    return centres, _arrange_types(rng, treatment, dose, centres, grid, image_size, n_types)


def _lattice(rng: np.random.Generator, n: int, size: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` jittered lattice positions (y, x) and their integer lattice coordinates (i, j)."""
    g = np.arange(step / 2, size - step / 2 + 1e-9, step)
    ii, jj = np.meshgrid(np.arange(len(g)), np.arange(len(g)), indexing="ij")
    grid = np.stack([ii.ravel(), jj.ravel()], 1)
    if n > len(grid):
        logger.warning("only %d nuclei fit in a %d px field (asked for %d)", len(grid), size, n)
        n = len(grid)
    grid = grid[np.sort(rng.choice(len(grid), size=n, replace=False))]
    yx = g[grid] + rng.uniform(-0.1 * step, 0.1 * step, size=grid.shape)
    return np.clip(yx, 0, size - 1), grid


def _arrange_types(rng: np.random.Generator, treatment: str, dose: float, centres: np.ndarray, grid: np.ndarray,
                   size: int, n_types: int) -> np.ndarray:
    """Cell type of each position: equal counts in every well; only spatial treatments change who sits where."""
    n = len(centres)
    counts = np.full(n_types, n // n_types)
    counts[: n % n_types] += 1
    pool = np.repeat(np.arange(n_types), counts)
    if treatment == "spatial_mixing":
        # alternating lattice positions: 4-neighbours always differ (types in rough, not exact, equal numbers)
        types = (grid[:, 0] + 2 * grid[:, 1]) % n_types
    elif treatment == "spatial_clustering":
        # tertiles of a smooth random field: contiguous patches of one type, exact counts
        field = np.zeros(n)
        for _ in range(3):
            theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            proj = centres[:, 0] * np.sin(theta) + centres[:, 1] * np.cos(theta)
            field += np.sin(2 * np.pi * proj / (0.45 * size) + phase)
        types = np.empty(n, dtype=int)
        types[np.argsort(field)] = pool
    elif treatment == "spatial_ring":
        # the cells closest to a circle around the centre take the largest type; the rest at random
        d = np.abs(np.hypot(centres[:, 0] - size / 2, centres[:, 1] - size / 2) - 0.33 * size)
        ring_type = n_types - 1
        types = np.empty(n, dtype=int)
        on_ring = np.argsort(d)[: counts[ring_type]]
        types[on_ring] = ring_type
        rest = np.setdiff1d(np.arange(n), on_ring)
        types[rest] = rng.permutation(pool[pool != ring_type])
    else:
        return rng.permutation(pool)
    if dose < 1:  # a fraction (1 - dose) of the cells swap types among themselves at random
        moved = rng.choice(n, size=int(round((1 - dose) * n)), replace=False)
        types[moved] = rng.permutation(types[moved])
    return types


def paint_screen_cell(
    image: np.ndarray,
    labels: np.ndarray,
    lab: int,
    cy: float,
    cx: float,
    r: float,
    elong: float,
    tex: float,
    speckle: float,
    lobes: float,
    sig: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Paint one 2-D screen nucleus in place; its mean intensity per channel is ``sig * (1 - tex / 2)``.

    The nucleus is an ellipse of the area of a circle of radius ``r``, at a random orientation, optionally
    with a speckle (``texture_granular``) or boundary lobes (``shape_irregular``). Its intensity pattern is
    rescaled so that the mean over its pixels does not depend on ``tex``, ``speckle`` or ``lobes``: the
    subtle phenotypes change texture and shape, never the mean intensity. Pixels already labelled by another
    nucleus are left alone.

    Parameters
    ----------
    image
        (channels, y, x) float image, written in place inside the nucleus.
    labels
        (y, x) label mask, written in place (``lab`` on the nucleus's free pixels).
    lab
        Label id of this nucleus (> 0).
    cy, cx
        Centre in pixels.
    r
        Radius in pixels of the circle of the same area.
    elong
        Ratio of the ellipse's semi-axes (1 = circle).
    tex
        Amplitude in [0, 1] of the cell type's coarse sinusoidal texture.
    speckle
        Amplitude of the added fine speckle (0: none).
    lobes
        Relative amplitude of five boundary lobes at unchanged area (0: a plain ellipse).
    sig
        Mean intensity per channel of the cell type before the ``1 - tex / 2`` texture factor.
    rng
        Random generator for the orientation and the phases of the patterns.

    """
    _, h, w = image.shape
    a, b = r * elong**0.5, r / elong**0.5
    if lobes:
        a, b = a / np.sqrt(1 + lobes**2 / 2), b / np.sqrt(1 + lobes**2 / 2)  # same area with lobes
    theta = rng.uniform(0, np.pi)
    (y0, y1, x0, x1), u, v = _rotated_window(cy, cx, int(np.ceil(a * (1 + lobes))) + 1, theta, h, w)
    rho = np.hypot(u / a, v / b)
    boundary = 1 + lobes * np.cos(5 * np.arctan2(v / b, u / a) + rng.uniform(0, 2 * np.pi)) if lobes else 1.0
    inside = rho <= boundary
    free = inside & (labels[y0:y1, x0:x1] == 0)
    if not free.any():
        return
    phase = rng.uniform(0, 2 * np.pi, size=3)
    pattern = 1.0 - tex * 0.5 * (1 + np.sin(1.6 * u + phase[0]) * np.sin(1.6 * v))
    if speckle:
        pattern = pattern * np.clip(1 + speckle * np.sin(2.8 * u + phase[1]) * np.cos(2.8 * v + phase[2]), 0, None)
    pattern = pattern / max(float(pattern[free].mean()), 1e-6) * (1 - tex / 2)
    labels[y0:y1, x0:x1][free] = lab
    for c in range(image.shape[0]):
        image[c, y0:y1, x0:x1][free] = sig[c] * pattern[free]
