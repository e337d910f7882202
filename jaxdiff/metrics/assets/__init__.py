"""Data files shipped with jaxdiff: the digits classifier's weights (``digits_classifier.npz``).

A package (not a bare folder) so every setuptools version installs the files with it.
"""
