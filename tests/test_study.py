"""benchmarks/study.py: the paired design of each study, a tiny study end to end (CSV, summary,
figures), a second invocation that skips finished runs, an interrupted run resumed through
submitit's in-process executor, bad input."""

import csv
import glob
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

spec = importlib.util.spec_from_file_location("study", os.path.join(ROOT, "benchmarks", "study.py"))
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)
TINY = ["--scenario", "HalfCheetah", "--agent-conf", "2x3", "--num-envs", "2", "--num-steps", "20",
        "--eval-interval", "2", "--eval-episodes", "2", "--max-episode-steps", "40"]  # fmt: skip


def study_command(cwd, *options, check=True):
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "study.py"), *options]
    res = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.parametrize("name", ["baselines", "rank", "placement", "timing"])
def test_every_phase_two_run_starts_from_its_own_seeds_pretraining(name):
    args = study.Args(
        study=name, seeds=(1, 2), ranks=(2, 8), placements=("mlp", "head"), fractions=(0.25, 0.5)
    )
    runs = study.study_runs(args)
    names = [run.name for run in runs]
    assert len(set(names)) == len(names)
    for run in runs:
        total = run.flags[run.flags.index("--total-timesteps") + 1]
        if run.after is not None:  # phase 2 from the seed's pretraining, to the same total budget
            assert run.after == f"pretrain__seed{run.seed}" and total == "2000000"
        elif name == "timing":
            assert total == "2000000" and ("--lora-start" in run.flags) == (run.treatment != "ps")
        else:
            assert run.treatment in ("pretrain", "nps")
    treatments = {run.treatment for run in runs}
    expected = {
        "baselines": {"pretrain", "ps", "lorasa-r8", "nps"},
        "rank": {"pretrain", "ps", "lorasa-r2", "lorasa-r8"},
        "placement": {"pretrain", "ps", "lorasa-mlp", "lorasa-head"},
        "timing": {"ps", "switch@0.25", "switch@0.5"},
    }
    assert treatments == expected[name]
    if name == "timing":
        switches = [run for run in runs if "--lora-start" in run.flags]
        starts = {run.flags[run.flags.index("--lora-start") + 1] for run in switches}
        assert starts == {"500000", "1000000"}  # the fractions of P + Q


