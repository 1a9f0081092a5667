"""Settings, typed and validated when built: ``TrainConfig`` (how to train, ``training.py``) and the YAML
run file (``run_file.py``: sections model, adapter, head, data, train -> ``RunConfig``)."""
