"""The ``RegionSpot`` meta-architecture: it assembles the parts and runs the recognition path.

The parts (built by :meth:`RegionSpot.from_config`, passed in like Detectron2's
``GeneralizedRCNN``), one per concept of the paper (docs/architecture.md):

- the **localizer** (``position_tokens.py``): frozen SAM; image -> embedding, boxes ->
  position-aware tokens (+ masks and predicted IoU);
- the **semantic encoder** (``semantic_features.py``): frozen CLIP; image -> semantic feature map;
- the **proposal generator** (``proposals/generator.py``): gt, file, rpn or sam_auto boxes;
- the **head** (``head.py``): tokens cross-attend the feature map -> region embeddings;
- the **text classifier** (``text_classifier.py``): vocabulary -> text embeddings (CLIP's
  text tower, prompt ensemble, class-name style, disk cache);
- the **criterion** (``losses.py``): focal loss with every ignore mask.

One recognition path (paper Fig. 2, Sec. 3), used by evaluation (``forward``), the predictor,
the demo and the benchmark alike, in the order the code runs it:

1. the mapper has resized/flipped the image and its boxes once (``data/mapper.py``);
2. :meth:`RegionSpot.encode_images`: the localizer embeds each image once and the semantic
   encoder makes its feature map, each for the whole batch in one call;
3. :meth:`RegionSpot.propose`: the proposal generator's boxes, as Detectron2 proposals;
4. :meth:`RegionSpot.recognize`: each box prompts SAM for its token (all boxes of the batch
   together, masks only when needed); the head turns tokens into region embeddings; logits
   against text embeddings computed *before*, outside the forward (:meth:`set_vocabulary`);
5. training -> the criterion; inference -> :meth:`RegionSpot.postprocess` (score fusion and
   selection, boxes in original-image pixels, one mask pasted per kept box -> ``Instances``).

Each stage runs under a ``torch.profiler`` label (:data:`~.profiling.STAGE_LABELS`).
"""

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Instances
from torch import nn

