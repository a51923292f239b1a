"""The paper's comparisons and ablations from one command: runs of the project's own scripts over seeds, in a paired
design, then one tidy CSV of every evaluation, a summary with IQM and 95 % stratified-bootstrap intervals (rliable)
and paired differences, and the figures.

    python benchmarks/study.py baselines --script mappo_lorasa_mamujoco.py -- --scenario HalfCheetah --agent-conf 2x3
    python benchmarks/study.py rank --ranks 1 4 8 16 --script mappo_lorasa_smac.py -- --map 3m
    python benchmarks/study.py timing --fractions 0.1 0.25 0.5 --seeds 1 2 3 4 5 --script mappo_lorasa_smac.py -- --map 3s5z
    python benchmarks/study.py baselines --script a2po_lorasa_smac.py --launcher slurm --slurm-partition cpu -- --map 3s5z

Everything after `--` goes to every run (the task and any other flag of the script). Studies (P = --pretrain-steps,
Q = --finetune-steps):
- baselines: per seed one PS pretraining run of P steps; from its checkpoint.pt, phase 2 continues PS (`ps`) or trains
  LoRASA adapters (`lorasa`) for Q steps; `nps` trains one network per agent from scratch for P + Q steps.
- rank / placement: the same pretraining; phase 2 is `ps` or LoRASA at each --ranks / --placements (layer sets).
- timing: one run per switch point, `--lora-start` at each fraction of P + Q, and `ps` (no switch); the scripts make
  runs of one seed bit-identical until their switch, so every timing shares its pretraining with the others.
Phase-2 treatments of a seed start from the same checkpoint (same weights, critic, value normalisers, RNG and env
seeds), so that their differences come from the treatment alone; comparisons are paired over seeds.

Each run is a separate process (`--threads` torch threads) of the script, in <out>/<study id>/<treatment>__seed<k>/.
Running the same command again skips finished runs, resumes unfinished ones from their checkpoint and rebuilds the
report; nothing is deleted. Local runs use a process pool of --workers (default: cores // --threads); `--launcher
slurm` submits them through submitit in two waves (pretraining, then phase 2). The report (evaluations.csv,
summary.csv, summary.md, command.txt, curves.png, final.png, profile.png) goes to --report-dir (default: the study
folder). Score: the evaluation win rate on StarCraft, the evaluation return on MaMuJoCo; the final score of a run is
the mean of its last --final-evals evaluations. `--report-only` starts nothing and rebuilds the report; without the
runs (a fresh clone of the repository) it rebuilds the summary and the figures from the evaluations.csv already in
--report-dir.
"""

import concurrent.futures
import csv
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple

import numpy as np
import tyro

warnings.filterwarnings(
    "ignore", category=FutureWarning, module="arch"
)  # rliable's bootstrap passes a RandomState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACEMENTS = {  # named layer sets for the placement study (the scripts' --lora-layers)
    "all": ("fc1", "fc2a", "fc2b", "gru_x", "gru_h", "fc_post", "head"),
    "mlp": ("fc1", "fc2a", "fc2b", "fc_post"),
    "gru": ("gru_x", "gru_h"),
    "head": ("head",),
    "no_head": ("fc1", "fc2a", "fc2b", "gru_x", "gru_h", "fc_post"),
}


@dataclass
class Args:
    study: tyro.conf.Positional[
        Literal["baselines", "rank", "placement", "timing"]
    ]  # which comparison (module docstring)
    script: str = "mappo_lorasa_mamujoco.py"  # the trainer script, at the repository root
    seeds: Tuple[int, ...] = (1, 2, 3)  # one paired set of runs per seed
    pretrain_steps: int = (
        1_000_000  # P: env steps of the PS pretraining (timing: P + Q is the whole run)
    )
    finetune_steps: int = 1_000_000  # Q: env steps of phase 2
    rank: int = 8  # the LoRASA rank of baselines, placement and timing
    ranks: Tuple[int, ...] = (1, 2, 4, 8, 16)  # rank study
    placements: Tuple[str, ...] = (
        "all",
        "mlp",
        "gru",
        "head",
        "no_head",
    )  # placement study: names of PLACEMENTS
    fractions: Tuple[float, ...] = (
        0.1,
        0.25,
        0.5,
        0.75,
    )  # timing study: switch points as fractions of P + Q
    threads: int = 1  # torch threads of each run (--threads of the script)
    launcher: Literal["local", "slurm", "debug"] = (
        "local"  # local pool, SLURM through submitit (debug: submitit in-process)
    )
    workers: Optional[int] = None  # local: runs at once (default: cores // --threads)
    slurm_partition: Optional[str] = None  # slurm: partition
    slurm_time_min: int = 24 * 60  # slurm: time limit of one run, minutes
    slurm_mem_gb: int = 8  # slurm: memory of one run
    out: str = "studies"  # parent folder of the study folders (runs, checkpoints, logs)
    report_dir: Optional[str] = None  # where the CSVs and figures go (default: the study folder)
    final_evals: int = 1  # the final score of a run: the mean of its last this many evaluations
    report_only: bool = False  # rebuild the report from the finished runs (none: from --report-dir's evaluations.csv)
    run_flags: tyro.conf.Suppress[List[str]] = field(
        default_factory=list
    )  # what follows `--` on the command line
    command: tyro.conf.Suppress[str] = (
        ""  # the command that runs the study (command.txt of the report)
    )


