"""Child process for the kill tests (tests/lib/test_durability.py): one write, killed from outside.

``python _kill_child.py <scenario> <json args>``. Scenarios that must be caught at a precise point
of the write wrap the function reached there so that it first creates ``args["ready"]`` and then
blocks; the parent waits for that file, checks that the write is under way (its temporary sibling
exists) and sends SIGKILL. The code under test is not changed: the wrapper only holds the process
still at the instant the parent wants to kill it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _hold_on_entry(owner, name: str, ready: str) -> None:
    """Replace ``owner.name`` by a function that signals ``ready`` and then waits to be killed."""

    def held(*args, **kwargs):
        Path(ready).write_text("ready")
        while True:
            time.sleep(1)

    setattr(owner, name, held)


def patches(args: dict) -> None:
    """``generate_dataset`` killed mid-write: the patch store is written, the index is being written."""
    import pandas as pd

    from phenocoder_lib.ingest import read_plate
    from phenocoder_lib.patches import generate_dataset

    sdata = read_plate(args["plate"])
    _hold_on_entry(pd.DataFrame, "to_parquet", args["ready"])
    generate_dataset(sdata, dataset=args["dataset"], dir_dataset=args["dir"], table_key="nuclei_features",
                     sample_key="sample", image_key="IF", patch_size=16)


def sdata(args: dict) -> None:
    """``write_sdata`` killed after the SpatialData zarr (images, labels, table) is written aside."""
    from phenocoder_lib import io as pio
    from phenocoder_lib.ingest import read_plate, write_sdata

    sd = read_plate(args["plate"])
    _hold_on_entry(pio, "replace_dir", args["ready"])
    write_sdata(sd, args["path"])


def train(args: dict) -> None:
    """A long training (no hook): the parent kills it once checkpoints of a few epochs exist."""
    from phenocoder_lib import Phenocoder

    pheno = Phenocoder(seed=0)
    pheno.data_dir = Path(args["dir"])
    pheno.datasets = [args["dataset"]]
    pheno.initialize_model(**args["model"])
    pheno.train(n_epochs=10_000, early_stopping_patience=10_000, learning_rate_patience=10_000, plot=False,
                verbose=0)


if __name__ == "__main__":
    scenario, payload = sys.argv[1], json.loads(sys.argv[2])
    {"patches": patches, "sdata": sdata, "train": train}[scenario](payload)
    sys.exit(3)  # reaching the end means the parent did not kill in time
