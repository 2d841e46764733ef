"""Long reliability runs: a generated corpus of hostile files (corpus.py) and property-based fuzzing
of the readers (fuzz.py); ``make reliability`` runs both."""
