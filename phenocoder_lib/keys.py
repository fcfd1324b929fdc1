"""Key names shared across the library (tables, layers, obsm entries, files)."""

from __future__ import annotations

#: Table written by :meth:`Phenocoder.encode` (the name the workflow guide uses).
PHENOCODER_TABLE = "phenocoder"
#: Layer of the encoded table that holds spatially message-passed latents.
MESSAGE_PASSING_LAYER = "spatial_message_passing"
#: Latent variable names: ``phc_latent_1 ... phc_latent_L``.
LATENT_PREFIX = "phc_latent_"

#: ``.obsm`` key with physical coordinates (um), columns (y, x[, z]).
SPATIAL_KEY = "spatial"
#: ``.obsm`` key with integer pixel indices into the image arrays, columns (y, x[, z]).
SPATIAL_INDEX_KEY = "spatial_index"

#: Default keys of an ingested plate.
DEFAULT_TABLE_KEY = "nuclei_features"
DEFAULT_IMAGE_KEY = "IF"
DEFAULT_SAMPLE_KEY = "sample"
LABELS_PREFIX = "nuclei"
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"
