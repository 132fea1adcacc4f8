"""Checkpoints of the trainable head: ours and the authors' released files.

SAM and CLIP are frozen and loaded from their official files, so a RegionSpot checkpoint
holds only the head. Two layouts load:
- ours: ``{"model": {"head.to_clip.weight", ...}, "optimizer", "scheduler", "iteration"}``;
- the released one (docs/method.md §4): head keys under ``model.`` (``model.to_clip.weight``,
  ``model.decoder.layers.0...``, ``model.projector.*``), possibly with the frozen
  ``model.sam.*`` / ``model.clip_model.*`` tensors, ``trainer`` and ``iteration`` entries.
Loading for inference or evaluation (``strict=True``, the default) refuses a file that leaves
any head parameter missing or holds head parameters this head does not have (another model's
checkpoint, SAM's own weights, a head of another depth), naming the keys; a shape mismatch is
always an error. Training (``strict=False``: initialising or ``--resume``) keeps Detectron2's
behaviour of loading what fits and logging the rest.
Files are written atomically (temporary file, then rename), so an interrupted save never
leaves a truncated checkpoint behind.
"""

import io
import os
from typing import Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys

from .io import atomic_write_bytes

HEAD_PREFIX = "head."
# Released layout: the core module is `self.model`, holding the head and the frozen encoders.
RELEASED_PREFIX = "model."
# The frozen parts of RegionSpot (their weights come from SAM_WEIGHTS, CLIP_WEIGHTS,
# RPN_WEIGHTS): the localizer, the semantic encoder and the proposal generator's RPN.
FROZEN_MODULES = ("localizer.", "semantic_encoder.", "proposal_generator.")
# Keys never taken from a checkpoint: the released file's frozen encoders, the frozen parts,
# and the frozen parts under their names before the components split (position., semantic., rpn.).
FROZEN_PREFIXES = ("model.sam.", "model.clip_model.") + FROZEN_MODULES + ("position.", "semantic.", "rpn.")


# The foundation models of the released checkpoints (and of every checkpoint written before
# checkpoints recorded their pair): what a checkpoint without "regionspot_pair" was trained on.
RELEASED_PAIR = {"localizer": "sam", "vl_model": "openai_clip"}


