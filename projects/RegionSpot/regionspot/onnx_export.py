"""Export a RegionSpot model to ONNX: the folder that :mod:`regionspot.deploy` runs on ONNX Runtime.

``regionspot-export onnx`` (:mod:`regionspot.tools.export_onnx`) calls :func:`export_onnx`, which
writes one folder:

- ``localizer_image_encoder.onnx``: the localizer's image side (the family's
  :meth:`~regionspot.modeling.localizer.Localizer.onnx_modules`), pixels -> embedding(s);
- ``localizer_prompt.onnx``: embedding(s) + N boxes (dynamic N) -> position-aware tokens (N, T),
  low-resolution mask logits and predicted IoUs;
- ``semantic_encoder.onnx``: the image (any size, [0, 255]) -> CLIP's resize and normalisation
  -> the semantic feature map (1, L, D);
- ``head.onnx``: tokens (N, T) + feature map + text embeddings (C, E) (dynamic N and C) ->
  logits (N, C) and unit region embeddings (N, E);
- ``text_encoder.onnx``: token ids (B, context) -> unnormalised text features (B, E);
- ``tokenizer.json``: the text model's BPE tokenizer for the ``tokenizers`` library (no torch);
- ``text_embeddings.npy`` + ``vocabulary.json``: the config's vocabulary, already encoded;
- ``manifest.json``: the pair, the parts' identities and sizes, pixel means, the protocol, the
  head's checkpoint hash, what exported it (versions, opset, exporter per file).

Every file goes through ``torch.onnx.export`` (the dynamo exporter; the TorchScript exporter when
dynamo fails on a part) at opset :data:`OPSET`, then ``onnx.checker``. The folder is written
under a temporary name beside the target and renamed at the end: a failed export leaves no folder.
What cannot be exported is refused with :class:`ExportRefused`, one line naming the part and why.
"""

import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .io import sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

OPSET = 18
FORMAT = "regionspot-onnx"
FORMAT_VERSION = 1
FILES = {
    "localizer_image_encoder": "localizer_image_encoder.onnx",
    "localizer_prompt": "localizer_prompt.onnx",
    "semantic_encoder": "semantic_encoder.onnx",
    "head": "head.onnx",
    "text_encoder": "text_encoder.onnx",
}


class ExportRefused(ValueError):
    """A part of the model cannot be exported; the message names the part and the reason."""


class _SemanticExport(nn.Module):
    """The semantic encoder's whole image side: (1, 3, H, W) float32 RGB in [0, 255] -> /255,
    bilinear resize to S x S (``resize_for_clip``), normalise, feature map (1, L, D) float32."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = self.encoder.input_size
        x = F.interpolate(image / 255.0, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=self.encoder.antialias)
        return self.encoder((x - self.encoder.pixel_mean) / self.encoder.pixel_std).float()


class _HeadExport(nn.Module):
    """The head and the logits of one image: tokens (N, T), feature map (1, L, D), text
    embeddings (C, E) -> (logits (N, C), unit region embeddings (N, E)), as
    ``RegionSpot.region_embeddings`` and ``region_logits(normalized=True)`` compute them."""

    def __init__(self, head: nn.Module, logit_scale: float):
        super().__init__()
        self.head = head
        self.logit_scale = float(logit_scale)

    def forward(self, tokens: torch.Tensor, semantic: torch.Tensor, text_embeddings: torch.Tensor):
        embeddings = F.normalize(self.head(tokens[None], semantic)[0].float(), dim=-1)
        return self.logit_scale * embeddings @ text_embeddings.float().t(), embeddings


class _TextExport(nn.Module):
    """The text tower: (B, context) int64 token ids -> (B, E) float32 unnormalised features
    (``encode_text``)."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip = clip_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens).float()


