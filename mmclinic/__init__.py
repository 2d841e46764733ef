"""mmclinic: a research workbench for clinical image-report learning."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["read_image", "__version__"]


def read_image(path: Any, frame: int | None = None, **kwargs: Any) -> Any:
    """Read a DICOM, PNG or JPEG file; see :func:`mmclinic.data.images.read_image`."""
    from mmclinic.data.images import read_image as _read_image

    return _read_image(path, frame, **kwargs)
