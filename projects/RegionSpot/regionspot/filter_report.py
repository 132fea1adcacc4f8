"""Filter reports: what each selection step removed, and the setting that controls it.

Between an image and its labelled regions several steps drop candidates: SAM's automatic
mask generator filters its masks (predicted IoU, stability score, box NMS, ...), the
proposal selection applies ``PROPOSAL_SCORE_THRESH``, ``PROPOSAL_NMS_THRESH`` and
``PROPOSAL_TOPK``, the scoring protocol keeps the ``TEST_TOPK`` best (box, class) pairs or,
with TAP's protocol, the classes above ``TAP_CLASS_THRESH``, and the demo applies
``--min-score``. When one of them removes everything, the result is empty, and an empty
result alone does not say why. Each step therefore records a :class:`FilterStep` in the
image's :class:`FilterReport`: the step's name, how many candidates came in, how many it
removed, and the config key (or command-line flag) that changes it.

Where the reports go:

- the model's ``forward`` returns each image's report as ``outputs[i]["filters"]``;
  :class:`FilterReportEvaluator` sums them over a dataset, and ``train_net.py --eval-only``
  writes the sum to ``OUTPUT_DIR/inference/<dataset>/metrics.json`` under ``filters``, with
  one warning line per dataset when a step left images with nothing;
- :meth:`regionspot.RegionSpotPredictor.predict` attaches its report to the predictions
  (``RegionPredictions.filters``) and logs one warning line when a step removed everything;
- the demo adds ``--min-score`` and writes the report into each image's JSON (``filters``).

Only the steps that are switched on are recorded (a threshold of 0 or an NMS that is off
is not a step). A step that receives no candidates (an earlier step removed them all) is
still recorded, with 0 in and 0 removed.
"""

import copy
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Tuple

# The key of a dataset dict (and model input) that carries the report of the steps the data
# loader applied to that image's proposals (a proposal file's selection, ``data/build.py``).
PROPOSAL_FILTERS_KEY = "proposal_filters"


@dataclass
class FilterStep:
    """One selection step, for one image or summed over images.

    Attributes:
        stage: what the step is, e.g. "sam_auto: predicted IoU" or "proposals: top-k".
        key: the config key or command-line flag that controls it, e.g.
            "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH" or "--min-score".
        setting: the value of ``key`` in this run (JSON-serialisable).
        unit: what is counted: "masks", "boxes", "(box, class) pairs", "regions".
        candidates: how many came in (summed over :attr:`images`).
        removed: how many the step removed (summed over :attr:`images`).
        images: the number of images the step ran on.
        images_emptied: images where candidates came in and the step left none.
        advice: how to keep more, e.g. "lower it" (used in the warnings).
    """

    stage: str
    key: str
    setting: object
    unit: str
    candidates: int
    removed: int
    images: int = 1
    images_emptied: int = 0
    advice: str = ""

    @property
    def kept(self) -> int:
        """Candidates left after the step."""
        return self.candidates - self.removed

    def control(self) -> str:
        """"KEY = value; advice" (what to change, in words)."""
        text = f"{self.key} = {self.setting!r}"
        return f"{text}; {self.advice}" if self.advice else text

    def as_dict(self) -> Dict[str, object]:
        """JSON-serialisable fields, with ``kept``."""
        out = asdict(self)
        out["kept"] = self.kept
        return out


