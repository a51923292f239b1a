"""Benchmark (not a test): what ps, lorasa and nps cost as the number of agents grows, side by side in one run. For
MaMuJoCo partitions with 2 to 17 agents and SMAX maps with 3 to 27 agents: actor parameters, the seconds of one
training update on synthetic data with the task's real dimensions, and the peak memory that the networks, the rollout
buffer and the update add to the process. Writes scaling.csv, scaling.md (its table) and scaling.png (one figure,
three panels); --report-only rebuilds the last two from the CSV.

    python benchmarks/bench_scaling.py --rounds 2 --report-dir docs/results/scaling

Every (task, mode) is measured in a fresh process with one torch thread; the configurations alternate over --rounds
(the machine's speed drifts). Same settings within a suite, so that only the agents and dimensions change: MaMuJoCo
16 envs x 250 steps, SMAX 10 envs x 320 steps, 5 epochs, 1 minibatch, rank 8 on all seven layers. Peak memory: the
process's peak resident set (VmHWM, reset after the env is built) minus its resident set before the networks exist.
"""

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = [  # script, task flags
    ("mappo_lorasa_mamujoco.py", dict(scenario="HalfCheetah", agent_conf="2x3")),
    ("mappo_lorasa_mamujoco.py", dict(scenario="Ant", agent_conf="4x2")),
    ("mappo_lorasa_mamujoco.py", dict(scenario="HalfCheetah", agent_conf="6x1")),
    ("mappo_lorasa_mamujoco.py", dict(scenario="Walker2d", agent_conf="6x1")),
    ("mappo_lorasa_mamujoco.py", dict(scenario="Humanoid", agent_conf="17x1")),
    ("mappo_lorasa_smac.py", dict(map="3m")),
    ("mappo_lorasa_smac.py", dict(map="2s3z")),
    ("mappo_lorasa_smac.py", dict(map="3s5z")),
    ("mappo_lorasa_smac.py", dict(map="10m_vs_11m")),
    ("mappo_lorasa_smac.py", dict(map="27m_vs_30m")),
]
MODES = ("ps", "lorasa", "nps")


