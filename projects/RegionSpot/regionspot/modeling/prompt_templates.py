"""The prompt templates of the class-name text embeddings (CLIP's prompt ensemble) and their check.

Source: OpenAI CLIP's "Prompt_Engineering_for_ImageNet" notebook (the 80 templates) and the
released RegionSpot code's ``get_prompt_templates()`` (the same set after the bare ``"{}."``).
"""

from typing import List, Sequence

# The 80 prompt templates of OpenAI CLIP's "Prompt_Engineering_for_ImageNet"
# notebook, in the notebook's order.
CLIP_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The prompt ensemble used for class embeddings: the bare "{}." followed by the
# 80 CLIP ImageNet templates (81 distinct templates).  The released RegionSpot
# code takes its list from ``get_prompt_templates()`` of the X-Decoder-style
# ``prompt_engineering.py``, which is this same set ("{}." plus the 80 CLIP
# templates).  The mean over templates is order-independent, but the order is
# part of the disk-cache key, so do not reorder casually.
PROMPT_TEMPLATES = ("{}.",) + CLIP_IMAGENET_TEMPLATES


def validate_templates(templates: Sequence[str]) -> List[str]:
    """``templates`` as a list, checked: a sequence (not one string) of distinct format strings with
    exactly one ``{}`` each.

    Raises:
        TypeError: a single string.
        ValueError: no template, a template without exactly one ``{}`` or not a valid format
            string, duplicates.
    """
    if isinstance(templates, (str, bytes)):
        raise TypeError("templates must be a sequence of template strings, not a single string")
    templates = list(templates)
    if not templates:
        raise ValueError("templates is empty: at least one prompt template is required")
    for i, t in enumerate(templates):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"template at index {i} must be a str with exactly one '{{}}': {t!r}")
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"template at index {i} is not a valid format string: {t!r}") from e
    if len(set(templates)) != len(templates):
        raise ValueError("templates contain duplicates")
    return templates