def _first_line(error: BaseException) -> str:
    """The error's type and first line, without terminal colour codes, at most 300 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _export(part: str, module: nn.Module, args: tuple, path: str, input_names: List[str],
            output_names: List[str], dynamic: Dict[str, Dict[int, str]]) -> Tuple[str, List[str]]:
    """``torch.onnx.export`` of one part (dynamo first, TorchScript if dynamo fails), then
    ``onnx.checker``. Returns (the exporter used, why the ones before it failed). Raises
    :class:`ExportRefused`."""
    import onnx

    dims = tuple({axis: torch.export.Dim.DYNAMIC for axis in dynamic[name]} if name in dynamic else None
                 for name in input_names)  # positional: argument names need not be the inputs'
    parameters = list(inspect.signature(module.forward).parameters.values())
    if len(parameters) == 1 and parameters[0].kind == inspect.Parameter.VAR_POSITIONAL:
        dims = (dims,)  # forward(*inputs): torch.export sees one argument, the tuple
    errors = []
    for exporter in ("dynamo", "torchscript"):
        try:
            if exporter == "dynamo":
                torch.onnx.export(module, args, path, dynamo=True, dynamic_shapes=dims, input_names=input_names,
                                  output_names=output_names, opset_version=OPSET, verbose=False)
            else:
                torch.onnx.export(module, args, path, dynamo=False, input_names=input_names,
                                  output_names=output_names, opset_version=OPSET, dynamic_axes=dynamic)
            onnx.checker.check_model(path, full_check=True)
            return exporter, errors
        except ExportRefused:
            raise
        except Exception as e:  # noqa: BLE001 (any exporter failure: try the other, then refuse)
            errors.append(f"{exporter}: {_first_line(e)}")
            if os.path.exists(path):
                os.remove(path)
    raise ExportRefused(f"cannot export {part}: " + "; ".join(errors))


def bpe_tables(tokenizer) -> Optional[dict]:
    """The BPE vocabulary and merges of a CLIP ``SimpleTokenizer`` (OpenAI ``clip``'s, or
    OpenCLIP's), or None for another tokenizer: ``{"vocab": {token: id}, "merges": [(a, b)...],
    "specials": [start token, end token], "sot": id, "eot": id}``."""
    encoder, ranks = getattr(tokenizer, "encoder", None), getattr(tokenizer, "bpe_ranks", None)
    if not isinstance(encoder, dict) or not isinstance(ranks, dict):
        return None
    decoder = {v: k for k, v in encoder.items()}
    sot = getattr(tokenizer, "sot_token_id", encoder.get("<|startoftext|>"))
    eot = getattr(tokenizer, "eot_token_id", encoder.get("<|endoftext|>"))
    if sot not in decoder or eot not in decoder:
        return None
    return {"vocab": dict(encoder), "merges": sorted(ranks, key=ranks.get), "specials": [decoder[sot], decoder[eot]],
            "sot": int(sot), "eot": int(eot)}


def write_tokenizer(tables: dict, path: str) -> None:
    """A ``tokenizers`` tokenizer (``tokenizer.json``) with CLIP's BPE: the text split as CLIP's
    ``SimpleTokenizer`` splits it (its regular expression), bytes mapped to unicode, BPE with
    the ``</w>`` end-of-word suffix. Cleaning (ftfy, HTML unescape, whitespace, lower case) and
    the start/end tokens are :mod:`regionspot.deploy`'s, as in ``SimpleTokenizer.encode``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    bpe = models.BPE(vocab=tables["vocab"], merges=[tuple(m) for m in tables["merges"]], continuing_subword_prefix="",
                     end_of_word_suffix="</w>", fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    pattern = "|".join(re.escape(s) for s in tables["specials"]) + \
        r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.save(path)


def _text_tokenizer(model) -> dict:
    tokenizer = model.text_classifier.tokenizer
    if tokenizer is None:
        from clip.simple_tokenizer import SimpleTokenizer

        tokenizer = SimpleTokenizer()
    tables = bpe_tables(tokenizer)
    if tables is None:
        raise ExportRefused(f"cannot export the tokenizer: {type(tokenizer).__name__} is not CLIP's BPE "
                            f"SimpleTokenizer (Hugging Face tokenizers such as SigLIP's are not exported yet)")
    clean = getattr(tokenizer, "clean_fn", None)
    if clean is not None and getattr(clean, "__name__", "") != "_clean_lower":
        raise ExportRefused(f"cannot export the tokenizer: its cleaning {getattr(clean, '__name__', clean)!r} is "
                            f"not CLIP's lower-casing")
    if getattr(tokenizer, "reduction_fn", None) is not None:
        raise ExportRefused("cannot export the tokenizer: it reduces long texts with a reduction_mask, not by cutting")
    return tables


