"""jaxdiff.distill."""
