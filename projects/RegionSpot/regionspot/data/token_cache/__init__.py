"""An on-disk cache of SAM's position-aware tokens for training (filled by ``tools/extract_sam_tokens.py``).

Training runs the frozen SAM on every image only to get one position-aware token per
annotated box; that output never changes for a ground-truth box, so it is computed once per
image offline and training then runs only CLIP and the head. What is cached, the file layout
(safetensors shards and a ``manifest.json``), the identity every file carries and what the
reader checks are specified in ``docs/token_cache.md``.

One module per job; this package re-exports the public names:

- :mod:`.layout`: format name and version, stored dtypes, file names, :class:`ShardRecord`,
  :class:`TokenCacheError`;
- :mod:`.identity`: :class:`CacheIdentity` (what the tokens were computed with),
  :func:`make_identity`, :func:`identity_from_config`;
- :mod:`.compute`: :func:`annotation_boxes`, :func:`compute_tokens`,
  :func:`compute_image_tokens` (the function the cache is defined by);
- :mod:`.writing`: :class:`ImageTokens`, :class:`ShardWriter`, :func:`scan_shards`,
  :func:`write_manifest`, :func:`write_progress`, :func:`finalize_cache`;
- :mod:`.reading`: :class:`SamTokenCache`, the data loader's reader.

The package does not import :mod:`regionspot.modeling`: what identifies the localizer comes
from :mod:`regionspot.weights_files`.
"""

from ...transforms import flip_boxes
from .compute import annotation_boxes, compute_image_tokens, compute_tokens
from .identity import CacheIdentity, identity_from_config, make_identity
from .layout import (
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    DTYPES,
    MANIFEST,
    SHARD_GLOB,
    STALE_TOLERANCE_PX,
    ShardRecord,
    TokenCacheError,
)
from .reading import SamTokenCache
from .writing import ImageTokens, ShardWriter, finalize_cache, scan_shards, write_manifest, write_progress

__all__ = [
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "DTYPES",
    "MANIFEST",
    "SHARD_GLOB",
    "STALE_TOLERANCE_PX",
    "CacheIdentity",
    "ImageTokens",
    "SamTokenCache",
    "ShardRecord",
    "ShardWriter",
    "TokenCacheError",
    "annotation_boxes",
    "compute_image_tokens",
    "compute_tokens",
    "finalize_cache",
    "flip_boxes",
    "identity_from_config",
    "make_identity",
    "scan_shards",
    "write_manifest",
    "write_progress",
]
