"""Time the web app and the cost of recording attention maps; write the figures to a JSON file.

    regionspot-benchmark app [--output output/benchmark_app.json] [--repeats 5] [--threads 2] [--browser]

On the CPU with the bundled sample's RANDOM weights (``demo/app.py``'s default; the numbers are
about speed only), on a bundled photo (scikit-image's astronaut, 512 x 512):

1. attention recording: ``predictor.predict(boxes)`` with ``return_attention`` off and on, and the
   head alone (``RegionSpotHead.embed_regions``) off and on, ``--boxes`` boxes, medians of
   ``--repeats`` x 10 calls alternating off/on (off runs the unchanged ``nn.TransformerDecoder``);
2. the app's handlers as the page calls them (:class:`regionspot.webapp.RegionSpotApp`, no HTTP):
   upload -> first result (read + encode the image, "everything" with a 8-class vocabulary,
   the drawing, table, attention image and JSON), then a vocabulary change -> new result (a
   vocabulary never seen, so its text embeddings are computed; and one seen before);
3. with ``--browser``: the same through the page in headless Chromium (Playwright, Debian's
   ``/usr/bin/chromium``): the app started as its own process, upload -> "Encoded" status,
   Recognise -> result status, vocabulary change -> new result status (what a person waits).

``--screenshots DIR`` writes the page's screenshot (with ``--browser``) and a Fig.-4-style
attention figure of three boxes on the photo (:func:`regionspot.attention_maps.attention_figure`),
both reduced to small palette PNGs: the files in docs/.

The figures and the machine (CPU count, threads, torch version) go to ``--output``; docs/app.md
and docs/speed.md quote them.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional, Sequence

from regionspot.tools.common import output_path

SUMMARY = "the web app's handlers (and page, with --browser) and the cost of recording attention maps"

PHOTO = "astronaut"
VOCABULARY = "person, cat, dog, cup, rocket, motorcycle, flower, building"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options, added to ``parser``."""
    parser.add_argument("--output", default=output_path("benchmark_app.json"),
                        help="JSON file for the figures")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each measurement (medians)")
    parser.add_argument("--boxes", type=int, default=20, help="boxes per predict() call in the attention measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--sample-dir", default=output_path("app_sample"),
                        help="where the sample's random weights are (written once)")
    parser.add_argument("--browser", action="store_true", help="also time the page in headless Chromium")
    parser.add_argument("--screenshots", metavar="DIR", default=None,
                        help="also write DIR/app.png (the page, with --browser) and DIR/attention_fig4.png (a "
                             "Fig.-4-style attention figure), small PNGs (the ones in docs/)")


def median_s(samples: Sequence[float]) -> float:
    return round(statistics.median(samples), 4)


def attention_cost(app, image, boxes: int, repeats: int) -> Dict[str, float]:
    """Medians of predict() and of the head with attention recording off and on."""
    import numpy as np
    import torch

    predictor = app.session("benchmark-attention").predictor
    predictor.set_image(image)
    h, w = image.shape[:2]
    rng = np.random.RandomState(0)
    xy = rng.uniform(0, 0.6, (boxes, 2)) * [w, h]
    wh = rng.uniform(0.1, 0.4, (boxes, 2)) * [w, h]
    box_array = np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1)
    names = [n.strip() for n in VOCABULARY.split(",")]
    predictor.predict(box_array, names, return_attention=True)  # warm-up, text embeddings
    timings = {"predict_off": [], "predict_on": [], "head_off": [], "head_on": []}
    model = app.model
    features = predictor._features
    regions = [predictor._box_regions(torch.as_tensor(box_array, dtype=torch.float32))]
    with torch.no_grad():
        prompts = model.prompt_boxes(features, regions, with_masks=False)
        tokens, semantic = [prompts[0].tokens], features[0].semantic[None]
        for _ in range(repeats * 10):
            for on in (False, True):
                start = time.perf_counter()
                predictor.predict(box_array, names, return_attention=on)
                timings["predict_on" if on else "predict_off"].append(time.perf_counter() - start)
                start = time.perf_counter()
                model.head.embed_regions(tokens, semantic, return_attention=on)
                timings["head_on" if on else "head_off"].append(time.perf_counter() - start)
    return {key + "_s": median_s(values) for key, values in timings.items()}


