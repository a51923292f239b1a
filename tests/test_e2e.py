"""Short end-to-end runs of each script on the real MaMuJoCo simulator (CleanRL-style smoke tests), checkpoint round
trips (PS -> LoRA fine-tuning with other adapter settings, --eval-only, --resume), paired seeds, divergence and the
one-line bad-input errors."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import MAMUJOCO, ROOT, load_script, make_args, only_run, present, run, scalars

# 4 iterations of 2 envs x 20 steps, 60-step episodes, the switch after 2 iterations
TINY = ["--num-envs", "2", "--num-steps", "20", "--total-timesteps", "160", "--lora-start", "80", "--eval-interval", "2",
        "--eval-episodes", "2", "--max-episode-steps", "60"]  # fmt: skip
SHORT = [
    "--num-envs",
    "2",
    "--num-steps",
    "20",
    "--eval-episodes",
    "1",
    "--max-episode-steps",
    "30",
]


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module", params=present(MAMUJOCO), ids=lambda s: s[:-3])
def lorasa_run(request, tmp_path_factory):
    """One lorasa run with the phase switch inside it, shared by the round-trip tests."""
    cwd = tmp_path_factory.mktemp(request.param[:-3])
    res = run(request.param, TINY, cwd)
    return request.param, cwd, only_run(cwd), res


def test_lorasa_run_switches_phase_and_writes_everything(lorasa_run):
    script, cwd, run_dir, res = lorasa_run
    assert not os.path.exists(os.path.join(cwd, "MUJOCO_LOG.TXT"))
    assert "phase switch at step 80" in res.stdout and res.stderr == ""
    assert {"checkpoint.pt", "adapters.pt", "ps_checkpoint.pt"} <= set(os.listdir(run_dir))
    assert os.path.basename(run_dir).startswith(
        f"HalfCheetah-2x3-local1__{script[:-3]}__lorasa-r8__1__"
    )
    s = scalars(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
                "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
                "losses/explained_variance", "losses/actor_grad_norm", "losses/critic_grad_norm",
                "eval/episodic_return", "eval/episodic_length", "perf/rollout_s", "perf/update_s", "perf/eval_s",
                "perf/SPS_env", "perf/SPS_update", "lorasa/shared_params", "lorasa/adapter_params_per_agent",
                "lorasa/trainable_params", "lorasa/nps_params", "lorasa/delta_norm/agent_0", "lorasa/delta_norm/agent_1",
                "lorasa/log_std/agent_1"]:  # fmt: skip
        assert tag in s, tag
    assert [v for _, v in s["charts/phase"]] == [0, 0, 1, 1]
    assert [st for st, _ in s["eval/episodic_return"]] == [0, 80, 160]
    if script.startswith(
        "a2po"
    ):  # agent order, clip per position, preceding-agent correction, trace statistics
        for tag in ["a2po/order_pos/agent_0", "a2po/order_pos/agent_1", "a2po/clip_eps/pos_1", "a2po/clip_eps/pos_2",
                    "a2po/others_ratio_mean", "a2po/others_ratio_min", "a2po/others_ratio_max", "a2po/trace_rho_mean",
                    "a2po/trace_trunc_frac", "a2po/trace_adv_gap"]:  # fmt: skip
            assert tag in s, tag
        assert sorted([s["a2po/order_pos/agent_0"][-1][1], s["a2po/order_pos/agent_1"][-1][1]]) == [
            1,
            2,
        ]
        assert (
            abs(s["a2po/clip_eps/pos_1"][0][1] - 0.15) < 1e-6
            and abs(s["a2po/clip_eps/pos_2"][0][1] - 0.2) < 1e-6
        )
    obs_dim, n_out = (
        7 + 2,
        3,
    )  # the counts of docs/method.md §3 (+ the Gaussian log-std or its per-agent offset)
    assert s["lorasa/shared_params"][0][1] == 66 * obs_dim + 38144 + 65 * n_out + n_out
    assert s["lorasa/adapter_params_per_agent"][0][1] == 8 * obs_dim + 8192 + 8 * n_out + n_out
    assert [v for _, v in s["lorasa/trainable_params"]][-1] == 2 * (
        8 * obs_dim + 8192 + 8 * n_out + n_out
    )
    assert s["lorasa/delta_norm/agent_0"][1][1] == 0 and s["lorasa/delta_norm/agent_0"][-1][1] > 0
    ckpt = load(os.path.join(run_dir, "checkpoint.pt"))
    ps = load(os.path.join(run_dir, "ps_checkpoint.pt"))
    assert {"args", "global_step", "iteration", "phase", "actor", "critic", "value_norm", "actor_optim", "critic_optim",
            "rng", "versions"} <= set(ckpt)  # fmt: skip
    assert (ckpt["phase"], ckpt["global_step"], ps["phase"], ps["global_step"]) == (
        "lora",
        160,
        "ps",
        80,
    )
    assert len(ckpt["actor_optim"]) == 2 and ckpt["value_norm"]["stats"].shape == (3, 2)
    for k, v in ps[
        "actor"
    ].items():  # frozen through phase lora: every shared actor tensor is bit-identical
        if "lora_" not in k:
            assert torch.equal(v, ckpt["actor"][k]), k
    assert not torch.equal(
        ps["critic"]["head.weight"], ckpt["critic"]["head.weight"]
    )  # the critic kept training
    adapters = load(os.path.join(run_dir, "adapters.pt"))
    assert adapters["fcs.fc1"]["A"].shape == (2, 8, obs_dim) and adapters["fcs.fc1"]["B"].shape == (
        2,
        64,
        8,
    )
    assert adapters["head"]["A"].shape == (2, 8, 64) and adapters["head"]["B"].shape == (
        2,
        n_out,
        8,
    )
    assert adapters["gru_h"]["B"].shape == (2, 192, 8) and adapters["head"]["scaling"] == 1.0
    assert adapters["log_std_offset"].shape == (2, n_out)
    assert torch.equal(adapters["fcs.fc1"]["A"][1], ckpt["actor"]["fcs.fc1.lora_A.1"])


def test_paired_seeds_lorasa_equals_ps_until_the_switch(lorasa_run, tmp_path):
    """FIX 29: the lorasa run's shared policy at --lora-start is bit-identical to the ps run of the same seed there."""
    script = lorasa_run[0]
    run(script, TINY[:4] + ["--total-timesteps", "80", "--eval-interval", "2", "--eval-episodes", "2",
                            "--max-episode-steps", "60", "--share-mode", "ps"], tmp_path)  # fmt: skip
    ps_run = load(os.path.join(only_run(tmp_path), "checkpoint.pt"))
    lorasa_switch = load(os.path.join(lorasa_run[2], "ps_checkpoint.pt"))
    assert ps_run["global_step"] == lorasa_switch["global_step"] == 80
    for key, value in ps_run["actor"].items():
        assert torch.equal(value, lorasa_switch["actor"][key]), key
    for key, value in ps_run["critic"].items():
        assert torch.equal(value, lorasa_switch["critic"][key]), key


