"""The condense methods: each module here registers its methods with `@register_method("condense", NAME)`.

Importing this package imports every module in it, so adding a method is adding one file (see `dm.py`, the
shortest: a `Method` subclass whose typed keyword-only arguments are its options, and one registration line).
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
