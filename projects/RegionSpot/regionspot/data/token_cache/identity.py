"""The identity of a SAM-token cache (docs/token_cache.md, "Identity"): what its tokens were
computed with (the localizer's weights content hash and architecture, the token source and
width, the stored dtype), and the check of a shard's header against it. It reads what
identifies the localizer from :mod:`regionspot.weights_files`, never from
:mod:`regionspot.modeling`."""

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ...weights_files import (
    WeightsError,
    check_token_source,
    localizer_architecture,
    require_file,
    sam_architecture,
    token_dim,
    weights_content_hash,
)
from .layout import CACHE_FORMAT, CACHE_FORMAT_VERSION, DTYPES, TokenCacheError


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
    check_token_source(token_source)
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


def check_shard_metadata(meta: Mapping[str, str], where: str, name: str, dataset_name: str,
                          expected: Optional[CacheIdentity]) -> Tuple[CacheIdentity, List[Any]]:
    """Check a shard's header metadata (``meta``, all strings): format and version, dataset, and
    (when ``expected`` is given) its identity; ``where`` and ``name`` name the cache and the shard
    in messages.

    Returns:
        (the shard's :class:`CacheIdentity`, its image ids as stored).

    Raises:
        TokenCacheError: another format or version, another dataset, unreadable metadata, or an
            identity that differs from ``expected`` (the differences listed).
    """
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

