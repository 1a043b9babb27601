"""Datasets that ship inside installed packages; nothing is downloaded."""

from jaxopt_serve.data.digits import Dataset, load_digits

__all__ = ["Dataset", "load_digits"]
