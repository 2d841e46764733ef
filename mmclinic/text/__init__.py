"""Report text: sections and normalisation (the text a model sees), corruption rules, label
parsing and tokenizers. Imports nothing above itself (no data, models, training, eval or serve)."""
