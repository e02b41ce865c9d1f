"""VGRefine (paper Sec. 3): triage + knockout at inference time, and its command line.

- :class:`VGRefine`, :class:`Setting`, :class:`RefineResult` (:mod:`.method`);
- :mod:`.cli`: ``vgkernels refine``; :mod:`.eval`: question files, prompts and scoring.
"""
from .method import RefineResult, Setting, VGRefine

__all__ = ["VGRefine", "Setting", "RefineResult"]