@dataclass
class Run:
    treatment: str  # e.g. pretrain, ps, lorasa-r8, nps, switch@0.25
    seed: int
    flags: List[str]  # the script's flags beyond the task's and the seed
    after: Optional[str] = None  # the pretraining run whose checkpoint.pt this run starts from
    name: str = ""

    def __post_init__(self):
        self.name = f"{self.treatment}__seed{self.seed}"


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def study_runs(args):
    """The study's runs: per seed a pretraining run and the phase-2 treatments that start from it, or the timing runs."""
    total = args.pretrain_steps + args.finetune_steps
    runs = []
    for seed in args.seeds:
        if args.study == "timing":
            runs.append(Run("ps", seed, ["--share-mode", "ps", "--total-timesteps", str(total)]))
            for fraction in args.fractions:
                start = str(int(fraction * total))
                flags = [
                    "--share-mode",
                    "lorasa",
                    "--rank",
                    str(args.rank),
                    "--lora-start",
                    start,
                    "--total-timesteps",
                    str(total),
                ]
                runs.append(Run(f"switch@{fraction:g}", seed, flags))
            continue
        pretrain = Run(
            "pretrain", seed, ["--share-mode", "ps", "--total-timesteps", str(args.pretrain_steps)]
        )
        phase2 = ["--total-timesteps", str(total)]
        runs += [pretrain, Run("ps", seed, ["--share-mode", "ps", *phase2], after=pretrain.name)]
        if args.study == "baselines":
            runs.append(
                Run(
                    f"lorasa-r{args.rank}",
                    seed,
                    ["--share-mode", "lorasa", "--rank", str(args.rank), *phase2],
                    pretrain.name,
                )
            )
            runs.append(Run("nps", seed, ["--share-mode", "nps", *phase2]))
        for rank in args.ranks if args.study == "rank" else []:
            runs.append(
                Run(
                    f"lorasa-r{rank}",
                    seed,
                    ["--share-mode", "lorasa", "--rank", str(rank), *phase2],
                    pretrain.name,
                )
            )
        for placement in args.placements if args.study == "placement" else []:
            layers = ["--lora-layers", *PLACEMENTS[placement], "--rank", str(args.rank)]
            runs.append(
                Run(
                    f"lorasa-{placement}",
                    seed,
                    ["--share-mode", "lorasa", *layers, *phase2],
                    pretrain.name,
                )
            )
    return runs


def check_run_flags(args, runs):
    """Every run's command line through the script's own parser and checks (no env, no network): a flag the script
    does not take, or a budget below one of its iterations, stops the study in its first seconds, not in a run's log."""
    name = args.script[:-3]
    if (
        name not in sys.modules
    ):  # registered, since tyro reads the Args help from the module's source
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, args.script))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    script = sys.modules[name]
    for run in runs:
        flags = [*args.run_flags, *run.flags, "--seed", str(run.seed)]
        try:
            defaults = script.Args(**script.task_defaults(flags))  # the script's per-task values
            script.finalize_args(
                tyro.cli(script.Args, args=flags, prog=args.script, default=defaults)
            )
        except SystemExit:
            fail(
                f"{args.script} refuses the study's run {run.name} (above): change the flags after -- or the budgets"
            )


def finished(study_dir, name):
    """The trainer's own run folder of a finished run, else None."""
    marker = os.path.join(study_dir, name, "finished.json")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        return os.path.join(study_dir, name, json.load(f)["run"])


