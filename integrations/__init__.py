"""Model-family shims, installed as ``vgkernels.integrations``.

Each module knows one family's decoder layers and image tokens and nothing of the
kernels; :mod:`vgkernels.patching` drives them.
"""
