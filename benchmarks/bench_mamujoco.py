"""Benchmark of a MaMuJoCo trainer script (not a test): raw env throughput vs the trainer's rollout and training SPS
on the same envs, update time per iteration in ps / lorasa / nps mode, and the parameter counts.

    python benchmarks/bench_mamujoco.py --script mappo_lorasa_mamujoco.py --scenario HalfCheetah --agent-conf 2x3

Raw throughput steps the same vector env the trainer uses (gymnasium SyncVectorEnv of the script's adapters, with
the script's own reset handling) with uniform random actions, and the bare PettingZoo envs in a plain loop.
The trainer runs in a subprocess; its numbers come from its TensorBoard events (perf/rollout_s, perf/update_s).
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
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def raw_vector_env_sps(mod, a, steps):
    """The trainer's own envs (make_envs: adapters stepped in lockstep), random actions, resets as in the trainer."""
    args, _ = mod.finalize_args(mod.Args(scenario=a.scenario, agent_conf=a.agent_conf, num_envs=a.num_envs))
    envs, _ = mod.make_envs(args, a.num_envs, [k for k in range(a.num_envs)])
    rng = np.random.default_rng(0)
    shape = envs.single_action_space.shape
    t0 = time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc, _ = envs.step(rng.uniform(-1, 1, (a.num_envs, *shape)).astype(np.float32))
        if (term | trunc).any():
            envs.reset(options={"reset_mask": term | trunc})
    sps = steps * a.num_envs / (time.perf_counter() - t0)
    envs.close()
    return sps


def raw_pettingzoo_sps(mod, a, steps):
    envs = [mod.MaMuJoCoEnv(a.scenario, a.agent_conf).env for _ in range(a.num_envs)]
    for k, e in enumerate(envs):
        e.reset(seed=k)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        for e in envs:
            acts = {ag: rng.uniform(-1, 1, e.action_space(ag).shape).astype(np.float32) for ag in e.possible_agents}
            _, _, term, trunc, _ = e.step(acts)
            if term[e.possible_agents[0]] or trunc[e.possible_agents[0]]:
                e.reset()
    return steps * a.num_envs / (time.perf_counter() - t0)


def trainer(a, mode, extra=()):
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, os.path.join(ROOT, a.script), "--scenario", a.scenario, "--agent-conf", a.agent_conf,
               "--num-envs", str(a.num_envs), "--share-mode", mode, "--eval-interval", "1000000", "--eval-episodes", "1",
               "--no-save-model", "--run-dir", d, *extra]
        steps_per_iter = a.num_envs * a.num_steps
        cmd += ["--num-steps", str(a.num_steps), "--total-timesteps", str(a.iterations * steps_per_iter),
                "--lora-start", str(a.iterations // 2 * steps_per_iter)]
        subprocess.run(cmd, check=True, cwd=d, stdout=subprocess.DEVNULL)
        ea = EventAccumulator(glob.glob(os.path.join(d, "*"))[0], size_guidance={"scalars": 0})
        ea.Reload()
        get = lambda tag: np.array([e.value for e in ea.Scalars(tag)])
        return dict(rollout_s=get("perf/rollout_s"), update_s=get("perf/update_s"), phase=get("charts/phase"),
                    sps_env=get("perf/SPS_env"), sps=get("charts/SPS"), steps=steps_per_iter,
                    counts={k: ea.Scalars(f"lorasa/{k}")[0].value for k in
                            ("shared_params", "adapter_params_per_agent", "nps_params", "critic_params")})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--script", default="mappo_lorasa_mamujoco.py")
    p.add_argument("--scenario", default="HalfCheetah")
    p.add_argument("--agent-conf", default="2x3")
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--num-steps", type=int, default=250)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--raw-steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    mod = load(a.script)
    print(f"{a.script} {a.scenario} {a.agent_conf}: {a.num_envs} envs x {a.num_steps} steps, {a.iterations} iterations"
          f" per run, {a.repeats} runs per mode; best / median over iterations after the first")
    raw_vec, raw_pz, runs = [], [], {m: [] for m in ("lorasa", "ps", "nps")}
    for _ in range(a.repeats):  # interleave raw bursts with the runs: this VM's speed drifts by tens of percent
        for mode in runs:
            for _ in range(2):
                raw_vec.append(raw_vector_env_sps(mod, a, a.raw_steps))
                raw_pz.append(raw_pettingzoo_sps(mod, a, a.raw_steps))
            runs[mode].append(trainer(a, mode))
    vec, pz = max(raw_vec), max(raw_pz)
    print(f"raw env steps/s, random actions (best / median of {len(raw_vec)} bursts of {a.raw_steps} steps): "
          f"trainer's envs {vec:.0f} / {np.median(raw_vec):.0f}; bare PettingZoo loop {pz:.0f} / {np.median(raw_pz):.0f}")
    print("| mode, phase | rollout steps/s best / median | rollout / env time (same iterations) | best rollout / best raw"
          " (trainer's envs, bare) | update s/iteration best / median | training SPS |")
    print("|---|---|---|---|---|---|")
    upd = {}
    for mode, rs in runs.items():
        for ph_name, ph in (("ps", 0), ("lora", 1), ("nps", 2)):
            roll, env_frac, up, sps = [], [], [], []
            for r in rs:
                sel = np.flatnonzero(r["phase"] == ph)
                sel = sel[sel > 0]  # the first iteration warms up
                roll += list(r["steps"] / r["rollout_s"][sel])
                env_frac += list(roll[-len(sel):] / r["sps_env"][sel]) if len(sel) else []
                up += list(r["update_s"][sel])
                sps.append(r["sps"][-1])
            if not roll:
                continue
            upd[(mode, ph_name)] = up
            print(f"| {mode}, {ph_name} | {max(roll):.0f} / {np.median(roll):.0f} | {np.median(env_frac):.0%} "
                  f"| {max(roll) / vec:.0%}, {max(roll) / pz:.0%} | {min(up):.3f} / {np.median(up):.3f} "
                  f"| {np.median(sps):.0f} |")
    ratio = np.median(upd[("lorasa", "lora")]) / np.median(upd[("lorasa", "ps")])
    ratio_best = min(upd[("lorasa", "lora")]) / min(upd[("lorasa", "ps")])
    print(f"lorasa runs: phase-lora update / phase-ps update = {ratio:.2f}x median, {ratio_best:.2f}x best")
    print("parameter counts:", {k: int(v) for k, v in runs["lorasa"][0]["counts"].items()})


if __name__ == "__main__":
    main()