@pytest.mark.parametrize("script", present(MAMUJOCO), ids=lambda s: s[:-3])
@pytest.mark.parametrize("mode", ["ps", "nps"])
def test_baseline_share_modes_run(script, mode, tmp_path):
    extra = (
        ["--async-envs", "--threads", "2"]
        if (script, mode) == ("mappo_lorasa_mamujoco.py", "ps")
        else []
    )
    run(
        script,
        SHORT + ["--total-timesteps", "80", "--eval-interval", "5", "--share-mode", mode, *extra],
        tmp_path,
    )
    run_dir = only_run(tmp_path)
    assert set(os.listdir(run_dir)) >= {"checkpoint.pt"} and "adapters.pt" not in os.listdir(
        run_dir
    )
    assert set(v for _, v in scalars(run_dir)["charts/phase"]) == {0 if mode == "ps" else 2}
    assert len(load(os.path.join(run_dir, "checkpoint.pt"))["actor_optim"]) == (
        1 if mode == "ps" else 2
    )


def test_a2po_ppo_loop_and_options_run(tmp_path):
    run("a2po_lorasa_mamujoco.py", SHORT + ["--total-timesteps", "80", "--lora-start", "40", "--eval-interval", "5",
                                            "--scenario", "Walker2d", "--agent-conf", "3x2", "--a2po-loop", "ppo",
                                            "--trace-variant", "retrace", "--no-two-stage", "--a2po-order", "random"],
        tmp_path)  # fmt: skip
    s = scalars(only_run(tmp_path))
    eps = [s[f"a2po/clip_eps/pos_{k}"][-1][1] for k in (1, 2, 3)]
    assert np.allclose(
        eps, [0.2 * (0.5 + 0.5 / 3)] * 3
    )  # KEEP 13: the ppo loop gives everyone the first clip


