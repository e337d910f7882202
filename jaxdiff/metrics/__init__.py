"""jaxdiff.metrics."""
