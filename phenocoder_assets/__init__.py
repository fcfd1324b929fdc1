"""Phenocoder's Dagster project: thin partitioned assets over :mod:`phenocoder_lib`.

``phenocoder_assets.definitions.defs`` is the code location; ``phenocoder demo`` (``cli.py``) runs
the whole graph on a synthetic plate. Nothing heavy is imported here.
"""