def execute(study_dir, script, run, task_flags, threads):
    """One run in its own process: fresh, or resumed from its checkpoint when an earlier attempt left one. Writes
    finished.json (the trainer's folder, the command) when the script exits 0; returns (run name, exit code)."""
    folder = os.path.abspath(os.path.join(study_dir, run.name))
    os.makedirs(folder, exist_ok=True)
    checkpoints = sorted(
        glob.glob(os.path.join(folder, "*", "checkpoint.pt")), key=os.path.getmtime
    )
    python_script = [sys.executable, os.path.join(ROOT, script)]
    command, trainer_folder = None, None
    if checkpoints:  # an earlier attempt was interrupted: continue it in its own folder, or only mark it if it had ended
        import torch

        checkpoint = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
        trainer_folder = os.path.dirname(checkpoints[-1])
        if checkpoint["global_step"] < checkpoint["args"]["total_timesteps"]:
            command = [
                *python_script,
                "--checkpoint",
                checkpoints[-1],
                "--resume",
                "--threads",
                str(threads),
            ]
    else:
        command = [
            *python_script,
            *task_flags,
            *run.flags,
            "--seed",
            str(run.seed),
            "--threads",
            str(threads),
        ]
        command += ["--run-dir", folder]
        if run.after is not None:
            command += [
                "--checkpoint",
                os.path.abspath(os.path.join(finished(study_dir, run.after), "checkpoint.pt")),
            ]
    code = 0
    if command is not None:
        before = set(glob.glob(os.path.join(folder, "*", "")))
        with open(os.path.join(folder, "log.txt"), "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            code = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=folder
            ).returncode
        if code == 0 and trainer_folder is None:
            trainer_folder = (
                (set(glob.glob(os.path.join(folder, "*", ""))) - before).pop().rstrip(os.sep)
            )
    if code == 0:
        with open(
            os.path.join(folder, "finished.json"), "w"
        ) as f:  # the trainer's folder relative: the study can move
            json.dump(dict(run=os.path.relpath(trainer_folder, folder), command=command), f)
    return run.name, code


