"""The vocabulary side of RegionSpot: class names -> text embeddings (paper Sec. 3).

One :class:`TextClassifier` owns everything that turns a vocabulary into the classifier the
region embeddings are scored against: CLIP's text tower, the prompt ensemble, the class-name
style (``CLASS_NAME_STYLE``), the disk cache (``TEXT_CACHE_DIR``) and its identity (the CLIP
weights). The model, the trainer, the predictor and ``tools/dump_text_embeddings.py`` all call
its :meth:`TextClassifier.embed`, so they share one cache entry per vocabulary.

The vocabulary a config names (``VOCABULARY``, ``CUSTOM_VOCABULARY``, a dataset's
``thing_classes``) is read by :func:`vocabulary_from_config`; a vocabulary with its embeddings,
class hierarchy and aliases is a :class:`Vocabulary`; what a model scores against (the
evaluation vocabulary, one per training dataset, the config's until it is encoded) is its one
:class:`ModelVocabularies`.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..data.vocabularies import (
    check_vocabulary,
    clean_class_name,
    duplicate_groups,
    get_vocabulary,
    names_for_text,
    vocabulary_by_name,
)
from .text_embeddings import PROMPT_TEMPLATES, cache_path, load_or_compute_text_embeddings, weights_fingerprint

logger = logging.getLogger(__name__)


def _text_projection(clip_model):
    """The text tower's output projection: ``clip_model.text_projection`` (OpenAI CLIP, OpenCLIP's
    ``CLIP``), else ``clip_model.text.text_projection`` (OpenCLIP's ``CustomTextCLIP``: EVA02,
    SigLIP); a (width, E) tensor or an ``nn.Linear``, or None."""
    proj = getattr(clip_model, "text_projection", None)
    if proj is None:
        proj = getattr(getattr(clip_model, "text", None), "text_projection", None)
    return proj


def text_embed_dim(clip_model) -> int:
    """E, the width of a CLIP model's joint embedding space (its text tower's output width).

    Raises:
        ValueError: the model has no text projection to read it from.
    """
    proj = _text_projection(clip_model)
    if isinstance(proj, torch.nn.Linear):
        return proj.out_features
    if torch.is_tensor(proj) and proj.dim() == 2:
        return int(proj.shape[1])
    output_dim = getattr(getattr(clip_model, "text", None), "output_dim", None)
    if isinstance(output_dim, int):
        return output_dim
    raise ValueError(f"{type(clip_model).__name__}: no text projection to read the embedding width from")


def _model_device(clip_model) -> torch.device:
    proj = _text_projection(clip_model)
    if isinstance(proj, torch.nn.Linear):
        return proj.weight.device
    if torch.is_tensor(proj):
        return proj.device
    return next(clip_model.parameters()).device


@dataclass
class Vocabulary:
    """A vocabulary with its text embeddings (one per training dataset, and the one evaluation
    scores against).

    Attributes:
        names: C class names.
        text_embeddings: (C, E) float32 L2-normalised, on the model's device.
        ancestors: optional, per class index the indices of its ancestors in a class
            hierarchy (V3Det); kept out of a region's negatives with ``IGNORE_ANCESTOR_NEGATIVES``.
        aliases: per class index, the other classes whose texts read the same to CLIP under the
            classifier's class-name style (:meth:`TextClassifier.aliases`): identical text
            embeddings, so never counted as each other's negatives.
    """

    names: List[str]
    text_embeddings: torch.Tensor
    ancestors: Optional[Dict[int, List[int]]] = None
    aliases: Dict[int, List[int]] = field(default_factory=dict)


class TextClassifier:
    """Text embeddings of vocabularies: CLIP's text tower with the prompt ensemble, on class
    names cleaned by one class-name style, through an on-disk cache.

    Not an ``nn.Module``: it holds the model's CLIP (registered once, in the semantic encoder)
    and computes on that model's device.

    Args:
        clip_model: OpenAI ``clip.model.CLIP`` (the same model as the semantic encoder's).
        weights_id: identity of the CLIP weights, part of every cache key
            (:func:`~regionspot.modeling.text_embeddings.weights_fingerprint` of the file).
        class_name_style: ``CLASS_NAME_STYLE``, "released" or "natural"
            (:func:`~regionspot.data.vocabularies.clean_class_name`).
        cache_dir: ``TEXT_CACHE_DIR``, or None for no cache.
        batch_size: ``TEXT_BATCH_SIZE``, prompts per text-tower call on a cache miss.
        templates: the prompt templates (the released 80 ImageNet templates + "{}.").
        tokenizer: the text model's own tokenizer (OpenCLIP, :mod:`.open_clip_model`); None for
            OpenAI CLIP's.

    Source: the released implementation encodes each class with the template ensemble, averages
    the unnormalised features and L2-normalises (docs/method.md); the cache is ours.
    """

    def __init__(self, clip_model, weights_id: str, *, class_name_style: str = "released",
                 cache_dir: Optional[str] = None, batch_size: int = 256,
                 templates: Sequence[str] = PROMPT_TEMPLATES, tokenizer: Optional[Callable] = None):
        clean_class_name("x", class_name_style)  # checks the style
        self.clip = clip_model
        self.weights_id = weights_id
        self.class_name_style = class_name_style
        self.cache_dir = cache_dir or None
        self.batch_size = batch_size
        self.templates = list(templates)
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, cfg, clip_model, *, weights_id: Optional[str] = None,
                    tokenizer: Optional[Callable] = None) -> "TextClassifier":
        """The classifier of a config: ``CLASS_NAME_STYLE``, ``TEXT_CACHE_DIR``,
        ``TEXT_BATCH_SIZE``; the identity is ``weights_id`` (default: the fingerprint of the
        ``CLIP_WEIGHTS`` file), the tokenizer the model's own (default: OpenAI CLIP's)."""
        rs = cfg.MODEL.REGIONSPOT
        return cls(clip_model, weights_id or weights_fingerprint(rs.CLIP_WEIGHTS),
                   class_name_style=rs.CLASS_NAME_STYLE, cache_dir=rs.TEXT_CACHE_DIR or None,
                   batch_size=rs.TEXT_BATCH_SIZE, tokenizer=tokenizer)

    def to(self, device) -> "TextClassifier":
        """Move the CLIP it encodes with to ``device`` (in place, as ``nn.Module.to``); returns self.

        A tool that builds only the text side (``regionspot-dump-text-embeddings``) encodes on
        its device this way; inside a model the CLIP moves with ``model.to``.
        """
        self.clip.to(device)
        return self

    @property
    def embed_dim(self) -> int:
        """E, the width of CLIP's joint embedding space."""
        return text_embed_dim(self.clip)

    def texts(self, class_names: Sequence[str]) -> List[str]:
        """The names handed to the text encoder under the classifier's style
        (:func:`~regionspot.data.vocabularies.names_for_text`: as given for "released", whose
        suffix rule the encoder applies itself, so cache keys stay the names; cleaned by
        :func:`~regionspot.data.vocabularies.clean_class_name` for "natural")."""
        return names_for_text(class_names, self.class_name_style)

    def cache_path(self, class_names: Sequence[str]) -> Optional[str]:
        """The cache file of a vocabulary's embeddings (None without a cache); it need not exist."""
        if self.cache_dir is None:
            return None
        return cache_path(os.path.expanduser(self.cache_dir), self.weights_id, self.texts(class_names),
                          self.templates)

    def aliases(self, class_names: Sequence[str]) -> Dict[int, List[int]]:
        """Per class index, the other classes whose texts CLIP reads the same (lower case,
        collapsed whitespace) under this style: with "natural", LVIS-style "aerosol_can" and
        "aerosol can" are aliases; with "released" they are not (CLIP sees the underscore)."""
        groups = duplicate_groups(class_names, self.class_name_style)
        return {i: [j for j in g if j != i] for g in groups for i in g}

    @torch.no_grad()
    def embed(self, class_names: Sequence[str], device=None, *, batch_size: Optional[int] = None) -> torch.Tensor:
        """Text embeddings of a vocabulary (read from the cache, or computed and written there).

        Args:
            class_names: C names (:func:`~regionspot.data.vocabularies.check_vocabulary`;
                names that read the same are allowed, they get the same embedding).
            device: where to return them (default: CLIP's device).
            batch_size: prompts per text-tower call on a cache miss (default: the classifier's,
                ``TEXT_BATCH_SIZE``); the embeddings do not depend on it beyond float rounding,
                and the cache key does not include it.

        Returns:
            (C, E) float32, rows L2-normalised.

        Raises:
            ValueError / TypeError: not a valid vocabulary (empty, blank or non-str names).
        """
        names = check_vocabulary(class_names, allow_duplicates=True)
        embeddings = load_or_compute_text_embeddings(
            self.clip, self.texts(names), weights_id=self.weights_id, cache_dir=self.cache_dir,
            templates=self.templates, batch_size=self.batch_size if batch_size is None else batch_size,
            tokenizer=self.tokenizer)
        return embeddings.to(device if device is not None else _model_device(self.clip))

    def check_embeddings(self, text_embeddings: torch.Tensor, num_classes: int, device=None) -> torch.Tensor:
        """``text_embeddings`` as float32 on ``device`` if they are (C, E) for this CLIP.

        Raises:
            ValueError: the shape is not (``num_classes``, :attr:`embed_dim`).
        """
        expected = (num_classes, self.embed_dim)
        if not torch.is_tensor(text_embeddings) or tuple(text_embeddings.shape) != expected:
            got = tuple(text_embeddings.shape) if torch.is_tensor(text_embeddings) else type(text_embeddings).__name__
            raise ValueError(f"text_embeddings must have shape {expected} for this vocabulary and CLIP, got {got}")
        return text_embeddings.float().to(device if device is not None else _model_device(self.clip))

    def vocabulary(self, class_names: Sequence[str], text_embeddings: Optional[torch.Tensor] = None, *,
                   ancestors: Optional[Dict[int, List[int]]] = None, allow_duplicates: bool = False,
                   device=None) -> Vocabulary:
        """A checked :class:`Vocabulary`: names, their embeddings (computed by :meth:`embed`
        unless given), aliases and an optional class hierarchy.

        Raises:
            ValueError: not a valid vocabulary (duplicates only with ``allow_duplicates``), or
                ``text_embeddings`` not (C, E).
        """
        names = check_vocabulary(class_names, allow_duplicates=allow_duplicates)
        if text_embeddings is None:
            text_embeddings = self.embed(names, device)
        text_embeddings = self.check_embeddings(text_embeddings, len(names), device)
        return Vocabulary(names, text_embeddings, ancestors, self.aliases(names))


