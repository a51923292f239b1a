"""Shared helpers: the scripts are loaded as modules (their `__main__` part does not run on import)."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["mappo_lorasa_mamujoco.py", "a2po_lorasa_mamujoco.py", "mappo_lorasa_smac.py", "a2po_lorasa_smac.py"]
MAMUJOCO = [s for s in SCRIPTS if s.endswith("mamujoco.py")]


def load_script(name):
    mod_name = name[:-3]
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, os.path.join(ROOT, name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    return sys.modules[mod_name]


def present(scripts):
    return [s for s in scripts if os.path.exists(os.path.join(ROOT, s))]


@pytest.fixture(params=present(MAMUJOCO), ids=lambda s: s[:-3])
def script(request):
    """Each MaMuJoCo trainer script, loaded as a module."""
    return load_script(request.param)


def make_args(module, **kw):
    """Effective Args as the script computes them (defaults filled, derived fields set)."""
    return module.finalize_args(module.Args(**kw))