class FilterReport:
    """The selection steps of one image in the order they ran, or their sums over a dataset.

    Args:
        steps: initial :class:`FilterStep` list (copied).
        images: the number of images the report covers (1 for one image).
    """

    def __init__(self, steps: Iterable[FilterStep] = (), images: int = 1):
        self.steps: List[FilterStep] = [copy.copy(s) for s in steps]
        self.images = int(images)

    def add(self, stage: str, key: str, setting: object, unit: str, before: int, after: int,
            advice: str = "") -> FilterStep:
        """Record a step of one image that kept ``after`` of ``before`` candidates.

        Args:
            stage, key, setting, unit, advice: see :class:`FilterStep`.
            before: candidates in (>= 0).
            after: candidates kept (0 <= after <= before).

        Returns:
            The recorded :class:`FilterStep`.

        Raises:
            ValueError: counts that are negative or where ``after`` exceeds ``before``.
        """
        before, after = int(before), int(after)
        if not 0 <= after <= before:
            raise ValueError(f"filter step {stage!r}: kept {after} of {before} candidates")
        step = FilterStep(stage, key, setting, unit, before, before - after, 1,
                          int(before > 0 and after == 0), advice)
        self.steps.append(step)
        return step

    def copy(self) -> "FilterReport":
        """An independent copy."""
        return FilterReport(self.steps, self.images)

    def merge(self, other: "FilterReport") -> "FilterReport":
        """Add another report's counts to this one (summing over images), in place.

        Steps are matched by (stage, key); a step this report lacks is appended in the order
        it comes. Returns ``self``.
        """
        index: Dict[Tuple[str, str], FilterStep] = {(s.stage, s.key): s for s in self.steps}
        for step in other.steps:
            mine = index.get((step.stage, step.key))
            if mine is None:
                mine = index[step.stage, step.key] = copy.copy(step)
                self.steps.append(mine)
                continue
            mine.candidates += step.candidates
            mine.removed += step.removed
            mine.images += step.images
            mine.images_emptied += step.images_emptied
        self.images += other.images
        return self

    @property
    def images_emptied(self) -> int:
        """Images that some step left without candidates (each is counted by one step only:
        the steps after it receive nothing)."""
        return sum(s.images_emptied for s in self.steps)

    def emptying_step(self) -> Optional[FilterStep]:
        """The first step that left an image without candidates, or None."""
        return next((s for s in self.steps if s.images_emptied), None)

    def chain(self) -> str:
        """The steps in one line: "stage in->kept unit, ..."."""
        return ", ".join(f"{s.stage} {s.candidates}->{s.kept} {s.unit}" for s in self.steps)

    def warning(self, where: str) -> Optional[str]:
        """One line saying which step removed everything for one image (None if none did).

        Args:
            where: what ran, e.g. "predict(proposals='sam_auto') on a 427x640 image".
        """
        step = self.emptying_step()
        if step is None:
            return None
        return (f"{where}: nothing left to recognise: {step.stage} removed all {step.candidates} {step.unit} "
                f"({step.control()}). Steps: {self.chain()}")

    def summary_warning(self, where: str) -> Optional[str]:
        """One line for a dataset: the steps that left images with nothing, with their counts
        and keys (None if no step emptied an image).

        Args:
            where: e.g. "evaluation on lvis_v1_val".
        """
        emptying = [s for s in self.steps if s.images_emptied]
        if not emptying:
            return None
        parts = [f"{s.stage} emptied {s.images_emptied} image(s), removing {s.removed} of {s.candidates} {s.unit} "
                 f"({s.control()})" for s in emptying]
        return (f"{where}: {self.images_emptied} of {self.images} images were left with nothing to recognise: "
                + "; ".join(parts))

    def as_dict(self) -> Dict[str, object]:
        """JSON-serialisable: ``images``, ``images_emptied`` and ``steps`` (each
        :meth:`FilterStep.as_dict`)."""
        return {"images": self.images, "images_emptied": self.images_emptied,
                "steps": [s.as_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "FilterReport":
        """The inverse of :meth:`as_dict`."""
        fields = set(FilterStep.__dataclass_fields__)
        steps = [FilterStep(**{k: v for k, v in s.items() if k in fields}) for s in data.get("steps", [])]
        return cls(steps, data.get("images", 1))

    def __repr__(self) -> str:
        return f"FilterReport(images={self.images}, steps=[{self.chain()}])"


def report_of_input(inputs: Dict) -> FilterReport:
    """A new report for one model input, starting with the steps the data loader already
    applied to its proposals (``inputs[PROPOSAL_FILTERS_KEY]``, a :class:`FilterReport` or its
    :meth:`~FilterReport.as_dict`), if any."""
    previous = inputs.get(PROPOSAL_FILTERS_KEY)
    if previous is None:
        return FilterReport()
    return previous.copy() if isinstance(previous, FilterReport) else FilterReport.from_dict(previous)


class FilterReportEvaluator:
    """Sums the models' per-image filter reports (``outputs[i]["filters"]``) over a dataset.

    Detectron2's ``DatasetEvaluator`` interface (``reset``, ``process``, ``evaluate``; not
    subclassed, so that importing this module does not import ``detectron2.evaluation``), to
    run beside the AP evaluator (``DatasetEvaluators([evaluator, FilterReportEvaluator()])``).
    :meth:`evaluate` gathers the sums of all processes on the main one and returns None (it
    adds no metric);
    :attr:`summary` then holds the dataset's :meth:`FilterReport.as_dict` plus
    ``images_without_detections`` (images whose output has no detection, whatever the cause:
    a filter, or no boxes to begin with), on the main process (None elsewhere).
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self._report = FilterReport(images=0)
        self._without_detections = 0
        self.summary: Optional[Dict[str, object]] = None

    def process(self, inputs, outputs):
        for output in outputs:
            self._report.merge(output.get("filters") or FilterReport())
            if "instances" in output and len(output["instances"]) == 0:
                self._without_detections += 1

    def evaluate(self):
        from detectron2.utils import comm

        parts = comm.gather((self._report.as_dict(), self._without_detections), dst=0)
        if not comm.is_main_process():
            return None
        total, without = FilterReport(images=0), 0
        for report, count in parts:
            total.merge(FilterReport.from_dict(report))
            without += count
        self.summary = dict(total.as_dict(), images_without_detections=without)
        return None


__all__ = ["PROPOSAL_FILTERS_KEY", "FilterStep", "FilterReport", "FilterReportEvaluator", "report_of_input"]