def _versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("regionspot", "torch", "onnx", "onnxscript", "onnxruntime", "tokenizers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def export_onnx(predictor, output_dir: str, *, vocabulary: Optional[Sequence[str]] = None,
                log: Callable[[str], None] = logger.info) -> dict:
    """Export a :class:`~regionspot.predictor.RegionSpotPredictor`'s model to an ONNX folder.

    Args:
        predictor: the predictor (its model on the CPU, float32; its ``weights`` recorded).
        output_dir: the folder to create; it must not exist.
        vocabulary: class names whose text embeddings are written (default: the model's
            config vocabulary, if it has one).
        log: where progress lines go.

    Returns:
        The manifest (also written as ``manifest.json``).

    Raises:
        ExportRefused: ``output_dir`` exists, or a part cannot be exported (one line each).
    """
    model = predictor.model
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir):
        raise ExportRefused(f"the output folder {output_dir} exists: choose a new one (nothing is overwritten)")
    if model.device.type != "cpu":
        raise ExportRefused(f"the model is on {model.device}: export from the CPU (MODEL.DEVICE cpu)")
    localizer, encoder = model.localizer, model.semantic_encoder
    try:
        parts = localizer.onnx_modules()
    except NotImplementedError as e:
        raise ExportRefused(f"cannot export the localizer: {e}") from None
    tables = _text_tokenizer(model)
    for name in ("pixel_mean", "pixel_std", "input_size", "antialias"):
        if not hasattr(encoder, name):
            raise ExportRefused(f"cannot export the semantic encoder: {type(encoder).__name__} has no {name}")
    names = list(vocabulary) if vocabulary is not None else model.class_names or model.vocabularies.pending
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes 0700; the folder gets the usual mode
    try:
        manifest = _write_folder(predictor, parts, tables, names, work, log)
        os.rename(work, output_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"wrote {output_dir} ({len(FILES)} ONNX files, opset {OPSET})")
    return manifest


