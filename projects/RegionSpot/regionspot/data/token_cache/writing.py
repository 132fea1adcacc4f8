"""Writing a SAM-token cache (docs/token_cache.md, "Storage"): one rank's shards
(:class:`ShardWriter`, each written atomically), the finished shards read back from their
headers (:func:`scan_shards`), a rank's progress file, and the manifest
(:func:`write_manifest`, :func:`finalize_cache`: the merge step after all ranks finish)."""

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from ...io import atomic_write_bytes, sha256_file, write_json_atomic
from .identity import CacheIdentity, check_shard_metadata
from .layout import (
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    DTYPES,
    MANIFEST,
    SHARD_GLOB,
    ShardRecord,
    TokenCacheError,
    cache_where,
    dataset_dir,
    image_key,
    read_header,
)


@dataclasses.dataclass
class ImageTokens:
    """One image's cache entry (float32 CPU tensors; see :func:`compute_image_tokens`)."""

    image_id: Any
    tokens: torch.Tensor
    tokens_flip: torch.Tensor
    boxes: torch.Tensor
    boxes_flip: torch.Tensor

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])


class ShardWriter:
    """Writes one rank's entries into shards of ``shard_size`` images, each atomically.

    Shards are named ``shard-r<rank:05d>-<k:06d>.safetensors`` with ``k`` continuing after the
    rank's existing shards, so a rerun never overwrites a finished shard and ranks never write
    the same file. Leftover temporary files of this rank (from a killed run) are removed.

    Args:
        cache_dir: the cache root; the dataset's folder ``<cache_dir>/<dataset_name>`` is created.
        identity: the cache identity (its ``dtype`` must be set).
        rank: this process's index; ``shard_size``: images per shard (>= 1).
        on_shard: called with the :class:`ShardRecord` after each shard is written.
    """

    def __init__(self, cache_dir: str, dataset_name: str, identity: CacheIdentity, rank: int = 0,
                 shard_size: int = 1000, on_shard=None):
        if identity.dtype not in DTYPES:
            raise ValueError(f"identity.dtype must be one of {tuple(DTYPES)} to write, got {identity.dtype!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.directory = dataset_dir(cache_dir, dataset_name)
        self.dataset_name = dataset_name
        self.identity = identity
        self.rank = int(rank)
        self.shard_size = int(shard_size)
        self.on_shard = on_shard
        self.records: List[ShardRecord] = []
        self._pending: List[ImageTokens] = []
        os.makedirs(self.directory, exist_ok=True)
        prefix = f"shard-r{self.rank:05d}-"
        for tmp in glob.glob(os.path.join(self.directory, f".{prefix}*.tmp")):
            os.remove(tmp)
        taken = [int(os.path.basename(p)[len(prefix):-len(".safetensors")])
                 for p in glob.glob(os.path.join(self.directory, f"{prefix}*.safetensors"))
                 if os.path.basename(p)[len(prefix):-len(".safetensors")].isdigit()]
        self._next = max(taken) + 1 if taken else 0

    def add(self, entry: ImageTokens) -> Optional[ShardRecord]:
        """Queue one image; writes a shard (and returns its record) when ``shard_size`` are queued."""
        self._pending.append(entry)
        return self.flush() if len(self._pending) >= self.shard_size else None

    def flush(self) -> Optional[ShardRecord]:
        """Write the queued images as one shard (no-op when none are queued)."""
        if not self._pending:
            return None
        from safetensors.torch import save

        dtype = DTYPES[self.identity.dtype]
        tensors: Dict[str, torch.Tensor] = {}
        for e in self._pending:
            k = image_key(e.image_id)
            if f"tokens/{k}" in tensors:
                raise ValueError(f"image id {e.image_id!r} queued twice for one shard")
            tensors[f"tokens/{k}"] = e.tokens.detach().cpu().to(dtype).contiguous().clone()
            tensors[f"tokens_flip/{k}"] = e.tokens_flip.detach().cpu().to(dtype).contiguous().clone()
            tensors[f"boxes/{k}"] = e.boxes.detach().cpu().float().contiguous().clone()
            tensors[f"boxes_flip/{k}"] = e.boxes_flip.detach().cpu().float().contiguous().clone()
        ids = [e.image_id for e in self._pending]
        num_boxes = sum(e.num_boxes for e in self._pending)
        metadata = {"format": CACHE_FORMAT, "format_version": str(CACHE_FORMAT_VERSION),
                    "dataset": self.dataset_name, "rank": str(self.rank), "identity": self.identity.to_json(),
                    "image_ids": json.dumps(ids), "num_boxes": str(num_boxes)}
        data = save(tensors, metadata=metadata)
        name = f"shard-r{self.rank:05d}-{self._next:06d}.safetensors"
        atomic_write_bytes(os.path.join(self.directory, name), data)  # a full disk: DiskFullError, no shard
        record = ShardRecord(name, self.rank, len(data), hashlib.sha256(data).hexdigest(), num_boxes, ids)
        self._next += 1
        self._pending = []
        self.records.append(record)
        if self.on_shard is not None:
            self.on_shard(record)
        return record


def _known_records(directory: str) -> Dict[str, ShardRecord]:
    """Shard records listed by the manifest and the progress files (for their sha256)."""
    known: Dict[str, ShardRecord] = {}
    for path in [os.path.join(directory, MANIFEST)] + sorted(glob.glob(os.path.join(directory, "progress-r*.json"))):
        try:
            with open(path, "r", encoding="utf-8") as f:
                for s in json.load(f).get("shards", []):
                    known[s["file"]] = ShardRecord(**s)
        except Exception:  # missing, partial or foreign: only an optimisation
            continue
    return known


def scan_shards(cache_dir: str, dataset_name: str, identity: Optional[CacheIdentity] = None,
                checksums: bool = False) -> List[ShardRecord]:
    """The finished shards of a dataset's cache folder, read from their headers.

    Args:
        identity: when given, every shard must match it (a ``dtype`` of None matches any, but
            all shards must then share one identity).
        checksums: fill ``sha256`` (taken from the manifest / progress files when the file
            size matches what they recorded, else computed); otherwise ``sha256`` is None.

    Returns:
        Records sorted by file name (empty if the folder does not exist).

    Raises:
        TokenCacheError: a corrupt shard (unreadable header), a foreign shard, or shards
            that disagree with each other; named by shard.
    """
    directory = dataset_dir(cache_dir, dataset_name)
    where = cache_where(cache_dir, dataset_name)
    if not os.path.isdir(directory):
        return []
    known = _known_records(directory) if checksums else {}
    records, first = [], None
    for path in sorted(glob.glob(os.path.join(directory, SHARD_GLOB))):
        name = os.path.basename(path)
        try:
            meta, _ = read_header(path)
        except Exception as e:
            raise TokenCacheError(f"{where}: shard {name} is corrupt ({type(e).__name__}: {e}); delete it and "
                                  f"rerun tools/extract_sam_tokens.py to rewrite its images") from None
        shard_identity, ids = check_shard_metadata(meta, where, name, dataset_name, identity)
        if first is None:
            first = (name, shard_identity)
        elif first[1] != shard_identity:
            raise TokenCacheError(f"{where}: shards {first[0]} and {name} were written with different SAM "
                                  f"identities ({'; '.join(first[1].differences(shard_identity))}); the folder "
                                  f"mixes two caches, rebuild it")
        size = os.path.getsize(path)
        sha = None
        if checksums:
            prior = known.get(name)
            sha = prior.sha256 if prior is not None and prior.bytes == size and prior.sha256 else sha256_file(path)
        rank = int(meta.get("rank", -1)) if str(meta.get("rank", "")).lstrip("-").isdigit() else -1
        records.append(ShardRecord(name, rank, size, sha, int(meta.get("num_boxes", 0)), ids))
    return records


def write_manifest(cache_dir: str, dataset_name: str, identity: CacheIdentity, records: Sequence[ShardRecord],
                   dataset_image_ids: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
    """Write ``manifest.json`` (atomically) listing ``records``; returns the manifest dict.

    ``complete`` is True when every id of ``dataset_image_ids`` is in some shard (False when
    they are not given). An image in several shards is listed by the first one (file-name order).
    """
    directory = dataset_dir(cache_dir, dataset_name)
    cached = set()
    for r in records:
        cached.update(image_key(i) for i in r.image_ids)
    missing = [] if dataset_image_ids is None else [i for i in dataset_image_ids if image_key(i) not in cached]
    manifest = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "dataset": dataset_name,
        "identity": identity.to_dict(),
        "complete": dataset_image_ids is not None and not missing,
        "dataset_num_images": None if dataset_image_ids is None else len(dataset_image_ids),
        "num_images": len(cached),
        "num_boxes": sum(r.num_boxes for r in records),
        "total_bytes": sum(r.bytes for r in records),
        "missing_image_ids": missing,
        "shards": [r.to_dict() for r in sorted(records, key=lambda r: r.file)],
    }
    write_json_atomic(os.path.join(directory, MANIFEST), manifest)
    return manifest


def write_progress(cache_dir: str, dataset_name: str, identity: CacheIdentity, rank: int,
                   records: Sequence[ShardRecord]) -> None:
    """A rank's own list of finished shards (``progress-r<rank>.json``), rewritten atomically."""
    directory = dataset_dir(cache_dir, dataset_name)
    write_json_atomic(os.path.join(directory, f"progress-r{rank:05d}.json"),
                      {"format": CACHE_FORMAT, "rank": rank, "identity": identity.to_dict(),
                       "shards": [r.to_dict() for r in records]})


def finalize_cache(cache_dir: str, dataset_name: str, identity: Optional[CacheIdentity],
                   dataset_image_ids: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
    """Merge step: write ``manifest.json`` covering every finished shard of the dataset.

    Run once after all ranks have finished (rank 0 does it in the tool, or ``--finalize``).
    Shards are read from the folder (headers only; sha256 reused from the progress files when
    sizes match, else computed); the per-rank progress files are removed afterwards.

    Args:
        identity: the identity every shard must have (``dtype`` None: the shards' dtype).
        dataset_image_ids: the dataset's image ids, to record completeness and missing ids.

    Returns:
        The manifest dict.

    Raises:
        TokenCacheError: a corrupt or foreign shard; no shard and no ``identity.dtype`` to
            write an empty manifest with.
    """
    directory = dataset_dir(cache_dir, dataset_name)
    records = scan_shards(cache_dir, dataset_name, identity, checksums=True)
    if records:
        meta, _ = read_header(os.path.join(directory, records[0].file))
        stored = CacheIdentity.from_dict(json.loads(meta["identity"]))
    elif identity is not None and identity.dtype in DTYPES:
        stored = identity  # nothing written (every image failed, or an empty dataset)
    else:
        raise TokenCacheError(f"{cache_where(cache_dir, dataset_name)}: no shard to finalize")
    manifest = write_manifest(cache_dir, dataset_name, stored, records, dataset_image_ids)
    for pattern in ("progress-r*.json", ".progress-r*.tmp", ".manifest.json.*.tmp"):  # all ranks are done
        for path in glob.glob(os.path.join(directory, pattern)):
            os.remove(path)
    return manifest