def test_ps_checkpoint_starts_lora_with_this_runs_adapters(lorasa_run, tmp_path):
    """A PS checkpoint gives the shared weights only: another rank, init and seed work, and the adapters start as this
    run builds them (checked after one iteration at a negligible learning rate), not as the old run's."""
    script, _, run_dir, _ = lorasa_run
    module = load_script(script)
    for seed in ("3", "4"):
        cwd = tmp_path / seed
        cwd.mkdir()
        extra = [
            "--rank",
            "4",
            "--lora-init",
            "standard",
            "--seed",
            seed,
            "--learning-rate",
            "1e-12",
        ]
        res = run(script, SHORT + ["--total-timesteps", "120", "--eval-interval", "10", "--checkpoint",
                                   os.path.join(run_dir, "ps_checkpoint.pt"), *extra], cwd)  # fmt: skip
        s = scalars(only_run(cwd))
        assert [st for st, _ in s["charts/phase"]] == [120] and [
            v for _, v in s["charts/phase"]
        ] == [1]
        assert (
            "phase switch" not in res.stdout
        )  # fine-tuning from the first iteration; the x-axis continues from 80
        trained = load(os.path.join(only_run(cwd), "checkpoint.pt"))["actor"]
        torch.manual_seed(
            0
        )  # the global RNG does not matter: the adapters have their own generator
        fresh = module.GaussianActor(
            9, 3, 2, make_args(module, rank=4, lora_init="standard", seed=int(seed))
        ).state_dict()
        for key, value in fresh.items():
            if "lora_" in key:
                torch.testing.assert_close(trained[key], value, atol=1e-8, rtol=0)
        assert (
            trained["fcs.fc1.lora_A.0"].shape == (4, 9)
            and trained["fcs.fc1.lora_B.0"].abs().max() < 1e-10
        )


def test_eval_only_round_trip(lorasa_run, tmp_path):
    """--eval-only on the final checkpoint reproduces the run's last evaluation (same seeds, greedy, merged)."""
    script, _, run_dir, _ = lorasa_run
    res = run(script, ["--checkpoint", os.path.join(run_dir, "checkpoint.pt"), "--eval-only", "--eval-episodes", "2",
                       "--max-episode-steps", "60"], tmp_path)  # fmt: skip
    last = scalars(run_dir)["eval/episodic_return"][-1][1]
    assert f"return {last:.2f}," in res.stdout, (res.stdout, last)
    assert os.listdir(tmp_path) == []  # evaluation writes nothing


def test_resume_continues_step_count(lorasa_run, tmp_path):
    script, _, run_dir, _ = lorasa_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in os.listdir(run_dir):
        (copy / name).write_bytes(open(os.path.join(run_dir, name), "rb").read())
    run(
        script,
        ["--checkpoint", str(copy / "checkpoint.pt"), "--resume", "--total-timesteps", "240"],
        tmp_path,
    )
    assert [st for st, _ in scalars(copy)["charts/phase"]] == [40, 80, 120, 160, 200, 240]
    ckpt = load(copy / "checkpoint.pt")
    assert (ckpt["global_step"], ckpt["iteration"], ckpt["phase"]) == (240, 6, "lora")
    assert os.listdir(tmp_path) == ["run"]  # resumed in its own folder


@pytest.mark.parametrize("async_envs", [False, True])
def test_ctrl_c_saves_a_checkpoint(tmp_path, async_envs):
    """Ctrl-C mid-run, sent as a terminal does to the whole process group (env worker processes included with
    --async-envs): the iteration in progress finishes, a checkpoint is saved atomically, exit 130, no traceback."""
    command = [sys.executable, os.path.join(ROOT, "mappo_lorasa_mamujoco.py"), *SHORT, "--total-timesteps", "400000",
               "--eval-interval", "100000"] + (["--async-envs"] if async_envs else [])  # fmt: skip
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("iter 2/"):
                os.killpg(proc.pid, signal.SIGINT)  # the process group, as a terminal's Ctrl-C
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.count("\n") == 2, (
        err
    )  # the Ctrl-C notice and the saved line
    run_dir = only_run(tmp_path)
    ckpt = load(os.path.join(run_dir, "checkpoint.pt"))
    assert (
        ckpt["global_step"] >= 80 and ckpt["global_step"] % 40 == 0 and "checkpoint of step" in err
    )
    assert (
        ckpt["iteration"] == ckpt["global_step"] // 40
    )  # a finished iteration, never a half-applied update
    assert not [name for name in os.listdir(run_dir) if ".tmp" in name]


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    res = run("mappo_lorasa_mamujoco.py", SHORT + ["--total-timesteps", "400", "--eval-interval", "1", "--share-mode",
                                                   "ps", "--learning-rate", "1e30"], tmp_path, check=False)  # fmt: skip
    assert res.returncode == 3 and res.stderr.count("\n") == 1, res.stderr
    assert (
        res.stderr.startswith("error: training diverged at step ") and "Traceback" not in res.stderr
    )
    run_dir = only_run(tmp_path)
    assert (
        f"the last good checkpoint is {os.path.join('runs', os.path.basename(run_dir), 'checkpoint.pt')}"
        in res.stderr
    )
    ckpt = load(os.path.join(run_dir, "checkpoint.pt"))
    assert all(tensor.isfinite().all() for tensor in ckpt["actor"].values())