def register_head_only_state(model: torch.nn.Module) -> None:
    """Make ``model.state_dict()`` / ``load_state_dict`` speak RegionSpot's checkpoint layout, for
    any checkpointer (Detectron2's ``DetectionCheckpointer`` too):

    - saving keeps only the head (the frozen parts are read from their official files: ~100 MB
      for BL instead of ~1 GB);
    - loading maps the released layout (head keys under ``model.``, docs/method.md §4) to
      ``head.*`` and drops its frozen tensors;
    - the frozen parts are never reported missing: only head keys are.
    """
    def drop_frozen(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(tuple(prefix + p for p in FROZEN_MODULES))]:
            del state_dict[key]

    def map_released(state_dict, prefix, *args):
        released = prefix + RELEASED_PREFIX
        for key in [k for k in state_dict if k.startswith(released)]:
            value = state_dict.pop(key)
            if not key[len(prefix):].startswith(FROZEN_PREFIXES):
                state_dict[prefix + HEAD_PREFIX + key[len(released):]] = value

    def ignore_frozen_missing(module, incompatible_keys):
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]

    model._register_state_dict_hook(drop_frozen)
    model._register_load_state_dict_pre_hook(map_released)
    model.register_load_state_dict_post_hook(ignore_frozen_missing)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded into the RegionSpot head."""


def head_state_from_checkpoint(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map a checkpoint's model state (ours or released) to ``head.*`` keys.

    Keys of the frozen encoders are dropped (they come from the official SAM/CLIP files);
    ``module.`` prefixes (DDP) are stripped. Keys that fit no layout are kept unchanged so the
    caller reports them as unexpected.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith(FROZEN_PREFIXES):
            continue
        if key.startswith(RELEASED_PREFIX):
            key = HEAD_PREFIX + key[len(RELEASED_PREFIX):]
        out[key] = value
    return out


class RegionSpotCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer, restricted to the head, atomic, and strict about what it loads.

    Use it wherever Detectron2 uses :class:`DetectionCheckpointer` (``--resume``,
    ``MODEL.WEIGHTS``, periodic checkpoints). The model must be a
    :class:`regionspot.modeling.meta_arch.RegionSpot` (or DDP-wrapped one).

    Args:
        model, save_dir, save_to_disk, checkpointables: as Detectron2's checkpointer.
        strict: refuse a checkpoint that misses head parameters or has unexpected ones
            (inference and evaluation); False loads what fits and logs the rest (training).
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = True, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.strict = strict
        self._source = None

    def save(self, name: str, **kwargs) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically: head weights, checkpointables, ``kwargs``.

        Raises:
            DiskFullError: no room for the file (checked before writing; the message names the
                folder, the bytes needed and free); ``last_checkpoint`` still names the previous one.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": {HEAD_PREFIX + k: v for k, v in self.model.head.state_dict().items()},
                "regionspot_pair": dict(getattr(self.model, "pair", RELEASED_PAIR))}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        buffer = io.BytesIO()  # the size is known before the disk is touched; a full disk is
        torch.save(data, buffer)  # a DiskFullError, not torch's "unexpected pos" zip error
        atomic_write_bytes(path, buffer.getvalue())
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Atomically record the newest checkpoint's name in ``<save_dir>/last_checkpoint``."""
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write_bytes(path, last_filename_basename.encode("utf-8"))

    def load(self, path: str, checkpointables=None):
        """Load ``path`` (see :meth:`_load_model`); a missing local file is a clear error."""
        if path and "://" not in path and not os.path.isfile(os.path.expanduser(path)):
            raise CheckpointError(f"RegionSpot checkpoint not found: {path!r} (MODEL.WEIGHTS); give the path of a "
                                  f"released RegionSpot checkpoint or of one written by train_net.py")
        self._source = path
        return super().load(os.path.expanduser(path) if path else path, checkpointables)

    def _load_file(self, f: str):
        try:
            return super()._load_file(f)
        except Exception as e:
            if _is_torchscript(f):
                raise CheckpointError(
                    f"{self._source or f!r} (MODEL.WEIGHTS) is a TorchScript archive, as OpenAI CLIP publishes its "
                    f"models (ViT-B-16.pt, ...), not a RegionSpot head: pass it as MODEL.REGIONSPOT.CLIP_WEIGHTS, and "
                    f"MODEL.WEIGHTS a RegionSpot checkpoint") from None
            raise CheckpointError(f"cannot read checkpoint {f!r}: {type(e).__name__}: {_one_line(e)}") from None

    def _load_model(self, checkpoint) -> _IncompatibleKeys:
        state = checkpoint.pop("model")
        if not isinstance(state, dict):
            raise CheckpointError("checkpoint has no model state dict under 'model'")
        self._convert_ndarray_to_tensor(state)
        pair = checkpoint.get("regionspot_pair") or RELEASED_PAIR
        model_pair = getattr(self.model, "pair", RELEASED_PAIR)
        if dict(pair) != dict(model_pair):
            raise CheckpointError(
                f"{self._source!r} (MODEL.WEIGHTS) is a head trained on {_pair_text(pair)}, but this model is "
                f"{_pair_text(model_pair)}: its region embeddings live in another space; use a head trained on "
                f"this pair (MODEL.REGIONSPOT.LOCALIZER / VL_MODEL)")
        given = head_state_from_checkpoint(state)
        expected = {HEAD_PREFIX + k: v for k, v in self.model.head.state_dict().items()}
        wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in given.items()
                 if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        if wrong:
            shown = "; ".join(f"{k}: {s} in the checkpoint, {m} in the model" for k, s, m in wrong[:3])
            raise CheckpointError(
                f"{self._source!r} (MODEL.WEIGHTS) does not fit this RegionSpot head: {len(wrong)} shape "
                f"mismatches ({shown}{'; ...' if len(wrong) > 3 else ''}); check that CLIP_WEIGHTS and the head "
                f"settings match the checkpoint's variant")
        missing = sorted(k for k in expected if k not in given)
        unexpected = sorted(k for k in given if k not in expected)
        if self.strict and (missing or any(k.startswith(HEAD_PREFIX) for k in unexpected)):
            foreign = identify_foreign_weights(state)
            if foreign and len(missing) == len(expected):
                raise CheckpointError(f"{self._source!r} (MODEL.WEIGHTS) is not a RegionSpot head: {foreign}")
            raise CheckpointError(
                f"{self._source!r} (MODEL.WEIGHTS) is not a checkpoint of this RegionSpot head: {len(missing)} of "
                f"its {len(expected)} parameter tensors are missing ({_some(missing, 3)}), {len(unexpected)} keys are "
                f"unexpected ({_some(unexpected, 3)}); expected a released RegionSpot checkpoint or one written by "
                f"train_net.py, of the same variant (CLIP_WEIGHTS, NUM_DECODER_LAYERS, TOKEN_SOURCE)")
        merged = dict(expected)
        merged.update({k: v for k, v in given.items() if k in expected})
        self.model.head.load_state_dict({k[len(HEAD_PREFIX):]: v for k, v in merged.items()})
        layout = "released" if any(k.startswith(RELEASED_PREFIX) for k in state) else "RegionSpot for Detectron2"
        self.logger.info("Loaded the RegionSpot head from %s (%s layout): %d of %d tensors, %d parameters",
                         self._source, layout, len(expected) - len(missing), len(expected),
                         sum(v.numel() for k, v in given.items() if k in expected))
        return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected, incorrect_shapes=[])


