"""Benchmark (not a test) of a StarCraft script on SMAX: the raw jitted, vmapped env throughput against the trainer's
rollout in the same iterations, the update time per phase, and the SPS of the default command (10 envs x 320 steps).

    python benchmarks/bench_smac.py --script mappo_lorasa_smac.py --map 3s5z --iterations 6
    python benchmarks/bench_smac.py --rollout-threads        # XLA threads, jax dispatch and torch threads in the rollout

Raw throughput steps the trainer's own SMAXEnvs (one jitted, vmapped step for all envs, finished envs reset as in the
trainer) with uniformly random available actions, in bursts interleaved with the trainer runs (this machine's speed
drifts). The trainer's perf/SPS_env is the env-only throughput inside its rollouts; perf/rollout_s the whole rollout.
--rollout-threads times the script's collect_rollout in fresh processes under each combination of XLA's threads (the
script's single thread, or XLA's default), jax's CPU dispatch (the script's synchronous one, or asynchronous) and
torch's threads during the rollout (the script's 1, or 2), the configurations interleaved over --repeats rounds.
"""

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(script):
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def raw_smax_sps(module, options, steps):
    args = module.finalize_args(
        module.Args(map=options.map, env_backend="smax", num_envs=options.num_envs)
    )
    envs, observation = module.make_envs(args, list(range(options.num_envs)))
    rng = np.random.default_rng(0)
    envs.step(np.ones((options.num_envs, observation["avail"].shape[1]), int))  # compiles the step
    envs.reset(
        options={"reset_mask": np.arange(options.num_envs) % 2 == 0}
    )  # and the partial reset
    start = time.perf_counter()
    for _ in range(steps):
        avail = observation["avail"]
        actions = (rng.random(avail.shape) * avail).argmax(
            -1
        )  # uniformly random among the available actions
        observation, _, terminated, truncated, _ = envs.step(actions)
        if (terminated | truncated).any():
            observation, _ = envs.reset(options={"reset_mask": terminated | truncated})
    return steps * options.num_envs / (time.perf_counter() - start)


def rollout_worker(script, map_name, num_envs, xla_default, async_dispatch, torch_threads):
    """In a fresh process: median seconds of collect_rollout (10 envs x 320 steps, phase ps) and its env share."""
    if xla_default:
        os.environ["XLA_FLAGS"] = (
            ""  # the script only sets XLA_FLAGS where the environment has none
        )
    module = load(script)
    args = module.finalize_args(module.Args(map=map_name, env_backend="smax", num_envs=num_envs))
    module.resolve_backend(args)
    envs, observation = module.make_envs(args, list(range(num_envs)))
    jax = module.import_smax()[0]
    jax.config.update("jax_cpu_enable_async_dispatch", async_dispatch)
    torch.set_num_threads(torch_threads)
    n_agents, obs_dim = envs.single_observation_space["obs"].shape
    state_dim, n_actions = (
        envs.single_observation_space["state"].shape[1],
        envs.single_observation_space["avail"].shape[1],
    )
    actor = module.CategoricalActor(obs_dim, n_actions, n_agents, args)
    module.start_phase(actor, "ps", args)
    buf = module.RolloutBuffer(args, n_agents, obs_dim, state_dim, n_actions, "cpu")
    buf.put_obs(0, observation)
    seconds, shares = [], []
    for _ in range(5):  # the first one compiles
        start = time.perf_counter()
        _, env_seconds = module.collect_rollout(args, envs, actor, buf)
        seconds.append(time.perf_counter() - start)
        shares.append(env_seconds / seconds[-1])
        buf.roll()
    return float(np.median(seconds[1:])), float(np.median(shares[1:]))


def rollout_threads(options):
    configs = [
        (xla, dispatch, threads)
        for xla in (False, True)
        for dispatch in (False, True)
        for threads in (1, 2)
    ]
    results = {config: [] for config in configs}
    for _ in range(options.repeats):
        for config in configs:
            folder = os.path.dirname(os.path.abspath(__file__))
            call = f"rollout_worker({options.script!r}, {options.map!r}, {options.num_envs}, *{config})"
            code = f"import sys, json; sys.path.insert(0, {folder!r}); import bench_smac; print(json.dumps(bench_smac.{call}))"
            out = subprocess.run(
                [sys.executable, "-c", code], check=True, capture_output=True, text=True
            ).stdout
            results[config].append(json.loads(out.strip().splitlines()[-1]))
    baseline = np.median([s for s, _ in results[(False, False, 1)]])
    print(
        f"{options.script} SMAX {options.map}, {options.num_envs} envs x 320 steps, collect_rollout, median of 4 per process"
    )
    for (xla, dispatch, threads), values in results.items():
        seconds = " ".join(f"{s:.3f}" for s, _ in values)
        print(f"XLA {'default threads' if xla else '1 thread       '}, dispatch {'async' if dispatch else 'sync '}, torch "
              f"{threads}: rollout s {seconds} (median / the script's {np.median([s for s, _ in values]) / baseline:.2f}x), "
              f"env share {np.median([share for _, share in values]):.0%}")  # fmt: skip


def trainer(options, folder):
    steps = options.num_envs * 320
    command = [sys.executable, os.path.join(ROOT, options.script), "--map", options.map, "--env-backend", "smax",
               "--num-envs", str(options.num_envs), "--total-timesteps", str(options.iterations * steps), "--lora-start",
               str(options.iterations // 2 * steps), "--eval-interval", "1000000", "--eval-episodes", "2", "--no-save-model",
               "--run-dir", folder]  # fmt: skip
    subprocess.run(command, check=True, cwd=folder, stdout=subprocess.DEVNULL)
    accumulator = EventAccumulator(
        glob.glob(os.path.join(folder, "*__*"))[0], size_guidance={"scalars": 0}
    )
    accumulator.Reload()
    tags = ("perf/rollout_s", "perf/update_s", "charts/phase", "perf/SPS_env", "charts/SPS")
    return {
        tag: np.array([event.value for event in accumulator.Scalars(tag)]) for tag in tags
    }, steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", default="mappo_lorasa_smac.py")
    parser.add_argument("--map", default="3s5z")
    parser.add_argument("--num-envs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--raw-steps", type=int, default=300)
    parser.add_argument(
        "--rollout-threads",
        action="store_true",
        help="time the rollout under thread settings instead",
    )
    options = parser.parse_args()
    if options.rollout_threads:
        rollout_threads(options)
        return
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
    print(
        f"training SPS at the end of the runs (rollout + update, no evaluation): {' '.join(f'{x:.0f}' for x in sps)}"
    )


if __name__ == "__main__":
    main()
