"""Benchmark (not a test) of a StarCraft script on SMAX: the raw jitted, vmapped env throughput against the trainer's
rollout in the same iterations, the update time per phase, and the SPS of the default command (10 envs x 320 steps).

    python benchmarks/bench_smac.py --script mappo_lorasa_smac.py --map 3s5z --iterations 6

Raw throughput steps the trainer's own SMAXEnvs (one jitted, vmapped step for all envs, finished envs reset as in the
trainer) with uniformly random available actions, in bursts interleaved with the trainer runs (this machine's speed
drifts). The trainer's perf/SPS_env is the env-only throughput inside its rollouts; perf/rollout_s the whole rollout.
"""

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(script):
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def raw_smax_sps(module, options, steps):
    args = module.finalize_args(module.Args(map=options.map, env_backend="smax", num_envs=options.num_envs))
    envs, observation = module.make_envs(args, list(range(options.num_envs)))
    rng = np.random.default_rng(0)
    envs.step(np.ones((options.num_envs, observation["avail"].shape[1]), int))  # compiles
    start = time.perf_counter()
    for _ in range(steps):
        avail = observation["avail"]
        actions = (rng.random(avail.shape) * avail).argmax(-1)  # uniformly random among the available actions
        observation, _, terminated, truncated, _ = envs.step(actions)
        if (terminated | truncated).any():
            observation, _ = envs.reset(options={"reset_mask": terminated | truncated})
    return steps * options.num_envs / (time.perf_counter() - start)


def trainer(options, folder):
    steps = options.num_envs * 320
    command = [sys.executable, os.path.join(ROOT, options.script), "--map", options.map, "--env-backend", "smax",
               "--num-envs", str(options.num_envs), "--total-timesteps", str(options.iterations * steps), "--lora-start",
               str(options.iterations // 2 * steps), "--eval-interval", "1000000", "--eval-episodes", "2", "--no-save-model",
               "--run-dir", folder]  # fmt: skip
    subprocess.run(command, check=True, cwd=folder, stdout=subprocess.DEVNULL)
    accumulator = EventAccumulator(glob.glob(os.path.join(folder, "*__*"))[0], size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = ("perf/rollout_s", "perf/update_s", "charts/phase", "perf/SPS_env", "charts/SPS")
    return {tag: np.array([event.value for event in accumulator.Scalars(tag)]) for tag in tags}, steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", default="mappo_lorasa_smac.py")
    parser.add_argument("--map", default="3s5z")
    parser.add_argument("--num-envs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--raw-steps", type=int, default=300)
    options = parser.parse_args()
    module = load(options.script)
    raw, runs = [], []
    for _ in range(options.repeats):
        raw.append(raw_smax_sps(module, options, options.raw_steps))
        runs.append(trainer(options, tempfile.mkdtemp()))
    raw_text = " ".join(f"{x:.0f}" for x in raw)
    print(f"{options.script} SMAX {options.map}, {options.num_envs} envs x 320 steps, {options.iterations} iterations x "
          f"{options.repeats} runs; raw env steps/s (random available actions): {raw_text}")  # fmt: skip
    for name, phase in (("ps", 0), ("lora", 1)):
        rollout, share, update = [], [], []
        for result, steps in runs:
            index = np.flatnonzero(result["charts/phase"] == phase)
            index = index[index > 0]  # the first iteration compiles
            rollout += list(steps / result["perf/rollout_s"][index])
            share += list(steps / result["perf/rollout_s"][index] / result["perf/SPS_env"][index])
            update += list(result["perf/update_s"][index])
        shares = f"{np.median(share):.0%} ({min(share):.0%}-{max(share):.0%})"
        print(f"phase {name}: rollout {np.median(rollout):.0f} steps/s, rollout / env time in the same iterations {shares}, "
              f"best rollout / best raw {max(rollout) / max(raw):.0%}, update {np.median(update):.2f} s")  # fmt: skip
    sps = [result["charts/SPS"][-1] for result, _ in runs]
    print(f"training SPS at the end of the runs (rollout + update, no evaluation): {' '.join(f'{x:.0f}' for x in sps)}")


if __name__ == "__main__":
    main()
