"""Training machinery that Detectron2 0.6 lacks or that must not depend on how it was installed:
a launcher that also runs on machines without CUDA, the DDP wrapper, mixed precision."""