def test_tiny_study_end_to_end_then_skipped_then_resumed(tmp_path):
    options = ["rank", "--ranks", "4", "--seeds", "1", "2", "--pretrain-steps", "80",
               "--finetune-steps", "80", "--"]  # fmt: skip
    res = study_command(tmp_path, *options, *TINY)
    folder = tmp_path / "studies" / "rank__mappo_lorasa_mamujoco__HalfCheetah-2x3"
    assert "0 of 6 runs already finished" in res.stdout and "lorasa-r4: IQM" in res.stdout
    figures = ("curves.png", "final.png", "profile.png")
    for name in ("evaluations.csv", "summary.csv", *figures, "study.json"):
        assert (folder / name).stat().st_size > 0, name
    command = ["python", "benchmarks/study.py", *options, *TINY]
    assert (folder / "command.txt").read_text().split() == command
    with open(folder / "evaluations.csv") as f:
        rows = list(csv.DictReader(f))
    pairs = {(t, s) for t in ("pretrain", "ps", "lorasa-r4") for s in "12"}
    assert {(row["treatment"], row["seed"]) for row in rows} == pairs
    pretrain = [row for row in rows if row["treatment"] == "pretrain" and row["step"] == "80"]
    pretrain_end = {row["seed"]: float(row["eval_return"]) for row in pretrain}
    # phase 2 starts from the pretrained policy: its first evaluation is the pretraining's last,
    # bit for bit (lorasa acts through the shared layers while every adapter is zero: the same
    # computation as the pretraining's, on any machine)
    for row in rows:
        if row["treatment"] != "pretrain" and row["step"] == "80":
            assert float(row["eval_return"]) == pretrain_end[row["seed"]], row
    with open(folder / "summary.csv") as f:
        summary = {row["treatment"]: row for row in csv.DictReader(f)}
    assert set(summary) == {"ps", "lorasa-r4"} and summary["lorasa-r4"]["wins_vs_ps"].endswith("/2")
    trainer_folders = sorted(glob.glob(str(folder / "*" / "*__*")))

    res = study_command(tmp_path, *options, *TINY)  # a second invocation: nothing runs again
    assert "6 of 6 runs already finished; 0 to run" in res.stdout
    assert sorted(glob.glob(str(folder / "*" / "*__*"))) == trainer_folders

    # as if interrupted after a checkpoint at step 120 of 160
    os.remove(folder / "lorasa-r4__seed2" / "finished.json")
    (checkpoint_path,) = glob.glob(str(folder / "lorasa-r4__seed2" / "*" / "checkpoint.pt"))
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    torch.save({**checkpoint, "global_step": 120, "iteration": 3}, checkpoint_path)
    res = study_command(tmp_path, *options[:-1], "--launcher", "debug", "--", *TINY)
    assert "5 of 6 runs already finished; 1 to run" in res.stdout
    assert "lorasa-r4__seed2: exit code 0" in res.stdout
    with open(folder / "lorasa-r4__seed2" / "finished.json") as f:
        assert "--resume" in json.load(f)["command"]
    # continued in its own folder
    assert sorted(glob.glob(str(folder / "*" / "*__*"))) == trainer_folders
    assert torch.load(checkpoint_path, weights_only=True)["global_step"] == 160
    # interrupted after its final checkpoint: only marked finished
    os.remove(folder / "ps__seed1" / "finished.json")
    res = study_command(tmp_path, *options, *TINY)
    assert "1 to run" in res.stdout and "finished ps__seed1" in res.stdout
    with open(folder / "ps__seed1" / "finished.json") as f:
        assert json.load(f)["command"] is None

    # another design: refused
    res = study_command(tmp_path, "rank", "--pretrain-steps", "160", "--", *TINY, check=False)
    assert res.returncode == 2 and "holds a study with other settings" in res.stderr
    assert "pretrain_steps 80 -> 160" in res.stderr


def test_bad_input_is_refused_before_anything_runs(tmp_path):
    refused = [
        (["placement", "--placements", "foo", "--"], "accepted: all mlp gru head no_head"),
        (["baselines", "--", "--seed", "3"], "may not set --seed"),
        (["baselines", "--script", "x.py"], "accepted: a2po_lorasa_mamujoco.py"),
        (["timing", "--fractions", "1.5"], "0 < fraction < 1"),
    ]
    for options, needle in refused:
        res = study_command(tmp_path, *options, check=False)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert needle in res.stderr, res.stderr
    refused_by_the_script = [
        (["baselines", "--", "--map", "3m"], "Unrecognized options: --map"),  # a StarCraft flag
        (["rank", "--pretrain-steps", "80", "--", *TINY[:4]], "--total-timesteps 80 is below one"),
        (["timing", "--script", "mappo_lorasa_smac.py", "--", "--map", "3m", "--num-envs", "0"],
         "--num-envs 0 is invalid"),
    ]  # fmt: skip
    for options, needle in refused_by_the_script:
        # the script's own message, then the run it refuses
        res = study_command(tmp_path, *options, check=False)
        assert res.returncode == 2 and needle in res.stderr, res.stderr
        assert "refuses the study's run" in res.stderr, res.stderr
    res = study_command(tmp_path, "--report-only", "baselines", "--", *TINY)
    assert "no finished runs yet" in res.stdout
    assert os.listdir(tmp_path) == []  # nothing written by any of these


STUDY_FOLDERS = sorted(
    os.path.dirname(path)
    for path in glob.glob(os.path.join(ROOT, "docs", "results", "*", "evaluations.csv"))
)


def results_text():
    with open(os.path.join(ROOT, "docs", "results.md")) as f:
        return f.read()


