"""Benchmark (not a test): the training update and the per-step action selection of a script on synthetic data with
the reference's shapes, in phase lora and phase ps, with one torch thread: MaMuJoCo HalfCheetah 6x1 (6 agents, 16 envs
x 250 steps, 5 epochs, obs 9, state 17, 1 action dim) or SMAC 3s5z (8 agents, 10 envs x 320 steps, 5 epochs, obs 128,
state 216, 14 actions with availability masks and dead agents). Optionally times the official LoRASA code's modules on
the same shapes in the same run, alternating with ours (the machine's speed drifts: only same-run ratios count):

    python benchmarks/bench_update.py --script mappo_lorasa_mamujoco.py --rounds 2
    python benchmarks/bench_update.py --script mappo_lorasa_smac.py --rounds 2
    python benchmarks/bench_update.py --script mappo_lorasa_smac.py a2po_lorasa_smac.py     # A2PO / MAPPO, alternated
    LORASA_OFFICIAL_ROOT=<official tree> python benchmarks/bench_update.py --official-harness <harness.py>

Action selection = one actor step for all envs and agents (what the rollout does per env step) plus the critic's cost
per step (the scripts run the critic once per rollout over all T + 1 states; its time / T is added).
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
SHAPES = {  # agents, envs, steps, obs, state, actions (dims, or categories), the official harness's shape name
    "mamujoco": (6, 16, 250, 9, 17, 1, "mujoco_halfcheetah_6x1"),
    "smac": (8, 10, 320, 128, 216, 14, "smac_3s5z"),
}


def load(script):
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ours(script, reps):
    """Median seconds of update() and milliseconds of action selection, per phase."""
    module = load(script)
    suite = "smac" if "smac" in script else "mamujoco"
    N, E, T, OBS, STATE, ACT, _ = SHAPES[suite]
    torch.set_num_threads(1)
    out = {}
    for phase in ("lora", "ps"):
        torch.manual_seed(0)
        args = module.finalize_args(
            module.Args(num_envs=E, num_steps=T, update_epochs=5, share_mode="lorasa")
        )
        if suite == "smac":
            actor = module.CategoricalActor(OBS, ACT, N, args)
        else:
            actor = module.GaussianActor(OBS, ACT, N, args)
        critic, value_norm = module.Critic(STATE, N, args), module.ValueNorm(N)
        critic_optim = torch.optim.Adam(critic.parameters(), lr=3e-4, eps=1e-5)
        groups, optimizers = module.start_phase(actor, phase, args)
        buf = module.RolloutBuffer(args, N, OBS, STATE, ACT, "cpu")
        for tensor in (buf.obs, buf.state, buf.values, buf.rewards):
            tensor.normal_()
        buf.masks[1:, ::3] = (torch.rand(T, 1) > 0.015).float()  # episode ends inside the batch
        if (
            suite == "smac"
        ):  # random availability (moves and stop always, attacks half the time), some dead agents
            buf.avail.copy_((torch.rand(buf.avail.shape) < 0.5).float())
            buf.avail[..., 1:6] = 1
            buf.avail[..., 0] = 0
            dead = torch.rand(N, T + 1, E) < 0.2
            buf.avail[dead] = torch.eye(ACT)[0]
            buf.active.copy_(~dead)
            buf.actions.copy_(torch.distributions.Categorical(probs=buf.avail[:, :-1]).sample())
            buf.logprobs.normal_(-1.5, 0.1)
        else:
            buf.actions.uniform_(-0.9, 0.9)
            buf.logprobs.normal_(-0.5, 0.1)
        returns, advantages = module.compute_returns(args, buf, value_norm)
        updates = []
        for _ in range(reps + 1):  # the first one warms up
            start = time.perf_counter()
            models = (actor, critic, value_norm, (optimizers, groups, critic_optim))
            module.update(args, phase, *models, buf, returns, advantages)
            updates.append(time.perf_counter() - start)
        obs, h, masks = torch.randn(N, 1, E, OBS), torch.zeros(N, E, 64), torch.ones(1, E)
        noise = torch.randn(N, E, ACT)
        avail = buf.avail[:, :1] if suite == "smac" else None

        def act():  # as in a rollout: inside merged_weights (entered once per rollout)
            with torch.inference_mode():
                if suite == "smac":
                    logits, _ = actor(obs, h, masks, avail)
                    (logits[:, 0] + noise).argmax(-1)
                else:
                    mean, std, _ = actor(obs, h, masks)
                    torch.tanh(mean[:, 0] + std[:, 0] * noise)

        act_ms, critic_ms = [], []
        for _ in range(5):
            start = time.perf_counter()
            with module.merged_weights(
                actor
            ):  # once per 200 steps here, once per rollout in the scripts
                for _ in range(200):
                    act()
            act_ms.append((time.perf_counter() - start) / 200 * 1000)
            start = time.perf_counter()
            module.critic_values(critic, buf)
            critic_ms.append((time.perf_counter() - start) / T * 1000)
        out[phase] = dict(update_s=statistics.median(updates[1:]), actor_step_ms=statistics.median(act_ms[1:]),
                          critic_per_step_ms=statistics.median(critic_ms[1:]))  # fmt: skip
        out[phase]["action_selection_ms"] = (
            out[phase]["actor_step_ms"] + out[phase]["critic_per_step_ms"]
        )
    return out


def official(harness, reps, shape):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "official.json")
        command = [sys.executable, harness, "--shapes", shape, "--modes", "lora", "ps", "--threads", "1",
                   "--reps", str(reps), "--warmup", "1", "--iteration", "--json", path]  # fmt: skip
        subprocess.run(
            command,
            check=True,
            stdout=subprocess.DEVNULL,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        with open(path) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--script",
        nargs="+",
        default=["mappo_lorasa_mamujoco.py"],
        help="one or more scripts, alternated",
    )
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--official-harness", default=None, help="the official-code timing harness (a .py file)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one measurement in a fresh process with one OpenMP thread
        print(json.dumps(ours(args.script[0], args.reps)))
        return
    for round_ in range(args.rounds):
        mine = {}
        for script in args.script:
            command = [
                sys.executable,
                __file__,
                "--worker",
                "--script",
                script,
                "--reps",
                str(args.reps),
            ]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            mine[script] = json.loads(
                subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
            )
            for phase, result in mine[script].items():
                print(f"round {round_ + 1} ours {script} phase {phase}: update {result['update_s']:.3f} s, action "
                      f"selection {result['action_selection_ms']:.3f} ms (actor {result['actor_step_ms']:.3f} + critic "
                      f"{result['critic_per_step_ms']:.3f})")  # fmt: skip
            print(
                f"  phase lora / phase ps update: {mine[script]['lora']['update_s'] / mine[script]['ps']['update_s']:.2f}x"
            )
        if len(args.script) > 1:
            first = mine[args.script[0]]
            for script in args.script[1:]:
                ratios = ", ".join(
                    f"phase {p} {mine[script][p]['update_s'] / first[p]['update_s']:.2f}x"
                    for p in first
                )
                print(f"  update {script} / {args.script[0]}: {ratios}")
        if args.official_harness:
            first = mine[args.script[0]]
            shape = SHAPES["smac" if "smac" in args.script[0] else "mamujoco"][-1]
            for row in official(args.official_harness, args.reps, shape)["configs"]:
                timing = row["results"]["1"]
                iteration, rollout = (
                    timing["iteration_s"]["median"],
                    timing["rollout_s"]["median"] * 1000,
                )
                print(f"round {round_ + 1} official mode {row['mode']}: train iteration {iteration:.3f} s, get_actions "
                      f"{rollout:.3f} ms")  # fmt: skip
                if row["mode"] == "lora":
                    print(f"  official lora / {args.script[0]}: update {iteration / first['lora']['update_s']:.2f}x (phase "
                          f"lora), {iteration / first['ps']['update_s']:.2f}x (phase ps); action selection "
                          f"{rollout / first['lora']['action_selection_ms']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
