"""The SAM-token cache's file layout (docs/token_cache.md): format name and version, stored
dtypes, file names, the record of a finished shard, and the helpers every part of the cache
uses to name a dataset's folder, an image's tensors and a shard's header."""

import dataclasses
import os
from typing import Any, Dict, List, Optional

import torch

CACHE_FORMAT = "regionspot-sam-token-cache"
# Bump when what is stored or how it is computed changes, so old caches are refused.
# Version 2: the identity holds the SAM weights' content hash (version 1: path, size, mtime).
CACHE_FORMAT_VERSION = 2
# Stored token dtypes (``--dtype``); boxes are always float32.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MANIFEST = "manifest.json"
SHARD_GLOB = "shard-r*-*.safetensors"
# A cached box equals the dataset's box when no coordinate differs by more than this (pixels):
# both come from the same float32 computation, the tolerance only absorbs another code path.
STALE_TOLERANCE_PX = 1e-3


class TokenCacheError(RuntimeError):
    """The SAM-token cache cannot give what was asked; the message names the cache, the
    dataset, the shard and the image concerned, and what to do."""


@dataclasses.dataclass
class ShardRecord:
    """A finished shard as listed in the manifest."""

    file: str
    rank: int
    bytes: int
    sha256: Optional[str]
    num_boxes: int
    image_ids: List[Any]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def dataset_dir(cache_dir: str, dataset_name: str) -> str:
    """``<cache_dir>/<dataset_name>`` (``~`` expanded). Raises ``ValueError`` for a name that
    cannot be one folder (empty, with "/", "." or "..")."""
    if not dataset_name or "/" in dataset_name or dataset_name in (".", ".."):
        raise ValueError(f"dataset name {dataset_name!r} cannot name a cache folder")
    return os.path.join(os.path.expanduser(os.fspath(cache_dir)), dataset_name)


def cache_where(cache_dir: str, dataset_name: str) -> str:
    """How messages name a dataset's cache: ``"SAM-token cache <cache_dir>/<dataset_name>"``."""
    return f"SAM-token cache {os.path.join(os.fspath(cache_dir), dataset_name)}"


def image_key(image_id: Any) -> str:
    """The key of an image in shards and the index: ``str(image_id)`` (tensor names ``tokens/<key>``, ...)."""
    return str(image_id)


def read_header(path: str):
    """(metadata dict, tensor names) of a safetensors file; raises on a corrupt file."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {}), list(f.keys())

