"""An on-disk cache of SAM's position-aware tokens for training (filled by ``tools/extract_sam_tokens.py``).

Training runs the frozen SAM on every image only to get one position-aware token per
annotated box (``modeling/position_tokens.py``). SAM's image encoder is by far the most
expensive part of a training step, and its output for a ground-truth box never changes, so it
can run once per image offline; training then runs only CLIP and the head.

What is cached (the contract)
-----------------------------
For each image of a dataset (Detectron2 dataset dicts) and for both the image as stored and
its horizontal flip:

- ``boxes`` (N, 4) float32: the image's non-crowd annotations (``iscrowd == 0``) in
  dataset-dict order, converted to XYXY_ABS pixels of the ORIGINAL image (``height`` x
  ``width`` of the dict) and validated/clipped by :func:`regionspot.data.validation.check_boxes`
  exactly as :class:`regionspot.data.mapper.RegionSpotDatasetMapper` does
  (:func:`annotation_boxes`); ``boxes_flip`` = the same boxes mirrored,
  ``x0' = W - x1, x1' = W - x0`` (:func:`flip_boxes`, Detectron2's ``HFlipTransform``).
- ``tokens`` (N, T): :class:`~regionspot.modeling.position_tokens.SamPositionTokens` on the
  original image at its original size (SAM resizes it to its own input), one token per box;
  ``tokens_flip``: the same on the flipped image with ``boxes_flip``. They come from the
  localizer's one token extraction, ``SamPositionTokens.extract_tokens``, which the extraction
  tool (in batches), :func:`compute_image_tokens` and online training
  (``SamPositionTokens.training_tokens``) all call: SAM runs in float32 whatever
  ``ENCODER_PRECISION`` says, so cached and online tokens agree to float rounding. Tokens are
  computed on the original-size image, not on a training resize of it: SAM resizes every
  image to its own input anyway, so a mapper that resizes and/or flips takes the entry of the
  right orientation and scales only the boxes (token i belongs to box i). Tokens computed
  online on an already-resized image differ slightly from these (two resamplings instead of
  one); use :func:`compute_image_tokens` on the original image to match the cache exactly.

Storage: safetensors shards
---------------------------
Tensors are stored in `safetensors <https://huggingface.co/docs/safetensors>`_ files because
the format is (1) safe: a JSON header plus raw little-endian buffers, nothing is unpickled,
so a cache file from anywhere cannot run code (unlike ``torch.load`` of pickles); (2)
memory-mapped and random access: ``safe_open`` reads the header once and then only the bytes
of the tensors asked for, which is what a data loader needs (one image's few KB out of a
shard of thousands of images); (3) self-describing: each file carries string metadata, used
here for the SAM identity, so a shard can be checked on its own; (4) well kept and small
(the Hugging Face library, already a dependency of the ecosystem, bfloat16 supported).

Layout (``<cache_dir>/<dataset_name>/``)::

    manifest.json                       # the index the reader uses (see below)
    shard-r<rank:05d>-<k:06d>.safetensors
    progress-r<rank:05d>.json           # only while a multi-process run is going on

Shard ``shard-r00001-000004.safetensors`` is the 5th shard written by process (rank) 1; ranks
never write the same file. Each shard holds, per image ``<id>`` (``str(image_id)``):
``tokens/<id>`` (N, T) and ``tokens_flip/<id>`` (N, T) in the cache dtype (float32 or
bfloat16), ``boxes/<id>`` and ``boxes_flip/<id>`` (N, 4) float32 (always float32: they are
the key of the staleness check). Its metadata (all strings): ``format``,
``format_version``, ``dataset``, ``rank``, ``identity`` (JSON of :class:`CacheIdentity`),
``image_ids`` (JSON list), ``num_boxes``.

``manifest.json``: ``format``, ``format_version``, ``dataset``, ``identity`` (a dict),
``complete`` (every image of the dataset is cached), ``dataset_num_images``, ``num_images``,
``num_boxes``, ``total_bytes``, ``missing_image_ids`` (dataset images not cached, e.g.
unreadable ones), and ``shards``: a list of ``{"file", "rank", "bytes", "sha256",
"num_boxes", "image_ids"}``.

Writing is atomic (temporary file + rename, :func:`regionspot.io.atomic_write`): a killed run
leaves only finished shards (and maybe a hidden ``.shard-*.tmp`` that the next run of that
rank removes). A rerun skips the images already in finished shards (read from the shards'
headers, so a shard whose manifest update was lost still counts). A single-process run
rewrites ``manifest.json`` after each shard; with several processes each rank rewrites its
``progress-r*.json`` after each shard and :func:`finalize_cache` (rank 0, after all ranks
finish, or ``--finalize`` later) writes ``manifest.json`` from all shards.

Identity
--------
:class:`CacheIdentity`: the content hash of the SAM weights file's tensors
(:func:`regionspot.weights_files.weights_content_hash`: a copy of the file on another node,
with or without its mtime, or a renamed file keeps the cache valid; one changed tensor makes
it "foreign", a loud error rather than silently wrong tokens), SAM's architecture read from
the tensor shapes (:func:`regionspot.weights_files.sam_architecture`), the token source, the
token width and the stored dtype. It is written into the manifest and every shard, and
checked on reading. The hash reads the weights once per process; :func:`identity_from_config`
remembers it next to the cache (``<TOKEN_CACHE_DIR>/weights-content-hashes.json``, keyed by
the file's real path, size and mtime), so that later runs on the node only ``stat`` the file.
This module does not import :mod:`regionspot.modeling`: what identifies SAM comes from
:mod:`regionspot.weights_files`.

Reading
-------
:class:`SamTokenCache` (for data-loader workers): loads the manifest, opens shards lazily
with ``safe_open`` (a small LRU of open files per process), re-opens them after ``fork`` or
unpickling, and raises :class:`TokenCacheError` naming the cache, the dataset, the shard and
the image for: a missing manifest or shard, a foreign manifest or shard (other SAM weights,
token source or dtype), a stale entry (boxes differ from the dataset's current annotation
boxes), an image that is not cached, and a corrupt file. Tokens are returned as float32
whatever the stored dtype.

Sizes: about 2.1 KB per box in float32 and 1.1 KB in bfloat16 (image and flip); the
measurements, per-dataset estimates and what bfloat16 changes are in ``docs/speed.md``
("The SAM-token cache").
"""

