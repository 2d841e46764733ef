"""Dual-tower models. Nothing here imports data code."""

from mmclinic.models.dual_encoder import DualEncoder

__all__ = ["DualEncoder"]
