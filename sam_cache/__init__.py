"""samcache stage 1: run a frozen SAM-family encoder over a dataset once and store the embeddings.

The public surface::

    from sam_cache import create_encoder, open_dataset, extract_dataset, EmbeddingStore
"""

from importlib.metadata import PackageNotFoundError as _NotInstalled, version as _version

try:  # the installed distribution's version, so that stores record what really made them
    __version__ = _version("samcache")
except _NotInstalled:  # pragma: no cover - a source tree that was never installed
    __version__ = "0.0.0+unknown"

from .convert import convert_store  # noqa: E402
from .readers import DatasetError, DatasetManifest, DatasetOptions, open_dataset  # noqa: E402
from .encoders import Encoder, EncoderError, create_encoder, list_encoders  # noqa: E402
from .errors import ConfigError, SamcacheError  # noqa: E402
from .export import export_pooled  # noqa: E402
from .extract import ExtractionResult, extract_dataset  # noqa: E402
from .extract_config import ExtractConfig  # noqa: E402
from .inspect import summarize_store, verify_store  # noqa: E402
from .store import EmbeddingStore, StoreError, StoreMismatchError  # noqa: E402
from .store_dataset import StoreDataset  # noqa: E402

__all__ = [
    "__version__",
    "SamcacheError",
    "ConfigError",
    "ExtractConfig",
    "DatasetOptions",
    "StoreDataset",
    "export_pooled",
    "DatasetError",
    "DatasetManifest",
    "open_dataset",
    "Encoder",
    "EncoderError",
    "create_encoder",
    "list_encoders",
    "ExtractionResult",
    "extract_dataset",
    "convert_store",
    "summarize_store",
    "verify_store",
    "EmbeddingStore",
    "StoreError",
    "StoreMismatchError",
]
