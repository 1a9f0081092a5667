"""Adapter methods, one module per kind, behind one interface (``spec.AdapterSpec``):

* ``lora.py``: LoRA through peft (Hu et al. 2021), with ``lora_fused.py``'s lean forward;
* ``bottleneck.py``: Houlsby / Pfeiffer bottleneck adapters, hooked onto output projections;
* ``targets.py``: which linear layers a selection names (shared by the kinds).

The kinds are listed once, in ``adapters.registry.ADAPTERS``."""