def app_handlers(app, photo_path: str, repeats: int) -> Dict[str, float]:
    """Upload -> first result and vocabulary change -> new result through the app's handlers."""
    first, new_vocab, seen_vocab, encode = [], [], [], []
    for r in range(repeats):
        key = f"benchmark-{r}"
        start = time.perf_counter()
        app.set_image(key, photo_path)
        encode.append(time.perf_counter() - start)
        show(app, key, VOCABULARY)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        show(app, key, f"astronaut suit {r}, helmet {r}, flag {r}, glove {r}")  # never seen: its text is encoded
        new_vocab.append(time.perf_counter() - start)
        start = time.perf_counter()
        show(app, key, VOCABULARY)  # seen before: its text embeddings are kept
        seen_vocab.append(time.perf_counter() - start)
        app.forget(key)
    return {"upload_read_and_encode_s": median_s(encode), "upload_to_first_result_s": median_s(first),
            "new_vocabulary_to_result_s": median_s(new_vocab), "seen_vocabulary_to_result_s": median_s(seen_vocab)}


def show(app, key: str, vocabulary: str) -> None:
    """What the page computes for one Recognise press in "everything" mode."""
    from regionspot.webapp import EVERYTHING

    app.recognise(key, vocabulary, EVERYTHING)
    app.drawn(key, True)
    app.table(key)
    choices = app.region_choices(key)
    app.attention_image(key, choices[0] if choices else None)