import collections
import dataclasses
import glob
import hashlib
import json
import logging
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..io import atomic_write, write_json_atomic
from ..transforms import annotation_boxes_xyxy, flip_boxes  # noqa: F401  (flip_boxes: part of this module's API)
from ..weights_files import (
    TOKEN_SOURCES,
    WeightsError,
    localizer_architecture,
    require_file,
    sam_architecture,
    token_dim,
    weights_content_hash,
)
from .validation import check_boxes

__all__ = [
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "DTYPES",
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
]

logger = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------- identity


@dataclasses.dataclass(frozen=True)
class CacheIdentity:
    """What the cached tokens depend on; two caches with different identities are not interchangeable.

    Attributes:
        sam_weights: :func:`regionspot.weights_files.weights_content_hash` of the SAM file (its
            tensors: a copied or renamed file keeps it, a changed tensor changes it).
        sam_architecture: canonical JSON of ``sam_architecture(state_dict)`` (embed dim, depth, ...).
        token_source: ``MODEL.REGIONSPOT.TOKEN_SOURCE`` ("transformer", "prompt_encoder", "mlp").
        token_dim: T, channels of one token (256, or 32 for "mlp").
        dtype: stored token dtype, "float32" or "bfloat16"; ``None`` in an *expected* identity
            means "any dtype" (the reader then takes the manifest's).
        localizer: the localizer family (``MODEL.REGIONSPOT.LOCALIZER``: "sam", "sam_hq",
            "sam2"); caches written before families existed are SAM's.
    """

    sam_weights: str
    sam_architecture: str
    token_source: str
    token_dim: int
    dtype: Optional[str] = "float32"
    localizer: str = "sam"

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sam_architecture"] = json.loads(self.sam_architecture)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CacheIdentity":
        """Raises ``KeyError``/``TypeError``/``ValueError`` on a malformed dict."""
        arch = d["sam_architecture"]
        arch = arch if isinstance(arch, str) else json.dumps(arch, sort_keys=True, separators=(",", ":"))
        return cls(str(d["sam_weights"]), arch, str(d["token_source"]), int(d["token_dim"]),
                   None if d.get("dtype") is None else str(d["dtype"]), str(d.get("localizer", "sam")))

    def with_dtype(self, dtype: Optional[str]) -> "CacheIdentity":
        return dataclasses.replace(self, dtype=dtype)

    def differences(self, stored: "CacheIdentity") -> List[str]:
        """Human-readable differences between this (expected) identity and a ``stored`` one;
        empty when they match (an expected ``dtype`` of ``None`` matches any dtype)."""
        out = []
        if self.localizer != stored.localizer:
            out.append(f"localizer {stored.localizer!r} != expected {self.localizer!r} (MODEL.REGIONSPOT.LOCALIZER)")
        if self.sam_weights != stored.sam_weights:
            out.append(f"SAM weights content hash {stored.sam_weights[:28]}... != expected {self.sam_weights[:28]}... "
                       f"(other SAM weights: a tensor of the SAM file differs)")
        if self.sam_architecture != stored.sam_architecture:
            out.append(f"SAM architecture {stored.sam_architecture} != expected {self.sam_architecture}")
        if self.token_source != stored.token_source:
            out.append(f"token source {stored.token_source!r} != expected {self.token_source!r}")
        if self.token_dim != stored.token_dim:
            out.append(f"token dim {stored.token_dim} != expected {self.token_dim}")
        if self.dtype is not None and self.dtype != stored.dtype:
            out.append(f"dtype {stored.dtype} != expected {self.dtype}")
        return out


