"""Short end-to-end runs of each script on the real MaMuJoCo simulator (CleanRL-style smoke tests), checkpoint
round trips (PS -> LoRA fine-tuning, --eval-only, --resume) and the one-line bad-input errors."""
import glob
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, load_script, make_args, present_scripts

# 4 iterations of 2 envs x 20 steps, 60-step episodes, the switch after 2 iterations
TINY = ["--num-envs", "2", "--num-steps", "20", "--total-timesteps", "160", "--lora-start", "80", "--eval-interval", "2",
        "--eval-episodes", "2", "--max-episode-steps", "60", "--run-dir", "runs"]


def run(script, args, cwd, check=True):
    res = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True, cwd=cwd,
                         timeout=300)
    if check:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def scalars(run_dir):
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def only_run(cwd):
    runs = glob.glob(os.path.join(cwd, "runs", "*"))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module", params=present_scripts(), ids=lambda s: s[:-3])
def lorasa_run(request, tmp_path_factory):
    """One lorasa run with the phase switch inside it, shared by the round-trip tests."""
    cwd = tmp_path_factory.mktemp(request.param[:-3])
    res = run(request.param, TINY, cwd)
    return request.param, cwd, only_run(cwd), res


def test_lorasa_run_switches_phase_and_writes_everything(lorasa_run):
    script, cwd, run_dir, res = lorasa_run
    assert not os.path.exists(os.path.join(cwd, "MUJOCO_LOG.TXT"))
    assert "phase switch at step 80" in res.stdout and "Traceback" not in res.stderr
    assert {"checkpoint.pt", "adapters.pt", "ps_checkpoint.pt"} <= set(os.listdir(run_dir))
    assert os.path.basename(run_dir).startswith(f"HalfCheetah-2x3-local1__{script[:-3]}__lorasa-r8__1__")
    s = scalars(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
                "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
                "losses/explained_variance", "losses/actor_grad_norm", "losses/critic_grad_norm",
                "eval/episodic_return", "eval/episodic_length", "perf/rollout_s", "perf/update_s", "perf/eval_s",
                "perf/SPS_env", "perf/SPS_update", "lorasa/shared_params", "lorasa/adapter_params_per_agent",
                "lorasa/trainable_params", "lorasa/nps_params", "lorasa/delta_norm/agent_0", "lorasa/delta_norm/agent_1",
                "lorasa/log_std/agent_1"]:
        assert tag in s, tag
    assert [v for _, v in s["charts/phase"]] == [0, 0, 1, 1]
    assert [st for st, _ in s["eval/episodic_return"]] == [0, 80, 160]
    if script.startswith("a2po"):  # agent order, clip per position, preceding-agent correction, trace statistics
        for tag in ["a2po/order_pos/agent_0", "a2po/order_pos/agent_1", "a2po/clip_eps/pos_1", "a2po/clip_eps/pos_2",
                    "a2po/others_ratio_mean", "a2po/others_ratio_min", "a2po/others_ratio_max", "a2po/trace_rho_mean",
                    "a2po/trace_trunc_frac", "a2po/trace_adv_gap"]:
            assert tag in s, tag
        assert sorted([s["a2po/order_pos/agent_0"][-1][1], s["a2po/order_pos/agent_1"][-1][1]]) == [1, 2]
        assert abs(s["a2po/clip_eps/pos_1"][0][1] - 0.15) < 1e-6 and abs(s["a2po/clip_eps/pos_2"][0][1] - 0.2) < 1e-6
    obs_dim, n_out = 7 + 2, 3  # counts as lorasa.md section 3 (+ the Gaussian log-std / its per-agent offset)
    assert s["lorasa/shared_params"][0][1] == 66 * obs_dim + 38144 + 65 * n_out + n_out
    assert s["lorasa/adapter_params_per_agent"][0][1] == 8 * obs_dim + 8192 + 8 * n_out + n_out
    assert [v for _, v in s["lorasa/trainable_params"]][-1] == 2 * (8 * obs_dim + 8192 + 8 * n_out + n_out)
    assert s["lorasa/delta_norm/agent_0"][1][1] == 0 and s["lorasa/delta_norm/agent_0"][-1][1] > 0
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    ps = torch.load(os.path.join(run_dir, "ps_checkpoint.pt"), weights_only=True)
    assert {"args", "global_step", "iteration", "phase", "actor", "critic", "value_norm", "actor_optim", "critic_optim",
            "rng"} <= set(ckpt)
    assert (ckpt["phase"], ckpt["global_step"], ps["phase"], ps["global_step"]) == ("lora", 160, "ps", 80)
    assert len(ckpt["actor_optim"]) == 2 and ckpt["value_norm"]["d"].shape == (2,)
    for k, v in ps["actor"].items():  # frozen through phase lora: every shared actor tensor is bit-identical
        if "lora_" not in k:
            assert torch.equal(v, ckpt["actor"][k]), k
    assert not torch.equal(ps["critic"]["head.weight"], ckpt["critic"]["head.weight"])  # the critic kept training
    ad = torch.load(os.path.join(run_dir, "adapters.pt"), weights_only=True)
    assert ad["trunk.fcs.fc1"]["A"].shape == (2, 8, obs_dim) and ad["trunk.fcs.fc1"]["B"].shape == (2, 64, 8)
    assert ad["head"]["A"].shape == (2, 8, 64) and ad["head"]["B"].shape == (2, n_out, 8)
    assert ad["trunk.gru.gru_h"]["B"].shape == (2, 192, 8) and ad["head"]["scaling"] == 1.0
    assert torch.equal(ad["trunk.fcs.fc1"]["A"][1], ckpt["actor"]["trunk.fcs.fc1.lora_A.1"])


