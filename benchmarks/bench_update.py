"""Benchmark (not a test): the training update and the per-step action selection of a MaMuJoCo script on synthetic
data with the reference's HalfCheetah 6x1 shapes (6 agents, 16 envs x 250 steps, 5 epochs, 1 minibatch, chunks of
10), in phase lora and phase ps, with one torch thread. Optionally times the official LoRASA code's modules in the
same run, alternating with ours (the machine's speed drifts between minutes, so only same-run ratios count):

    python benchmarks/bench_update.py --script mappo_lorasa_mamujoco.py --rounds 2
    LORASA_OFFICIAL_ROOT=<official tree> python benchmarks/bench_update.py --official-harness <harness.py>

Action selection = one actor step for all envs and agents (what the rollout does per env step) plus the critic's
cost per step (the scripts run the critic once per rollout over all T + 1 states; its time / T is added).
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, E, T, OBS, STATE, ACT = 6, 16, 250, 9, 17, 1


def load(script):
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ours(script, reps):
    """Median seconds of update() and milliseconds of action selection, per phase."""
    module = load(script)
    torch.set_num_threads(1)
    out = {}
    for phase in ("lora", "ps"):
        torch.manual_seed(0)
        args = module.finalize_args(module.Args(num_envs=E, num_steps=T, update_epochs=5, share_mode="lorasa"))
        actor, critic, value_norm = module.GaussianActor(OBS, ACT, N, args), module.Critic(STATE, N, args), module.ValueNorm(N)
        critic_optim = torch.optim.Adam(critic.parameters(), lr=3e-4, eps=1e-5)
        groups, optimizers = module.start_phase(actor, phase, args)
        buf = module.RolloutBuffer(args, N, OBS, STATE, ACT, "cpu")
        for tensor in (buf.obs, buf.state, buf.values, buf.rewards):
            tensor.normal_()
        buf.actions.uniform_(-0.9, 0.9)
        buf.logprobs.normal_(-0.5, 0.1)
        buf.masks[1:, ::7] = (torch.rand(T, 1) > 0.004).float()  # a few episode ends inside the batch
        returns, advantages = module.compute_returns(args, buf, value_norm)
        updates = []
        for _ in range(reps + 1):  # the first one warms up
            start = time.perf_counter()
            module.update(args, actor, critic, value_norm, optimizers, groups, critic_optim, buf, returns, advantages, phase)
            updates.append(time.perf_counter() - start)
        module.merge(actor, critic)
        obs, h, masks = torch.randn(N, 1, E, OBS), torch.zeros(N, E, 64), torch.ones(1, E)
        noise = torch.randn(N, E, ACT)

        def act():
            with torch.inference_mode():
                mean, std, _ = actor(obs, h, masks)
                torch.tanh(mean[:, 0] + std[:, 0] * noise)

        def critic_pass():
            with torch.inference_mode():
                critic(buf.state, buf.critic_h[:, 0], buf.masks)

        act_ms, critic_ms = [], []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(200):
                act()
            act_ms.append((time.perf_counter() - start) / 200 * 1000)
            start = time.perf_counter()
            critic_pass()
            critic_ms.append((time.perf_counter() - start) / T * 1000)
        out[phase] = dict(update_s=statistics.median(updates[1:]), actor_step_ms=statistics.median(act_ms[1:]),
                          critic_per_step_ms=statistics.median(critic_ms[1:]))  # fmt: skip
        out[phase]["action_selection_ms"] = out[phase]["actor_step_ms"] + out[phase]["critic_per_step_ms"]
    return out


def official(harness, reps):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "official.json")
        command = [sys.executable, harness, "--shapes", "mujoco_halfcheetah_6x1", "--modes", "lora", "ps", "--threads", "1",
                   "--reps", str(reps), "--warmup", "1", "--iteration", "--json", path]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
        with open(path) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", default="mappo_lorasa_mamujoco.py")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--official-harness", default=None, help="the official-code timing harness (a .py file)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one measurement in a fresh process with one OpenMP thread
        print(json.dumps(ours(args.script, args.reps)))
        return
    for round_ in range(args.rounds):
        command = [sys.executable, __file__, "--worker", "--script", args.script, "--reps", str(args.reps)]
        worker = subprocess.run(command, check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        mine = json.loads(worker.stdout)
        for phase, result in mine.items():
            print(f"round {round_ + 1} ours {args.script} phase {phase}: update {result['update_s']:.3f} s, action "
                  f"selection {result['action_selection_ms']:.3f} ms (actor {result['actor_step_ms']:.3f} + critic "
                  f"{result['critic_per_step_ms']:.3f})")  # fmt: skip
        if args.official_harness:
            for row in official(args.official_harness, args.reps)["configs"]:
                timing = row["results"]["1"]
                iteration, rollout = timing["iteration_s"]["median"], timing["rollout_s"]["median"] * 1000
                print(f"round {round_ + 1} official mode {row['mode']}: train iteration {iteration:.3f} s, get_actions "
                      f"{rollout:.3f} ms")  # fmt: skip
                if row["mode"] == "lora":
                    print(f"  official lora / ours: update {iteration / mine['lora']['update_s']:.2f}x (phase lora), "
                          f"{iteration / mine['ps']['update_s']:.2f}x (phase ps); action selection "
                          f"{rollout / mine['lora']['action_selection_ms']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
