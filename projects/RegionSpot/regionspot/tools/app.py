"""``regionspot-app``: RegionSpot in the browser: upload a photo, type a vocabulary, prompt, read the
labels (in a checkout also ``python demo/app.py``, a thin wrapper).

    regionspot-app --config-file regionspot_bl.yaml --opts MODEL.WEIGHTS regionspot_bl.pth
    regionspot-app                          # the bundled sample's RANDOM weights: labels mean nothing

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
from typing import List

from regionspot.webapp import (
    BUNDLED,
    EVERYTHING,
    MODES,
    SAMPLE_BANNER,
    TOP_K,
    RegionSpotApp,
    preset_text,
    presets,
)

logger = logging.getLogger("regionspot.app")


def build_parser() -> argparse.ArgumentParser:
    from regionspot.data.datasets.user import add_register_argument

    parser = argparse.ArgumentParser(description="RegionSpot web app (Gradio)")
    parser.add_argument("--config-file", default="", metavar="FILE",
                        help="RegionSpot config; without it, the bundled sample's random weights (see --sample)")
    parser.add_argument("--sample", action="store_true",
                        help="run on the bundled sample's random SAM/CLIP and an untrained head (labels mean nothing)")
    parser.add_argument("--sample-dir", default=os.path.join("output", "app_sample"),
                        help="where the sample's random weights and text cache are written (once; default: "
                             "./output/app_sample under the current folder)")
    parser.add_argument("--untrained-head", action="store_true", help="allow an empty MODEL.WEIGHTS with a config")
    parser.add_argument("--backend", choices=("pytorch", "onnxruntime"), default="pytorch",
                        help="onnxruntime: the export in --onnx-dir on ONNX Runtime (boxes only)")
    parser.add_argument("--onnx-dir", metavar="FOLDER",
                        help="with --backend onnxruntime: a folder written by regionspot-export onnx")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image accepted, in pixels")
    parser.add_argument("--max-sessions", type=int, default=16, help="browser sessions kept in memory")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_register_argument(parser)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


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
        return "Prompts cleared.", app.prompt_image(key), None

    def on_mask(path, request: gr.Request):
        try:
            return app.set_mask(key_of(request), path)
        except user_errors as e:
            return f"**Error:** {e}"

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
                mask_file = gr.File(label="Mask prompt (optional, with Points): a black-and-white image of the "
                                          "object, the whole photo", type="filepath", elem_id="mask-upload")
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
        clear.click(on_clear, None, [status, prompt_view, mask_file])
        mask_file.upload(on_mask, [mask_file], [status])
        mask_file.clear(on_mask, [mask_file], [status])
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
        prog = "regionspot-app" if sys.argv and os.path.basename(sys.argv[0]) == "regionspot-app" else "app.py"
        print(f"{prog}: error: {e}", file=sys.stderr)
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