def identify_foreign_weights(state: Dict[str, object]):
    """Name a well-known weights file that is not a RegionSpot head, and where it belongs.

    Args:
        state: the file's model state dict (keys as stored; a DDP ``module.`` prefix allowed).

    Returns:
        A sentence naming what the file holds and the config key it belongs to, or None when
        the keys match no known layout. Recognised by their key layouts: SAM's (and SAM-HQ's)
        ``image_encoder.* / prompt_encoder.* / mask_decoder.*``; OpenAI CLIP's state dict
        (``visual.*``, ``token_embedding.*``, ``logit_scale``); a Detectron2 model (``backbone.*``
        with ``proposal_generator.*`` and/or ``roi_heads.*``).
    """
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state]
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("image_encoder.") and has("mask_decoder.") and has("prompt_encoder."):
        return ("this is SAM's image encoder + prompt encoder + mask decoder (a segment-anything checkpoint such "
                "as sam_vit_b_01ec64.pth): pass it as MODEL.REGIONSPOT.SAM_WEIGHTS, and MODEL.WEIGHTS a RegionSpot "
                "checkpoint")
    if has("visual.") and (has("token_embedding.") or "logit_scale" in keys):
        return ("this is a CLIP model's state dict (image and text towers): pass the official CLIP file as "
                "MODEL.REGIONSPOT.CLIP_WEIGHTS, and MODEL.WEIGHTS a RegionSpot checkpoint")
    if has("backbone.") and (has("proposal_generator.") or has("roi_heads.")):
        where = ("if you meant its RPN as the proposal source, pass it as MODEL.REGIONSPOT.RPN_WEIGHTS with "
                 "MODEL.REGIONSPOT.PROPOSALS rpn; " if has("proposal_generator.") else "")
        return (f"this is a Detectron2 detection model (backbone{', RPN' if has('proposal_generator.') else ''}"
                f"{', ROI heads' if has('roi_heads.') else ''}): {where}MODEL.WEIGHTS must be a RegionSpot "
                f"checkpoint")
    return None


def _is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``*/constants.pkl``)."""
    import zipfile

    try:
        with zipfile.ZipFile(os.path.expanduser(path)) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _pair_text(pair) -> str:
    return f"localizer {pair.get('localizer')!r} + vision-language model {pair.get('vl_model')!r}"


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _some(keys, n: int = 6) -> str:
    """The first ``n`` keys, for messages."""
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") if keys else "none"

