"""``torch.profiler`` labels of the recognition path's stages.

Each stage runs under ``record_function(STAGE_LABELS[stage])`` (free when no profiler is
active), so a profiler, ``regionspot-benchmark e2e`` included, can time the stages without
touching the model: the localizer's image encoder and prompt decoder, the semantic encoder,
the proposal generator, the head and the post-processing.
"""

import functools

from torch.profiler import record_function

STAGE_LABELS = {
    "sam_image_encoder": "regionspot.sam_image_encoder",
    "clip_semantic": "regionspot.clip_semantic",
    "proposals": "regionspot.proposals",
    "sam_prompt_decoder": "regionspot.sam_prompt_decoder",
    "head": "regionspot.head",
    "postprocess": "regionspot.postprocess",
}


def stage(name: str):
    """Decorator: run a function under the ``record_function`` label of stage ``name``
    (a key of :data:`STAGE_LABELS`)."""
    label = STAGE_LABELS[name]

    def decorate(fn):
        @functools.wraps(fn)
        def labelled(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)
        return labelled
    return decorate
