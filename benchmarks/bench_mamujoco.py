"""Benchmark (not a test) of a MaMuJoCo trainer script: raw env throughput against the trainer's rollout on the same
envs, and the update time per iteration in each share mode, read from the trainer's TensorBoard events.

    python benchmarks/bench_mamujoco.py --script mappo_lorasa_mamujoco.py --scenario HalfCheetah --agent-conf 2x3
    python benchmarks/bench_mamujoco.py --modes lorasa --parallel 2 --threads 1   # two runs side by side

Raw throughput steps the trainer's own vector env (gymnasium SyncVectorEnv of the script's adapters, finished envs
reset as in the trainer) with uniform random actions, and the bare PettingZoo envs in a plain loop; bursts are
interleaved with the trainer runs because this machine's speed drifts. The most reliable rollout figure is the
rollout's share of the env time inside the same iterations (perf/SPS_env against the rollout's steps per second).
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


def raw_vector_env_sps(module, options, steps):
    args = module.finalize_args(
        module.Args(scenario=options.scenario, agent_conf=options.agent_conf)
    )
    envs, _ = module.make_envs(args, list(range(options.num_envs)))
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = envs.step(
            rng.uniform(-1, 1, envs.action_space.shape).astype(np.float32)
        )
        if (terminated | truncated).any():
            envs.reset(options={"reset_mask": terminated | truncated})
    sps = steps * options.num_envs / (time.perf_counter() - start)
    envs.close()
    return sps


def raw_pettingzoo_sps(module, options, steps):
    envs = [
        module.MaMuJoCoEnv(options.scenario, options.agent_conf).env
        for _ in range(options.num_envs)
    ]
    for k, env in enumerate(envs):
        env.reset(seed=k)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        for env in envs:
            actions = {
                agent: rng.uniform(-1, 1, env.action_space(agent).shape)
                for agent in env.possible_agents
            }
            _, _, terminations, truncations, _ = env.step(actions)
            if any(terminations.values()) or any(truncations.values()):
                env.reset()
    return steps * options.num_envs / (time.perf_counter() - start)


def start_trainer(options, mode, folder):
    steps = options.num_envs * options.num_steps
    command = [sys.executable, os.path.join(ROOT, options.script), "--scenario", options.scenario, "--agent-conf",
               options.agent_conf, "--num-envs", str(options.num_envs), "--num-steps", str(options.num_steps),
               "--share-mode", mode, "--eval-interval", "1000000", "--eval-episodes", "1", "--no-save-model",
               "--run-dir", folder, "--threads", str(options.threads), "--total-timesteps", str(options.iterations * steps),
               "--lora-start", str(options.iterations // 2 * steps)]  # fmt: skip
    return subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL)


def read_run(folder):
    accumulator = EventAccumulator(
        glob.glob(os.path.join(folder, "*__*"))[0], size_guidance={"scalars": 0}
    )
    accumulator.Reload()
    tags = ("perf/rollout_s", "perf/update_s", "charts/phase", "perf/SPS_env")
    return {tag: np.array([event.value for event in accumulator.Scalars(tag)]) for tag in tags}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", default="mappo_lorasa_mamujoco.py")
    parser.add_argument("--scenario", default="HalfCheetah")
    parser.add_argument("--agent-conf", default="2x3")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--num-steps", type=int, default=250)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["lorasa", "ps", "nps"])
    parser.add_argument("--threads", type=int, default=1, help="the trainers' --threads")
    parser.add_argument(
        "--parallel", type=int, default=1, help="trainer processes started side by side per mode"
    )
    parser.add_argument("--raw-steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    module = load(options.script)
    steps = options.num_envs * options.num_steps
    print(f"{options.script} {options.scenario} {options.agent_conf}: {options.num_envs} envs x {options.num_steps} steps, "
          f"{options.iterations} iterations, --threads {options.threads}, {options.parallel} run(s) at once")  # fmt: skip
    raw_vector, raw_bare, runs = [], [], {mode: [] for mode in options.modes}
    for _ in range(options.repeats):
        for mode in options.modes:
            raw_vector.append(raw_vector_env_sps(module, options, options.raw_steps))
            raw_bare.append(raw_pettingzoo_sps(module, options, options.raw_steps))
            folders = [tempfile.mkdtemp() for _ in range(options.parallel)]
            processes = [start_trainer(options, mode, folder) for folder in folders]
            assert all(process.wait() == 0 for process in processes)
            runs[mode] += [read_run(folder) for folder in folders]
    best_vector, best_bare = max(raw_vector), max(raw_bare)
    print(f"raw env steps/s (best / median of {len(raw_vector)} bursts): trainer's envs {best_vector:.0f} / "
          f"{np.median(raw_vector):.0f}, bare PettingZoo {best_bare:.0f} / {np.median(raw_bare):.0f}")  # fmt: skip
    print("| mode, phase | rollout / env time, same iterations | best rollout / best raw (trainer's envs, bare) "
          "| update s/iteration median (min-max) |\n|---|---|---|---|")  # fmt: skip
    for mode, results in runs.items():
        for phase_name, phase in (("ps", 0), ("lora", 1), ("nps", 2)):
            rollout, env_share, update = [], [], []
            for result in results:
                index = np.flatnonzero(result["charts/phase"] == phase)
                index = index[index > 0]  # the first iteration warms up
                rollout += list(steps / result["perf/rollout_s"][index])
                env_share += list(
                    steps / result["perf/rollout_s"][index] / result["perf/SPS_env"][index]
                )
                update += list(result["perf/update_s"][index])
            if rollout:
                shares = f"{np.median(env_share):.0%} | {max(rollout) / best_vector:.0%}, {max(rollout) / best_bare:.0%}"
                print(
                    f"| {mode}, {phase_name} | {shares} | {np.median(update):.2f} ({min(update):.2f}-{max(update):.2f}) |"
                )


if __name__ == "__main__":
    main()