def test_bad_input_cli_one_line_no_traceback(tmp_path):
    for args, needles in [(["--agent-conf", "9x9"], ["'9x9'", "2x3 6x1"]), (["--gamma", "1.5"], ["--gamma 1.5"]),
                          (["--run-dir", "/proc/nope"], ["--run-dir '/proc/nope'", "writable"])]:  # fmt: skip
        res = run("mappo_lorasa_mamujoco.py", args, tmp_path, check=False)
        assert res.returncode == 2 and res.stdout == "", res.stdout
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
        assert all(needle in res.stderr for needle in needles), res.stderr
    res = run(
        "mappo_lorasa_mamujoco.py", ["--scenario", "Foo"], tmp_path, check=False
    )  # tyro's own message
    assert (
        res.returncode == 2
        and "'Foo'" in res.stderr
        and "HalfCheetah" in res.stderr
        and "Traceback" not in res.stderr
    )
    assert os.listdir(tmp_path) == []


BAD = [
    (dict(rank=0), ["--rank 0", "> 0"]),
    (dict(lora_alpha=-1.0), ["--lora-alpha -1.0", "> 0"]),
    (dict(num_steps=25), ["--num-steps 25", "multiples of --data-chunk-length 10"]),
    (dict(lora_start=-5), ["--lora-start -5", "0 ... --total-timesteps"]),
    (dict(gamma=1.5), ["--gamma 1.5", "0 < value <= 1"]),
    (dict(gae_lambda=0.0), ["--gae-lambda 0.0", "0 < value <= 1"]),
    (dict(learning_rate=-1.0), ["--learning-rate -1.0", "> 0"]),
    (dict(clip_coef=-1.0), ["--clip-coef -1.0", "> 0"]),
    (dict(adam_eps=0.0), ["--adam-eps 0.0", "> 0"]),
    (dict(huber_delta=float("nan")), ["--huber-delta nan", "> 0"]),
    (dict(ent_coef=-0.1), ["--ent-coef -0.1", ">= 0"]),
    (dict(threads=0), ["--threads 0", "> 0"]),
    (dict(num_minibatches=999), ["--num-minibatches 999", "<= 400"]),
]


