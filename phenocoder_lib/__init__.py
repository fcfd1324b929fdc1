"""Phenocoder: spatially aware morphological embeddings of microscopy plates.

``from phenocoder_lib import Phenocoder`` gives the workflow guide's API. Importing the package is
cheap: TensorFlow, squidpy and umap are imported only by the steps that need them.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("phenocoder")
except PackageNotFoundError:  # pragma: no cover - source tree without installation
    __version__ = "0.0.0"

if TYPE_CHECKING:
    from .phenocoder import Phenocoder

__all__ = ["Phenocoder", "__version__", "set_verbose_logging"]


def __getattr__(name: str) -> Any:
    if name == "Phenocoder":
        from .phenocoder import Phenocoder

        return Phenocoder
    raise AttributeError(f"module 'phenocoder_lib' has no attribute {name!r}")


def set_verbose_logging(verbose: bool = True) -> None:
    """Show the library's INFO messages (progress, choices made) on stderr, or only warnings.

    Parameters
    ----------
    verbose
        INFO and above when True, WARNING and above when False.

    """
    logger = logging.getLogger("phenocoder_lib")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)
