"""Reading a SAM-token cache in data-loader workers (docs/token_cache.md, "Reading"):
:class:`SamTokenCache` checks the manifest and the shards it opens against the expected
identity, and every entry it returns against its shapes, its values and the dataset's current
boxes."""

import collections
import json
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ...io import sha256_file
from .compute import annotation_boxes
from .identity import CacheIdentity, check_shard_metadata
from .layout import (
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    DTYPES,
    MANIFEST,
    STALE_TOLERANCE_PX,
    ShardRecord,
    TokenCacheError,
    cache_where,
    dataset_dir,
    image_key,
)


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
                self.map.setdefault(image_key(i), s)

    def get(self, image_id: Any) -> Optional[int]:
        if self.ints:
            try:
                value = int(image_id) if not isinstance(image_id, (int, np.integer)) else image_id
            except (TypeError, ValueError):
                return None
            if image_key(value) != image_key(image_id):
                return None
            j = int(np.searchsorted(self.ids, value))
            return int(self.shards[j]) if j < len(self.ids) and self.ids[j] == value else None
        return self.map.get(image_key(image_id))

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
        self.directory = dataset_dir(self.cache_dir, dataset_name)
        self.where = cache_where(self.cache_dir, dataset_name)
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
            digest = sha256_file(path)
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
            check_shard_metadata(meta, self.where, shard.file, self.dataset_name, self.identity)
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
        k = image_key(image_id)
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
            original = handle.get_tensor(f"boxes/{image_key(image_id)}")  # the stored unflipped boxes
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