@pytest.mark.parametrize("script", present_scripts(), ids=lambda s: s[:-3])
@pytest.mark.parametrize("mode", ["ps", "nps"])
def test_baseline_share_modes_run(script, mode, tmp_path):
    extra = ["--async-envs"] if (script, mode) == ("mappo_lorasa_mamujoco.py", "ps") else []  # subprocess envs once
    run(script, TINY[:4] + ["--total-timesteps", "80", "--eval-interval", "5", "--eval-episodes", "1",
                            "--max-episode-steps", "30", "--run-dir", "runs", "--share-mode", mode, *extra], tmp_path)
    run_dir = only_run(tmp_path)
    assert set(os.listdir(run_dir)) >= {"checkpoint.pt"} and "adapters.pt" not in os.listdir(run_dir)
    s = scalars(run_dir)
    assert set(v for _, v in s["charts/phase"]) == {0 if mode == "ps" else 2}
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert len(ckpt["actor_optim"]) == (1 if mode == "ps" else 2)


def test_a2po_ppo_loop_and_options_run(tmp_path):
    run("a2po_lorasa_mamujoco.py", TINY[:4] + ["--total-timesteps", "80", "--lora-start", "40", "--eval-interval", "5",
                                               "--eval-episodes", "1", "--max-episode-steps", "30", "--run-dir", "runs",
                                               "--scenario", "Walker2d", "--agent-conf", "3x2", "--a2po-loop", "ppo",
                                               "--trace-variant", "retrace", "--no-two-stage", "--a2po-order", "random"],
        tmp_path)
    s = scalars(only_run(tmp_path))
    eps = [s[f"a2po/clip_eps/pos_{k}"][-1][1] for k in (1, 2, 3)]
    assert np.allclose(eps, [0.2 * (0.5 + 0.5 / 3)] * 3)  # KEEP 13: the ppo loop gives everyone the first clip


def test_ps_checkpoint_starts_lora_finetuning(lorasa_run, tmp_path):
    script, _, run_dir, _ = lorasa_run
    res = run(script, TINY[:4] + ["--total-timesteps", "160", "--eval-interval", "10", "--eval-episodes", "1",
                                  "--max-episode-steps", "60", "--run-dir", "runs", "--checkpoint",
                                  os.path.join(run_dir, "ps_checkpoint.pt")], tmp_path)
    s = scalars(only_run(tmp_path))
    assert [st for st, _ in s["charts/phase"]] == [120, 160]  # the x-axis continues from the PS checkpoint's step 80
    assert [v for _, v in s["charts/phase"]] == [1, 1] and "phase switch" not in res.stdout


def test_eval_only_round_trip(lorasa_run, tmp_path):
    """--eval-only on the final checkpoint reproduces the run's last evaluation (same seeds, greedy, merged)."""
    script, _, run_dir, _ = lorasa_run
    res = run(script, ["--checkpoint", os.path.join(run_dir, "checkpoint.pt"), "--eval-only", "--eval-episodes", "2",
                       "--max-episode-steps", "60", "--run-dir", "runs"], tmp_path)
    last = scalars(run_dir)["eval/episodic_return"][-1][1]
    assert f"return {last:.2f} " in res.stdout, (res.stdout, last)
    assert not os.path.exists(tmp_path / "runs")  # evaluation writes nothing