def browser_timings(photo_path: str, sample_dir: str, repeats: int, threads: int,
                    screenshot: Optional[str] = None) -> Dict[str, float]:
    """The page in headless Chromium: upload -> encoded, Recognise -> result, vocabulary change -> result."""
    import socket
    import urllib.request

    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    server = subprocess.Popen([sys.executable, "-m", "regionspot.tools.app", "--port", str(port),
                               "--sample-dir", sample_dir, "--threads", str(threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the app did not start") from None
                time.sleep(0.5)
        times = {"encoded": [], "first": [], "vocabulary": []}
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                           headless=True, viewport={"width": 1400, "height": 1100})
            try:
                for r in range(repeats):
                    page = context.new_page()
                    page.goto(url, timeout=120_000)
                    page.wait_for_selector("#status", timeout=120_000)

                    def wait(pattern, page=page):
                        page.wait_for_function("p => new RegExp(p).test(document.querySelector('#status').innerText)",
                                               arg=pattern, timeout=120_000)
                    start = time.perf_counter()
                    page.locator("#upload input[type=file]").set_input_files(photo_path)
                    wait("Encoded")
                    times["encoded"].append(time.perf_counter() - start)
                    page.click("#recognise")
                    wait(r"region\(s\), 8 classes")
                    page.wait_for_selector("#attention img", timeout=120_000)
                    times["first"].append(time.perf_counter() - start)
                    page.locator("#vocabulary textarea").fill(f"suit {r}, helmet {r}, flag {r}")
                    start = time.perf_counter()
                    page.click("#recognise")
                    wait(r"region\(s\), 3 classes")
                    times["vocabulary"].append(time.perf_counter() - start)
                    if screenshot and r == repeats - 1:
                        app_screenshot(page, wait, screenshot)
                    page.close()
            finally:
                context.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"browser_upload_to_encoded_s": median_s(times["encoded"]),
            "browser_upload_to_first_result_s": median_s(times["first"]),
            "browser_vocabulary_change_to_result_s": median_s(times["vocabulary"]),
            "browser_note": "upload and Recognise pressed at once; includes HTTP, Gradio's queue and rendering"}


ATTENTION_BOXES = [[160, 20, 340, 230], [50, 190, 470, 512], [360, 0, 512, 180]]  # head, suit, flag (pixels)


def small_png(rgb, path: str, width: int = 900) -> str:
    """Write an RGB array as a palette PNG at most ``width`` pixels wide (docs/ images stay small)."""
    from PIL import Image

    image = Image.fromarray(rgb)
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def app_screenshot(page, wait, path: str) -> None:
    """Two boxes clicked on the photo, recognised, the page's screenshot."""
    import io

    import numpy as np
    from PIL import Image

    page.locator("#vocabulary textarea").fill(VOCABULARY)
    page.get_by_label("Boxes (click two corners)").check()
    image = page.locator("#prompt-image img")
    box = image.bounding_box()
    for (x0, y0, x1, y1), count in zip(([0.31, 0.04, 0.66, 0.45], [0.7, 0.0, 1.0, 0.35]), (1, 2)):
        image.click(position={"x": box["width"] * x0, "y": box["height"] * y0})
        wait("opposite corner")
        image.click(position={"x": box["width"] * x1 - 1, "y": box["height"] * y1 + 1})
        wait(rf"{count} box\(es\)")
    page.click("#recognise")
    wait(r"2 region\(s\)")
    page.wait_for_selector("#attention img", timeout=120_000)
    time.sleep(1.0)
    shot = page.screenshot(full_page=True)
    small_png(np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")), path)


def attention_screenshot(app, image, path: str) -> None:
    """A Fig.-4-style figure: three boxes, each with its token's cross-attention per decoder layer."""
    from regionspot.attention_maps import attention_figure

    predictor = app.session("benchmark-figure").predictor
    predictor.set_image(image)
    out = predictor.predict(ATTENTION_BOXES, [n.strip() for n in VOCABULARY.split(",")], return_attention=True)
    figure = attention_figure(image, out.boxes, out.attention, [f"box {i + 1}" for i in range(len(out.boxes))],
                              panel_side=200)
    small_png(figure, path, width=figure.shape[1])


def run(args) -> int:
    import torch
    from PIL import Image

    from regionspot.data.datasets.regionspot_sample import load_sample_image
    from regionspot.io import write_json_atomic
    from regionspot.webapp import BUNDLED, RegionSpotApp

    torch.set_num_threads(args.threads)
    if args.screenshots:
        os.makedirs(args.screenshots, exist_ok=True)
    app = RegionSpotApp.from_args(argparse.Namespace(sample=True, config_file="", sample_dir=args.sample_dir,
                                                     opts=[], untrained_head=False, max_pixels=40_000_000,
                                                     max_sessions=16))
    image = load_sample_image(BUNDLED[PHOTO])
    with tempfile.TemporaryDirectory() as folder:
        photo_path = os.path.join(folder, f"{PHOTO}.png")
        Image.fromarray(image).save(photo_path)
        print(f"attention recording off/on ({args.boxes} boxes, {args.repeats * 10} calls each) ...", flush=True)
        figures: Dict[str, object] = {"attention": attention_cost(app, image, args.boxes, args.repeats)}
        print("the app's handlers ...", flush=True)
        figures["app_handlers"] = app_handlers(app, photo_path, args.repeats)
        if args.browser:
            print("the page in headless Chromium ...", flush=True)
            figures["browser"] = browser_timings(photo_path, args.sample_dir, args.repeats, args.threads,
                                                 os.path.join(args.screenshots, "app.png") if args.screenshots
                                                 else None)
        if args.screenshots:
            attention_screenshot(app, image, os.path.join(args.screenshots, "attention_fig4.png"))
    figures["setup"] = {"photo": f"{PHOTO} {image.shape[1]}x{image.shape[0]}", "weights": "bundled sample, RANDOM",
                        "device": "cpu", "threads": args.threads, "cpu_count": os.cpu_count(),
                        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                        "torch": torch.__version__, "python": platform.python_version(), "repeats": args.repeats,
                        "boxes": args.boxes}
    write_json_atomic(args.output, figures)
    print(json.dumps(figures, indent=2))
    print(f"-> {args.output}")
    return 0


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``regionspot-benchmark app``: returns the exit status (2 for a bad option)."""
    if args.repeats < 1 or args.boxes < 1 or args.threads < 1:
        parser.error("--repeats, --boxes and --threads must be at least 1")
    return run(args)
