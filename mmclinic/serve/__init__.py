"""Serving: vetting and export (SavedModel in TensorFlow Serving's layout), batch scoring into
SQL, and the REST server."""