def _canonical_arch(arch: Mapping[str, Any]) -> str:
    return json.dumps(dict(arch), sort_keys=True, separators=(",", ":"))


def _arch_from_file(path: str, localizer: str = "sam") -> Dict[str, Any]:
    try:  # mmap: only the zip directory and the header are read, not the ~0.4-2.5 GB of weights
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"cannot read SAM weights file {path!r}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise WeightsError(f"SAM weights file {path!r} does not hold a state dict")
    return localizer_architecture(localizer, state, path)


def make_identity(sam_weights: str, token_source: str, dtype: Optional[str] = "float32",
                  sam: Optional[torch.nn.Module] = None, *, hash_dir: Optional[str] = None,
                  localizer: str = "sam") -> CacheIdentity:
    """The :class:`CacheIdentity` of tokens computed with a localizer's weights file.

    Args:
        sam_weights: path of the SAM file (``MODEL.REGIONSPOT.SAM_WEIGHTS``, ``~`` expanded).
        token_source: one of ``TOKEN_SOURCES``.
        dtype: "float32", "bfloat16", or ``None`` (any; only for an expected identity).
        sam: the loaded ``Sam`` module of the "sam" family, if at hand (its architecture is
            read from it instead of the file's tensor shapes; the result is the same).
        hash_dir: optional folder (the cache root) where the weights' content hash is
            remembered across processes (:func:`regionspot.weights_files.weights_content_hash`).
        localizer: the family (``MODEL.REGIONSPOT.LOCALIZER``), which reads the architecture
            from its own file format (:func:`regionspot.weights_files.localizer_architecture`).

    Raises:
        WeightsError: the file is missing or not a state dict of that family.
        ValueError: unknown ``token_source`` or ``dtype``.
    """
    if token_source not in TOKEN_SOURCES:
        raise ValueError(f"token_source must be one of {TOKEN_SOURCES}, got {token_source!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    path = require_file(sam_weights, "SAM")
    if sam is not None and localizer == "sam":
        arch = sam_architecture(sam.state_dict())
    else:
        arch = _arch_from_file(path, localizer)
    return CacheIdentity(weights_content_hash(path, hash_dir), _canonical_arch(arch), token_source,
                         token_dim(arch, token_source), dtype, localizer)


def identity_from_config(cfg, dtype: Optional[str] = None) -> CacheIdentity:
    """The expected identity for a config: ``MODEL.REGIONSPOT.SAM_WEIGHTS`` and ``TOKEN_SOURCE``
    (the weights' content hash remembered under ``TOKEN_CACHE_DIR`` when set); ``dtype`` None
    accepts the cache's dtype. Raises ``WeightsError`` (see :func:`make_identity`)."""
    rs = cfg.MODEL.REGIONSPOT
    return make_identity(os.path.expanduser(rs.SAM_WEIGHTS), rs.TOKEN_SOURCE, dtype,
                         hash_dir=rs.TOKEN_CACHE_DIR or None, localizer=rs.LOCALIZER)


# ----------------------------------------------------------------------------- computing tokens


def annotation_boxes(record: Mapping[str, Any]) -> torch.Tensor:
    """The boxes of a dataset dict that the cache keys its tokens by, as the mapper computes them.

    The ``iscrowd == 0`` annotations in dataset-dict order, ``bbox`` converted from its
    ``bbox_mode`` to XYXY_ABS (``BoxMode.convert``, as float32), then
    :func:`~regionspot.data.validation.check_boxes` with the image size (``height``,
    ``width`` of the dict): clipped to [0, W] x [0, H].

    Returns:
        (N, 4) float32 CPU tensor, XYXY_ABS pixels of the original image (N may be 0).

    Raises:
        InputError: a NaN, empty or out-of-image box (named by index and file name).
        KeyError: the dict lacks ``height``/``width``.
    """
    annos = [a for a in record.get("annotations", []) if a.get("iscrowd", 0) == 0]
    if not annos:
        return torch.zeros(0, 4, dtype=torch.float32)
    xyxy = annotation_boxes_xyxy(annos)
    size = (int(record["height"]), int(record["width"]))
    return check_boxes(xyxy, size, f"boxes of {record.get('file_name', '<no file_name>')!r}").contiguous()


@torch.no_grad()
def compute_tokens(position, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """One orientation: SAM's tokens of ``boxes`` on ``image`` at its own size, through the
    localizer's one token extraction (``SamPositionTokens.extract_tokens``, float32).

    Args:
        position: the localizer, a ``SamPositionTokens`` (frozen SAM).
        image: (3, H, W) uint8 RGB.
        boxes: (N, 4) XYXY_ABS pixels of ``image``.

    Returns:
        (N, T) float32 CPU tensor.
    """
    return position.extract_tokens([image], [boxes.float()])[0].cpu()


def compute_image_tokens(position, image: torch.Tensor, boxes: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Both cache entries of one image: its tokens and those of its horizontal flip.

    This is the function the cache is defined by; the training path can call it online and get
    the tokens the cache holds (float32 cache: bit-identical with the same SAM, device and number
    of threads; other thread counts or GPU kernels change the last float bits, ~1e-6 relative).

    Args:
        position: a ``SamPositionTokens``.
        image: (3, H, W) uint8 RGB, the original image.
        boxes: (N, 4) XYXY_ABS pixels of ``image`` (e.g. :func:`annotation_boxes`).

    Returns:
        dict of float32 CPU tensors: ``tokens`` (N, T), ``tokens_flip`` (N, T) (computed on
        ``image.flip(-1)`` with ``boxes_flip``), ``boxes`` (N, 4), ``boxes_flip`` (N, 4)
        (:func:`flip_boxes` with W = ``image.shape[-1]``).
    """
    boxes = boxes.detach().float().cpu().contiguous()
    boxes_flip = flip_boxes(boxes, image.shape[-1])
    with torch.no_grad():
        tokens, tokens_flip = position.extract_tokens([image, image.flip(-1)], [boxes, boxes_flip])
    return {"tokens": tokens.cpu(), "tokens_flip": tokens_flip.cpu(), "boxes": boxes, "boxes_flip": boxes_flip}


# ----------------------------------------------------------------------------- writing


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


def _dataset_dir(cache_dir: str, dataset_name: str) -> str:
    if not dataset_name or "/" in dataset_name or dataset_name in (".", ".."):
        raise ValueError(f"dataset name {dataset_name!r} cannot name a cache folder")
    return os.path.join(os.path.expanduser(os.fspath(cache_dir)), dataset_name)


def _where(cache_dir: str, dataset_name: str) -> str:
    return f"SAM-token cache {os.path.join(os.fspath(cache_dir), dataset_name)}"


def _key(image_id: Any) -> str:
    return str(image_id)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
        self.directory = _dataset_dir(cache_dir, dataset_name)
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
            k = _key(e.image_id)
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
        atomic_write(os.path.join(self.directory, name), lambda f: f.write(data))
        record = ShardRecord(name, self.rank, len(data), hashlib.sha256(data).hexdigest(), num_boxes, ids)
        self._next += 1
        self._pending = []
        self.records.append(record)
        if self.on_shard is not None:
            self.on_shard(record)
        return record


def _read_header(path: str):
    """(metadata dict, tensor names) of a safetensors file; raises on a corrupt file."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {}), list(f.keys())


def _check_shard_metadata(meta: Mapping[str, str], where: str, name: str, dataset_name: str,
                          expected: Optional[CacheIdentity]) -> Tuple[CacheIdentity, List[Any]]:
    if meta.get("format") != CACHE_FORMAT or meta.get("format_version") != str(CACHE_FORMAT_VERSION):
        raise TokenCacheError(f"{where}: shard {name} is not a version-{CACHE_FORMAT_VERSION} SAM-token shard "
                              f"(format {meta.get('format')!r} version {meta.get('format_version')!r}); rebuild it")
    if meta.get("dataset") != dataset_name:
        raise TokenCacheError(f"{where}: shard {name} belongs to dataset {meta.get('dataset')!r}, not "
                              f"{dataset_name!r} (foreign shard)")
    try:
        identity = CacheIdentity.from_dict(json.loads(meta["identity"]))
        ids = json.loads(meta["image_ids"])
        assert isinstance(ids, list)
    except Exception as e:
        raise TokenCacheError(f"{where}: shard {name} has unreadable metadata ({type(e).__name__}: {e}); "
                              f"the file is corrupt, delete it") from None
    if expected is not None:
        diffs = expected.differences(identity)
        if diffs:
            raise TokenCacheError(f"{where}: shard {name} is foreign: it was written with {'; '.join(diffs)}. "
                                  f"Rebuild the cache (tools/extract_sam_tokens.py --overwrite) or use another "
                                  f"cache folder")
    return identity, ids


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
    directory = _dataset_dir(cache_dir, dataset_name)
    where = _where(cache_dir, dataset_name)
    if not os.path.isdir(directory):
        return []
    known = _known_records(directory) if checksums else {}
    records, first = [], None
    for path in sorted(glob.glob(os.path.join(directory, SHARD_GLOB))):
        name = os.path.basename(path)
        try:
            meta, _ = _read_header(path)
        except Exception as e:
            raise TokenCacheError(f"{where}: shard {name} is corrupt ({type(e).__name__}: {e}); delete it and "
                                  f"rerun tools/extract_sam_tokens.py to rewrite its images") from None
        shard_identity, ids = _check_shard_metadata(meta, where, name, dataset_name, identity)
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
            sha = prior.sha256 if prior is not None and prior.bytes == size and prior.sha256 else _sha256_file(path)
        rank = int(meta.get("rank", -1)) if str(meta.get("rank", "")).lstrip("-").isdigit() else -1
        records.append(ShardRecord(name, rank, size, sha, int(meta.get("num_boxes", 0)), ids))
    return records


def write_manifest(cache_dir: str, dataset_name: str, identity: CacheIdentity, records: Sequence[ShardRecord],
                   dataset_image_ids: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
    """Write ``manifest.json`` (atomically) listing ``records``; returns the manifest dict.

    ``complete`` is True when every id of ``dataset_image_ids`` is in some shard (False when
    they are not given). An image in several shards is listed by the first one (file-name order).
    """
    directory = _dataset_dir(cache_dir, dataset_name)
    cached = set()
    for r in records:
        cached.update(_key(i) for i in r.image_ids)
    missing = [] if dataset_image_ids is None else [i for i in dataset_image_ids if _key(i) not in cached]
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
    directory = _dataset_dir(cache_dir, dataset_name)
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
    directory = _dataset_dir(cache_dir, dataset_name)
    records = scan_shards(cache_dir, dataset_name, identity, checksums=True)
    if records:
        meta, _ = _read_header(os.path.join(directory, records[0].file))
        stored = CacheIdentity.from_dict(json.loads(meta["identity"]))
    elif identity is not None and identity.dtype in DTYPES:
        stored = identity  # nothing written (every image failed, or an empty dataset)
    else:
        raise TokenCacheError(f"{_where(cache_dir, dataset_name)}: no shard to finalize")
    manifest = write_manifest(cache_dir, dataset_name, stored, records, dataset_image_ids)
    for pattern in ("progress-r*.json", ".progress-r*.tmp", ".manifest.json.*.tmp"):  # all ranks are done
        for path in glob.glob(os.path.join(directory, pattern)):
            os.remove(path)
    return manifest


# ----------------------------------------------------------------------------- reading


class _Index:
    """image id -> shard index; compact (numpy) when all ids are ints (1.7M ids ~ 27 MB)."""

    def __init__(self, shard_ids: Sequence[Sequence[Any]]):
        flat = [(i, s) for s, ids in enumerate(shard_ids) for i in ids]
        self.ints = all(isinstance(i, int) and not isinstance(i, bool) for i, _ in flat)
        if self.ints:
            ids = np.array([i for i, _ in flat], dtype=np.int64)
            shards = np.array([s for _, s in flat], dtype=np.int32)
            order = np.argsort(ids, kind="stable")  # the first listing wins on duplicates
            self.ids, self.shards = ids[order], shards[order]
        else:
            self.map: Dict[str, int] = {}
            for i, s in flat:
                self.map.setdefault(_key(i), s)

    def get(self, image_id: Any) -> Optional[int]:
        if self.ints:
            try:
                value = int(image_id) if not isinstance(image_id, (int, np.integer)) else image_id
            except (TypeError, ValueError):
                return None
            if _key(value) != _key(image_id):
                return None
            j = int(np.searchsorted(self.ids, value))
            return int(self.shards[j]) if j < len(self.ids) and self.ids[j] == value else None
        return self.map.get(_key(image_id))

    def __len__(self) -> int:
        return len(self.ids) if self.ints else len(self.map)


class SamTokenCache:
    """Reader of a dataset's SAM-token cache, for training data loaders.

    Opening reads and checks ``manifest.json``; shards are opened lazily (``safe_open``,
    memory-mapped) on first use, at most ``max_open_shards`` per process (LRU). The object
    can be pickled and used after ``fork`` (data-loader workers): open files are never
    shared, each process re-opens its own.

    Args:
        cache_dir: the cache root (``MODEL.REGIONSPOT.TOKEN_CACHE_DIR``).
        dataset_name: the dataset's name (its folder under ``cache_dir``).
        expected_identity: what the tokens must have been computed with
            (:func:`identity_from_config` / :func:`make_identity`); ``dtype`` None accepts the
            manifest's dtype.
        max_open_shards: open shard files kept per process.
        verify_checksums: hash (sha256) each shard against the manifest when it is first
            opened in a process (reads the whole shard once; catches flipped bits that the
            size and header checks cannot).

    Raises:
        TokenCacheError: no or unreadable manifest, another format version or dataset, or a
            foreign identity (the message lists the differences).
    """

    def __init__(self, cache_dir: str, dataset_name: str, expected_identity: CacheIdentity,
                 max_open_shards: int = 8, verify_checksums: bool = False):
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be positive, got {max_open_shards}")
        self.cache_dir = os.path.expanduser(os.fspath(cache_dir))
        self.dataset_name = dataset_name
        self.directory = _dataset_dir(self.cache_dir, dataset_name)
        self.where = _where(self.cache_dir, dataset_name)
        self.max_open_shards = int(max_open_shards)
        self.verify_checksums = bool(verify_checksums)
        path = os.path.join(self.directory, MANIFEST)
        if not os.path.isfile(path):
            raise TokenCacheError(f"{self.where}: no {MANIFEST}; fill the cache with tools/extract_sam_tokens.py "
                                  f"--dataset {dataset_name} (or --finalize if its shards are all written)")
        try:
            with open(path, "r", encoding="utf-8") as f:
                manifest = json.load(f)
            identity = CacheIdentity.from_dict(manifest["identity"])
            shards = [ShardRecord(**s) for s in manifest["shards"]]
        except Exception as e:
            raise TokenCacheError(f"{self.where}: {MANIFEST} is unreadable ({type(e).__name__}: {e}); "
                                  f"rerun tools/extract_sam_tokens.py --finalize") from None
        if manifest.get("format") != CACHE_FORMAT or manifest.get("format_version") != CACHE_FORMAT_VERSION:
            raise TokenCacheError(f"{self.where}: {MANIFEST} is format {manifest.get('format')!r} version "
                                  f"{manifest.get('format_version')!r}, expected {CACHE_FORMAT!r} version "
                                  f"{CACHE_FORMAT_VERSION}; rebuild the cache")
        if manifest.get("dataset") != dataset_name:
            raise TokenCacheError(f"{self.where}: {MANIFEST} is for dataset {manifest.get('dataset')!r}")
        diffs = expected_identity.differences(identity)
        if diffs:
            raise TokenCacheError(f"{self.where}: the cache is foreign: it was written with {'; '.join(diffs)}. "
                                  f"Rebuild it (tools/extract_sam_tokens.py --overwrite) or point "
                                  f"MODEL.REGIONSPOT.TOKEN_CACHE_DIR elsewhere")
        self.identity = identity
        self.complete = bool(manifest.get("complete", False))
        self.num_boxes = int(manifest.get("num_boxes", 0))
        self.shards = shards
        self._index = _Index([s.image_ids for s in shards])
        self._handles: "collections.OrderedDict[int, Any]" = collections.OrderedDict()
        self._checked: set = set()
        self._pid = os.getpid()

    # pickling / fork: never carry open files into another process
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = collections.OrderedDict()
        state["_checked"] = set()
        state["_pid"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id) -> bool:
        return self._index.get(image_id) is not None

    def _shard_error(self, shard: ShardRecord, what: str, image_id=None) -> TokenCacheError:
        image = f" (image {image_id!r})" if image_id is not None else ""
        return TokenCacheError(f"{self.where}: shard {shard.file}{image}: {what}")

    def _open(self, s: int, image_id=None):
        if self._pid != os.getpid():  # forked: the parent's handles are not ours
            self._handles = collections.OrderedDict()
            self._checked = set()
            self._pid = os.getpid()
        handle = self._handles.get(s)
        if handle is not None:
            self._handles.move_to_end(s)
            return handle
        from safetensors import safe_open

        shard = self.shards[s]
        path = os.path.join(self.directory, shard.file)
        if not os.path.isfile(path):
            raise self._shard_error(shard, "the shard file is missing; rerun tools/extract_sam_tokens.py to "
                                           "rewrite its images", image_id)
        size = os.path.getsize(path)
        if size != shard.bytes:
            raise self._shard_error(shard, f"corrupt shard: {size} bytes on disk, the manifest says {shard.bytes}; "
                                           f"delete it and rerun tools/extract_sam_tokens.py", image_id)
        if self.verify_checksums and s not in self._checked:
            digest = _sha256_file(path)
            if shard.sha256 and digest != shard.sha256:
                raise self._shard_error(shard, "corrupt shard: sha256 differs from the manifest's; delete it and "
                                               "rerun tools/extract_sam_tokens.py", image_id)
            self._checked.add(s)
        try:
            handle = safe_open(path, framework="pt")
            meta = dict(handle.metadata() or {})
        except Exception as e:
            raise self._shard_error(shard, f"corrupt shard ({type(e).__name__}: {e}); delete it and rerun "
                                           f"tools/extract_sam_tokens.py", image_id) from None
        try:
            _check_shard_metadata(meta, self.where, shard.file, self.dataset_name, self.identity)
        except TokenCacheError as e:
            raise TokenCacheError(f"{e} (image {image_id!r})" if image_id is not None else str(e)) from None
        self._handles[s] = handle
        while len(self._handles) > self.max_open_shards:
            self._handles.popitem(last=False)
        return handle

    def lookup(self, image_id: Any, flip: bool = False,
               expected_boxes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The cached tokens and boxes of one image (or of its horizontal flip).

        Args:
            image_id: the dataset dict's ``image_id`` (matched through ``str()``).
            flip: the flipped image's entry.
            expected_boxes: (N, 4) boxes the entry must hold, XYXY_ABS pixels of the original
                image (not flipped; e.g. :func:`annotation_boxes` of the current dict): a
                difference over :data:`STALE_TOLERANCE_PX` is a stale entry.

        Returns:
            tokens (N, T) float32 and boxes (N, 4) float32 (CPU; mirrored when ``flip``),
            row i of the tokens belonging to box i.

        Raises:
            TokenCacheError: the image is not in the cache; its shard is missing, corrupt or
                foreign; the entry's shapes are wrong; its boxes differ from ``expected_boxes``.
        """
        s = self._index.get(image_id)
        if s is None:
            raise TokenCacheError(f"{self.where}: image {image_id!r} is not in the cache ({len(self)} images cached"
                                  f"{'' if self.complete else ', the cache is incomplete'}); rerun "
                                  f"tools/extract_sam_tokens.py for this dataset")
        handle = self._open(s, image_id)
        shard = self.shards[s]
        k = _key(image_id)
        prefix = "_flip" if flip else ""
        try:
            tokens = handle.get_tensor(f"tokens{prefix}/{k}")
            boxes = handle.get_tensor(f"boxes{prefix}/{k}")
        except Exception as e:
            raise self._shard_error(shard, f"corrupt shard: cannot read the image's tensors "
                                           f"({type(e).__name__}: {e})", image_id) from None
        n = boxes.shape[0] if boxes.dim() == 2 else -1
        if (boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.dtype != torch.float32 or tokens.dim() != 2
                or tuple(tokens.shape) != (n, self.identity.token_dim)
                or tokens.dtype != DTYPES.get(self.identity.dtype)):
            raise self._shard_error(shard, f"corrupt entry: tokens {tuple(tokens.shape)} {tokens.dtype}, boxes "
                                           f"{tuple(boxes.shape)} {boxes.dtype}; expected (N, "
                                           f"{self.identity.token_dim}) {self.identity.dtype} and (N, 4) float32",
                                    image_id)
        tokens = tokens.float()
        if not bool(torch.isfinite(tokens).all()):
            raise self._shard_error(shard, "corrupt entry: non-finite tokens", image_id)
        if expected_boxes is not None:
            self._check_stale(shard, image_id, boxes, expected_boxes, flip, handle)
        return tokens, boxes

    def _check_stale(self, shard, image_id, boxes, expected, flip, handle):
        expected = torch.as_tensor(expected).detach().float().cpu().reshape(-1, 4)
        if flip:
            original = handle.get_tensor(f"boxes/{_key(image_id)}")  # the stored unflipped boxes
            same_frame = original
        else:
            same_frame = boxes
        if same_frame.shape != expected.shape or not bool(
                ((same_frame - expected).abs() <= STALE_TOLERANCE_PX).all()):
            raise self._shard_error(shard, f"stale entry: its {same_frame.shape[0]} cached boxes differ from the "
                                           f"dataset's {expected.shape[0]} current annotation boxes (the annotations "
                                           f"changed since the cache was written); rebuild the cache "
                                           f"(tools/extract_sam_tokens.py --overwrite)", image_id)

    def lookup_record(self, record: Mapping[str, Any], flip: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`lookup` of a dataset dict, checked against its current annotation boxes
        (:func:`annotation_boxes`). Raises as :meth:`lookup` (and ``InputError`` for a bad box)."""
        return self.lookup(record["image_id"], flip, expected_boxes=annotation_boxes(record))

    def verify(self, dataset_dicts: Optional[Iterable[Mapping[str, Any]]] = None) -> Dict[str, int]:
        """Check the whole cache: every shard's size, sha256 and header, every entry's shapes
        and values; with ``dataset_dicts``, that each image is cached and not stale (image and flip).

        Returns:
            {"shards", "images", "boxes"}: what the cache holds (all checked).

        Raises:
            TokenCacheError: the first problem found.
        """
        previous = self.verify_checksums
        self.verify_checksums = True
        try:
            for s, shard in enumerate(self.shards):
                self._checked.discard(s)
                self._handles.pop(s, None)
                self._open(s)
                for image_id in shard.image_ids:
                    self.lookup(image_id, False)
                    self.lookup(image_id, True)
            for record in dataset_dicts or ():
                self.lookup_record(record, False)
                self.lookup_record(record, True)
        finally:
            self.verify_checksums = previous
        return {"shards": len(self.shards), "images": len(self), "boxes": self.num_boxes}
