"""``python -m sample``: the sampling entry point (see ``sample/__main__.py``)."""
