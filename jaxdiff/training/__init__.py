"""jaxdiff.training."""
