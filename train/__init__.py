"""``python -m train``: the training entry point (see ``train/__main__.py``)."""
