"""Experiment configs for ``python -m train --config=train/configs/NAME.py``."""
