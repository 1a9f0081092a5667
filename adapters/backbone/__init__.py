"""The frozen pretrained network under an adapter: loading it with bitsandbytes quantization, dtype and
device (``loading.py``), the compute dtype each device gets (``precision.py``), the fused RMSNorm and
rotary forms it computes with where they match its own code (``kernels.py``), the CPU allocator setting
it runs under (``allocator.py``), reading it FSDP-sharded (``sharded.py``), what its ``forward`` accepts
(``signature.py``), and the models shipped in PyPI packages (``packaged.py``)."""
