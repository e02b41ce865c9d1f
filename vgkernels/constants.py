"""Constants of the method and of the models, written down once.

- :data:`IMAGE_TOKEN_INDEX`: the LLaVA codebase's image sentinel (``tokenizer_image_token``
  puts it where ``<image>`` stood; the model splices the image's features there).
- :data:`REFERENCE_PROMPT`: the generic prompt whose attention map normalises a question's
  (paper Sec. 3).
- :data:`ANSWER_LINE`: the short-answer instruction of the LLaVA evaluation templates that
  the authors append to every closed-ended question (paper Fig. I.12).
- :data:`CHOICE_LINE`: the closing instruction of the LLaVA multiple-choice template
  (paper Fig. I.13).
- :data:`OFFICIAL_GRID`: the ``(rows, cols)`` token grid the authors' ``gt_tokens`` cells
  are given on (the 24×24 grid of a 336-pixel CLIP ViT-L/14).
"""
IMAGE_TOKEN_INDEX = -200
REFERENCE_PROMPT = "Write a general description of the image."
ANSWER_LINE = "Answer the question using a single word or phrase."
CHOICE_LINE = "Answer with the option's letter from the given choices directly."
OFFICIAL_GRID = (24, 24)

__all__ = ["IMAGE_TOKEN_INDEX", "REFERENCE_PROMPT", "ANSWER_LINE", "CHOICE_LINE", "OFFICIAL_GRID"]