from ..checkpoint import RELEASED_PAIR, register_head_only_state
from ..config_defaults import resolve_config_device
from ..data.validation import check_images
from ..filter_report import FilterReport, report_of_input
from ..structures import ImageFeatures, RegionRecognition, stack_embeddings
from .backbones import build_localizer, build_vl_model
from .head import RegionSpotHead, region_logits
from .localizer import Localizer
from .losses import RegionSpotCriterion
from .position_tokens import BoxPrompts
from .postprocess import RecognitionProtocol, detections_to_instances, resize_masks
from .profiling import STAGE_LABELS, stage  # noqa: F401  (STAGE_LABELS: the labels profilers look for)
from .proposals.generator import RegionProposalGenerator
from .semantic_features import SemanticEncoder
from .text_classifier import ModelVocabularies, TextClassifier, build_time_vocabulary

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class RegionSpot(nn.Module):
    """Open-vocabulary region recognition with frozen SAM and CLIP (Yang et al., RegionSpot).

    Inputs (Detectron2's batched format, one dict per image, as made by
    :class:`regionspot.data.mapper.RegionSpotDatasetMapper`):
        - "image": (3, H, W) RGB tensor, uint8 or float in 0-255 (the mapper's resized image);
        - optional "sam_input" ((3, h, w) uint8, the image resized for SAM) and "clip_input"
          ((3, S, S) float32, resized for CLIP), made by the test mapper in the data-loader
          workers so that no resize runs on the model's critical path;
        - "instances": ``Instances`` with ``gt_boxes`` (XYXY_ABS pixels of that image) and,
          for training, ``gt_classes`` (int64 indices into the vocabulary); the proposals at
          test time with ``PROPOSALS`` "gt";
        - "proposals": ``Instances`` with ``proposal_boxes`` / ``objectness_logits`` (the
          mapper's, from a file) with ``PROPOSALS`` "file";
        - optional "proposal_filters": what the file's selection removed from the image's boxes;
        - optional "height", "width": the original image size to report results in.

    Outputs: training -> ``{"loss_region_focal": scalar}``; inference -> one
    ``{"instances": Instances, "filters": FilterReport}`` per image: ``pred_boxes`` (XYXY_ABS,
    original pixels), ``scores`` (float32), ``pred_classes`` (int64 vocabulary indices),
    ``proposal_scores`` and, with ``mask_on``, ``pred_masks``
    (:class:`~regionspot.modeling.postprocess.SharedMasks`, (K, H, W) bool); the report says
    what each selection step removed, and the key that controls it.

    The vocabularies ``forward`` scores against are one object, :attr:`vocabularies`
    (:class:`~regionspot.modeling.text_classifier.ModelVocabularies`): the config's (its text
    embeddings computed on the first inference) until :meth:`set_vocabulary` sets another, and
    one per training dataset (the trainer sets them); the predictor passes its own text
    embeddings to :meth:`inference` instead and never changes the model. Checkpoints hold only the head
    (:func:`~regionspot.checkpoint.register_head_only_state`).
    """

    @configurable
    def __init__(self, *, localizer: Localizer, semantic_encoder: SemanticEncoder,
                 head: RegionSpotHead, proposal_generator: RegionProposalGenerator,
                 text_classifier: TextClassifier, criterion: RegionSpotCriterion,
                 protocol: Optional[RecognitionProtocol] = None, mask_on: bool = False,
                 logit_scale: float = 100.0, vocabulary: Optional[Sequence[str]] = None,
                 pair: Optional[Dict[str, str]] = None):
        """
        Args:
            localizer, semantic_encoder, head, proposal_generator, text_classifier, criterion:
                the built parts (see the module docstring).
            protocol: scoring and selection at inference (default: the released one).
            mask_on: paste a mask for each detection (``MODEL.MASK_ON``).
            logit_scale: ``LOGIT_SCALE``, region-text logits = scale x cosine (paper Eq. 3).
            vocabulary: the config's class names; their text embeddings are computed (or read
                from the cache) on the first inference, so that building stays quick.
            pair: the foundation models' identities, ``{"localizer": ..., "vl_model": ...}``
                (default: the released SAM + OpenAI CLIP), recorded in and checked against
                checkpoints (:class:`~regionspot.checkpoint.RegionSpotCheckpointer`).
        """
        super().__init__()
        self.localizer = localizer
        self.semantic_encoder = semantic_encoder
        self.head = head
        self.proposal_generator = proposal_generator
        self.text_classifier = text_classifier
        self.criterion = criterion
        self.protocol = protocol or RecognitionProtocol()
        self.mask_on = mask_on
        self.logit_scale = logit_scale
        self.pair = dict(pair or RELEASED_PAIR)
        # What forward() scores against: the config's vocabulary (encoded on first use) until
        # set_vocabulary sets another, and one vocabulary per training dataset.
        self.vocabularies = ModelVocabularies(text_classifier, vocabulary)
        register_head_only_state(self)

    @classmethod
    def from_config(cls, cfg):
        resolve_config_device(cfg)  # Detectron2's build_model moves the model to cfg.MODEL.DEVICE next
        rs = cfg.MODEL.REGIONSPOT
        localizer = build_localizer(cfg)  # MODEL.REGIONSPOT.LOCALIZER (modeling/backbones.py)
        semantic_encoder, text_classifier, vl_identity = build_vl_model(cfg)  # MODEL.REGIONSPOT.VL_MODEL
        head = RegionSpotHead(localizer.token_dim, semantic_encoder.width, semantic_encoder.embed_dim,
                              rs.NUM_DECODER_LAYERS, rs.NUM_HEADS, rs.DIM_FEEDFORWARD, rs.DROPOUT)
        return dict(
            localizer=localizer,
            semantic_encoder=semantic_encoder,
            head=head,
            proposal_generator=RegionProposalGenerator.from_config(cfg, localizer),
            text_classifier=text_classifier,
            criterion=RegionSpotCriterion.from_config(cfg),
            protocol=RecognitionProtocol.from_config(cfg),
            mask_on=cfg.MODEL.MASK_ON,
            logit_scale=rs.LOGIT_SCALE,
            vocabulary=build_time_vocabulary(cfg),
            pair={"localizer": localizer.pair_name, "vl_model": vl_identity},
        )

    @property
    def device(self) -> torch.device:
        return self.head.projector.weight.device

    def train(self, mode: bool = True):
        """Only the head trains: SAM, CLIP and the RPN stay in eval mode (no dropout, frozen)."""
        super().train(mode)
        self.localizer.eval()
        self.semantic_encoder.eval()
        self.proposal_generator.train(False)
        return self

    def compile_encoders(self, **options) -> None:
        """``torch.compile`` SAM's image encoder and CLIP's image tower in place (``COMPILE``)."""
        self.localizer.compile_encoder(**options)
        self.semantic_encoder.compile_encoder(**options)

    # ----------------------------------------------------------------- vocabulary
    @property
    def text_embeddings(self) -> Optional[torch.Tensor]:
        """(C, E) float32 text embeddings of the evaluation vocabulary on the model's device, or
        None before one is set (read-only: :meth:`set_vocabulary` sets them)."""
        return self.vocabularies.text_embeddings

    @property
    def class_names(self) -> Optional[List[str]]:
        """The C names of the evaluation vocabulary, or None before one is set (read-only)."""
        return self.vocabularies.names

    def encode_vocabulary(self, class_names: Sequence[str]) -> torch.Tensor:
        """(C, E) float32 L2-normalised text embeddings of ``class_names`` on the model's device
        (:meth:`TextClassifier.embed`: prompt ensemble, class-name style, disk cache). It does
        not change the model."""
        return self.text_classifier.embed(class_names, self.device)

    def check_text_embeddings(self, text_embeddings: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``text_embeddings`` as float32 on the model's device if they are (C, E) for this CLIP.

        Raises:
            ValueError: another shape.
        """
        return self.text_classifier.check_embeddings(text_embeddings, num_classes, self.device)

    def set_vocabulary(self, class_names: Sequence[str], text_embeddings: Optional[torch.Tensor] = None, *,
                       dataset: Optional[str] = None, ancestors: Optional[Dict[int, List[int]]] = None,
                       allow_duplicates: bool = False) -> None:
        """Set a vocabulary that :meth:`forward` scores against.

        Args:
            class_names: the C names of the vocabulary.
            text_embeddings: optional precomputed (C, E) L2-normalised embeddings for them (e.g.
                a large vocabulary encoded offline); by default they are computed now.
            dataset: None sets the vocabulary of evaluation (and of training inputs without a
                "dataset" key); a training dataset's name sets that dataset's vocabulary: every
                training image is scored against its own dataset's, so one batch may mix them.
            ancestors: optional class hierarchy of a training dataset ({class index: indices of
                its ancestors}, e.g. V3Det), for ``IGNORE_ANCESTOR_NEGATIVES``.
            allow_duplicates: accept names that read the same to CLIP (a dataset's own
                vocabulary, see :func:`~regionspot.data.vocabularies.check_vocabulary`).

        Raises:
            ValueError: the vocabulary is not valid, or ``text_embeddings`` is not (C, E).
        """
        self.vocabularies.set(class_names, text_embeddings, dataset=dataset, ancestors=ancestors,
                              allow_duplicates=allow_duplicates, device=self.device)

    def needs_sam_masks(self, protocol: Optional[RecognitionProtocol] = None, mask_on: Optional[bool] = None) -> bool:
        """Whether recognition must compute SAM's masks: for ``MASK_ON`` and for the TAP protocol
        (its score uses SAM's predicted IoU); box AP with the released protocol needs tokens only."""
        protocol = protocol or self.protocol
        return (self.mask_on if mask_on is None else mask_on) or protocol.selection == "tap"

    # ----------------------------------------------------------------- the recognition path
    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor],
                      sam_inputs: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      clip_inputs: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[ImageFeatures]:
        """Step 2: the localizer's and the semantic encoder's image side, each once for the batch.

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB (sizes may differ), any device.
            sam_inputs, clip_inputs: optional per image, the resizes the test mapper made in the
                data-loader workers.

        Returns:
            B :class:`ImageFeatures`.
        """
        embeddings, sizes = self.localizer.encode(images, sam_inputs)
        return ImageFeatures.from_batch(images, embeddings, sizes, self.semantic_encoder.encode(images, clip_inputs))

    def propose(self, batched_inputs: List[Dict], features: Sequence[ImageFeatures],
                reports: Optional[Sequence[FilterReport]] = None) -> List[Instances]:
        """Step 3: the proposal generator's boxes for each image (:class:`RegionProposalGenerator`)."""
        return self.proposal_generator(batched_inputs, features, reports)

    def generate_proposals(self, source: str, features: Sequence[ImageFeatures],
                           reports: Optional[Sequence[FilterReport]] = None) -> List[Instances]:
        """Proposals of a source the model computes itself ("rpn", "sam_auto"), whatever
        ``PROPOSALS`` says (:meth:`RegionProposalGenerator.generate`)."""
        return self.proposal_generator.generate(source, features, reports)

    def prompt_boxes(self, features: Sequence[ImageFeatures], proposals: Sequence[Instances],
                     with_masks: bool = True) -> List[BoxPrompts]:
        """The localizer's prompt side on the proposal boxes of B images, all together:
        position-aware tokens and, with ``with_masks``, masks and predicted IoUs."""
        if not features:
            return []
        return self.localizer.prompt(stack_embeddings([f.sam_embedding for f in features]),
                                     [p.proposal_boxes.tensor for p in proposals],
                                     [f.image_size for f in features], with_masks)

    def region_embeddings(self, features: Sequence[ImageFeatures], prompts: Sequence[BoxPrompts],
                          return_attention: bool = False):
        """The head on the position-aware tokens of B images: L2-normalised region embeddings.

        Args:
            features: B :class:`ImageFeatures` (their semantic feature maps are attended).
            prompts: B :class:`BoxPrompts` (tokens (N_i, T)).
            return_attention: also return each region's cross-attention weights
                (:meth:`RegionSpotHead.embed_regions`; nothing is recorded without it).

        Returns:
            B tensors (N_i, E) float32, rows of unit L2 norm (in the vision-language model's
            joint space); with ``return_attention``, ``(embeddings, attention)`` with B tensors
            (N_i, num_layers, L) float32 (None for an image without regions).
        """
        keep = [i for i, pr in enumerate(prompts) if pr.tokens.shape[0] > 0]
        embeddings = [torch.zeros(0, self.semantic_encoder.embed_dim, device=self.device) for _ in prompts]
        attention: List[Optional[torch.Tensor]] = [None] * len(prompts)
        if keep:
            semantic = torch.stack([features[i].semantic for i in keep])
            out = self.head.embed_regions([prompts[i].tokens for i in keep], semantic,
                                          return_attention=return_attention)
            out, maps = out if return_attention else (out, [None] * len(keep))
            for i, e, a in zip(keep, out, maps):
                embeddings[i] = F.normalize(e.float(), dim=-1)
                attention[i] = a
        return (embeddings, attention) if return_attention else embeddings

    def recognize(self, features: Sequence[ImageFeatures], proposals: Sequence[Instances],
                  text_embeddings: torch.Tensor, prompts: Optional[Sequence[BoxPrompts]] = None,
                  with_masks: bool = True, return_attention: bool = False) -> List[RegionRecognition]:
        """Step 4: position-aware tokens of each proposal, the head, and logits.

        Args:
            features: B :class:`ImageFeatures`.
            proposals: B ``Instances`` with ``proposal_boxes`` in the frame of each image.
            text_embeddings: (C, E) float32 text embeddings on the model's device.
            prompts: the :meth:`prompt_boxes` of these proposals, if already computed.
            with_masks: compute SAM's masks and predicted IoUs too (:meth:`needs_sam_masks`).
            return_attention: record the head's cross-attention weights
                (``RegionRecognition.attention``); off, nothing is recorded.

        Returns:
            B :class:`RegionRecognition` (with the region embeddings).
        """
        prompts = prompts if prompts is not None else self.prompt_boxes(features, proposals, with_masks)
        if return_attention:
            embeddings, attention = self.region_embeddings(features, prompts, return_attention=True)
        else:
            embeddings, attention = self.region_embeddings(features, prompts), [None] * len(prompts)
        # e = F.normalize(head output): the released logits (region_logits of the head output), bit for bit
        logits = [region_logits(e, text_embeddings, self.logit_scale, normalized=True) for e in embeddings]
        return [RegionRecognition(p, lg, pr.iou_predictions, pr.low_res_masks, f.sam_input_size, e, a)
                for f, p, pr, lg, e, a in zip(features, proposals, prompts, logits, embeddings, attention)]

    @torch.no_grad()
    def postprocess(self, recognition: RegionRecognition, output_size: Tuple[int, int],
                    protocol: Optional[RecognitionProtocol] = None, mask_on: Optional[bool] = None,
                    report: Optional[FilterReport] = None) -> Instances:
        """Step 5: scored detections of one image in the output frame
        (:func:`~regionspot.modeling.postprocess.detections_to_instances`).

        Args:
            recognition: the image's :class:`RegionRecognition`.
            output_size: (H_out, W_out) to report boxes and masks in (the original image).
            protocol: scoring and selection (default: the model's, from the config).
            mask_on: paste masks (default: ``MODEL.MASK_ON``): the ``sam_auto`` mask if the
                proposal has one, else SAM's box-prompted mask.
            report: the image's filter report (the selection steps add what they removed).

        Raises:
            RuntimeError: masks asked for, but SAM's masks were not computed.
        """
        proposals = recognition.proposals
        mask_on = self.mask_on if mask_on is None else mask_on

        def masks_of(kept: torch.Tensor) -> torch.Tensor:
            if proposals.has("proposal_masks"):
                return resize_masks(proposals.proposal_masks[kept], output_size)
            if recognition.low_res_masks is None:
                raise RuntimeError("masks were asked for but SAM's masks were not computed: recognise with "
                                   "with_masks=True (RegionSpot.needs_sam_masks)")
            return self.localizer.paste_masks(recognition.low_res_masks[kept], recognition.sam_input_size,
                                              output_size)

        return detections_to_instances(proposals, recognition.logits, recognition.proposal_scores,
                                       recognition.iou_predictions, output_size, protocol or self.protocol,
                                       masks_of=masks_of if mask_on else None, report=report)

    def inference(self, features: Sequence[ImageFeatures], proposals: Sequence[Instances],
                  text_embeddings: torch.Tensor, output_sizes: Sequence[Tuple[int, int]],
                  protocol: Optional[RecognitionProtocol] = None, mask_on: Optional[bool] = None,
                  reports: Optional[Sequence[FilterReport]] = None) -> List[Instances]:
        """Steps 4-5 for B encoded images: :meth:`recognize` (SAM's masks only if
        :meth:`needs_sam_masks`), then :meth:`postprocess` each (with its report, if given)."""
        recognitions = self.recognize(features, proposals, text_embeddings,
                                      with_masks=self.needs_sam_masks(protocol, mask_on))
        reports = reports or [None] * len(recognitions)
        return [self.postprocess(r, size, protocol, mask_on, report)
                for r, size, report in zip(recognitions, output_sizes, reports)]

    # ----------------------------------------------------------------- forward
    def forward(self, batched_inputs: List[Dict]):
        """Training: dict of losses. Inference: list of {"instances": Instances, "filters":
        FilterReport} (see the class docstring).

        Raises:
            RuntimeError: no vocabulary (neither the config's nor :meth:`set_vocabulary`'s).
            ValueError: a bad image tensor, or an input without the boxes its source needs.
        """
        images = check_images(batched_inputs)
        if self.training:
            return self.losses(batched_inputs, images)
        vocabulary = self.vocabularies.for_inference(self.device)  # the config's is encoded on first use
        features = self.encode_images(images, [x.get("sam_input") for x in batched_inputs],
                                      [x.get("clip_input") for x in batched_inputs])
        reports = [report_of_input(x) for x in batched_inputs]  # + a proposal file's selection
        proposals = self.propose(batched_inputs, features, reports)
        sizes = [(x.get("height", f.image_size[0]), x.get("width", f.image_size[1]))
                 for x, f in zip(batched_inputs, features)]
        results = self.inference(features, proposals, vocabulary.text_embeddings, sizes, reports=reports)
        return [{"instances": r, "filters": report} for r, report in zip(results, reports)]

    # ----------------------------------------------------------------- training
    def losses(self, batched_inputs: List[Dict], images: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The criterion on every region of the batch, each image against its own dataset's
        vocabulary (paper Sec. 3, :class:`~regionspot.modeling.losses.RegionSpotCriterion`).

        Raises:
            ValueError: an input without "instances" (gt_boxes and gt_classes).
        """
        missing = [x.get("file_name", "?") for x in batched_inputs if "instances" not in x]
        if missing:
            raise ValueError(f"image {missing[0]!r} has no 'instances': training needs gt_boxes and gt_classes")
        vocabularies = [self.vocabularies.for_training(x) for x in batched_inputs]
        tokens = self.localizer.training_tokens(batched_inputs, images)
        keep = [i for i, t in enumerate(tokens) if t.shape[0] > 0]
        if not keep:  # keep every head parameter in the graph (DDP) with a zero loss
            return {"loss_region_focal": sum(p.sum() for p in self.head.parameters()) * 0.0}
        semantic = self.semantic_encoder.encode([images[i] for i in keep],
                                                [batched_inputs[i].get("clip_input") for i in keep])
        embeddings = self.head.embed_regions([tokens[i] for i in keep], semantic)
        logits = [region_logits(e, vocabularies[i].text_embeddings, self.logit_scale) for i, e in zip(keep, embeddings)]
        return self.criterion(logits, [batched_inputs[i] for i in keep], [vocabularies[i] for i in keep])
