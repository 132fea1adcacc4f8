"""The web app's logic without Gradio (``regionspot-app``, :mod:`regionspot.tools.app`, builds the page around it;
``regionspot-benchmark app`` times it): sessions, each with its own
:class:`~regionspot.predictor.RegionSpotPredictor` around one shared model, the image encoded
once per upload, prompts (two-click boxes, clicked points, "everything"), recognition, drawing,
the top-5 table, attention maps and the JSON of the predictions.
"""

import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np

logger = logging.getLogger("regionspot.webapp")

SAMPLE_CONFIG = "regionspot_sample_cpu.yaml"  # a bundled config (regionspot.model_zoo)
BUNDLED = {  # name shown -> regionspot.data.datasets.regionspot_sample.load_sample_image source
    "astronaut": "skimage.data.astronaut", "cat (chelsea)": "skimage.data.chelsea", "coffee": "skimage.data.coffee",
    "rocket": "skimage.data.rocket", "motorcycle": "skimage.data.stereo_motorcycle",
    "china": "sklearn.datasets.load_sample_images:china.jpg",
}
MODES = ("Everything (sam_auto)", "Boxes (click two corners)", "Points (click the object)")
EVERYTHING, BOXES, POINTS = MODES
PRESETS = ("lvis", "coco", "objects365")
SAMPLE_BANNER = ("**Random weights.** SAM, CLIP and the head are the bundled sample's small *randomly initialised* "
                 "models: the labels and scores below mean nothing. Start the app with `--config-file` and "
                 "`--opts MODEL.WEIGHTS <checkpoint>` (and real SAM/CLIP weights) to recognise for real.")
TOP_K = 5


# ----------------------------------------------------------------------------- the model
def sample_config(folder: str, opts=()):
    """The sample CPU config with random tiny SAM/CLIP written under ``folder`` (once), SAM's
    automatic-mask quality thresholds at 0 (a random SAM's masks never pass the real ones).
    The random models come from :mod:`regionspot.testing` (as for ``tools/run_sample.py``)."""
    from regionspot.config import load_config
    from regionspot.testing.random_backbones import write_random_clip, write_random_sam

    sam = os.path.join(folder, "sam_random_tiny.pth")
    clip = os.path.join(folder, "clip_random_tiny.pt")
    if not os.path.exists(sam):
        write_random_sam(sam, "tiny", seed=0)
    if not os.path.exists(clip):
        write_random_clip(clip, "tiny", seed=0)
    return load_config(SAMPLE_CONFIG, ["MODEL.REGIONSPOT.SAM_WEIGHTS", sam, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip,
                                       "MODEL.REGIONSPOT.TEXT_CACHE_DIR", os.path.join(folder, "text_cache"),
                                       "MODEL.DEVICE", "cpu",
                                       # random SAM's predicted IoUs and stabilities are low: keep its masks
                                       "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH", "0.0",
                                       "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH", "0.0", *opts])