class ModelVocabularies(nn.Module):
    """The vocabularies a RegionSpot model scores against, owned in one place (``model.vocabularies``).

    - The **evaluation vocabulary**: what ``forward`` scores against at inference (and training
      inputs without a "dataset" key): :attr:`names`, their aliases and class hierarchy, and
      :attr:`text_embeddings`, (C, E) float32 L2-normalised, a non-persistent buffer: it moves
      with ``model.to(device)`` and never enters the state dict, hence never a checkpoint.
    - :attr:`by_dataset`: one :class:`Vocabulary` per training dataset; each training image is
      scored against its own dataset's.
    - :attr:`pending`: the config's class names, not encoded yet: building a model encodes no
      text; :meth:`for_inference` encodes them (or reads the cache) on first use, once.

    Args:
        text_classifier: the model's :class:`TextClassifier` (encodes and checks vocabularies).
        pending: the config's class names (:func:`build_time_vocabulary`), or None.

    Source: ours. The released implementation scores the one vocabulary its config names; the
    per-dataset vocabularies (a batch may mix datasets) and the lazy encoding are this project's.
    """

    def __init__(self, text_classifier: TextClassifier, pending: Optional[Sequence[str]] = None):
        super().__init__()
        self.text_classifier = text_classifier
        self.names: Optional[List[str]] = None
        self.register_buffer("text_embeddings", None, persistent=False)
        self.ancestors: Optional[Dict[int, List[int]]] = None
        self.aliases: Dict[int, List[int]] = {}
        self.by_dataset: Dict[str, Vocabulary] = {}
        self.pending: Optional[List[str]] = list(pending) if pending else None

    def set(self, class_names: Sequence[str], text_embeddings: Optional[torch.Tensor] = None, *,
            dataset: Optional[str] = None, ancestors: Optional[Dict[int, List[int]]] = None,
            allow_duplicates: bool = False, device=None) -> Vocabulary:
        """Check and set a vocabulary (``RegionSpot.set_vocabulary``'s arguments): the evaluation
        one (``dataset`` None; it replaces :attr:`pending`), else that training dataset's.

        Args:
            text_embeddings: optional (C, E) embeddings; computed by :meth:`TextClassifier.embed`
                (or read from its cache) when None.
            device: where the embeddings are kept (the model's device).

        Returns:
            the :class:`Vocabulary` set.

        Raises:
            ValueError: not a valid vocabulary, or ``text_embeddings`` not (C, E).
        """
        vocabulary = self.text_classifier.vocabulary(class_names, text_embeddings, ancestors=ancestors,
                                                     allow_duplicates=allow_duplicates, device=device)
        if dataset is not None:
            self.by_dataset[dataset] = vocabulary
            return vocabulary
        self.names, self.text_embeddings = vocabulary.names, vocabulary.text_embeddings
        self.ancestors, self.aliases = vocabulary.ancestors, vocabulary.aliases
        self.pending = None
        return vocabulary

    @property
    def evaluation(self) -> Optional[Vocabulary]:
        """The evaluation vocabulary (its embeddings where the model is now), or None before one is set."""
        if self.text_embeddings is None:
            return None
        return Vocabulary(self.names, self.text_embeddings, self.ancestors, self.aliases)

    def for_inference(self, device=None) -> Vocabulary:
        """The evaluation vocabulary; the config's (:attr:`pending`) is encoded now if none is set yet.

        Raises:
            RuntimeError: no vocabulary at all (neither the config's nor one set).
        """
        if self.text_embeddings is None and self.pending:
            logger.info("Text embeddings of the config's vocabulary (%d classes), once", len(self.pending))
            self.set(self.pending, allow_duplicates=True, device=device)
        if self.text_embeddings is None:
            raise RuntimeError("RegionSpot has no vocabulary to score against: call "
                               "model.set_vocabulary(class_names) first (train_net.py does it per dataset)")
        return self.evaluation

    def for_training(self, inputs: Dict) -> Vocabulary:
        """The vocabulary a training input is scored against: its dataset's
        (``inputs["dataset"]``), else the evaluation vocabulary.

        Raises:
            RuntimeError: no vocabulary was set for it.
        """
        name = inputs.get("dataset")
        if name is not None and name in self.by_dataset:
            return self.by_dataset[name]
        if self.text_embeddings is None:
            raise RuntimeError(f"no vocabulary for training image {inputs.get('file_name', '?')!r} (dataset "
                               f"{name!r}): call model.set_vocabulary(names, dataset=...) first (train_net.py does)")
        return self.evaluation

    def extra_repr(self) -> str:
        size = "none" if self.names is None else f"{len(self.names)} classes"
        return f"evaluation: {size}, datasets: {sorted(self.by_dataset)}, pending: {len(self.pending or [])} names"


