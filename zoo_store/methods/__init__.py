"""Composition methods, one folder each, registered by name (``registry``); ``base`` says what a
method is and how to add one. Importing this package registers the four built-in methods."""

from zoo_store.methods import clone, reassemble, reprogram, resample
from zoo_store.methods.registry import get_method, method_names, register_method

__all__ = ["clone", "get_method", "method_names", "reassemble", "register_method", "reprogram", "resample"]
