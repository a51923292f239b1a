"""Shared helpers: the scripts are loaded as modules (their `__main__` part does not run on import)."""

import glob
import importlib.util
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [
    "mappo_lorasa_mamujoco.py",
    "a2po_lorasa_mamujoco.py",
    "mappo_lorasa_smac.py",
    "a2po_lorasa_smac.py",
]
MAMUJOCO = [s for s in SCRIPTS if s.endswith("mamujoco.py")]
# Every process that runs SMAX compiles its jitted functions (about 15 s of CPU): the test processes share JAX's
# persistent compilation cache, which stores the compiled executables (the same code, the same numbers).
JAX_CACHE = dict(
    JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "lorasa-tests-jax-cache")
)
JAX_CACHE.update(
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0"
)
for key, value in JAX_CACHE.items():
    os.environ.setdefault(key, value)


def pytest_configure(config):
    # JAX warns at every fork of a process that imported it; the tests' subprocesses run new programs at once
    config.addinivalue_line("filterwarnings", r"ignore:os\.fork\(\) was called:RuntimeWarning")


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


def run(script, args, cwd, env=None, check=True):
    """A script as users run it, in a subprocess in `cwd`, with `env` over this process's environment (None: unset);
    on failure the assertion shows the end of its output."""
    env = {key: value for key, value in {**os.environ, **(env or {})}.items() if value is not None}
    res = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True, cwd=cwd,
                         timeout=400, env=env)  # fmt: skip
    if check:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def scalars(run_dir):
    """{tag: [(step, value), ...]} of a run's TensorBoard scalars."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def only_run(cwd):
    """The one run folder under cwd/runs (W&B's files of --track, runs/wandb, are not a run)."""
    runs = [
        path for path in glob.glob(os.path.join(cwd, "runs", "*")) if not path.endswith("wandb")
    ]
    assert len(runs) == 1, runs
    return runs[0]


def record_actor_steps(actor, optimizers):
    """Wrap every optimiser's step: the returned list gets (optimiser index, names of the actor parameters it changed)."""
    steps = []
    for k, optimizer in enumerate(optimizers):
        original = optimizer.step

        def step(*a, _original=original, _k=k, **kw):
            before = {n: p.detach().clone() for n, p in actor.named_parameters()}
            out = _original(*a, **kw)
            steps.append(
                (_k, {n for n, p in actor.named_parameters() if not torch.equal(before[n], p)})
            )
            return out

        optimizer.step = step
    return steps


def assert_only_the_current_agent_moved(steps, actor, groups, stats, mode, loop, N, epochs):
    """A2PO's turns, from record_actor_steps: lorasa - each step moves only agent k's adapters; nps - only agent k's
    network; ps - the shared network, one optimiser stepping once per turn; the agent loop's turns follow the order."""
    names = {id(p): n for n, p in actor.named_parameters()}
    assert len(steps) == N * epochs
    for k, moved in steps:
        assert moved, k
        if mode == "ps":
            assert k == 0 and all("lora_" not in n for n in moved)
        else:
            assert moved <= {names[id(p)] for p in groups[k]}, k
    if (
        mode != "ps" and loop == "agent"
    ):  # each agent's turn is contiguous and follows the logged order
        order = sorted(range(N), key=lambda i: stats[f"a2po/order_pos/agent_{i}"])
        assert [k for k, _ in steps] == [i for i in order for _ in range(epochs)]
    assert {"a2po/others_ratio_mean", "a2po/trace_rho_mean", f"a2po/clip_eps/pos_{N}"} <= set(stats)


def sc2_folder(path, game=b"\x7fELF", mode=0o755):
    """A StarCraft II folder as resolve_backend checks it: Versions/Base75689/SC2_x64 (`game`:
    its content, None: absent) and the map files."""
    (path / "Versions" / "Base75689").mkdir(parents=True)
    (path / "Maps" / "SMAC_Maps").mkdir(parents=True)
    for name in ("3m", "3s5z", "32x32_flat"):
        (path / "Maps" / "SMAC_Maps" / f"{name}.SC2Map").write_bytes(b"")
    if game is not None:
        (path / "Versions" / "Base75689" / "SC2_x64").write_bytes(game)
        (path / "Versions" / "Base75689" / "SC2_x64").chmod(mode)
    return path
