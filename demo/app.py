#!/usr/bin/env python
"""RegionSpot in the browser: upload a photo, type a vocabulary, prompt, read the labels.

    python demo/app.py --config-file configs/regionspot_bl.yaml --opts MODEL.WEIGHTS regionspot_bl.pth
    python demo/app.py                      # the bundled sample's RANDOM weights: labels mean nothing

Serves on http://127.0.0.1:7860 by default (``--host``, ``--port``). In the page:

- upload a photo (any file: a non-image is refused with a message) or pick a bundled one; the
  image is encoded once (SAM's image encoder and CLIP's feature map, the predictor's
  ``set_image``), with progress shown, so changing the vocabulary or the prompts only reruns the
  prompt decoder and the head;
- a vocabulary (free text, comma- or line-separated) or a preset (LVIS, COCO, Objects365, and
  each registered dataset's categories);
- three ways to prompt: "everything" (SAM's automatic masks, ``sam_auto``), boxes (click two
  corners on the image) or points (click the object; negative clicks exclude parts);
- the result drawn with Detectron2's Visualizer (a toggle hides the masks), a table of each
  region's top-5 classes, the cross-attention map of a selected region (paper Fig. 4: its token
  over CLIP's feature map, one decoder layer, heads averaged, class token excluded) and the
  predictions as JSON to download;
- a message in the page for a non-image upload, an image over ``--max-pixels``, an empty or
  duplicate vocabulary, no prompt, and no regions found (with the step that removed them).

One model serves every visitor; each browser session has its own predictor (its own image,
embeddings, vocabulary and prompts), kept for the last ``--max-sessions`` sessions, so one
user's session never sees another's image or vocabulary. Model calls are serialised.

Without ``--config-file`` (or with ``--sample``), the app runs on the bundled sample's random
SAM and CLIP and a randomly initialised head (written under ``--sample-dir`` once), with a
banner saying that the labels mean nothing. Timings: docs/app.md.
"""

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np

logger = logging.getLogger("regionspot.app")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_CONFIG = os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml")
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


def build_parser() -> argparse.ArgumentParser:
    from regionspot.data.datasets.user import add_register_argument

    parser = argparse.ArgumentParser(description="RegionSpot web app (Gradio)")
    parser.add_argument("--config-file", default="", metavar="FILE",
                        help="RegionSpot config; without it, the bundled sample's random weights (see --sample)")
    parser.add_argument("--sample", action="store_true",
                        help="run on the bundled sample's random SAM/CLIP and an untrained head (labels mean nothing)")
    parser.add_argument("--sample-dir", default=os.path.join(REPO, "output", "app_sample"),
                        help="where the sample's random weights and text cache are written (once)")
    parser.add_argument("--untrained-head", action="store_true", help="allow an empty MODEL.WEIGHTS with a config")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image accepted, in pixels")
    parser.add_argument("--max-sessions", type=int, default=16, help="browser sessions kept in memory")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_register_argument(parser)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


# ----------------------------------------------------------------------------- the model
def sample_config(folder: str, opts=()):
    """The sample CPU config with random tiny SAM/CLIP written under ``folder`` (once), SAM's
    automatic-mask quality thresholds at 0 (a random SAM's masks never pass the real ones)."""
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
        self.predictions = None
        self.folder = tempfile.mkdtemp(prefix="regionspot-app-")


class RegionSpotApp:
    """The app's logic, without Gradio (the page calls these; so does ``regionspot-benchmark-app``).

    Args:
        model: a built RegionSpot model (shared by every session, never changed).
        min_size, max_size: the predictor's test-time resize.
        sample: True when the weights are the sample's random ones (the banner says so).
        max_pixels: largest image accepted.
        max_sessions: sessions kept (least recently used dropped).
    """

    def __init__(self, model, min_size: int, max_size: int, sample: bool = False, max_pixels: int = 40_000_000,
                 max_sessions: int = 16):
        self.model = model
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
        from regionspot import RegionSpotPredictor

        if key not in self.sessions:
            self.sessions[key] = Session(RegionSpotPredictor(self.model, self.min_size, self.max_size))
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
        session.boxes, session.points, session.corner = [], [], None

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
        with self.lock:
            if mode == EVERYTHING:
                out = predictor.predict(proposals="sam_auto", vocabulary=names, return_attention=True)
            elif mode == BOXES:
                if not session.boxes:
                    raise InputError("no boxes yet: click two opposite corners of a box on the image")
                out = predictor.predict(session.boxes, names, return_attention=True)
            elif mode == POINTS:
                if not any(label for _, _, label in session.points):
                    raise InputError("no positive click yet: click the object on the image")
                out = predictor.predict(points=[p[:2] for p in session.points],
                                        point_labels=[p[2] for p in session.points], vocabulary=names,
                                        return_attention=True)
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


