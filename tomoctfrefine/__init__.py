"""tomoctfrefine: per-tilt CTF refinement for cryo-ET subtomogram averaging.

The engine (this package) never imports Scipion. Scipion finds the plugin through the
``pyworkflow.plugin`` entry point, which names this module and reads its ``Plugin`` attribute:
it is resolved lazily from :mod:`tomoctfrefine.plugin` so that ``import tomoctfrefine`` works
without Scipion installed.
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Plugin", "_pluginInstance"):
        from . import plugin

        return getattr(plugin, name) if name == "Plugin" else None
    if name in ("protocols", "wizards", "viewers"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
