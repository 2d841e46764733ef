"""De-identification (DICOM headers, report text) and the guard that checks what is logged."""
