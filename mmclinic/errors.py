"""Typed errors with a stable ``reason_code``.

The reason codes are the ones written to ``quarantine.csv``. Messages name the
argument, file, field or DICOM tag at fault and never carry a patient's data:
callers pass tag keywords and ranges, not values read from the file.

Reason codes of one input (an image file or a table row):

- ``not_dicom``: neither DICOM (a Part 10 file, a dataset without preamble, either gzip-compressed)
  nor PNG or JPEG.
- ``truncated``: the file ends inside an element, the pixel data or the gzip stream.
- ``no_pixel_data``: an image object without a PixelData element.
- ``non_image_object``: a DICOM object that is not an image by its SOP class (structured report,
  key object selection, presentation state, RT structure set, plan or dose, segmentation,
  registration, waveform, encapsulated document, ...). A subclass of ``no_pixel_data``'s error.
- ``dicomdir``: a DICOMDIR, a directory of other files; the files it lists are never followed.
- ``unsupported_transfer_syntax``, ``unsupported_pixel_format``: a transfer syntax, or Image Pixel
  module values, the reader does not handle (the message names the tag).
- ``pixel_budget_exceeded``: the header asks for more decoded bytes than the pixel budget, or a
  gzip file or deflated dataset inflates past it (decompression bombs).
- ``corrupt_image``: bytes that cannot be decoded; ``decode_timeout``, ``decoder_crash``: the decoding
  worker ran past its time box or died.
- ``missing_uid``: a DICOM file without SOPInstanceUID where one is needed. Ingest needs none: an image
  without the tag takes the file meta's MediaStorageSOPInstanceUID, else a UID derived from the file's
  bytes (``mmclinic.data.images.instance_uid``; the manifest's ``uid_source`` says which), and its
  de-identified copy carries that identifier, keyed.
- ``unsafe_path``: a path named by a table (absolute, climbing out with ``..``) or a symbolic link
  that resolves outside the source folder; it is never read.
- ``missing_patient_id``: with ``--write-dicom``, a DICOM file without PatientID (no pseudonym or
  date shift for its de-identified copy).
- ``burned_in_annotation``, ``missing_image``, ``missing_report``, ``missing_patient``,
  ``empty_report``, ``duplicate``, ``conflicting_report``, ``bad_input``, ``bad_text``: see the
  README's Ingest section.
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


class NonImageObject(NoPixelData):
    """A DICOM object that is not an image: its SOP class is a structured report, key object
    selection, presentation state, RT structure set, plan or dose, segmentation, waveform,
    encapsulated document and the like."""

    reason_code = "non_image_object"


class DicomDirectory(NonImageObject):
    """A DICOMDIR: a directory of other files (Media Storage Directory Storage), not an image."""

    reason_code = "dicomdir"


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


class MissingUid(InputError):
    """A DICOM file without SOPInstanceUID (0008,0018) where one is needed."""

    reason_code = "missing_uid"


class UnsafePath(InputError):
    """A path from a table or a listed file that would be read from outside the source folder."""

    reason_code = "unsafe_path"


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
