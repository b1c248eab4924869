"""Tandem: a fast answer now, an accurate answer later."""

__version__ = "0.1.0"
