"""The frozen pretrained network under an adapter: loading it with bitsandbytes quantization, dtype and
device (``loading.py``), and the models shipped in PyPI packages (``packaged.py``)."""
