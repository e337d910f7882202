"""jaxdiff.data."""
