"""Files -> rows -> token ids -> batches.

* ``sources.py``: CSV / JSONL / Parquet / hub data sets -> rows, splits, sampling;
* ``encoding.py``: rows -> token ids (the encoders head specs choose from) and the collator;
* ``batching.py``: length-grouped sampling, token-budget inference batches, packing."""