def vocabulary_from_config(cfg, dataset_name: Optional[str] = None) -> List[str]:
    """Class names to score a dataset's boxes against.

    ``MODEL.REGIONSPOT.VOCABULARY``: "dataset" -> the ``thing_classes`` of ``dataset_name`` (or of
    the first training dataset) in Detectron2's ``MetadataCatalog``, loading the dataset first
    if its loader is what sets them (as Detectron2's ``register_coco_instances`` and
    ``register_lvis_instances`` do); "lvis", "coco", "objects365" -> the built-in lists;
    "custom" -> ``CUSTOM_VOCABULARY`` ("a,b,c"). Evaluation passes each test dataset's name, so
    every dataset is scored against its own vocabulary.

    Raises:
        ValueError: unknown vocabulary, empty custom vocabulary, a dataset that is not
            registered, or one without ``thing_classes``.
    """
    rs = cfg.MODEL.REGIONSPOT
    if rs.VOCABULARY != "dataset":
        return get_vocabulary(rs.VOCABULARY, rs.CUSTOM_VOCABULARY or None)
    name = dataset_name or next(iter(cfg.DATASETS.TRAIN), None)
    if name is None:
        raise ValueError('MODEL.REGIONSPOT.VOCABULARY is "dataset" but no dataset is given; name one or set '
                         'a vocabulary ("lvis", "coco", "objects365", "custom")')
    return vocabulary_by_name(name)


def build_time_vocabulary(cfg) -> Optional[List[str]]:
    """The vocabulary a model built from ``cfg`` starts with: "dataset" -> the first test
    dataset's ``thing_classes`` (else the first training dataset's); "lvis", "coco",
    "objects365", "custom" as configured (:func:`vocabulary_from_config`). None, with a log
    line, when the config names no usable dataset (set one with ``set_vocabulary``)."""
    name = next(iter(cfg.DATASETS.TEST), None) or next(iter(cfg.DATASETS.TRAIN), None)
    try:
        return vocabulary_from_config(cfg, name)
    except ValueError as e:
        logger.info("No vocabulary from the config (%s); set one with model.set_vocabulary(class_names)", e)
        return None
