"""Scipion's view of tomoctfrefine: the ``Plugin`` class that ``pwem.Domain`` instantiates.

Imported only by Scipion (through the lazy ``tomoctfrefine.Plugin`` attribute), never by the engine.
The engine is pure Python installed in the same environment as Scipion, so there is no binary to
install and no home directory to check: ``_pathVars`` stays empty on purpose (a listed path that does
not exist would make every protocol of the plugin refuse to run).
"""
import os
import sys

import pwem
import pyworkflow.utils as pwutils

from . import __version__

_url = "https://github.com/tomoctfrefine/tomoctfrefine"

#: Number of numba threads a step may use; passed in the environment of every engine process.
NUMBA_THREADS_VAR = "NUMBA_NUM_THREADS"


class Plugin(pwem.Plugin):
    _homeVar = ""
    _pathVars = []
    _supportedVersions = [__version__]
    _url = _url

    @classmethod
    def _defineVariables(cls):
        # Nothing to configure: the engine lives in this Python environment.
        pass

    @classmethod
    def getEnviron(cls, threads: int = 1) -> pwutils.Environ:
        """Environment of the engine's processes.

        The interpreter's ``bin/`` goes first on ``PATH`` so that ``mpirun`` (mpich installed in the
        same environment) and this Python are the ones found, whatever the user's shell had.
        """
        environ = pwutils.Environ(os.environ)
        environ.update({"PATH": os.path.dirname(sys.executable)}, position=pwutils.Environ.BEGIN)
        environ[NUMBA_THREADS_VAR] = str(max(1, int(threads)))
        return environ

    @classmethod
    def getPythonProgram(cls) -> str:
        return sys.executable

    @classmethod
    def defineBinaries(cls, env):
        pass

    @classmethod
    def validateInstallation(cls):
        """Nothing to check: the engine is this package (each protocol validates what it needs)."""
        return []


# pyworkflow names a plugin, and finds its folder and templates, through ``Plugin.__module__``
# (``sys.modules[module].__path__``), which must be the package the entry point names.
Plugin.__module__ = "tomoctfrefine"
