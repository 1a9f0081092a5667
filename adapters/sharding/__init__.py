"""Fully sharded data parallelism (FSDP2) of an adapted model: sharding it (``fsdp.py``) and loading it
sharded, each rank reading only its own part of the frozen base (``load.py``).

Below ``adapters.model`` (which calls both from ``adapt(..., fsdp=True)``) and above the backbone, methods and
heads it shards; the training loop shards a model that was loaded whole.
"""
