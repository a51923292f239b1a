"""Shared helpers: the scripts are loaded as modules (their `__main__` part does not run on import)."""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["mappo_lorasa_mamujoco.py", "a2po_lorasa_mamujoco.py"]


def load_script(name):
    path = os.path.join(ROOT, name)
    mod_name = name[:-3]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def present_scripts():
    return [s for s in SCRIPTS if os.path.exists(os.path.join(ROOT, s))]


@pytest.fixture(params=present_scripts(), ids=lambda s: s[:-3])
def script(request):
    """Each trainer script present in the repo, loaded as a module."""
    return load_script(request.param)


def make_args(mod, **kw):
    """Effective Args as the script computes them (defaults filled, derived fields set)."""
    args, _ = mod.finalize_args(mod.Args(**kw))
    return args
