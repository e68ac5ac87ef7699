"""Headless Scipion environment for the plugin tests, set up before pyworkflow is first imported.

Scipion reads its configuration from the environment when ``pyworkflow`` is imported, and every
protocol runs in a child process that inherits it; so this module (loaded by pytest before the test
modules of this folder) sets, in a fresh temporary folder:

* ``SCIPION_HOME`` (with ``config/hosts.conf`` written by ``HostConfig.writeBasic``),
  ``SCIPION_USER_DATA`` (projects, logs), ``SCIPION_TESTS`` (test data sets, unused);
* ``SCIPION_DOMAIN=pwem`` (else ``createProject`` fails on a None domain);
* ``SCIPION_PYTHON`` = this interpreter (protocols run as ``$SCIPION_PYTHON pw_protocol_run.py``);
* ``SQLITE_JOURNAL_MODE=WAL`` (Python 3.11 + the default journal mode deadlocks tomo's imports);
* ``SCIPION_TEST_NOSYNC=1`` (never download test data).

Values already in the environment are kept, so a developer can point the tests at a real install.
"""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

if "pyworkflow" in sys.modules:
    raise RuntimeError("pyworkflow was imported before tests/scipion/conftest.py could configure Scipion; "
                       "run the Scipion tests in their own pytest process or import nothing from Scipion earlier")

_ROOT = tempfile.mkdtemp(prefix="tomoctfrefine_scipion_")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

os.environ.setdefault("SCIPION_HOME", os.path.join(_ROOT, "home"))
os.environ.setdefault("SCIPION_USER_DATA", os.path.join(_ROOT, "userdata"))
os.environ.setdefault("SCIPION_TESTS", os.path.join(_ROOT, "tests_data"))
os.environ["SCIPION_DOMAIN"] = "pwem"
os.environ.setdefault("SCIPION_PYTHON", sys.executable)
os.environ["SQLITE_JOURNAL_MODE"] = "WAL"
os.environ["SCIPION_TEST_NOSYNC"] = "1"
# The child processes must find this interpreter's tools (mpirun) first.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

try:
    import pyworkflow.protocol as _protocol  # first pyworkflow import: after the variables above
except ImportError:  # the engine alone is installed (pip install tomoctfrefine, without [scipion])
    _protocol = None
    collect_ignore_glob = ["test_*.py"]
else:
    _HOSTS = os.path.join(os.environ["SCIPION_HOME"], "config", "hosts.conf")
    if not os.path.exists(_HOSTS):
        os.makedirs(os.path.dirname(_HOSTS), exist_ok=True)
        _protocol.HostConfig.writeBasic(_HOSTS)


@pytest.fixture(scope="session")
def scipion_root():
    """The temporary folder holding SCIPION_HOME and SCIPION_USER_DATA."""
    return _ROOT