def status(key):
    """A field of /proc/self/status in MiB (VmRSS: now, VmHWM: the peak)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def worker(script, task, mode, reps):
    """In a fresh process: build the task's env for its dimensions, then the networks and a synthetic batch, and time
    `update` (median of reps after a warm-up) and record the peak memory it all adds."""
    import torch

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    smac = "smac" in script
    steps = dict(num_envs=10, num_steps=320) if smac else dict(num_envs=16, num_steps=250)
    args = module.finalize_args(module.Args(**task, **steps, update_epochs=5, share_mode=mode, env_backend="smax") if smac
                                else module.Args(**task, **steps, update_epochs=5, share_mode=mode))  # fmt: skip
    if smac:
        module.resolve_backend(args)
        envs, _ = module.make_envs(args, [0])
        N, OBS = envs.single_observation_space["obs"].shape
        STATE, ACT = (
            envs.single_observation_space["state"].shape[1],
            envs.single_observation_space["avail"].shape[1],
        )
    else:
        env = module.MaMuJoCoEnv(
            args.scenario, args.agent_conf, args.agent_obsk, args.obs_mode, args.max_episode_steps
        )
        N, OBS, STATE, ACT = (
            len(env.agents),
            env.obs.shape[1],
            env.state.shape[1],
            env.action_dims.shape[1],
        )
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = status("VmRSS")
    torch.manual_seed(0)
    if smac:
        actor = module.CategoricalActor(OBS, ACT, N, args)
    else:
        actor = module.GaussianActor(OBS, ACT, N, args, torch.as_tensor(env.action_dims))
    critic, value_norm = module.Critic(STATE, N, args), module.ValueNorm(N)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=3e-4, eps=1e-5)
    phase = {"ps": "ps", "lorasa": "lora", "nps": "nps"}[mode]
    groups, optimizers = module.start_phase(actor, phase, args)
    buf = module.RolloutBuffer(args, N, OBS, STATE, ACT, "cpu")
    for tensor in (buf.obs, buf.state, buf.values, buf.rewards):
        tensor.normal_()
    buf.masks[1:, ::3] = (torch.rand(args.num_steps, 1) > 0.015).float()
    if smac:
        buf.avail.copy_((torch.rand(buf.avail.shape) < 0.5).float())
        buf.avail[..., 1:6] = 1
        buf.avail[..., 0] = 0
        buf.actions.copy_(torch.distributions.Categorical(probs=buf.avail[:, :-1]).sample())
        buf.logprobs.normal_(-1.5, 0.1)
    else:
        buf.actions.uniform_(-0.9, 0.9)
        buf.logprobs.normal_(-0.5, 0.1)
    returns, advantages = module.compute_returns(args, buf, value_norm)
    seconds = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        models = (actor, critic, value_norm, (optimizers, groups, critic_optim))
        module.update(args, phase, *models, buf, returns, advantages)
        seconds.append(time.perf_counter() - start)
    shared = sum(p.numel() for n, p in actor.named_parameters() if "lora_" not in n) // (
        N if mode == "nps" else 1
    )
    adapters = sum(
        p.numel() for n, p in actor.named_parameters() if "lora_" in n and "lora_bias" not in n
    )
    actor_params = {"ps": shared, "lorasa": shared + adapters, "nps": N * shared}[mode]
    return dict(update_s=float(np.median(seconds[1:])), peak_mib=status("VmHWM") - before, actor_params=actor_params,
                trainable_params=sum(p.numel() for group in groups for p in group), n_agents=N)  # fmt: skip


def scaling_table(rows):
    """scaling.csv's rows (strings) as the Markdown table docs/results.md shows."""
    lines = ["| task | agents | mode | actor parameters | trained parameters | update s (min-max) | peak MiB |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        update = f"{row['update_s']} ({row['update_s_min']}-{row['update_s_max']})"
        cells = [
            row["task"],
            row["n_agents"],
            row["mode"],
            row["actor_params"],
            row["trainable_params"],
            update,
            row["peak_mib"],
        ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("actor_params", "actor parameters (all agents)"), ("update_s", "update, s per iteration (1 thread)"),
              ("peak_mib", "peak memory added, MiB"))  # fmt: skip
    for axis, (key, title) in zip(axes, panels):
        for suite, style in (("MaMuJoCo", "-o"), ("SMAX", "--s")):
            for mode, color in zip(MODES, ("tab:blue", "tab:orange", "tab:green")):
                points = sorted(
                    (row["n_agents"], row[key])
                    for row in rows
                    if row["suite"] == suite and row["mode"] == mode
                )
                if points:
                    axis.plot(*zip(*points), style, color=color, label=f"{mode}, {suite}")
        axis.set(xlabel="agents", title=title, yscale="log" if key == "actor_params" else "linear")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=9)
    figure.suptitle(
        "Cost as agents grow: MaMuJoCo 16 x 250 and SMAX 10 x 320 env steps per iteration, 5 epochs, r = 8"
    )
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--report-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild scaling.md and scaling.png from scaling.csv",
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.report_only:
        report(options.report_dir)
        return
    if options.worker:
        script, task, mode = options.worker
        print(json.dumps(worker(script, json.loads(task), mode, options.reps)))
        return
    results = {}
    for round_ in range(options.rounds):
        for script, task in TASKS:
            for mode in MODES:
                command = [
                    sys.executable,
                    __file__,
                    "--reps",
                    str(options.reps),
                    "--worker",
                    script,
                    json.dumps(task),
                    mode,
                ]
                env = dict(os.environ, OMP_NUM_THREADS="1")
                out = subprocess.run(
                    command, check=True, capture_output=True, text=True, env=env
                ).stdout
                result = json.loads(out.strip().splitlines()[-1])
                label = "-".join(task.values())
                results.setdefault(
                    ("SMAX" if "smac" in script else "MaMuJoCo", label, mode), []
                ).append(result)
                print(f"round {round_ + 1} {label} ({result['n_agents']} agents) {mode}: update {result['update_s']:.2f} s, "
                      f"peak +{result['peak_mib']:.0f} MiB, actor params {result['actor_params']:,}", flush=True)  # fmt: skip
    rows = []
    for (suite, label, mode), measured in results.items():
        rows.append(dict(task=label, suite=suite, mode=mode, n_agents=measured[0]["n_agents"],
                         actor_params=measured[0]["actor_params"], trainable_params=measured[0]["trainable_params"],
                         update_s=float(np.median([m["update_s"] for m in measured])),
                         update_s_min=min(m["update_s"] for m in measured), update_s_max=max(m["update_s"] for m in measured),
                         peak_mib=float(np.median([m["peak_mib"] for m in measured]))))  # fmt: skip
    os.makedirs(options.report_dir, exist_ok=True)
    with open(os.path.join(options.report_dir, "scaling.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows
        )
    report(options.report_dir)


def report(report_dir):
    """scaling.md and scaling.png from scaling.csv (the figure from the same rounded numbers as the table)."""
    with open(os.path.join(report_dir, "scaling.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(report_dir, "scaling.md"), "w") as f:
        f.write(scaling_table(rows))
    numbers = [
        {
            **row,
            **{
                key: float(row[key]) for key in ("n_agents", "actor_params", "update_s", "peak_mib")
            },
        }
        for row in rows
    ]
    plot(numbers, os.path.join(report_dir, "scaling.png"))
    print(f"scaling.csv, scaling.md and scaling.png in {report_dir}")


if __name__ == "__main__":
    main()
