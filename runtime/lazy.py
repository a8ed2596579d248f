"""Lazy package exports: a package ``__init__`` that names its public objects without importing them.

``cachec.runtime`` and ``cachec.calibrate`` use it so that importing one light submodule (the plan schema,
the calibration format) does not import torch through the package's other modules.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """Module ``__getattr__`` and ``__dir__`` for ``package``.

    Args:
        package: the package's ``__name__``.
        exports: ``{public name: submodule that defines it}``.
        namespace: the package's ``globals()``; a resolved name is cached there.

    Returns:
        ``(__getattr__, __dir__)`` to assign in the package's ``__init__``.

    Raises:
        AttributeError: (from ``__getattr__``) a name that is not exported.
    """

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
