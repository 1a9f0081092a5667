"""``qadapters serve``: artifacts behind an HTTP API, those on one backbone sharing it (``server.py``)."""
