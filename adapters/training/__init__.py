"""The training loop and what it uses.

``run.py`` (``train``/``evaluate``, the one-call entries) -> ``loop.py`` (``TrainingLoop`` in phases) ->
``loaders.py``, ``optim.py``, ``checkpoint.py``, ``evaluation.py``, ``batch_size.py``, ``probe.py``
(LP-FT), ``callbacks.py``, ``tracking.py``."""
