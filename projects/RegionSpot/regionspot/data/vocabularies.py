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
import logging
import os
from typing import List, Sequence, Union

__all__ = ["BUILTIN_VOCABULARIES", "get_vocabulary", "vocabulary_by_name", "check_vocabulary", "duplicate_groups",
           "clean_class_name", "names_for_text", "CLASS_NAME_STYLES"]

BUILTIN_VOCABULARIES = ("lvis", "coco", "objects365", "objects365_v1")

_CUSTOM = "custom"
_OBJECTS365_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "objects365_v2_classes.json")
_OBJECTS365_V1_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "objects365_v1_classes.json")


def _valid_names() -> str:
    return ", ".join(BUILTIN_VOCABULARIES + (_CUSTOM,))


# Suffixes removed from class names before they are put into a prompt template
# (COCO-panoptic style names such as "wall-other-merged").
_STRIPPED_SUFFIXES = ("-other", "-merged", "-stuff")


CLASS_NAME_STYLES = ("released", "natural")


def clean_class_name(name: str, style: str = "released") -> str:
    """Return the text put into the prompt templates for one class name: the one class-name
    cleaning, shared by training and inference (``MODEL.REGIONSPOT.CLASS_NAME_STYLE``).

    - ``"released"`` (default; what the released weights were trained with): removes the
      trailing suffixes ``-other``, ``-merged`` and ``-stuff`` (repeatedly, so
      ``"wall-other-merged"`` becomes ``"wall"``) and nothing else (CLIP's tokenizer already
      lower-cases and collapses whitespace). The released code applies
      ``.replace('-other', '')`` etc. to every name; stripping only *trailing* suffixes gives the
      same text for every such dataset name without mangling one that merely contains them.
    - ``"natural"``: also reads the names as words: underscores become spaces (LVIS's
      ``"aerosol_can"`` -> ``"aerosol can"``, ``"bow_(weapon)"`` -> ``"bow (weapon)"``: the
      parenthesised sense is kept, it tells CLIP which meaning), ``"a/b"`` alternatives become
      ``"a or b"`` (Objects365's ``"Cabinet/shelf"`` -> ``"Cabinet or shelf"``), whitespace is
      collapsed. LVIS's synonyms need nothing more: Detectron2 names each LVIS class by its
      first synonym, the vocabulary's names.

    Raises:
        TypeError: ``name`` is not a ``str``.
        ValueError: an unknown ``style``.
    """
    if not isinstance(name, str):
        raise TypeError(f"class name must be a str, got {type(name).__name__}: {name!r}")
    if style not in CLASS_NAME_STYLES:
        raise ValueError(f"MODEL.REGIONSPOT.CLASS_NAME_STYLE must be one of {CLASS_NAME_STYLES}, got {style!r}")
    changed = True
    while changed:
        changed = False
        for suffix in _STRIPPED_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                changed = True
    if style == "natural":
        name = name.replace("_", " ")
        name = " or ".join(part.strip() for part in name.split("/") if part.strip()) or name
        name = " ".join(name.split())
    return name


def names_for_text(class_names: Sequence[str], style: str = "released") -> List[str]:
    """The names to hand to the text encoder for a ``CLASS_NAME_STYLE``: as they are for
    "released" (the encoder applies that cleaning itself, so cache keys stay the names), cleaned
    with :func:`clean_class_name` for any other style. Used by the model and the dump tool alike."""
    return list(class_names) if style == "released" else [clean_class_name(n, style) for n in class_names]


def _text_key(name: str, style: str = "released") -> str:
    """What CLIP reads of a class name under a style: cleaned, lower-cased, whitespace collapsed."""
    return " ".join(clean_class_name(name, style).lower().split())


