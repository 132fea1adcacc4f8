"""Reading a proposal file: what kind of file it is (JSON or a pickle, from its first bytes), a
pickle loaded without running code, the format detected from the content
(:func:`detect_format`), and :func:`read_proposal_file`, which hands the content to its
format's parser (:mod:`.parsing`)."""

import json
import pickle

from .parsing import parse_coco, parse_detectron2, parse_glip
from .proposal_set import (
    COCO_LAYOUT,
    D2_LAYOUT,
    GLIP_LAYOUT,
    PROPOSAL_FILE_FORMATS,
    ProposalFileError,
    ProposalSet,
)


class _RefusedClass(pickle.UnpicklingError):
    """A pickle names a class that a proposal file has no business holding."""


class _RefusedPickle(ProposalFileError):
    """A valid pickle that holds something other than plain data."""


class _ProposalUnpickler(pickle.Unpickler):
    """Builds only plain containers, numpy arrays/scalars and BoxMode; refuses other classes."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol 0-2 pickles written by Python 3
        ("collections", "OrderedDict"),
        ("detectron2.structures.boxes", "BoxMode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _RefusedClass(
            f"refusing to load {module}.{name}: a Detectron2 proposal pickle holds only lists, "
            "dicts and numpy arrays (convert tensors with .numpy())")


def _sniff(path: str) -> str:
    """The kind of file from its first bytes: ``"json"``, ``"pickle"`` or ``"unknown"``."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head:
        raise ProposalFileError(f"{path}: the file is empty; expected a proposal file in one of the "
                                f"formats {PROPOSAL_FILE_FORMATS}")
    start = head.lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    if start[:1] in (b"{", b"["):
        return "json"
    if head[:1] == b"\x80":  # pickle protocol >= 2
        return "pickle"
    return "unknown"


def _load_json(path: str):
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProposalFileError(f"{path}: starts like JSON but is not valid JSON: {e}") from None


def _load_pickle(path: str):
    try:
        with open(path, "rb") as f:
            return _ProposalUnpickler(f, encoding="latin1").load()
    except _RefusedClass as e:
        raise _RefusedPickle(f"{path}: cannot be read as a Detectron2 proposal pickle: {e}") from None
    except Exception as e:  # a corrupt or foreign pickle can fail in many ways
        raise ProposalFileError(f"{path}: is not a valid pickle ({type(e).__name__}: {e})") from None


def _load_content(path: str):
    """(kind, content): the parsed JSON value or unpickled object of ``path``."""
    kind = _sniff(path)
    if kind == "json":
        return kind, _load_json(path)
    if kind == "pickle":
        return kind, _load_pickle(path)
    try:  # protocol 0/1 pickles, JSON after a long run of blanks
        return "pickle", _load_pickle(path)
    except _RefusedPickle:
        raise
    except ProposalFileError:
        pass
    try:
        return "json", _load_json(path)
    except ProposalFileError:
        pass
    raise ProposalFileError(
        f"{path}: is neither JSON nor a pickle; expected a proposal file in one of the formats "
        f"{PROPOSAL_FILE_FORMATS}: a JSON object (glip), a JSON list (coco) or a pickle (detectron2)")


def _format_of_content(path: str, kind: str, content) -> str:
    if kind == "pickle":
        return "detectron2"
    if isinstance(content, dict):
        return "glip"
    if isinstance(content, list):
        return "coco"
    raise ProposalFileError(f"{path}: JSON top level is {type(content).__name__}; expected an object "
                            f"(glip layout {GLIP_LAYOUT}) or a list (coco layout {COCO_LAYOUT})")


def detect_format(path: str) -> str:
    """The format of a proposal file, from its content.

    A JSON object is ``"glip"``, a JSON list ``"coco"``, a pickle ``"detectron2"``. Usually
    only the first bytes are read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ProposalFileError: the file is empty, neither JSON nor a pickle, or JSON whose top
            level is neither an object nor a list.
    """
    kind = _sniff(path)
    if kind == "pickle":
        return "detectron2"
    if kind == "json":
        with open(path, "rb") as f:
            start = f.read(256).lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
        return "glip" if start[:1] == b"{" else "coco"
    kind, content = _load_content(path)
    return _format_of_content(path, kind, content)


def read_proposal_file(path: str, format: str = "auto") -> ProposalSet:
    """Read and validate a proposal file.

    Args:
        path: a file in one of :data:`PROPOSAL_FILE_FORMATS` (see the module docstring).
        format: ``"auto"`` (detect from the content, :func:`detect_format`) or the expected
            format; a file whose content is another format is an error.

    Returns:
        A :class:`ProposalSet`: per ``str(image_id)``, (N, 4) float32 XYXY_ABS boxes in
        original-image pixels, (N,) float32 scores in [0, 1] (sigmoid of the logits for the
        detectron2 format) and (N,) int64 labels (-1 where the file has none). COCO entries are
        grouped by image (images sorted by id: numerically when all ids are integers; boxes in
        file order).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``format`` is not "auto" or one of :data:`PROPOSAL_FILE_FORMATS`.
        ProposalFileError: the content is not the named format; missing keys or wrong types;
            boxes that are not (N, 4) or whose count differs from the scores'; NaN or infinite
            coordinates, NaN scores or logits; scores outside [0, 1] (glip, coco); negative
            COCO width/height; XYXY boxes with x1 < x0 or y1 < y0 (the message asks whether
            XYWH was written); a Detectron2 ``bbox_mode`` other than XYXY_ABS / XYWH_ABS;
            duplicate image ids in a pickle.
    """
    if format != "auto" and format not in PROPOSAL_FILE_FORMATS:
        raise ValueError(f"proposal file format must be 'auto' or one of {PROPOSAL_FILE_FORMATS}, got {format!r}")
    kind, content = _load_content(path)
    found = _format_of_content(path, kind, content)
    if format != "auto" and format != found:
        raise ProposalFileError(f"{path}: expected the {format!r} format ({_layout(format)}) but the "
                                f"content is {_describe_content(kind, content)}, i.e. the {found!r} format")
    parse = {"glip": parse_glip, "coco": parse_coco, "detectron2": parse_detectron2}[found]
    boxes, scores, labels = parse(content, path)
    return ProposalSet(path=path, format=found, boxes=boxes, scores=scores, labels=labels)


def _layout(fmt: str) -> str:
    return {"glip": GLIP_LAYOUT, "coco": COCO_LAYOUT, "detectron2": "a pickle " + D2_LAYOUT}[fmt]


def _describe_content(kind: str, content) -> str:
    if kind == "pickle":
        return "a pickle"
    return "a JSON object" if isinstance(content, dict) else "a JSON list"
