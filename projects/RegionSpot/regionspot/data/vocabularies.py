"""Class-name vocabularies for open-vocabulary region recognition.

RegionSpot (paper Sec. 3) scores each region against the CLIP text embeddings
of a vocabulary of class names; row ``i`` of the text-embedding matrix is the
class with contiguous id ``i``.  The lists returned here are therefore in each
dataset's *contiguous-id order* as used by Detectron2's dataset metadata
(``thing_classes``), so that predicted class indices match the evaluator's
``thing_dataset_id_to_contiguous_id`` mapping.
"""

import functools
import json
import os
from typing import List, Sequence, Union

__all__ = ["BUILTIN_VOCABULARIES", "get_vocabulary"]

BUILTIN_VOCABULARIES = ("lvis", "coco", "objects365")

_CUSTOM = "custom"
_OBJECTS365_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "objects365_v2_classes.json")


def _valid_names() -> str:
    return ", ".join(BUILTIN_VOCABULARIES + (_CUSTOM,))


def _lvis_v1() -> List[str]:
    from detectron2.data.datasets.lvis import get_lvis_instances_meta

    names = list(get_lvis_instances_meta("lvis_v1")["thing_classes"])
    if len(names) != 1203:
        raise RuntimeError(f"detectron2 LVIS v1 metadata has {len(names)} classes, expected 1203")
    return names


def _coco() -> List[str]:
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

    names = list(_get_builtin_metadata("coco")["thing_classes"])
    if len(names) != 80:
        raise RuntimeError(f"detectron2 COCO metadata has {len(names)} thing classes, expected 80")
    return names


@functools.lru_cache(maxsize=1)
def _objects365_v2() -> tuple:
    with open(_OBJECTS365_FILE, "r", encoding="utf-8") as f:
        data = json.load(f)
    names = data["classes"] if isinstance(data, dict) else data
    if (
        not isinstance(names, list)
        or len(names) != 365
        or not all(isinstance(n, str) and n.strip() for n in names)
        or len(set(names)) != 365
    ):
        raise RuntimeError(f"{_OBJECTS365_FILE} must hold 365 distinct non-empty class names")
    return tuple(names)


def _parse_custom(custom: Union[str, Sequence[str], None]) -> List[str]:
    if custom is None:
        raise ValueError("custom vocabulary is empty: pass class names as 'a,b,c' or a list of str")
    if isinstance(custom, str):
        if not custom.strip():
            raise ValueError(f"custom vocabulary is empty: got {custom!r}")
        items = custom.split(",")
    elif isinstance(custom, bytes):
        raise ValueError("custom vocabulary must be a str or a sequence of str, not bytes")
    else:
        items = list(custom)
        if not items:
            raise ValueError("custom vocabulary is empty: got an empty sequence")
    names = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(
                f"custom vocabulary item at index {i} is not a str (got {type(item).__name__}: {item!r})"
            )
        name = item.strip()
        if not name:
            raise ValueError(f"custom vocabulary item at index {i} is empty in {custom!r}")
        names.append(name)
    seen = set()
    dups = []
    for name in names:
        if name in seen and name not in dups:
            dups.append(name)
        seen.add(name)
    if dups:
        raise ValueError(f"custom vocabulary contains duplicate class names: {dups}")
    return names


def get_vocabulary(name: str, custom: Union[str, Sequence[str], None] = None) -> List[str]:
    """Return the class names of a vocabulary, in contiguous-id order.

    Vocabularies:

    * ``"lvis"``: the 1203 LVIS v1 categories from Detectron2's built-in metadata
      (``get_lvis_instances_meta("lvis_v1")["thing_classes"]``, e.g. index 0 is
      ``"aerosol_can"``), the zero-shot evaluation vocabulary of the paper.
      Detectron2 names each LVIS class by its first synonym, which differs from
      the LVIS ``name`` field once (id 162: ``"horned_cow"``, LVIS name ``"bull"``).
    * ``"coco"``: the 80 COCO thing classes from Detectron2's built-in metadata
      (``_get_builtin_metadata("coco")["thing_classes"]``, starting ``"person"``).
    * ``"objects365"``: the 365 Objects365 **v2** category names in category-id
      order 1..365, read from ``objects365_v2_classes.json`` next to this module
      (official spellings, typos included; see the file's ``"source"``).
      Objects365 v1 annotation files use a different name list and id order.
    * ``"custom"``: the names given by ``custom``, either a comma-separated string
      (``"cat, dog ,car"`` -> ``["cat", "dog", "car"]``, items whitespace-stripped)
      or a sequence of str (each stripped).

    Names are returned as stored; text-side cleaning (``-other``/``-merged``/
    ``-stuff`` suffix removal) happens in
    ``regionspot.modeling.text_embeddings``.

    Source: paper Sec. 3/4 (CLIP text embeddings of the target vocabulary;
    LVIS zero-shot evaluation); released implementation's ``custom_vocabulary``
    option for user-defined classes.

    Args:
        name: ``"lvis"``, ``"coco"``, ``"objects365"`` or ``"custom"``
            (case-insensitive, surrounding whitespace ignored).
        custom: the custom class names; only allowed with ``name="custom"``.

    Returns:
        A new ``list[str]`` (the caller may modify it).

    Raises:
        ValueError: unknown ``name`` (message lists the valid names); ``custom``
            given with a built-in vocabulary; empty custom vocabulary
            ("custom vocabulary is empty ..."); an empty item, a non-str item
            (index named) or duplicate names in the custom vocabulary.
        ImportError: ``"lvis"``/``"coco"`` when Detectron2 is not importable.
    """
    if not isinstance(name, str):
        raise ValueError(
            f"vocabulary name must be a str, got {type(name).__name__}; valid names: {_valid_names()}"
        )
    key = name.strip().lower()
    if key == _CUSTOM:
        return _parse_custom(custom)
    if key not in BUILTIN_VOCABULARIES:
        raise ValueError(f"unknown vocabulary {name!r}; valid names: {_valid_names()}")
    if custom is not None:
        raise ValueError(
            f"custom class names were given with the built-in vocabulary {key!r}; "
            "use name='custom' to pass your own class names"
        )
    if key == "lvis":
        return _lvis_v1()
    if key == "coco":
        return _coco()
    return list(_objects365_v2())
