"""Optional dependencies: import them with an error that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra and the command."""


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ``MissingExtraError`` with the install command.

    Example:
        >>> require("numpy", extra="core", purpose="arrays").__name__
        'numpy'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{purpose} needs the '{module}' package, which is not installed. "
            f"Install the '{extra}' extra: pip install 'jaxopt_serve[{extra}]'"
        ) from err
