"""Tandem's benchmark: `python -m bench`. Numbers are ratios taken in one run on one machine."""
