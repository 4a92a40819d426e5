"""Every dpolab module imports on its own: no import circle hides behind the import order of another module."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

# One interpreter; before each module every dpolab module is dropped from sys.modules, so each
# import starts from nothing of ours (third-party packages stay loaded: they are not ours to test).
CODE = r"""
import importlib, pkgutil, sys, traceback
import dpolab
names = ["dpolab"] + [m.name for m in pkgutil.walk_packages(dpolab.__path__, "dpolab.")]
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "dpolab" or m.startswith("dpolab.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print(len(names), "modules")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert int(proc.stdout.split()[0]) >= 40  # every module was found, not an empty walk