@pytest.mark.parametrize("kw,needles", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_values_are_refused_with_one_line(script, kw, needles, capsys):
    with pytest.raises(SystemExit) as error:
        make_args(script, **kw)
    err = capsys.readouterr().err
    assert error.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert all(needle in err for needle in needles), (needles, err)


def checkpoint_error(module, capsys, **kw):
    with pytest.raises(SystemExit):
        args, checkpoint = module.load_checkpoint(module.Args(**kw))
        module.check_checkpoint(module.finalize_args(args), checkpoint)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_checkpoint_of_another_task_or_shape_is_refused(lorasa_run, capsys):
    module = load_script(lorasa_run[0])
    path = os.path.join(lorasa_run[2], "checkpoint.pt")
    refused = [
        (dict(scenario="Ant", agent_conf="4x2"), ["scenario='HalfCheetah'", "'Ant'"]),
        (dict(hidden_size=32), ["hidden_size=64", "32"]),
        (dict(share_mode="ps"), ["phase-lora", "lorasa run", "accepted: ps"]),
        (dict(rank=4), ["rank=8", "4"]),
        (
            dict(total_timesteps=100, num_envs=2, num_steps=20),
            ["--total-timesteps 100", "after step 160"],
        ),
    ]
    for kw, needles in refused:
        err = checkpoint_error(module, capsys, checkpoint=path, **kw)
        assert all(needle in err for needle in needles), (needles, err)
    for kw, needle in [(dict(checkpoint="/nonexistent.pt"), "FileNotFoundError"), (dict(resume=True), "needs --checkpoint"),
                       (dict(checkpoint=os.path.join(lorasa_run[2], "adapters.pt")), "adapters only")]:  # fmt: skip
        assert needle in checkpoint_error(module, capsys, **kw)


def test_eval_only_and_resume_take_task_and_shape_from_the_checkpoint(lorasa_run, capsys):
    module = load_script(lorasa_run[0])
    path = os.path.join(lorasa_run[2], "checkpoint.pt")
    command_line = module.Args(
        checkpoint=path, eval_only=True, scenario="Ant", agent_conf="4x2", hidden_size=32, seed=7
    )
    args, _ = module.load_checkpoint(command_line)
    assert (args.scenario, args.agent_conf, args.hidden_size, args.seed, args.share_mode) == ("HalfCheetah", "2x3", 64, 7,
                                                                                              "lorasa")  # fmt: skip
    args, _ = module.load_checkpoint(
        module.Args(checkpoint=path, resume=True, num_envs=5, total_timesteps=400)
    )
    args = module.finalize_args(args)
    assert (args.num_envs, args.total_timesteps, args.lora_start) == (2, 400, 80)
    # a flag given that the checkpoint overrides is named, never dropped silently; defaults are not
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("the checkpoint's settings win: ") and len(printed) == 2
    assert "scenario='HalfCheetah' (not 'Ant')" in printed[0] and "seed=" not in printed[0]
    assert printed[1] == "the checkpoint's settings win: num_envs=2 (not 5)"


def test_loading_refuses_an_actor_that_does_not_fit_and_takes_this_runs_critic_settings(
    lorasa_run, capsys
):
    """A ps checkpoint may lack only the adapters (a shared layer left at its init would be frozen
    in phase lora); the critic's optimiser takes this run's --critic-learning-rate and --adam-eps."""
    module = load_script(lorasa_run[0])
    path = os.path.join(lorasa_run[2], "ps_checkpoint.pt")
    args = module.finalize_args(
        module.Args(checkpoint=path, critic_learning_rate=1e-3, adam_eps=1e-6)
    )
    checkpoint = load(path)
    obs_dim, act_dim = (checkpoint["actor"][k].shape[0] for k in ("feature_norm.weight", "log_std"))
    actor = module.GaussianActor(obs_dim, act_dim, 2, args)
    critic = module.Critic(checkpoint["critic"]["feature_norm.weight"].shape[0], 2, args)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate)
    models = (actor, critic, module.ValueNorm(2), critic_optim)
    assert module.load_weights(args, checkpoint, *models)[0] == "lora"
    group = critic_optim.param_groups[0]
    assert (group["lr"], group["eps"]) == (1e-3, 1e-6)
    del checkpoint["actor"]["fcs.fc2a.weight"]
    with pytest.raises(SystemExit):
        module.load_weights(args, checkpoint, *models)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit this actor" in err and "fc2a" in err


def test_task_defaults_apply_to_the_named_task_and_the_command_line_wins(script):
    """--help shows literal values; naming a task gives the reference's settings for it (TASK_DEFAULTS), and a flag on
    the command line still wins over them."""

    def parse(argv):  # as the scripts' main block parses
        return script.tyro.cli(
            script.Args, args=argv, default=script.Args(**script.task_defaults(argv))
        )

    assert (parse([]).update_epochs, parse([]).num_envs) == (
        5,
        16,
    )  # HalfCheetah 2x3, the default task
    humanoid = parse(["--scenario", "Humanoid", "--agent-conf", "9|8"])
    assert (humanoid.num_envs, humanoid.num_steps, humanoid.gae_lambda, humanoid.obs_mode) == (
        25,
        160,
        0.9,
        "global",
    )
    assert parse(["--scenario=Humanoid", "--agent-conf=9|8", "--num-envs", "3"]).num_envs == 3
    assert (
        parse(["--scenario", "Ant", "--agent-conf", "2x4"]).update_epochs
        == script.Args.update_epochs
        == 3
    )
    argv = ["--scenario", "Humanoid", "--agent-conf", "9|8", "--help"]
    res = run(script.__name__ + ".py", argv, ROOT, env=dict(COLUMNS="200"))  # one line per flag
    none = [field.name for field in script.dataclasses.fields(script.Args) if field.default is None]
    assert none == ["checkpoint", "lora_alpha", "lora_start"]  # derived values say so in their help
    assert res.stdout.count("(default: None)") == 3 and "alpha = rank" in res.stdout
    assert "(default: 160)" in res.stdout and "(default: global)" in res.stdout
