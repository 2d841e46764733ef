"""mmclinic: a research workbench for clinical image-report learning.

The commands as functions (each module is imported on first use, so ``import mmclinic`` stays
light): :func:`read_image`, :func:`synthesize`, :func:`ingest`, :func:`train`, :func:`evaluate`,
:func:`compare`, :func:`export`, :func:`score`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_COMMANDS = {
    "synthesize": "mmclinic.data.synth",
    "ingest": "mmclinic.data.ingest",
    "train": "mmclinic.training.loop",
    "evaluate": "mmclinic.eval.evaluate",
    "compare": "mmclinic.eval.compare",
    "export": "mmclinic.serve.export",
    "score": "mmclinic.serve.scoring",
}

__all__ = ["read_image", "__version__", *_COMMANDS]


def read_image(path: Any, frame: int | None = None, **kwargs: Any) -> Any:
    """Read a DICOM, PNG or JPEG file; see :func:`mmclinic.data.images.read_image`."""
    from mmclinic.data.images import read_image as _read_image

    return _read_image(path, frame, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _COMMANDS:
        return getattr(importlib.import_module(_COMMANDS[name]), name)
    raise AttributeError(f"module 'mmclinic' has no attribute {name!r}")