# ----------------------------------------------------------------------------- the page
def build_page(app: RegionSpotApp, registered: List[str]):
    """The Gradio Blocks page around ``app``."""
    import gradio as gr

    from regionspot.data.validation import InputError

    user_errors = (InputError, ValueError)

    def key_of(request: gr.Request) -> str:
        return getattr(request, "session_hash", None) or "local"

    def on_upload(path, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
        return load(path, None, request, progress)

    def on_bundled(name, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
        return load(None, name, request, progress)

    def load(path, bundled, request, progress):
        key = key_of(request)
        try:
            status = app.set_image(key, path, bundled, progress)
        except user_errors as e:
            return f"**Error:** {e}", gr.update(), None, [], gr.update(choices=[], value=None), None, None
        return status, app.prompt_image(key), None, [], gr.update(choices=[], value=None), None, None

    def on_click(mode, polarity, evt: gr.SelectData, request: gr.Request):
        key = key_of(request)
        x, y = evt.index[:2]
        status = app.click(key, mode, float(x), float(y), polarity == "negative")
        return status, app.prompt_image(key)

    def on_clear(request: gr.Request):
        key = key_of(request)
        app.clear_prompts(key)
        return "Prompts cleared.", app.prompt_image(key)

    def on_recognise(vocabulary, mode, show_masks, layer, request: gr.Request):
        key = key_of(request)
        try:
            status, count = app.recognise(key, vocabulary, mode)
        except user_errors as e:
            return f"**Error:** {e}", None, [], gr.update(choices=[], value=None), None, None
        choices = app.region_choices(key)
        first = choices[0] if choices else None
        return (status, app.drawn(key, show_masks), app.table(key), gr.update(choices=choices, value=first),
                app.attention_image(key, first, layer), app.json_path(key))

    def on_masks(show_masks, request: gr.Request):
        return app.drawn(key_of(request), show_masks)

    def on_region(choice, layer, request: gr.Request):
        return app.attention_image(key_of(request), choice, layer)

    def on_preset(name):
        try:
            return preset_text(name)
        except ValueError as e:
            return f"(preset {name!r} failed: {e})"

    with gr.Blocks(title="RegionSpot") as page:
        gr.Markdown("# RegionSpot: recognise any region with any vocabulary")
        if app.sample:
            gr.Markdown(SAMPLE_BANNER, elem_id="banner")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Upload a photo", type="filepath", elem_id="upload")
                with gr.Row():
                    bundled = gr.Dropdown(list(BUNDLED), label="or a bundled photo", value=None, elem_id="bundled")
                    use_bundled = gr.Button("Use this photo", elem_id="use-bundled")
                prompt_view = gr.Image(label="Your image (click to add box corners or points)", type="numpy",
                                       interactive=False, elem_id="prompt-image")
                mode = gr.Radio(list(MODES), value=EVERYTHING, label="Prompt", elem_id="mode")
                polarity = gr.Radio(["positive", "negative"], value="positive", label="Point clicks are",
                                    elem_id="polarity")
                clear = gr.Button("Clear prompts", elem_id="clear")
                preset = gr.Dropdown(list(presets(registered)), label="Vocabulary preset", value=None,
                                     elem_id="preset")
                vocabulary = gr.Textbox(label="Vocabulary (comma- or line-separated class names)", lines=3,
                                        value="person, cat, dog, cup, rocket, motorcycle, flower, building",
                                        elem_id="vocabulary")
                run = gr.Button("Recognise", variant="primary", elem_id="recognise")
            with gr.Column():
                status = gr.Markdown("Upload a photo or pick a bundled one.", elem_id="status")
                result = gr.Image(label="Result", type="numpy", interactive=False, elem_id="result")
                show_masks = gr.Checkbox(value=True, label="Show masks", elem_id="show-masks")
                headers = ["region", "box (x0, y0, x1, y1)"] + [f"top-{k + 1}" for k in range(TOP_K)]
                table = gr.Dataframe(headers=headers, label="Top-5 classes per region", interactive=False,
                                     elem_id="table")
                with gr.Row():
                    region = gr.Dropdown([], label="Attention map of region", elem_id="region")
                    layer = gr.Radio(["last", "all"], value="last", label="Decoder layers", elem_id="layer")
                attention = gr.Image(label="Cross-attention of the region's token over CLIP's feature map "
                                           "(paper Fig. 4)", type="numpy", interactive=False, elem_id="attention")
                download = gr.File(label="Predictions (JSON)", interactive=False, elem_id="download")
        outputs = [status, prompt_view, result, table, region, attention, download]
        upload.upload(on_upload, [upload], outputs, show_progress="full")
        use_bundled.click(on_bundled, [bundled], outputs, show_progress="full")
        prompt_view.select(on_click, [mode, polarity], [status, prompt_view])
        clear.click(on_clear, None, [status, prompt_view])
        preset.change(on_preset, [preset], [vocabulary])
        run.click(on_recognise, [vocabulary, mode, show_masks, layer],
                  [status, result, table, region, attention, download])
        show_masks.change(on_masks, [show_masks], [result])
        region.change(on_region, [region, layer], [attention])
        layer.change(on_region, [region, layer], [attention])
        def on_unload(request: gr.Request):
            app.forget(key_of(request))

        page.unload(on_unload)
    return page


def main(argv=None) -> int:
    """Start the server (blocks until interrupted); 2 for a bad command line or config."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    from regionspot.cli import setup_logging

    setup_logging()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from regionspot.data.datasets.user import register_from_args

    try:
        registered = register_from_args(args.register)
        app = RegionSpotApp.from_args(args)
    except (ValueError, OSError) as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        return 2
    import gradio as gr

    page = build_page(app, registered)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts
    logger.info("RegionSpot app on http://%s:%d%s", args.host, args.port,
                " (RANDOM sample weights: labels mean nothing)" if app.sample else "")
    page.queue(default_concurrency_limit=2).launch(server_name=args.host, server_port=args.port, share=False,
                                                   theme=theme, show_error=True, quiet=True,
                                                   max_file_size="200mb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