def launch(args, study_dir, runs):
    """Start every unfinished run once what it starts from has finished; a failed pretraining skips its phase 2."""
    todo = [run for run in runs if not finished(study_dir, run.name)]
    print(
        f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to run in {study_dir}"
    )
    failed = set()
    if args.launcher in ("slurm", "debug"):
        import submitit

        cluster = (
            None if args.launcher == "slurm" else "debug"
        )  # debug: the same code path, jobs run in this process
        executor = submitit.AutoExecutor(folder=os.path.join(study_dir, "slurm"), cluster=cluster)
        executor.update_parameters(timeout_min=args.slurm_time_min, cpus_per_task=args.threads, mem_gb=args.slurm_mem_gb,
                                   slurm_partition=args.slurm_partition, name=os.path.basename(study_dir))  # fmt: skip
        for wave in (
            [run for run in todo if run.after is None],
            [run for run in todo if run.after is not None],
        ):
            wave = [run for run in wave if run.after not in failed]
            jobs = [
                executor.submit(execute, study_dir, args.script, run, args.run_flags, args.threads)
                for run in wave
            ]
            for run, job in zip(wave, jobs):
                name, code = job.result()
                print(f"{name}: exit code {code}")
                failed |= {name} if code else set()
        return failed
    workers = args.workers or max(1, (os.cpu_count() or 1) // args.threads)
    pending = {run.name: run for run in todo}
    running = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        while pending or running:
            for name, run in list(pending.items()):
                blocked = run.after is not None and (run.after in pending or run.after in running)
                if run.after in failed:
                    failed.add(pending.pop(name).name)
                    print(f"{name}: skipped, {run.after} failed")
                elif not blocked and len(running) < workers:
                    running[name] = pool.submit(
                        execute,
                        study_dir,
                        args.script,
                        pending.pop(name),
                        args.run_flags,
                        args.threads,
                    )
                    print(f"{time.strftime('%H:%M:%S')} started {name}")
            done, _ = concurrent.futures.wait(
                running.values(), return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in done:
                name, code = future.result()
                del running[name]
                failed |= {name} if code else set()
                outcome = "finished" if code == 0 else f"FAILED (exit code {code}, see its log.txt)"
                print(f"{time.strftime('%H:%M:%S')} {outcome} {name}")
    return failed


def read_evaluations(study_dir, runs):
    """Every evaluation of every finished run: dicts with treatment, seed, step, return and win rate (StarCraft)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for run in runs:
        trainer_folder = finished(study_dir, run.name)
        if trainer_folder is None:
            continue
        accumulator = EventAccumulator(trainer_folder, size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        returns = {e.step: e.value for e in accumulator.Scalars("eval/episodic_return")}
        wins = (
            {e.step: e.value for e in accumulator.Scalars("eval/win_rate")}
            if "eval/win_rate" in tags
            else {}
        )
        for step in sorted(returns):
            rows.append(dict(treatment=run.treatment, seed=run.seed, step=step, eval_return=returns[step],
                             eval_win_rate=wins.get(step, "")))  # fmt: skip
    return rows


def curves_by_treatment(rows, score):
    """{treatment: (steps, scores (seeds, steps))}; phase-2 treatments are preceded by their seed's pretraining."""
    seeds = sorted({row["seed"] for row in rows})
    out = {}
    for treatment in dict.fromkeys(row["treatment"] for row in rows):
        if treatment == "pretrain":
            continue
        per_seed = []
        for seed in seeds:
            own = {
                row["step"]: row[score]
                for row in rows
                if row["treatment"] == treatment and row["seed"] == seed
            }
            pretrain = {
                row["step"]: row[score]
                for row in rows
                if row["treatment"] == "pretrain" and row["seed"] == seed
            }
            if own:
                per_seed.append(
                    {**{step: value for step, value in pretrain.items() if step < min(own)}, **own}
                )
        steps = sorted(set.intersection(*(set(curve) for curve in per_seed)))
        out[treatment] = (
            np.array(steps),
            np.array([[curve[step] for step in steps] for curve in per_seed], dtype=float),
        )
    return out


SUMMARY_FIELDS = ["treatment", "score", "seeds", "final_step", "iqm", "iqm_low", "iqm_high", "mean", "median",
                  "diff_vs_ps", "diff_low", "diff_high", "wins_vs_ps"]  # fmt: skip


def summarize(rows, final_evals):
    """From the evaluation rows (dicts as in evaluations.csv, strings or numbers): the score's name, the curves, the
    final scores, and the summary rows with their numbers as 4-significant-digit strings (as summary.csv holds them):
    IQM over seeds with its 95 % stratified-bootstrap interval (rliable), mean, median, and the paired difference to
    `ps` (mean over seeds, percentile-bootstrap interval, seeds where the treatment is better). Deterministic."""
    from rliable import library as rly
    from rliable import metrics

    score = "eval_win_rate" if rows[0]["eval_win_rate"] not in ("", None) else "eval_return"
    rows = [
        dict(row, seed=int(row["seed"]), step=int(row["step"]), **{score: float(row[score])})
        for row in rows
    ]
    curves = curves_by_treatment(rows, score)
    final = {
        name: scores[:, -final_evals:].mean(1, keepdims=True)
        for name, (_, scores) in curves.items()
    }
    rng = np.random.default_rng(0)  # fixed bootstrap draws: the same CSV gives the same summary
    iqm_of = lambda x: np.array([metrics.aggregate_iqm(x)])  # noqa: E731
    # rliable's StratifiedBootstrap draws its resamples from numpy's global generator, whatever
    # random_state says: without this seed the intervals changed from one process to the next
    np.random.seed(0)
    iqm, iqm_ci = rly.get_interval_estimates(
        final, iqm_of, reps=5000, random_state=np.random.RandomState(0)
    )
    summary = []
    for name, scores in final.items():
        row = dict(treatment=name, score=score, seeds=len(scores), final_step=int(curves[name][0][-1]),
                   iqm=iqm[name][0], iqm_low=iqm_ci[name][0, 0], iqm_high=iqm_ci[name][1, 0],
                   mean=scores.mean(), median=np.median(scores))  # fmt: skip
        if (
            "ps" in final and name != "ps" and len(final["ps"]) == len(scores)
        ):  # paired over seeds (same seed order)
            difference = (scores - final["ps"])[:, 0]
            boot = rng.choice(difference, (5000, len(difference))).mean(1)
            row.update(
                diff_vs_ps=difference.mean(),
                diff_low=np.quantile(boot, 0.025),
                diff_high=np.quantile(boot, 0.975),
            )
            row["wins_vs_ps"] = f"{int((difference > 0).sum())}/{len(difference)}"
        summary.append({key: f"{float(value):.4g}" if isinstance(value, (float, np.floating)) else value
                        for key, value in row.items()})  # fmt: skip
    return score, curves, final, (iqm, iqm_ci), summary


def summary_table(summary):
    """The summary as the Markdown table docs/results.md shows."""
    lines = ["| treatment | seeds | final step | IQM [95 % CI] | mean | median | paired Δ vs ps [95 % CI] | better than ps |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in summary:
        paired = (
            f"{row['diff_vs_ps']} [{row['diff_low']}, {row['diff_high']}]"
            if "diff_vs_ps" in row
            else ""
        )
        iqm = f"{row['iqm']} [{row['iqm_low']}, {row['iqm_high']}]"
        cells = [
            row["treatment"],
            row["seeds"],
            row["final_step"],
            iqm,
            row["mean"],
            row["median"],
            paired,
        ]
        lines.append(
            "| " + " | ".join(str(cell) for cell in [*cells, row.get("wins_vs_ps", "")]) + " |"
        )
    return "\n".join(lines) + "\n"


def report(args, study_dir, runs):
    """evaluations.csv, summary.csv and summary.md (summarize), command.txt (the study's command) and the figures
    curves.png (mean over seeds with a 95 % bootstrap interval per evaluation), final.png (IQM of the final scores) and
    profile.png (performance profiles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import library as rly
    from rliable import plot_utils

    report_dir = args.report_dir or study_dir
    rows = read_evaluations(study_dir, runs)
    saved_csv = os.path.join(report_dir, "evaluations.csv")
    if (
        not rows and args.report_only and os.path.exists(saved_csv)
    ):  # e.g. a fresh clone: the committed CSV alone
        with open(saved_csv) as f:
            rows = [
                row
                for row in csv.DictReader(f)
                if row["treatment"] in {run.treatment for run in runs}
            ]
        print(f"no finished runs in {study_dir}: the report from {saved_csv}")
    if not rows:
        print("no finished runs yet: no report")
        return None
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "evaluations.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["study", "script", "task", "treatment", "seed", "step", "eval_return",
                                               "eval_win_rate"])  # fmt: skip
        writer.writeheader()
        task = " ".join(args.run_flags)
        writer.writerows(
            {"study": args.study, "script": args.script, "task": task, **row} for row in rows
        )
    score, curves, final, (iqm, iqm_ci), summary = summarize(rows, args.final_evals)
    with open(os.path.join(report_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(summary)
    with open(os.path.join(report_dir, "summary.md"), "w") as f:
        f.write(summary_table(summary))
    with open(
        os.path.join(report_dir, "command.txt"), "w"
    ) as f:  # add --report-only to rebuild this report alone
        f.write(args.command + "\n")

    label = "evaluation win rate" if score == "eval_win_rate" else "evaluation return"
    title = f"{args.study}: {args.script[:-3]}, {task_label(args.run_flags)}, {len(final[next(iter(final))])} seeds"
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, (steps, scores) in curves.items():
        means, intervals = [], []
        for (
            column
        ) in scores.T:  # the mean over seeds with its 95 % bootstrap interval, per evaluation step
            point, interval = rly.get_interval_estimates({"x": column[:, None]}, lambda x: np.array([x.mean()]), reps=1000,
                                                         random_state=np.random.RandomState(0))  # fmt: skip
            means.append(point["x"][0])
            intervals.append(interval["x"][:, 0])
        intervals = np.array(intervals)
        (line,) = axis.plot(steps, means, label=name)
        axis.fill_between(steps, intervals[:, 0], intervals[:, 1], alpha=0.2)
        if name.startswith("switch@"):  # timing: each run's own switch point, in its colour
            switch = float(name.removeprefix("switch@")) * (
                args.pretrain_steps + args.finetune_steps
            )
            axis.axvline(switch, color=line.get_color(), linestyle=":", linewidth=1)
    if args.study != "timing":  # the end of the pretraining, where every phase-2 treatment starts
        axis.axvline(args.pretrain_steps, color="grey", linestyle=":", linewidth=1)
    axis.set(xlabel="env steps", ylabel=f"{label} (mean, 95 % CI)", title=title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(report_dir, "curves.png"), dpi=120)
    names = list(final)
    points, intervals = {name: iqm[name] for name in names}, {name: iqm_ci[name] for name in names}
    figure, _ = plot_utils.plot_interval_estimates(points, intervals, metric_names=["IQM (95 % CI)"], algorithms=names,
                                                   xlabel=f"final {label}", subfigure_width=6, row_height=0.5,
                                                   xlabel_y_coordinate=-0.45)  # fmt: skip
    figure.suptitle(title, fontsize=10, y=1.15)
    plt.savefig(os.path.join(report_dir, "final.png"), dpi=120, bbox_inches="tight")
    all_scores = np.concatenate(list(final.values()))
    taus = np.linspace(all_scores.min(), all_scores.max(), 51)
    np.random.seed(0)  # rliable's performance profiles draw from numpy's global generator
    profiles, profile_cis = rly.create_performance_profile(final, taus, reps=2000)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=profile_cis, xlabel=f"final {label} τ",
                                         ax=axis)  # fmt: skip
    axis.set_title(title, fontsize=9)
    axis.legend()
    figure.savefig(os.path.join(report_dir, "profile.png"), dpi=120, bbox_inches="tight")
    plt.close("all")
    for row in summary:
        paired = (
            f", paired difference to ps {row['diff_vs_ps']} [{row['diff_low']}, {row['diff_high']}]"
            if "diff_vs_ps" in row
            else ""
        )
        print(
            f"{row['treatment']}: IQM {row['iqm']} [{row['iqm_low']}, {row['iqm_high']}] over {row['seeds']} seeds{paired}"
        )
    print(f"report in {report_dir}")
    return summary


def task_label(run_flags):
    """The task's flags (--map, --scenario, --agent-conf) as in the scripts' run names, e.g. HalfCheetah-2x3."""
    values = [
        run_flags[i + 1]
        for i, flag in enumerate(run_flags[:-1])
        if flag in ("--map", "--scenario", "--agent-conf")
    ]
    return "-".join(values).replace("|", "_") or "default-task"


def main(argv):
    own, run_flags = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    args = tyro.cli(Args, args=own)
    args.run_flags = run_flags
    study_flags = [flag for flag in own if flag != "--report-only"]
    args.command = shlex.join(["python", "benchmarks/study.py", *study_flags, "--", *run_flags])
    if not os.path.exists(os.path.join(ROOT, args.script)):
        scripts = sorted(
            os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*_lorasa_*.py"))
        )
        fail(
            f"--script {args.script!r} is not at the repository root; accepted: {' '.join(scripts)}"
        )
    if any(
        flag in run_flags
        for flag in ("--seed", "--share-mode", "--total-timesteps", "--run-dir", "--checkpoint")
    ):
        fail(
            "the flags after -- may not set --seed, --share-mode, --total-timesteps, --run-dir or --checkpoint; the study does"
        )
    unknown = [name for name in args.placements if name not in PLACEMENTS]
    if unknown:
        fail(f"--placements {' '.join(unknown)} is invalid; accepted: {' '.join(PLACEMENTS)}")
    if not all(0 < fraction < 1 for fraction in args.fractions):
        fail(
            f"--fractions {' '.join(map(str, args.fractions))} is invalid; accepted: 0 < fraction < 1"
        )
    if (
        min(args.pretrain_steps, args.finetune_steps, args.threads, args.final_evals) < 1
        or not args.seeds
    ):
        fail(
            "--pretrain-steps, --finetune-steps, --threads, --final-evals must be >= 1 and --seeds non-empty"
        )
    runs = study_runs(args)
    check_run_flags(args, runs)
    folder_name = f"{args.study}__{args.script[:-3]}__{re.sub(r'[^A-Za-z0-9_.-]', '_', task_label(run_flags))}"
    study_dir = os.path.join(args.out, folder_name)
    design = dict(script=args.script, run_flags=run_flags, pretrain_steps=args.pretrain_steps,
                  finetune_steps=args.finetune_steps, rank=args.rank)  # fmt: skip
    design_file = os.path.join(study_dir, "study.json")
    if os.path.exists(
        design_file
    ):  # finished runs are reused only by the same design (more seeds or ranks may join)
        with open(design_file) as f:
            saved = json.load(f)
        if saved != design:
            changed = ", ".join(
                f"{key} {saved[key]!r} -> {design[key]!r}"
                for key in design
                if saved.get(key) != design[key]
            )
            fail(
                f"{study_dir} holds a study with other settings ({changed}); accepted: the same settings, or another --out"
            )
    elif not args.report_only:
        os.makedirs(study_dir, exist_ok=True)
        with open(design_file, "w") as f:
            json.dump(design, f, indent=1)
    failed = set() if args.report_only else launch(args, study_dir, runs)
    report(args, study_dir, runs)
    if failed:
        print(
            f"{len(failed)} runs failed: {' '.join(sorted(failed))} (their log.txt says why; run the command again to retry)"
        )
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
