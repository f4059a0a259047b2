"""The methods: one package per method, read top to bottom like its paper.

The registry itself is part of the engine (:mod:`labelwise.engine.registry`); it is
re-exported here for convenience. See ``docs/architecture.md`` ("How to add a method").
"""

from labelwise.engine.method import Method, StepContext
from labelwise.engine.registry import BUILTIN_METHODS, get_method, list_methods, method_class, register_method

__all__ = ["Method", "StepContext", "register_method", "get_method", "list_methods", "method_class",
           "BUILTIN_METHODS"]
