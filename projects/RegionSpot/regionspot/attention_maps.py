"""Cross-attention maps drawn over the image, as in the paper's Fig. 4 (Sec. 4.3).

The head's position-aware token of a region attends CLIP's semantic feature map; the
predictor returns, per region and decoder layer, those weights over CLIP's g x g patch grid
(heads averaged, class token excluded: :attr:`regionspot.predictor.RegionPredictions.attention`).
CLIP sees the whole image stretched to a square (``transforms.resize_for_clip``), so the grid
covers the whole image: a map is upsampled to the image's size by bilinear interpolation
(:func:`upsample_attention`) and drawn as a heat map (:func:`heatmap_overlay`); several regions
side by side, one row per layer (:func:`attention_figure`).

Only numpy, torch and OpenCV: used by ``demo/demo.py --attention``, the web app
(``demo/app.py``) and ``docs/``'s figure.
"""

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

Array = Union[np.ndarray, torch.Tensor]

# Colours (RGB) of the boxes drawn in the figure, cycled.
BOX_COLOURS = ((0, 255, 0), (255, 64, 64), (64, 160, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220))


def upsample_attention(grid: Array, image_size: Tuple[int, int]) -> np.ndarray:
    """Attention over the patch grid -> attention over the image's pixels.

    Args:
        grid: (g, g) or (N, g, g) float weights over CLIP's patch grid (raster order).
        image_size: (H, W) of the image, pixels.

    Returns:
        (H, W) or (N, H, W) float32, bilinear (align_corners False); values are weights, not
        normalised to the image.
    """
    t = torch.as_tensor(np.asarray(grid, dtype=np.float32) if not torch.is_tensor(grid) else grid).float().cpu()
    single = t.dim() == 2
    if t.dim() not in (2, 3):
        raise ValueError(f"grid must be (g, g) or (N, g, g), got shape {tuple(t.shape)}")
    t = t[None] if single else t
    out = F.interpolate(t[:, None], size=tuple(int(v) for v in image_size), mode="bilinear", align_corners=False)[:, 0]
    return (out[0] if single else out).numpy()


def heatmap_overlay(image: np.ndarray, attention: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """A heat map of one (H, W) attention map blended over an (H, W, 3) uint8 RGB image.

    The map is scaled to [0, 1] by its own minimum and maximum (each map shows where *its*
    token attends most) and coloured with OpenCV's JET map (blue low, red high).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    import cv2

    a = np.asarray(attention, dtype=np.float32)
    if a.shape != image.shape[:2]:
        raise ValueError(f"attention {a.shape} and image {image.shape[:2]} differ in size")
    span = float(a.max() - a.min())
    a = (a - a.min()) / span if span > 0 else np.zeros_like(a)
    colour = cv2.applyColorMap((a * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    return (alpha * colour + (1 - alpha) * image.astype(np.float32)).clip(0, 255).astype(np.uint8)


def _panel(image: np.ndarray, side: int) -> Tuple[np.ndarray, float]:
    import cv2

    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    canvas = np.full((side, side, 3), 255, np.uint8)
    canvas[:resized.shape[0], :resized.shape[1]] = resized
    return canvas, scale


def _box(canvas: np.ndarray, box: Sequence[float], scale: float, colour, thickness: int = 2) -> None:
    import cv2

    x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
    cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, thickness)


def _title(panel: np.ndarray, text: str) -> np.ndarray:
    import cv2

    bar = np.full((22, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text[:40], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, panel], axis=0)


def attention_figure(image: np.ndarray, boxes: Array, attention: Array, labels: Optional[Sequence[str]] = None,
                     layers: Optional[Sequence[int]] = None, panel_side: int = 240) -> np.ndarray:
    """Fig.-4-style figure: one column per region, the region's box on the image, then its
    cross-attention heat map for each layer asked for (with the box drawn on it).

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) XYXY_ABS pixels of the image.
        attention: (N, num_layers, g, g) maps (``RegionPredictions.attention``).
        labels: N titles (e.g. "cat 0.91"); default "region i".
        layers: indices of the layers to show (default: all), each one row.
        panel_side: side of each square panel, pixels.

    Returns:
        (rows x (panel_side + 22), N x panel_side, 3) uint8 RGB image.

    Raises:
        ValueError: the numbers of boxes, maps and labels differ, or no region.
    """
    boxes = np.asarray(boxes.cpu() if torch.is_tensor(boxes) else boxes, dtype=np.float32).reshape(-1, 4)
    maps = torch.as_tensor(np.asarray(attention, dtype=np.float32) if not torch.is_tensor(attention)
                           else attention).float().cpu()
    if maps.dim() != 4 or maps.shape[0] != len(boxes) or len(boxes) == 0:
        raise ValueError(f"need N >= 1 boxes (N, 4) and maps (N, layers, g, g); got {len(boxes)} boxes and maps of "
                         f"shape {tuple(maps.shape)}")
    labels = list(labels) if labels is not None else [f"region {i}" for i in range(len(boxes))]
    if len(labels) != len(boxes):
        raise ValueError(f"{len(labels)} labels for {len(boxes)} boxes")
    layers = list(range(maps.shape[1])) if layers is None else [int(v) % maps.shape[1] for v in layers]
    columns = []
    for i, (box, label) in enumerate(zip(boxes, labels)):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        panel, scale = _panel(image, panel_side)
        _box(panel, box, scale, colour)
        cells = [_title(panel, label)]
        for layer in layers:
            heat = heatmap_overlay(image, upsample_attention(maps[i, layer], image.shape[:2]))
            panel, scale = _panel(heat, panel_side)
            _box(panel, box, scale, (255, 255, 255), 1)
            cells.append(_title(panel, f"layer {layer + 1} cross-attention"))
        columns.append(np.concatenate(cells, axis=0))
    return np.concatenate(columns, axis=1)
