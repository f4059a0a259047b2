"""Method registry: ``register_method`` / ``get_method`` / ``list_methods``.

Methods are registered as *classes*; :func:`get_method` returns a fresh instance on
every call, so state a method keeps on ``self`` never leaks from one run into the next
in the same process.

Where methods come from, in this order:

* built-ins (``BUILTIN_METHODS``: name -> module), imported on first use so that
  ``get_method("cam")`` only pays for the ``cam`` imports;
* plugins: modules named in the environment variable ``LABELWISE_PLUGINS``
  (comma-separated) and the ``labelwise.methods`` entry-point group of installed
  distributions. Importing a plugin module registers its methods::

      from labelwise.engine import Method, register_method

      @register_method
      class MyMethod(Method):
          name = "mine"
          config_cls = MyConfig
          ...

  ``LABELWISE_PLUGINS`` reaches ``torchrun`` workers and DataLoader processes too, so a
  plugin method trains under ``torchrun -m labelwise train mine ...`` like a built-in.

This module lives in the engine and imports method modules only by name, so the engine
does not depend on any method.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os

from labelwise.errors import LabelwiseError

__all__ = ["BUILTIN_METHODS", "register_method", "get_method", "list_methods", "method_class"]

# name -> module that registers it (imported lazily). A name whose module is not part of
# this build is reported as such, never as an unknown name.
BUILTIN_METHODS = {
    "cam": "labelwise.methods.cam",
    "seco": "labelwise.methods.seco",
    "cobra": "labelwise.methods.cobra",
    "irn": "labelwise.methods.irn",
    "segmenter": "labelwise.methods.segmenter",
    "oap": "labelwise.methods.oap",
    "kmax": "labelwise.methods.kmax",
    "cocal": "labelwise.methods.cocal",
}

_REGISTRY: dict[str, type] = {}
_plugins_loaded = False


def register_method(cls: type) -> type:
    """Register a :class:`~labelwise.engine.method.Method` subclass under its ``name`` (a class decorator)."""
    from labelwise.engine.method import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method expects a Method subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in filter(None, (m.strip() for m in os.environ.get("LABELWISE_PLUGINS", "").split(","))):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise LabelwiseError(f"LABELWISE_PLUGINS names module '{mod}', which cannot be imported ({e}); fix "
                                 "the name or PYTHONPATH") from None
    from importlib.metadata import entry_points

    for ep in entry_points(group="labelwise.methods"):
        ep.load()


def _import_builtin(name: str) -> bool:
    """Import the built-in module of ``name``; False when it is not part of this build."""
    module = BUILTIN_METHODS[name]
    if importlib.util.find_spec(module) is None:
        return False
    importlib.import_module(module)
    return True


def list_methods() -> list[str]:
    """Names of the methods that can be trained here (built in and shipped, or plugins)."""
    _load_plugins()
    for name in BUILTIN_METHODS:
        if name not in _REGISTRY:
            _import_builtin(name)
    return sorted(_REGISTRY)


def method_class(name: str) -> type:
    """The registered class of method ``name`` (see :func:`get_method`)."""
    _load_plugins()
    if name not in _REGISTRY and name in BUILTIN_METHODS:
        if not _import_builtin(name) or name not in _REGISTRY:
            raise LabelwiseError(f"method '{name}' is not part of this version of labelwise (available methods: "
                                 f"{', '.join(list_methods()) or 'none'})")
    if name not in _REGISTRY:
        names = list_methods()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LabelwiseError(f"unknown method '{name}'{hint} (available methods: {', '.join(names) or 'none'})")
    return _REGISTRY[name]


def get_method(name: str):
    """A new instance of method ``name``."""
    return method_class(name)()
