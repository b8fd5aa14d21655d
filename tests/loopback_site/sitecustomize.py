"""Installs the tests' loopback guard (tests/loopback.py) in every Python subprocess of the tests.

tests/conftest.py puts this directory on PYTHONPATH for the session; Python imports sitecustomize
at start-up, before `-m pusherd` runs. The guard is loaded from its file so that the daemon's
sys.path stays as it would be.
"""

import importlib.util
import pathlib
import sys

_path = pathlib.Path(__file__).resolve().parent.parent / "loopback.py"
_spec = importlib.util.spec_from_file_location("pusherd_tests_loopback", _path)
assert _spec is not None and _spec.loader is not None
_guard = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _guard
_spec.loader.exec_module(_guard)
_guard.install()
