"""Datasets that ship inside installed packages; nothing is downloaded."""

from jaxopt_serve.data.digits import CLS_TOKEN, Dataset, load_digit_tokens, load_digits

__all__ = ["CLS_TOKEN", "Dataset", "load_digit_tokens", "load_digits"]