def test_resume_continues_step_count(lorasa_run, tmp_path):
    script, _, run_dir, _ = lorasa_run
    copy = tmp_path / "run"
    copy.mkdir()
    for f in os.listdir(run_dir):
        (copy / f).write_bytes(open(os.path.join(run_dir, f), "rb").read())
    run(script, ["--checkpoint", str(copy / "checkpoint.pt"), "--resume", "--total-timesteps", "240"], tmp_path)
    s = scalars(copy)
    assert [st for st, _ in s["charts/phase"]] == [40, 80, 120, 160, 200, 240]
    ckpt = torch.load(copy / "checkpoint.pt", weights_only=True)
    assert (ckpt["global_step"], ckpt["iteration"], ckpt["phase"]) == (240, 6, "lora")
    assert not os.path.exists(tmp_path / "runs")  # resumed in its own folder


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    """SIGINT (Ctrl-C) mid-run: the iteration in progress finishes, a checkpoint is saved atomically, exit 130."""
    cmd = [sys.executable, os.path.join(ROOT, "mappo_lorasa_mamujoco.py"), *TINY[:4], "--total-timesteps", "400000",
           "--eval-interval", "100000", "--eval-episodes", "1", "--max-episode-steps", "30", "--run-dir", "runs"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("iter 2/"):
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    run_dir = only_run(tmp_path)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ckpt["global_step"] >= 80 and ckpt["global_step"] % 40 == 0 and "checkpoint of step" in err
    assert ckpt["iteration"] == ckpt["global_step"] // 40  # a finished iteration, never a half-applied update
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]


def test_bad_input_cli_one_line_no_traceback(tmp_path):
    res = run("mappo_lorasa_mamujoco.py", ["--scenario", "Foo"], tmp_path, check=False)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: --scenario 'Foo'"), res.stderr
    assert "HalfCheetah" in res.stderr and not os.path.exists(tmp_path / "runs")


BAD = [
    (dict(scenario="Foo"), ["'Foo'", "HalfCheetah", "Walker2d"]),
    (dict(agent_conf="9x9"), ["'9x9'", "2x3", "6x1"]),
    (dict(scenario="Walker2d", agent_conf="4x2"), ["'4x2'", "3x2", "2x3", "6x1"]),
    (dict(rank=0), ["--rank 0", ">= 1"]),
    (dict(lora_alpha=-1.0), ["--lora-alpha -1.0", "> 0"]),
    (dict(lora_layers=("fc1", "bogus")), ["'bogus'", "fc2a", "head"]),
    (dict(lora_layers=("gru_x",), recurrent=False), ["'gru_x'", "fc_post"]),
    (dict(num_steps=25), ["--num-steps 25", "multiples of 10"]),
    (dict(lora_start=-5), ["--lora-start -5", "0 ... --total-timesteps"]),
    (dict(resume=True), ["--resume", "--checkpoint"]),
    (dict(checkpoint="/nonexistent/checkpoint.pt"), ["/nonexistent/checkpoint.pt", "no such file"]),
]


@pytest.mark.parametrize("kw,needles", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_input_errors(script, kw, needles, capsys):
    with pytest.raises(SystemExit) as e:
        make_args(script, **kw)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    for needle in needles:
        assert needle in err, (needle, err)


def test_eval_only_and_resume_take_task_and_shape_from_the_checkpoint(lorasa_run):
    script, _, run_dir, _ = lorasa_run
    mod = load_script(script)
    path = os.path.join(run_dir, "checkpoint.pt")
    args = make_args(mod, checkpoint=path, eval_only=True, scenario="Ant", agent_conf="4x2", hidden_size=32, seed=7)
    assert (args.scenario, args.agent_conf, args.hidden_size, args.seed, args.share_mode) == ("HalfCheetah", "2x3", 64, 7,
                                                                                              "lorasa")
    args = make_args(mod, checkpoint=path, resume=True, num_envs=5, total_timesteps=400)
    assert (args.num_envs, args.total_timesteps, args.lora_start) == (2, 400, 80)


def test_checkpoint_of_another_task_or_shape_is_refused(lorasa_run, capsys):
    script, _, run_dir, _ = lorasa_run
    mod = load_script(script)
    path = os.path.join(run_dir, "checkpoint.pt")
    for kw, needles in [(dict(scenario="Ant", agent_conf="4x2"), ["scenario='HalfCheetah'", "'Ant'"]),
                        (dict(hidden_size=32), ["hidden_size=64", "32"]),
                        (dict(share_mode="ps"), ["lorasa", "phase lora", "accepted phases: ps"]),
                        (dict(rank=4), ["rank=8", "rank=4"]),
                        (dict(total_timesteps=100), ["--total-timesteps 100", "step 160"])]:
        with pytest.raises(SystemExit):
            make_args(mod, checkpoint=path, **kw)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --checkpoint") or err.startswith("error: --total"), err
        for needle in needles:
            assert needle in err, (needle, err)
