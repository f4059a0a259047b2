"""Method registry: ``register_method`` / ``get_method`` / ``list_methods``.

Built-in methods live in ``labelwise.methods.<name>`` and are imported on first use, so
``get_method("cam")`` only pays for the ``cam`` imports. A third-party method registers
itself with::

    from labelwise.methods import Method, register_method

    @register_method
    class MyMethod(Method):
        name = "mine"
        config_cls = MyConfig
        ...
"""

from __future__ import annotations

import importlib
import importlib.util

from labelwise.engine.method import Method, StepContext
from labelwise.errors import LabelwiseError

__all__ = ["Method", "StepContext", "register_method", "get_method", "list_methods", "BUILTIN_METHODS"]

# name -> module that registers it (imported lazily)
BUILTIN_METHODS = {
    "cam": "labelwise.methods.cam",
    "seco": "labelwise.methods.seco",
    "cobra": "labelwise.methods.cobra",
    "oap": "labelwise.methods.oap",
    "kmax": "labelwise.methods.kmax",
    "cocal": "labelwise.methods.cocal",
}

_REGISTRY: dict[str, Method] = {}


def register_method(cls_or_obj):
    """Register a :class:`Method` subclass (used as a decorator) or instance under its ``name``."""
    obj = cls_or_obj() if isinstance(cls_or_obj, type) else cls_or_obj
    if not obj.name:
        raise ValueError(f"{cls_or_obj!r} has no name")
    _REGISTRY[obj.name] = obj
    return cls_or_obj


def _available() -> list[str]:
    names = set(_REGISTRY)
    for name, module in BUILTIN_METHODS.items():
        if importlib.util.find_spec(module) is not None:
            names.add(name)
    return sorted(names)


def list_methods() -> list[str]:
    """Names of the methods that can be trained (registered or built in and importable)."""
    return _available()


def get_method(name: str) -> Method:
    if name not in _REGISTRY and name in BUILTIN_METHODS:
        try:
            importlib.import_module(BUILTIN_METHODS[name])
        except ModuleNotFoundError as e:
            if e.name and BUILTIN_METHODS[name].startswith(e.name):
                pass  # not shipped in this build
            else:
                raise
    if name not in _REGISTRY:
        import difflib

        names = list_methods()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LabelwiseError(f"unknown method '{name}'{hint} (available methods: {', '.join(names) or 'none'})")
    return _REGISTRY[name]
