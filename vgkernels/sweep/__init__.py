"""Grounding sweeps: ``vgkernels sweep``, ``vgkernels heads`` and ``vgkernels demo``.

A sweep reads image–box–question samples (:mod:`.datasets`), captures the last prompt
token's attention over the image for a question prompt and a reference prompt
(:mod:`.runner`), reduces the maps to AR/KL/JS per layer and per head
(:mod:`.metrics`), writes them to append-only, resumable shards (:mod:`.store`) and,
merged, to tidy Parquet tables (:mod:`.tables`), shards the work over ``torchrun`` ranks
(:mod:`.dist`) and renders tables and plots (:mod:`.report`). :mod:`.heads` ranks heads
for VGRefine's triage. Output folders are locked and owned (:mod:`vgkernels.outdir`).
"""
