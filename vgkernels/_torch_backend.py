"""``backend="torch"``: the references of :mod:`vgkernels.reference` under the backend names."""
from .reference import attention_ref as attention
from .reference import capture_from_lse_ref as capture_from_lse
from .reference import grounding_metrics_ref as grounding_metrics

__all__ = ["attention", "capture_from_lse", "grounding_metrics"]
