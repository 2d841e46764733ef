"""Reading, de-identifying, pairing, splitting and serving data to models."""
