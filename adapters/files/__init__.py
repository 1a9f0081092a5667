"""Files the library writes and reads: one small module per responsibility, under the rule that the library
deletes only what it wrote and that damage says so.

``manifest.py``: what a folder's writer wrote, with sizes and sha256 (delete exactly that; verify on read);
``durable.py``: folders written atomically and durably, with a roll-forward journal and a full disk reported;
``destinations.py``: which files a write may replace, a writability probe, a lock per destination;
``tensors.py``: safetensors read with typed errors, checked against a model, digested cheaply."""

from adapters.files.destinations import destination_lock, probe_writable, writable_entries
from adapters.files.durable import durable_folder, recover
from adapters.files.manifest import MANIFEST, Manifest, read_manifest, remove_listed, verify
from adapters.files.tensors import check_state, cpu_state, load_tensors, weights_digest

__all__ = [
    "MANIFEST",
    "Manifest",
    "check_state",
    "cpu_state",
    "destination_lock",
    "durable_folder",
    "load_tensors",
    "probe_writable",
    "read_manifest",
    "recover",
    "remove_listed",
    "verify",
    "weights_digest",
    "writable_entries",
]