@torch.no_grad()
def _write_folder(predictor, parts, tables: dict, names, work: str, log) -> dict:
    model = predictor.model
    localizer, encoder, clip_model = model.localizer, model.semantic_encoder, model.text_classifier.clip
    previous_attention = localizer.attention
    model.eval()
    exporters, seconds, notes = {}, {}, {}
    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.uniform(0, 255, (1, 3, 200, 300)).astype(np.float32))
    size = localizer.input_size
    try:
        localizer.set_attention("official")  # the same result up to rounding; plain ops for the exporter
        if parts.host_resize == "longest_side":
            pixels = F.interpolate(image, size=(int(200 * size / 300 + 0.5), size), mode="bilinear")
        else:
            pixels = image
        embeddings = parts.image_encoder(pixels)
        steps = [
            ("localizer_image_encoder", "the localizer's image encoder", parts.image_encoder, (pixels,), ["pixels"],
             list(parts.embedding_names), {"pixels": {2: "height", 3: "width"}}),
            ("localizer_prompt", "the localizer's prompt path", parts.prompt,
             (*embeddings, torch.tensor([[10.0, 20.0, 120.0, 150.0], [0.0, 0.0, 300.0, 200.0],
                                         [50.0, 60.0, 70.0, 90.0]]), torch.tensor([200.0, 300.0])),
             [*parts.embedding_names, "boxes", "image_size"], ["tokens", "low_res_masks", "iou_predictions"],
             {"boxes": {0: "num_boxes"}}),
            ("semantic_encoder", "the semantic encoder", _SemanticExport(encoder), (image,), ["image"],
             ["semantic_features"], {"image": {2: "height", 3: "width"}}),
            ("head", "the head", _HeadExport(model.head, model.logit_scale),
             (torch.randn(3, localizer.token_dim), torch.randn(1, encoder.num_tokens, encoder.width),
              F.normalize(torch.randn(5, encoder.embed_dim), dim=-1)),
             ["tokens", "semantic_features", "text_embeddings"], ["logits", "region_embeddings"],
             {"tokens": {0: "num_boxes"}, "text_embeddings": {0: "num_classes"}}),
            ("text_encoder", "the text tower", _TextExport(clip_model),
             (torch.randint(1, 400, (2, int(getattr(clip_model, "context_length", 77)))),),
             ["text_tokens"], ["text_features"], {"text_tokens": {0: "num_texts"}}),
        ]
        for key, part, module, args, inputs, outputs, dynamic in steps:
            start = time.perf_counter()
            exporters[key], failed = _export(part, module.eval(), args, os.path.join(work, FILES[key]), inputs,
                                             outputs, dynamic)
            if failed:
                notes[key] = failed
            seconds[key] = round(time.perf_counter() - start, 3)
            log(f"exported {part} -> {FILES[key]} ({exporters[key]} exporter, {seconds[key]:.1f} s)")
    finally:
        localizer.set_attention(previous_attention)
    write_tokenizer(tables, os.path.join(work, "tokenizer.json"))
    text = {"tokenizer": "tokenizer.json", "sot": tables["sot"], "eot": tables["eot"],
            "context_length": int(getattr(clip_model, "context_length", 77)),
            "templates": list(model.text_classifier.templates),
            "class_name_style": model.text_classifier.class_name_style}
    if names:
        embeddings = predictor.text_embeddings_for(names).float().cpu().numpy()
        np.save(os.path.join(work, "text_embeddings.npy"), embeddings)
        write_json_atomic(os.path.join(work, "vocabulary.json"), list(names))
        text.update(vocabulary="vocabulary.json", embeddings="text_embeddings.npy")
    weights = predictor.weights or ""
    protocol = predictor.protocol
    resize = predictor.resize
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "opset": OPSET,
        "pair": dict(model.pair),
        "files": dict(FILES), "exporters": exporters, "exporter_failures": notes, "export_seconds": seconds,
        "image_resize": {"min_size": int(resize.short_edge_length[0]), "max_size": int(resize.max_size)},
        "localizer": {"family": localizer.family, "pair_name": localizer.pair_name,
                      "identity": {k: str(v) for k, v in localizer.identity.items()},
                      "input_size": int(size), "token_dim": int(localizer.token_dim),
                      "token_source": localizer.token_source, "embedding_names": list(parts.embedding_names),
                      "host_resize": parts.host_resize, "mask_paste": parts.mask_paste,
                      "mask_threshold": float(parts.mask_threshold),
                      **({"pixel_mean": localizer.sam.pixel_mean.flatten().tolist(),
                          "pixel_std": localizer.sam.pixel_std.flatten().tolist()}
                         if hasattr(localizer.sam, "pixel_mean") else {})},
        "semantic_encoder": {"vl_model": model.pair.get("vl_model"), "class": type(encoder).__name__,
                             "input_size": int(encoder.input_size), "antialias": bool(encoder.antialias),
                             "pixel_mean": encoder.pixel_mean.flatten().tolist(),
                             "pixel_std": encoder.pixel_std.flatten().tolist(),
                             "num_tokens": int(encoder.num_tokens), "width": int(encoder.width),
                             "embed_dim": int(encoder.embed_dim)},
        "protocol": {"selection": "per_box", "class_score": protocol.class_score,
                     "proposal_score_power": float(protocol.proposal_score_power)},
        "logit_scale": float(model.logit_scale),
        "text": text,
        "head": {"weights": os.path.basename(weights) if weights else "",
                 "sha256": sha256_file(weights) if weights and os.path.isfile(weights) else "untrained"},
        "versions": _versions(),
    }
    write_json_atomic(os.path.join(work, "manifest.json"), manifest)
    with open(os.path.join(work, "manifest.json"), encoding="utf-8") as f:
        json.load(f)
    return manifest
