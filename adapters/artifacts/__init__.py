"""What a trained model becomes on disk, and what can be made of it.

``spec.py``: ``ArtifactSpec`` (``qadapters.json``, typed); ``format.py``: the artifact format (one reader
``open_artifact``, one writer ``save_artifact``); ``card.py``: the model card; ``merge.py``: LoRA folded into
a standalone model; ``export.py``: a folder ``transformers.pipeline`` reads."""