class Session:
    """One browser session: its own predictor around the shared model, image and results."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.image: Optional[np.ndarray] = None
        self.name = ""
        self.boxes: List[List[float]] = []
        self.corner: Optional[Tuple[float, float]] = None
        self.points: List[Tuple[float, float, int]] = []
        self.mask: Optional[np.ndarray] = None  # (H, W) bool mask prompt of one object (with Points)
        self.predictions = None
        self.folder = tempfile.mkdtemp(prefix="regionspot-app-")


class RegionSpotApp:
    """The app's logic, without Gradio (the page calls these; so does ``regionspot-benchmark app``).

    Args:
        model: a built RegionSpot model (shared by every session, never changed).
        min_size, max_size: the predictor's test-time resize.
        sample: True when the weights are the sample's random ones (the banner says so).
        max_pixels: largest image accepted.
        max_sessions: sessions kept (least recently used dropped).
    """

    def __init__(self, model, min_size: int, max_size: int, sample: bool = False, max_pixels: int = 40_000_000,
                 max_sessions: int = 16, deployed=None):
        self.model = model
        # --backend onnxruntime: an OnnxRegionSpotPredictor (regionspot.deploy) whose sessions every
        # browser session shares (boxes only: no proposals, clicks or attention maps); model is None.
        self.deployed = deployed
        self.min_size, self.max_size = min_size, max_size
        self.sample = sample
        self.max_pixels = max_pixels
        self.max_sessions = max_sessions
        self.sessions: "OrderedDict[str, Session]" = OrderedDict()
        self.lock = threading.Lock()  # one model computation at a time

    @classmethod
    def from_args(cls, args) -> "RegionSpotApp":
        """Build the model of the command line (the sample's random one without a config)."""
        import torch
        from detectron2.modeling import build_model

        from regionspot.checkpoint import RegionSpotCheckpointer
        from regionspot.config import load_config

        if getattr(args, "backend", "pytorch") == "onnxruntime":
            from regionspot.deploy import OnnxRegionSpotPredictor

            if not getattr(args, "onnx_dir", None):
                raise ValueError("--backend onnxruntime needs --onnx-dir FOLDER (written by regionspot-export onnx)")
            deployed = OnnxRegionSpotPredictor(args.onnx_dir)
            return cls(None, 0, 0, sample=deployed.manifest["head"]["sha256"] == "untrained",
                       max_pixels=args.max_pixels, max_sessions=args.max_sessions, deployed=deployed)
        sample = args.sample or not args.config_file
        if sample:
            cfg = sample_config(args.sample_dir, args.opts)
        else:
            cfg = load_config(args.config_file, args.opts)
            if not cfg.MODEL.WEIGHTS and not args.untrained_head:
                raise ValueError("MODEL.WEIGHTS is empty: add --opts MODEL.WEIGHTS FILE, or --untrained-head on "
                                 "purpose (or run without --config-file for the sample's random weights)")
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        if cfg.MODEL.WEIGHTS:
            RegionSpotCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        return cls(model, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, sample=sample or not cfg.MODEL.WEIGHTS,
                   max_pixels=args.max_pixels, max_sessions=args.max_sessions)

    def session(self, key: str) -> Session:
        """The session ``key`` (a browser session's hash), created on first use."""
        from regionspot.predictor import RegionSpotPredictor

        if key not in self.sessions:
            self.sessions[key] = Session(self.deployed.fork() if self.deployed is not None else
                                         RegionSpotPredictor(self.model, self.min_size, self.max_size))
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(key)
        return self.sessions[key]

    def forget(self, key: str) -> None:
        self.sessions.pop(key, None)

    # ------------------------------------------------------------------------- image
    def set_image(self, key: str, path: Optional[str] = None, bundled: Optional[str] = None,
                  progress=None) -> str:
        """Read and encode the session's image (a file or a bundled photo); returns a status line.

        Raises:
            InputError: not an image, or larger than ``max_pixels``.
        """
        from regionspot.data.datasets.regionspot_sample import load_sample_image
        from regionspot.data.validation import InputError, read_image

        if bundled:
            if bundled not in BUNDLED:
                raise InputError(f"unknown bundled photo {bundled!r}: one of {', '.join(BUNDLED)}")
            image, name = load_sample_image(BUNDLED[bundled]), bundled
        elif path:
            name = os.path.basename(path)
            try:
                from PIL import Image

                with Image.open(path) as probe:
                    pixels = probe.size[0] * probe.size[1]
            except Exception:
                pixels = 0  # read_image names what is wrong with it
            if pixels > self.max_pixels:
                raise InputError(f"{name} is too large: {pixels:,} pixels, the app accepts at most "
                                 f"{self.max_pixels:,} (--max-pixels); resize it first")
            try:
                image = read_image(path, "RGB")
            except InputError:
                raise InputError(f"{name} is not an image this app can read (PNG, JPEG, WebP, BMP, TIFF, ...)") \
                    from None
        else:
            raise InputError("upload a photo or pick a bundled one")
        session = self.session(key)
        if progress is not None:
            progress(0.2, desc="Encoding the image (SAM + CLIP), once per image")
        start = time.perf_counter()
        with self.lock:
            session.predictor.set_image(image)
        session.image, session.name = image, name
        session.boxes, session.points, session.corner, session.predictions = [], [], None, None
        session.mask = None
        return (f"Encoded **{name}** ({image.shape[1]}x{image.shape[0]}) in {time.perf_counter() - start:.2f} s. "
                f"Type a vocabulary, choose how to prompt and press Recognise.")

    # ------------------------------------------------------------------------- prompts
    def click(self, key: str, mode: str, x: float, y: float, negative: bool = False) -> str:
        """A click on the image: a box corner (two make a box) or a point; returns a status line."""
        session = self.session(key)
        if session.image is None:
            return "Upload a photo first."
        if mode == BOXES:
            if session.corner is None:
                session.corner = (x, y)
                return f"Box corner at ({x:.0f}, {y:.0f}): click the opposite corner."
            (x0, y0), session.corner = session.corner, None
            box = [min(x0, x), min(y0, y), max(x0, x), max(y0, y)]
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                return "That box is too small: click two opposite corners."
            session.boxes.append(box)
            return f"{len(session.boxes)} box(es). Press Recognise (or click more corners)."
        if mode == POINTS:
            session.points.append((x, y, 0 if negative else 1))
            return f"{len(session.points)} click(s) on one object. Press Recognise."
        return "In 'Everything' mode clicks are not used: choose Boxes or Points to prompt by clicking."

    def clear_prompts(self, key: str) -> None:
        session = self.session(key)
        session.boxes, session.points, session.corner, session.mask = [], [], None, None

    def set_mask(self, key: str, path: Optional[str]) -> str:
        """A mask prompt of one object for Points mode, from an image file (white or any non-zero
        pixel, or opaque alpha, is the object) covering the whole photo at any resolution (same
        aspect ratio); None clears it. Returns a status line.

        Raises:
            InputError: no photo yet, not an image, another aspect ratio, or an empty mask.
        """
        from regionspot.data.validation import InputError, read_image

        session = self.session(key)
        if path is None:
            session.mask = None
            return "Mask prompt cleared."
        if session.image is None:
            raise InputError("upload a photo before its mask")
        name = os.path.basename(path)
        try:
            pixels = read_image(path, "RGB")
        except InputError:
            raise InputError(f"{name} is not an image: a mask prompt is a black-and-white image of the photo") \
                from None
        h, w = session.image.shape[:2]
        mh, mw = pixels.shape[:2]
        if abs(mh / mw - h / w) > 0.02:
            raise InputError(f"the mask {name} is {mw}x{mh} but the photo is {w}x{h}: give a mask of the whole photo "
                             f"(same aspect ratio)")
        mask = pixels.max(axis=2) > 127
        if not mask.any():
            raise InputError(f"the mask {name} is empty: white (or any bright) pixels mark the object")
        session.mask = mask
        return (f"Mask prompt {name}: {int(mask.sum()):,} pixels of {mw}x{mh}. Choose Points and press Recognise "
                f"(clicks optional).")

    def prompt_image(self, key: str) -> Optional[np.ndarray]:
        """The session's image with its boxes and clicks drawn (green positive, red negative)."""
        import cv2

        session = self.session(key)
        if session.image is None:
            return None
        out = session.image.copy()
        thickness = max(2, round(max(out.shape[:2]) / 300))
        for x0, y0, x1, y1 in session.boxes:
            cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), (0, 255, 0), thickness)
        if session.corner is not None:
            cv2.drawMarker(out, tuple(int(v) for v in session.corner), (0, 255, 0), cv2.MARKER_CROSS, 6 * thickness,
                           thickness)
        for x, y, label in session.points:
            cv2.circle(out, (int(x), int(y)), 3 * thickness, (0, 200, 0) if label else (230, 0, 0), -1)
        return out

    # ------------------------------------------------------------------------- recognition
    @staticmethod
    def parse_vocabulary(text: str) -> List[str]:
        """Class names from the vocabulary box (commas or new lines), checked.

        Raises:
            ValueError: empty, blank or duplicate names (the message names them).
        """
        from regionspot.data.vocabularies import check_vocabulary

        names = [n.strip() for line in (text or "").splitlines() for n in line.split(",")]
        names = [n for n in names if n]
        if not names:
            raise ValueError("the vocabulary is empty: type some class names, e.g. \"cat, dog, sofa\", or pick a "
                             "preset")
        return check_vocabulary(names, "the vocabulary")

    def recognise(self, key: str, vocabulary_text: str, mode: str) -> Tuple[str, int]:
        """Recognise the session's prompts with the vocabulary; returns (status, regions).

        Raises:
            InputError / ValueError: no image, no prompt, a bad vocabulary.
        """
        from regionspot.data.validation import InputError

        session = self.session(key)
        if session.image is None:
            raise InputError("upload a photo (or pick a bundled one) first")
        names = self.parse_vocabulary(vocabulary_text)
        predictor = session.predictor
        start = time.perf_counter()
        if self.deployed is not None and mode != BOXES:
            raise InputError(f"{mode!r} is not available with --backend onnxruntime (the export recognises boxes "
                             f"only): choose the boxes prompt")
        with self.lock:
            if self.deployed is not None:
                if not session.boxes:
                    raise InputError("no boxes yet: click two opposite corners of a box on the image")
                out = predictor.predict(session.boxes, names)
            elif mode == EVERYTHING:
                out = predictor.predict(proposals="sam_auto", vocabulary=names, return_attention=True)
            elif mode == BOXES:
                if not session.boxes:
                    raise InputError("no boxes yet: click two opposite corners of a box on the image")
                out = predictor.predict(session.boxes, names, return_attention=True)
            elif mode == POINTS:
                if not any(label for _, _, label in session.points) and session.mask is None:
                    raise InputError("no positive click yet: click the object on the image (or give a mask prompt)")
                clicked = bool(session.points)
                out = predictor.predict(points=[p[:2] for p in session.points] if clicked else None,
                                        point_labels=[p[2] for p in session.points] if clicked else None,
                                        mask=session.mask, vocabulary=names, return_attention=True)
            else:
                raise InputError(f"unknown prompt mode {mode!r}")
        seconds = time.perf_counter() - start
        session.predictions = out
        self.write_json(session, names, mode)
        if not len(out.labels):
            why = out.filters.warning(f"{mode} on {session.name}") or "no region was found"
            return f"**No regions found.** {why}", 0
        return (f"{len(out.labels)} region(s), {len(names)} classes, in {seconds:.2f} s (the image was encoded once; "
                f"only the prompt decoder and the head ran)."), len(out.labels)

    def write_json(self, session: Session, names: List[str], mode: str) -> str:
        from regionspot.io import write_json_atomic

        out = session.predictions
        return write_json_atomic(os.path.join(session.folder, "predictions.json"), {
            "image": session.name, "height": int(session.image.shape[0]), "width": int(session.image.shape[1]),
            "prompt": mode, "vocabulary_size": len(names), "random_weights": self.sample,
            "predictions": out.to_json(top_k=TOP_K), "filters": out.filters.as_dict()})

    def drawn(self, key: str, show_masks: bool = True) -> Optional[np.ndarray]:
        from regionspot.drawing import draw_predictions

        session = self.session(key)
        if session.predictions is None or session.image is None:
            return None
        return draw_predictions(session.image, session.predictions, show_masks)

    def table(self, key: str) -> List[List[str]]:
        """Rows: region, box, then the top-5 classes as "name probability"."""
        out = self.session(key).predictions
        if out is None:
            return []
        rows = []
        for i, (box, top) in enumerate(zip(out.boxes.tolist(), out.top_classes(TOP_K))):
            cells = [f"{name} {p:.3f}" for name, p in top] + [""] * (TOP_K - len(top))
            rows.append([str(i), ", ".join(f"{v:.0f}" for v in box)] + cells)
        return rows

    def region_choices(self, key: str) -> List[str]:
        out = self.session(key).predictions
        if out is None:
            return []
        return [f"{i}: {label} {score:.2f}" for i, (label, score) in enumerate(zip(out.labels, out.scores.tolist()))]

    def attention_image(self, key: str, choice: Optional[str], layer: str = "last") -> Optional[np.ndarray]:
        """The selected region's box, then its cross-attention heat map for each decoder layer."""
        from regionspot.attention_maps import attention_figure

        session = self.session(key)
        out = session.predictions
        if out is None or out.attention is None or not len(out.labels) or not choice:
            return None
        i = int(str(choice).split(":")[0])
        if not 0 <= i < len(out.labels):
            return None
        layers = None if layer == "all" else [-1]
        figure = attention_figure(session.image, out.boxes[i:i + 1], out.attention[i:i + 1],
                                  [f"{out.labels[i]} {float(out.scores[i]):.2f}"], layers=layers, panel_side=320)
        if layers is not None:  # side by side: the box, then the last layer's map
            half = figure.shape[0] // 2
            figure = np.concatenate([figure[:half], figure[half:]], axis=1)
        return figure

    def json_path(self, key: str) -> Optional[str]:
        session = self.session(key)
        path = os.path.join(session.folder, "predictions.json")
        return path if session.predictions is not None and os.path.exists(path) else None


def presets(registered: List[str]) -> Dict[str, str]:
    """Preset name -> "a, b, c" text (LVIS, COCO, Objects365, each registered dataset's)."""
    out = {}
    for name in list(PRESETS) + registered:
        out[name] = name
    return out


def preset_text(name: str) -> str:
    from regionspot.data.vocabularies import vocabulary_by_name

    return ", ".join(vocabulary_by_name(name))