def duplicate_groups(class_names: Sequence[str], style: str = "released") -> List[List[int]]:
    """Groups (of >= 2 indices) of class names that read the same to CLIP under a
    ``CLASS_NAME_STYLE`` (:func:`check_vocabulary`; the text classifier's aliases)."""
    groups: dict = {}
    for i, name in enumerate(class_names):
        groups.setdefault(_text_key(name, style), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def check_vocabulary(class_names: Sequence[str], what: str = "vocabulary",
                     allow_duplicates: bool = False) -> List[str]:
    """The one check of a vocabulary, used wherever class names enter RegionSpot.

    A vocabulary is a non-empty sequence of non-blank ``str`` class names (after
    :func:`clean_class_name`) with no two names that read the same to CLIP (same text after
    suffix removal, lower-casing and whitespace collapsing): such names would get identical
    text embeddings and make the softmax over the vocabulary ambiguous. A dataset's own
    vocabulary may have such names (V3Det has 45 pairs that differ only in case, e.g. "Timer" and
    "timer"): with ``allow_duplicates`` they are accepted with a logged warning (training then
    never counts one as a negative of the other).

    Args:
        class_names: C names; their order defines the class indices.
        what: how to name the vocabulary in errors (e.g. ``"custom vocabulary"``).
        allow_duplicates: accept (and warn about) names that read the same to CLIP.

    Returns:
        The names as a new ``list[str]``.

    Raises:
        TypeError: ``class_names`` is a single ``str``/``bytes`` instead of a sequence.
        ValueError: the vocabulary is empty ("<what> is empty"); a name is not a ``str`` or
            is blank (its index is named); duplicate names (all of them are named) unless
            ``allow_duplicates``.
    """
    if isinstance(class_names, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of class-name strings, not a single "
                        f"{type(class_names).__name__}: {class_names!r}")
    names = list(class_names)
    if not names:
        raise ValueError(f"{what} is empty: give at least one class name")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ValueError(f"{what}: class name at index {i} is not a str "
                             f"(got {type(name).__name__}: {name!r})")
        if not clean_class_name(name).strip():
            raise ValueError(f"{what}: class name at index {i} is empty or blank "
                             f"(after removing -other/-merged/-stuff suffixes): {name!r}")
    groups = duplicate_groups(names)
    if groups:
        listed = " | ".join("; ".join(f"{names[j]!r} (index {j})" for j in g) for g in groups[:10])
        message = (f"{what} contains duplicate class names (the same text for CLIP after suffix removal, "
                   f"lower-casing and whitespace collapsing): {listed}" + (" | ..." if len(groups) > 10 else ""))
        if not allow_duplicates:
            raise ValueError(message)
        logging.getLogger(__name__).warning("%s; they get identical text embeddings (%d groups)", message, len(groups))
    return names


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


@functools.lru_cache(maxsize=2)
def _objects365_names(path: str) -> tuple:
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    names = data["classes"] if isinstance(data, dict) else data
    if (
        not isinstance(names, list)
        or len(names) != 365
        or not all(isinstance(n, str) and n.strip() for n in names)
        or len(set(names)) != 365
    ):
        raise RuntimeError(f"{path} must hold 365 distinct non-empty class names")
    return tuple(names)


def _objects365_v2() -> tuple:
    return _objects365_names(_OBJECTS365_FILE)


def _objects365_v1() -> tuple:
    return _objects365_names(_OBJECTS365_V1_FILE)


def _parse_custom(custom: Union[str, Sequence[str], None]) -> List[str]:
    if custom is None or isinstance(custom, bytes):
        raise ValueError("custom vocabulary is empty: pass class names as 'a,b,c' or a list of str")
    if isinstance(custom, str):
        if not custom.strip():
            raise ValueError(f"custom vocabulary is empty: got {custom!r}")
        items = custom.split(",")
    else:
        items = list(custom)
    names = [item.strip() if isinstance(item, str) else item for item in items]
    return check_vocabulary(names, "custom vocabulary")


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
    * ``"objects365_v1"``: the 365 Objects365 **v1** category names in category-id
      order 1..365 (the names of ``objects365_train.json``, with which the released
      RegionSpot model was trained; lower case, e.g. index 0 ``"person"``), read from
      ``objects365_v1_classes.json`` next to this module (see its ``"source"``).
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
        name: ``"lvis"``, ``"coco"``, ``"objects365"``, ``"objects365_v1"`` or ``"custom"``
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
    if key == "objects365_v1":
        return list(_objects365_v1())
    return list(_objects365_v2())


def vocabulary_by_name(name: str, custom: Union[str, Sequence[str], None] = None) -> List[str]:
    """A built-in vocabulary, a custom one, or the categories of a registered dataset.

    Args:
        name: "lvis", "coco", "objects365", "objects365_v1", "custom" (with ``custom``), or the name of a
            dataset registered in Detectron2's catalog (e.g. with ``--register``), whose
            ``thing_classes`` are used (the dataset is loaded if its loader sets them).

    Raises:
        ValueError: an unknown name, or a dataset without categories.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key in BUILTIN_VOCABULARIES or key == _CUSTOM:
        return get_vocabulary(name, custom)
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        raise ValueError(f"vocabulary {name!r} is neither {_valid_names()} nor a registered dataset "
                         f"(register one with --register NAME JSON IMAGE_ROOT)")
    if not MetadataCatalog.get(name).get("thing_classes", None):
        DatasetCatalog.get(name)  # Detectron2's COCO/LVIS loaders set thing_classes when they run
    classes = MetadataCatalog.get(name).get("thing_classes", None)
    if not classes:
        raise ValueError(f"dataset {name!r} has no categories (thing_classes) to use as a vocabulary")
    # A dataset's own names are what its annotations mean: case-only twins (V3Det) are kept.
    return check_vocabulary(list(classes), f"the vocabulary of {name!r}", allow_duplicates=True)