# rliable passes arch a RandomState (study.py filters it too)
@pytest.mark.filterwarnings("ignore::FutureWarning:arch")
@pytest.mark.parametrize("folder", STUDY_FOLDERS, ids=os.path.basename)
def test_docs_results_come_from_the_committed_csvs(folder, tmp_path, monkeypatch, capsys):
    """docs/results.md shows the tables that the committed CSVs give: each study's command.txt, with
    --report-only on a copy of its evaluations.csv alone (as in a fresh clone), rebuilds its
    summary.csv and summary.md exactly, and that table appears in docs/results.md."""
    monkeypatch.chdir(tmp_path)  # no study folder here: the report must come from the CSV
    copy = tmp_path / os.path.basename(folder)
    copy.mkdir()
    shutil.copy(os.path.join(folder, "evaluations.csv"), copy)
    with open(os.path.join(folder, "command.txt")) as f:
        argv = shlex.split(f.read())[2:]
    split = argv.index("--")
    study.main([*argv[:split], "--report-only", "--report-dir", str(copy), *argv[split:]])
    assert "the report from" in capsys.readouterr().out
    for name in ("summary.csv", "summary.md"):
        with open(os.path.join(folder, name)) as f:
            assert (copy / name).read_text() == f.read(), (folder, name)
    figures = ("curves.png", "final.png", "profile.png")
    assert all((copy / name).stat().st_size > 0 for name in figures), folder
    assert (copy / "summary.md").read_text() in results_text(), folder
    assert os.listdir(tmp_path) == [os.path.basename(folder)]


@pytest.mark.filterwarnings("ignore::FutureWarning:arch")
def test_summary_does_not_depend_on_numpys_global_generator():
    """rliable's bootstrap resamples from numpy's global generator (not from its random_state):
    the same evaluations must give the same intervals whatever that generator's state."""
    values = np.random.default_rng(0).normal(1000, 300, (2, 5, 3))  # no ties between resamples
    rows = [
        dict(treatment=name, seed=seed + 1, step=step, eval_return=values[t, seed, step])
        for t, name in enumerate(["ps", "lorasa-r8"])
        for seed in range(5)
        for step in range(3)
    ]
    for row in rows:
        row["eval_win_rate"] = ""
    intervals = []
    for seed in (7, 123):
        np.random.seed(seed)
        _, _, _, (_, iqm_ci), _ = study.summarize(rows, 3)
        intervals.append({name: ci.tolist() for name, ci in iqm_ci.items()})
    assert intervals[0] == intervals[1]


def test_docs_results_show_the_scaling_table():
    """The cost-scaling table of scaling.csv appears in docs/results.md."""
    assert STUDY_FOLDERS, "no committed study results"
    path = os.path.join(ROOT, "benchmarks", "bench_scaling.py")
    spec = importlib.util.spec_from_file_location("bench_scaling", path)
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    with open(os.path.join(ROOT, "docs", "results", "scaling", "scaling.csv")) as f:
        assert scaling.scaling_table(list(csv.DictReader(f))) in results_text()


def plateau_summary(path):
    """A plateau check's eval.csv as docs/results.md quotes it: the mean greedy win rate over each
    500 k-step window, and the mean of the last 5 evaluations."""
    with open(path) as f:
        rows = [(int(r["step"]), float(r["eval_win_rate"])) for r in csv.DictReader(f)]
    windows = []
    for start in range(0, rows[-1][0], 500_000):
        values = [win for step, win in rows if start < step <= start + 500_000]
        windows.append(f"{sum(values) / len(values):.2f}")
    last = sum(win for _, win in rows[-5:]) / 5
    return ", ".join(windows), f"the last 5 evaluations average {last:.2f}"


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(ROOT, "docs", "results", "plateau-*", "eval.csv")))
)
def test_plateau_checks_quoted_from_their_csv(path):
    text = " ".join(results_text().split())
    for quoted in plateau_summary(path):
        assert quoted in text, (path, quoted)
