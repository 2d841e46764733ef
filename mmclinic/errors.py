"""Typed errors with a stable ``reason_code``.

The reason codes are the ones written to ``quarantine.csv``. Messages name the
argument, file, field or DICOM tag at fault and never carry a patient's data:
callers pass tag keywords and ranges, not values read from the file.
"""

from __future__ import annotations


class MmclinicError(Exception):
    """Base class. ``exit_code`` is what the command line returns for it."""

    reason_code = "error"
    exit_code = 1

    def __init__(self, message: str, *, reason_code: str | None = None) -> None:
        super().__init__(message)
        if reason_code is not None:
            self.reason_code = reason_code

    @property
    def message(self) -> str:
        return str(self)


class UsageError(MmclinicError):
    """Unusable arguments or input: a missing file, a bad option (exit code 2)."""

    reason_code = "usage"
    exit_code = 2


class ConfigError(UsageError):
    """An experiment file with an unknown key, a wrong type or a value out of range."""

    reason_code = "config"


class InputError(MmclinicError):
    """One input file that cannot be accepted; it goes to the quarantine list."""

    reason_code = "bad_input"
    exit_code = 2


class NotDicom(InputError):
    reason_code = "not_dicom"


class TruncatedFile(InputError):
    reason_code = "truncated"


class NoPixelData(InputError):
    reason_code = "no_pixel_data"


class UnsupportedTransferSyntax(InputError):
    reason_code = "unsupported_transfer_syntax"


class UnsupportedPixelFormat(InputError):
    reason_code = "unsupported_pixel_format"


class PixelBudgetExceeded(InputError):
    reason_code = "pixel_budget_exceeded"


class CorruptImage(InputError):
    reason_code = "corrupt_image"


class DecodeTimeout(InputError):
    """Decoding one file ran past its time box and the worker process was stopped."""

    reason_code = "decode_timeout"


class MissingReport(InputError):
    reason_code = "missing_report"


class MissingImage(InputError):
    reason_code = "missing_image"


class EmptyReport(InputError):
    reason_code = "empty_report"


class BadText(InputError):
    reason_code = "bad_text"


class BurnedInAnnotation(InputError):
    reason_code = "burned_in_annotation"


class PhiRisk(MmclinicError):
    """Something about to be logged or exported looks like protected health information."""

    reason_code = "phi_risk"


class VettingFailed(MmclinicError):
    """A run did not pass the checks required before export."""

    reason_code = "vetting_failed"
