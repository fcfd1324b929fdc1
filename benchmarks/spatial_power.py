"""Power of the arrangement features on the synthetic screen's spatial treatments, by nuclei per well.

No images and no model: every well of the screen design (``make_synthetic_screen``'s plates, controls,
replicates, treatments and doses) gets the screen's own jittered lattice and planted type arrangement
(``screen_well_layout``), the *true* cell types are given to
:func:`phenocoder_lib.spatial.neighbourhood.arrangement_table`, and the well profiles go through the same
normalization, selection, sphering (``build_profiles``) and copairs scoring (``phenotypic_activity``)
as ``phenocoder validate --json``. The result is the ceiling of the ``graph_stats`` representation on the
spatial treatments: what perfect cell typing would retrieve at each well size. The field grows with the
number of nuclei (``screen_image_size``: the screen's density at every size).

    python benchmarks/spatial_power.py                       # 90, 180, 270 nuclei; seeds 0-2
    python benchmarks/spatial_power.py --nuclei 90 360 --seeds 0 1 2 3 4

Prints one JSON document on stdout: per well size, the spatial treatment-doses' mean activity mAP and the
fraction retrieved (q < 0.05) per seed and on average, and each treatment-dose's mAP.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phenocoder_lib import synthetic  # noqa: E402
from phenocoder_lib.profiles import build_profiles  # noqa: E402
from phenocoder_lib.retrieval import phenotypic_activity  # noqa: E402
from phenocoder_lib.spatial.neighbourhood import arrangement_table  # noqa: E402


def simulate(nuclei: int, seed: int, *, n_plates: int = 3, n_controls: int = 6, replicates: int = 2,
             doses: tuple[float, ...] = (0.5, 1.0), null_size: int = 10000) -> dict:
    """Arrangement profiles of one simulated screen and the activity scores of its spatial treatments."""
    rng = np.random.default_rng(seed)
    size = synthetic.screen_image_size(nuclei)
    step = synthetic.screen_lattice_step(doses)
    design = synthetic.screen_design(tuple(synthetic.SCREEN_TREATMENTS), doses, n_controls=n_controls,
                                     replicates=replicates)
    coords, types, samples, rows = [], [], [], []
    for p in range(n_plates):
        for w, (treatment, dose) in enumerate(design):
            centres, cell_type = synthetic.screen_well_layout(rng, treatment, dose, nuclei_per_well=nuclei,
                                                              image_size=size, step=step)
            sample = f"P{p}_W{w:03d}"
            coords.append(centres)
            types.append(cell_type)
            samples += [sample] * len(centres)
            kind, mechanism = synthetic.SCREEN_TREATMENTS.get(treatment, ("control", ""))
            rows.append({"sample": sample, "plate": f"P{p}", "well": f"W{w:03d}", "treatment": treatment,
                         "dose": dose, "control": treatment == synthetic.SCREEN_CONTROL, "mechanism": mechanism,
                         "kind": kind})
    table = arrangement_table(np.concatenate(coords), np.concatenate(types), np.asarray(samples), n_types=3)
    meta = pd.DataFrame(rows).set_index("sample")
    raw = meta.join(table).reset_index(drop=True)
    profiles = build_profiles(raw, list(table.columns), representation="arrangement_true_types", sphere=True)
    spatial = [t for t, (kind, _) in synthetic.SCREEN_TREATMENTS.items() if kind == "spatial"]
    keep = profiles.data["treatment"].isin(spatial) | profiles.data["control"].astype(bool)
    result = phenotypic_activity(profiles.data[keep].reset_index(drop=True), profiles.features,
                                 null_size=null_size, seed=seed)
    groups = result.per_group
    return {"map": float(groups["mean_average_precision"].mean()),
            "retrieved": float(groups["below_corrected_p"].mean()),
            "per_treatment_dose": {str(r.treatment_dose): round(float(r.mean_average_precision), 3)
                                   for r in groups.itertuples()},
            "n_features": len(profiles.features), "image_size": size,
            "nuclei_placed": int(len(samples) / len(rows))}


def main(argv: list[str] | None = None) -> None:
    """Run the sweep and print the JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nuclei", type=int, nargs="+", default=[90, 180, 270])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--null-size", type=int, default=10000)
    args = parser.parse_args(argv)
    out = {"benchmark": "spatial_power", "design": {"n_plates": 3, "n_controls": 6, "replicates": 2,
                                                     "doses": [0.5, 1.0]}, "sizes": {}}
    for n in args.nuclei:
        t = time.perf_counter()
        runs = {s: simulate(n, s, null_size=args.null_size) for s in args.seeds}
        out["sizes"][str(n)] = {
            "mean_map": round(float(np.mean([r["map"] for r in runs.values()])), 3),
            "mean_retrieved": round(float(np.mean([r["retrieved"] for r in runs.values()])), 3),
            "per_seed": {str(s): {"map": round(r["map"], 3), "retrieved": round(r["retrieved"], 3),
                                  "per_treatment_dose": r["per_treatment_dose"]} for s, r in runs.items()},
            "image_size": runs[args.seeds[0]]["image_size"], "nuclei_placed": runs[args.seeds[0]]["nuclei_placed"],
            "seconds": round(time.perf_counter() - t, 1)}
        print(f"{n} nuclei: {out['sizes'][str(n)]['mean_map']} mAP, "
              f"{out['sizes'][str(n)]['mean_retrieved']} retrieved", file=sys.stderr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
