"""The StarCraft scripts: SMAX end to end (the real JaxMARL environment), the StarCraft II adapter
against a stand-in of smac's and smacv2's API (tests/standin; StarCraft II cannot run here), the
masks, the win flag, the evaluation's episode count, the map defaults and bad input."""

import contextlib
import glob
import importlib.util
import inspect
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import tyro
from conftest import (
    ROOT,
    SCRIPTS,
    load_script,
    make_args,
    only_run,
    present,
    run,
    sc2_folder,
    scalars,
)

SMAC = present([s for s in SCRIPTS if s.endswith("smac.py")])
STANDIN = os.path.join(ROOT, "tests", "standin")
FAKE_GAME = os.path.join(ROOT, "tests", "fake_sc2")
# the real smac code, run on tests/fake_sc2 (pysc2, smac and smacv2 are not installed in CI)
REAL = all(importlib.util.find_spec(name) for name in ("pysc2", "smac", "s2clientprotocol"))
NOT_REAL = "needs the real pysc2 and smac (pip install --no-deps, see tests/fake_sc2)"
TINY = ["--map", "3m", "--num-envs", "2", "--num-steps", "40", "--eval-episodes", "2"]
PIPES = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def fake_sc2(tmp_path_factory):
    """A StarCraft II folder with what pysc2 looks for (Versions/, the map files), and the
    stand-in packages."""
    path = sc2_folder(tmp_path_factory.mktemp("StarCraftII"))
    python_path = os.pathsep.join([STANDIN, os.environ.get("PYTHONPATH", "")])
    return dict(SC2PATH=str(path), PYTHONPATH=python_path)


@pytest.fixture(scope="module", params=SMAC, ids=lambda s: s[:-3])
def smax_run(request, tmp_path_factory):
    """The headline command, shortened to two iterations: SMAX 3s5z (no StarCraft II here), the
    switch inside the run."""
    cwd = tmp_path_factory.mktemp(request.param[:-3])
    flags = ["--rank", "8", "--map", "3s5z", "--total-timesteps", "6400", "--eval-episodes", "4"]
    res = run(request.param, flags, cwd)
    return request.param, cwd, only_run(cwd), res


def test_headline_command_on_smax(smax_run):
    script, cwd, run_dir, res = smax_run
    assert "env backend: smax, JaxMARL's SMAX, not SMAC" in res.stdout
    assert "README 'StarCraft II'" in res.stdout
    assert "phase switch at step 3200" in res.stdout and res.stderr == ""
    # never called SMAC
    assert os.path.basename(run_dir).startswith(f"smax-3s5z__{script[:-3]}__lorasa-r8__1__")
    assert {"checkpoint.pt", "adapters.pt", "ps_checkpoint.pt"} <= set(os.listdir(run_dir))
    s = scalars(run_dir)
    tags = [
        "eval/win_rate",
        "eval/episodic_return",
        "eval/num_episodes",
        "charts/win_rate",
        "charts/dead_ratio",
        "charts/episodic_return",
        "losses/policy_loss",
        "losses/entropy",
        "perf/SPS_env",
        "lorasa/delta_norm/agent_7",
        "lorasa/adapter_params_per_agent",
    ]
    for tag in tags:
        assert tag in s, tag
    assert [v for _, v in s["eval/num_episodes"]] == [4, 4]
    assert [v for _, v in s["charts/phase"]] == [0, 1]
    # SMAX 3s5z: 205 obs, 192 world state, 13 actions (+ SMAC's no-op)
    obs_dim, n_actions = 205 + 8, 14
    assert s["lorasa/adapter_params_per_agent"][0][1] == 8 * obs_dim + 8192 + 8 * n_actions
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ckpt["args"]["env_backend"] == "smax"
    assert ckpt["actor"]["head.lora_B.7"].shape == (n_actions, 8)
    assert ckpt["critic"]["fcs.fc1.weight"].shape == (64, 192 + 205 + 8)  # --state-mode ep_obs_id


@pytest.mark.parametrize("script", SMAC, ids=lambda s: s[:-3])
@pytest.mark.parametrize("mode", ["ps", "nps"])
def test_smax_baselines_run(script, mode, tmp_path):
    flags = ["--total-timesteps", "160", "--share-mode", mode, "--state-mode", "ep_id"]
    run(script, TINY + flags, tmp_path)
    s = scalars(only_run(tmp_path))
    assert set(v for _, v in s["charts/phase"]) == {0 if mode == "ps" else 2}
    assert "eval/win_rate" in s


def test_eval_only_resume_and_ps_checkpoint_on_smax(smax_run, tmp_path):
    script, _, run_dir, _ = smax_run
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    res = run(script, ["--checkpoint", checkpoint, "--eval-only", "--eval-episodes", "4"], tmp_path)
    last = scalars(run_dir)["eval/win_rate"][-1][1]
    assert f"eval smax-3s5z step 6400: win rate {last:.3f}," in res.stdout
    assert os.listdir(tmp_path) == []
    copy = tmp_path / "run"
    copy.mkdir()
    for name in os.listdir(run_dir):
        (copy / name).write_bytes(open(os.path.join(run_dir, name), "rb").read())
    flags = ["--checkpoint", str(copy / "checkpoint.pt"), "--resume", "--total-timesteps", "9600"]
    run(script, flags, tmp_path)
    assert [step for step, _ in scalars(copy)["charts/phase"]] == [3200, 6400, 9600]
    fine_tune = tmp_path / "fine_tune"
    fine_tune.mkdir()
    flags = ["--map", "3s5z", "--num-envs", "2", "--num-steps", "40", "--total-timesteps", "3280"]
    flags += ["--eval-episodes", "2", "--rank", "4", "--checkpoint", str(copy / "ps_checkpoint.pt")]
    run(script, flags, fine_tune)
    # LoRA from the first iteration; the x-axis continues
    assert scalars(only_run(fine_tune))["charts/phase"] == [(3280, 1)]


def test_sc2_backend_against_the_standin(fake_sc2, tmp_path):
    """The sc2 path end to end, on the stand-in: SMAC map 3m and SMACv2 task protoss_5_vs_5, with
    StarCraft II restarts and a failed SMACv2 reset inside the run."""
    env = dict(fake_sc2, STANDIN_RESTART_EVERY="23", STANDIN_FAILED_RESETS="1")
    for name in ("3m", "protoss_5_vs_5"):
        cwd = tmp_path / name
        cwd.mkdir()
        flags = ["--map", name, "--total-timesteps", "160", "--env-backend", "sc2"]
        res = run(SMAC[0], TINY[2:] + flags + ["--capture-video"], cwd, env)
        run_dir = only_run(cwd)
        assert os.path.basename(run_dir).startswith(f"sc2-{name}__")
        s = scalars(run_dir)
        assert "eval/win_rate" in s and s["eval/num_episodes"][-1][1] == 2
        # --capture-video: the eval game's own replay, from its launch on, replaced after each
        # evaluation (the stand-in's holds the steps its game played)
        replay = os.path.join(run_dir, "videos", "eval.SC2Replay")
        assert os.listdir(os.path.dirname(replay)) == ["eval.SC2Replay"]
        assert res.stdout.count(f"replay: {os.path.relpath(replay, cwd)}") == 2
        played = open(replay, "rb").read().decode()
        assert played.startswith(f"replay of {name if name == '3m' else '10gen_protoss'}: ")
        # two evaluations of 2 episodes: at least 4 steps
        assert int(played.split(": ")[1].split()[0]) >= 4, played
    # recording changes no number: the same 3m run without --capture-video
    plain = tmp_path / "plain"
    plain.mkdir()
    flags = ["--map", "3m", "--total-timesteps", "160", "--env-backend", "sc2"]
    run(SMAC[0], TINY[2:] + flags, plain, env)
    filmed, unfilmed = scalars(only_run(tmp_path / "3m")), scalars(only_run(plain))
    for tag in filmed:
        if not tag.startswith(("perf/", "charts/SPS")):
            assert filmed[tag] == unfilmed[tag], tag
    # auto picks the game when it is there
    res = run(SMAC[0], TINY + ["--total-timesteps", "80"], tmp_path / "3m", env)
    assert "env backend" not in res.stdout


def test_starcraft2_adapter_api(fake_sc2, monkeypatch):
    """Shapes, dtypes, the win flag, the timeout, the restart case and dead units' actions, on the
    stand-in."""
    for key, value in fake_sc2.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(STANDIN)
    for module in list(sys.modules):
        if module.split(".")[0] in ("smac", "smacv2", "sc2_standin"):
            monkeypatch.delitem(sys.modules, module)
    S = load_script(SMAC[0])
    args = make_args(S, map="3m", env_backend="sc2")
    env = S.StarCraft2("3m", 1, args.state_mode, args.death_masking)
    obs, _ = env.reset()
    assert obs["obs"].shape == (3, 48 + 3) and obs["state"].shape == (3, 48 + 48 + 3)
    assert obs["avail"].shape == (3, 9)
    assert all(x.dtype == np.float32 for x in obs.values()) and obs in env.observation_space
    ended, steps = False, 0
    while not ended:
        # attack the last available enemy
        actions = np.array([np.flatnonzero(a)[-1] for a in obs["avail"]])
        obs, reward, terminated, truncated, info = env.step(actions)
        steps += 1
        ended = terminated or truncated
        dead = obs["avail"][:, 0] == 1
        assert (obs["avail"][dead, 1:] == 0).all()  # a dead unit can only no-op
        # its critic input is masked but for its id
        assert (obs["state"][dead, :-3] == 0).all()
        assert (obs["state"][dead, -3:] == np.eye(3)[dead]).all()
    assert terminated and info["won"] and isinstance(reward, float)
    # a toy battle that nobody wins: the episode limit is a truncation, not a loss
    env.env.health[:] = 1.0
    env.env._episode_steps = 59
    _, _, terminated, truncated, info = env.step(np.ones(3, int))
    assert truncated and not terminated and not info["won"]
    # a StarCraft II protocol error: (0, True, {}) is a loss
    env.env.restart_every, env.env._steps_total = 1, 0
    _, reward, terminated, truncated, info = env.step(np.ones(3, int))
    assert terminated and not truncated and not info["won"] and reward == 0
    # a restart in the first episode: the next reset closes the game the restart launched (smac
    # launches again), and smac's reward normaliser stays that of the first launch
    standin = sys.modules["sc2_standin"]
    env.env.restart_every = 0
    fresh = S.StarCraft2("3m", 2, args.state_mode, args.death_masking)
    running = standin.GameProcess.running
    fresh.reset()
    normaliser = fresh.env.max_reward
    fresh.env.restart_every, fresh.env._steps_total = 1, 0
    assert fresh.step(np.ones(3, int))[2]
    fresh.env.restart_every = 0
    fresh.reset()
    assert fresh.env.max_reward == normaliser == 200 + 10 * 3 + 3
    assert standin.GameProcess.running == running + 1
    fresh.close()
    v2 = S.StarCraft2("protoss_5_vs_5", 1, args.state_mode, args.death_masking)
    # smacv2's wrapper retries and returns None; the adapter reads the env afterwards
    v2.env.env.failed_resets = 2
    obs, _ = v2.reset()
    assert obs["obs"].shape == (5, 92 + 5) and v2.env.resets == 3


def real_packages(monkeypatch):
    """The real smac and smacv2 for this test: other tests leave the stand-in's modules imported
    (and with its folder on the path, `import smac` is the stand-in)."""
    for name, module in list(sys.modules.items()):
        if STANDIN in (getattr(module, "__file__", None) or ""):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != STANDIN])


@pytest.mark.skipif(importlib.util.find_spec("smac") is None, reason="smac is not installed")
def test_standin_matches_the_real_packages(monkeypatch):
    """Where the real smac / smacv2 are installed: their get_env_info() and constructor parameters
    match the stand-in's."""
    real_packages(monkeypatch)
    from smac.env import StarCraft2Env

    monkeypatch.syspath_prepend(STANDIN)
    import sc2_standin

    for name in ("3m", "8m", "2s3z", "3s5z", "MMM2", "corridor"):
        for last_action in (False, True):
            real = StarCraft2Env(map_name=name, obs_last_action=last_action).get_env_info()
            fake = sc2_standin.StarCraft2Env(map_name=name, obs_last_action=last_action)
            fake = fake.get_env_info()
            assert {key: real[key] for key in fake} == fake, name
    parameters = set(inspect.signature(StarCraft2Env).parameters)
    assert {"map_name", "seed", "obs_last_action", "continuing_episode"} <= parameters


def test_smax_adapter_layout_win_flag_and_remap():
    """SMAX behind SMAC's API: the action remap (SMAC N/S/E/W/stop onto SMAX's), availability in
    SMAC's layout, the win flag from the post-step state, a timeout as truncation."""
    S = load_script(SMAC[0])
    args = make_args(S, map="3m", env_backend="smax")
    envs = S.SMAXEnvs("3m", 2, args)
    obs, _ = envs.reset(seed=[0, 1])
    assert obs["obs"].shape == (2, 3, 75 + 3) and obs["state"].shape == (2, 3, 72 + 75 + 3)
    assert obs["avail"].shape == (2, 3, 9)
    # alive: no no-op, stop available
    assert (obs["avail"][..., 0] == 0).all() and (obs["avail"][..., 1] == 1).all()
    jax = envs.jax
    moves = {}
    for smac_action in (1, 2, 3, 4, 5):  # stop, north, south, east, west
        envs.reset(seed=[0, 1])
        before = np.array(envs.states.state.unit_positions[0, :3])
        envs.step(np.full((2, 3), smac_action))
        after = np.array(envs.states.state.unit_positions[0, :3])
        moves[smac_action] = (after - before).mean(0)
    for smac_action, direction in ((2, (0, 1)), (3, (0, -1)), (4, (1, 0)), (5, (-1, 0))):
        move = moves[smac_action]
        assert move @ np.array(direction) > 0.9 * np.linalg.norm(move), moves
    assert np.linalg.norm(moves[1]) < 0.1 * np.linalg.norm(moves[2]), moves
    envs.reset(seed=[0, 1])
    # env 0: every enemy dead; env 1: every ally dead
    health = envs.states.state.unit_health.at[0, 3:].set(0.0)
    health = health.at[1, :3].set(0.0)
    envs.states = envs.states.replace(state=envs.states.state.replace(unit_health=health))
    _, _, terminated, truncated, info = envs.step(np.ones((2, 3), int))
    assert terminated.tolist() == [True, True] and not truncated.any()
    assert info["won"].tolist() == [True, False]
    envs.reset(seed=[0, 1])
    # the 60th step: the last of 3m's episode limit
    step = jax.numpy.full_like(envs.states.state.step, 59)
    envs.states = envs.states.replace(state=envs.states.state.replace(step=step))
    obs, _, terminated, truncated, info = envs.step(np.ones((2, 3), int))
    assert truncated.all() and not terminated.any() and not info["won"].any()


def test_unavailable_actions_are_never_sampled_and_get_no_gradient():
    S = load_script(SMAC[0])
    args = make_args(S, map="3m", env_backend="smax", num_envs=4, num_steps=30)
    S.resolve_backend(args)
    envs, obs = S.make_envs(args, [0, 1, 2, 3])
    torch.manual_seed(0)
    actor = S.CategoricalActor(78, 9, 3, args)
    S.start_phase(actor, "ps", args)
    buf = S.RolloutBuffer(args, 3, 78, 150, 9, "cpu")
    buf.put_obs(0, obs)
    S.collect_rollout(args, envs, actor, buf)
    # sampled only among the available actions, dead units included (no-op)
    chosen = buf.avail[:, :-1].gather(-1, buf.actions[..., None])[..., 0]
    assert (chosen == 1).all()
    # the stored log-probs are the policy's, of the sampled actions: the ratios start at 1
    with torch.no_grad():
        logits, _ = actor(buf.obs[:, :-1], buf.actor_h[:, 0], buf.masks[:-1], buf.avail[:, :-1])
    log_probs = logits.log_softmax(-1).gather(-1, buf.actions[..., None])[..., 0]
    torch.testing.assert_close(log_probs, buf.logprobs, atol=1e-5, rtol=1e-5)
    assert (buf.logprobs[buf.active[:, :-1] == 0] == 0).all()  # a dead unit's no-op is certain
    avail = torch.ones(3, 1, 5, 9)
    avail[..., 7] = 0  # action 7 unavailable everywhere
    logits, _ = actor(torch.randn(3, 1, 5, 78), torch.zeros(3, 5, 64), torch.ones(1, 5), avail)
    probs = logits.softmax(-1)
    assert (probs[..., 7] == 0).all() and torch.isfinite(logits).all()
    loss = (logits.log_softmax(-1) * torch.rand_like(probs) * avail).sum()
    loss = loss + (probs * torch.randn_like(probs)).sum()
    loss.backward()
    grad = actor.head.weight.grad
    assert (grad[7] == 0).all() and actor.head.bias.grad[7] == 0 and grad[6].abs().sum() > 0


@pytest.mark.parametrize("script", SMAC, ids=lambda s: s[:-3])
def test_dead_steps_do_not_enter_the_policy_loss(script):
    """Active masks: advantages and actions at steps where an agent is dead change nothing in the
    update (A2PO: in its others' ratios and traces either; a fixed order, since the order score
    reads every step as the reference's does)."""
    S = load_script(script)
    results = []
    for change in (False, True):
        torch.manual_seed(0)
        kw = dict(a2po_order="cyclic") if script.startswith("a2po") else {}
        kw.update(map="3m", env_backend="smax", num_envs=3, num_steps=20, update_epochs=2)
        args = make_args(S, share_mode="ps", **kw)
        actor, critic = S.CategoricalActor(12, 9, 2, args), S.Critic(15, 2, args)
        value_norm = S.ValueNorm(2)
        groups, actor_optims = S.start_phase(actor, "ps", args)
        critic_optim = torch.optim.Adam(critic.parameters(), lr=1e-3)
        buf = S.RolloutBuffer(args, 2, 12, 15, 9, "cpu")
        generator = torch.Generator().manual_seed(1)
        buf.obs.normal_(generator=generator)
        buf.state.normal_(generator=generator)
        buf.actions.random_(1, 9, generator=generator)
        # about the initial policy's: ratios near 1, inside the clips
        buf.logprobs.fill_(-np.log(9))
        buf.active[1, 5:15] = 0  # agent 1 dead from step 5 to 14
        advantages = torch.randn(2, 20, 3, generator=generator)
        returns = torch.randn(2, 20, 3, generator=generator)
        if change:
            advantages[1, 5:15] *= -10
            buf.actions[1, 5:15] = 0
        torch.manual_seed(2)
        optimizers = (actor_optims, groups, critic_optim)
        S.update(args, "ps", actor, critic, value_norm, optimizers, buf, returns, advantages)
        results.append(torch.cat([p.detach().flatten() for p in actor.parameters()]))
    torch.testing.assert_close(results[0], results[1])


def test_agent_inputs_death_masking_and_state_modes():
    S = load_script(SMAC[0])
    obs = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    state = np.full(5, 7.0, np.float32)
    avail = np.ones((3, 6), np.float32)
    avail[:, 0] = 0  # alive: no no-op
    avail[1] = [1, 0, 0, 0, 0, 0]  # agent 1 is dead
    for mode, width in (("ep_obs_id", 5 + 4 + 3), ("ep_id", 5 + 3)):
        for masking in (True, False):
            inputs = S.agent_inputs(obs, state, avail, mode, masking, np)
            assert inputs["obs"].shape == (3, 4 + 3) and (inputs["obs"][:, 4:] == np.eye(3)).all()
            assert inputs["state"].shape == (3, width)
            assert (inputs["state"][:, -3:] == np.eye(3)).all()
            assert (inputs["state"][1, :-3] == 0).all() == masking
            assert (inputs["state"][0, :5] == 7).all()


def test_bad_maps_and_a_missing_game(tmp_path, monkeypatch, capsys):
    S = load_script(SMAC[0])
    monkeypatch.setenv("SC2PATH", str(tmp_path))
    cases = [
        (
            dict(map="MMM2", env_backend="smax"),
            ["'MMM2' is not a SMAX map", "3s5z", "smacv2_5_units"],
        ),
        (dict(map="protoss_5_vs_5", env_backend="smax"), ["not a SMAX map", "no substitute"]),
        (dict(map="foo", env_backend="sc2"), ["'foo' is unknown", "MMM2", "protoss_5_vs_5"]),
        (
            dict(map="3s5z", env_backend="sc2"),
            ["--env-backend sc2", f"{tmp_path}/Versions", "README"],
        ),
    ]
    for kw, needles in cases:
        with pytest.raises(SystemExit) as error:
            S.resolve_backend(make_args(S, **kw))
        err = capsys.readouterr().err
        assert error.value.code == 2 and err.count("\n") == 1, err
        assert all(needle in err for needle in needles), err


def test_evaluation_plays_exactly_eval_episodes():
    """--eval-episodes 5 on 2 envs: shares 3 and 2, each env playing its share in turn; episodes
    beyond a share are not counted; the same seeds give the same result at every evaluation."""
    S = load_script(SMAC[0])
    args = make_args(S, map="3m", env_backend="smax", eval_episodes=5)
    envs = S.SMAXEnvs("3m", 2, args)
    torch.manual_seed(0)
    actor = S.CategoricalActor(78, 9, 3, args)
    S.start_phase(actor, "ps", args)
    result = S.evaluate(args, actor, envs)
    assert result["num_episodes"] == 5 and 0 <= result["win_rate"] <= 1
    assert 1 <= result["episodic_length"] <= 60  # 3m's episode limit
    assert result == S.evaluate(args, actor, envs)


def test_map_defaults_apply_and_show_in_help(tmp_path):
    """The reference's settings per map (3s5z_vs_3s6z: lambda 0.90) are the defaults --help shows
    for that map; a flag on the command line still wins; the suite's defaults are Args literals."""
    S = load_script(SMAC[0])
    assert S.task_defaults(["--map", "3s5z_vs_3s6z", "--seed", "2"]) == {"gae_lambda": 0.90}
    assert S.task_defaults(["--map=3s5z"]) == {} and S.task_defaults([]) == {}
    defaults = (S.Args.num_envs, S.Args.num_steps, S.Args.eval_episodes, S.Args.gae_lambda)
    assert defaults == (10, 320, 32, 0.95)
    for argv, gae_lambda in ((["--map", "3s5z_vs_3s6z"], 0.90), (["--gae-lambda", "0.8"], 0.8)):
        argv = ["--map", "3s5z_vs_3s6z", *argv]
        default = S.Args(**S.task_defaults(argv))
        assert tyro.cli(S.Args, default=default, args=argv).gae_lambda == gae_lambda
    res = run(SMAC[0], ["--map", "3s5z_vs_3s6z", "--help"], tmp_path)
    assert "GAE lambda (default: 0.9)" in res.stdout
    assert "parallel training envs (default: 10)" in res.stdout


def test_ctrl_c_on_sc2_saves_a_checkpoint(fake_sc2, tmp_path):
    """Ctrl-C sent as a terminal does, to the whole process group: the StarCraft II worker
    processes ignore it, the main one finishes the iteration, saves, exits 130, no traceback."""
    script = os.path.join(ROOT, SMAC[0])
    flags = ["--total-timesteps", "400000", "--eval-interval", "100000", "--env-backend", "sc2"]
    env = dict(os.environ, **fake_sc2)
    command = [sys.executable, script, *TINY, *flags]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, text=True, start_new_session=True, **PIPES
    )
    try:
        for line in proc.stdout:
            if line.startswith("iter 2/"):
                os.killpg(proc.pid, signal.SIGINT)  # the process group, as a terminal's Ctrl-C
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.count("\n") == 2, err  # the notice and the saved line
    ckpt = torch.load(os.path.join(only_run(tmp_path), "checkpoint.pt"), weights_only=True)
    assert ckpt["global_step"] >= 160 and ckpt["iteration"] == ckpt["global_step"] // 80


FALSE = shutil.which("false")
BROKEN_INSTALLS = {  # SC2_x64's content and mode, what is removed, what the error line says
    "no Versions": (None, 0, "Versions", "no StarCraft II build"),
    "an empty Versions": (None, 0, "Versions/Base75689", "no StarCraft II build"),
    "no SC2_x64": (None, 0, None, "SC2_x64 is missing"),
    "SC2_x64 not executable": (b"\x7fELF", 0o644, None, "is not executable; fix: chmod +x"),
    "a script as SC2_x64": (b"#!/bin/sh\nsleep 1000\n", 0o755, None, "is not the game"),
    "a game that exits at once": (FALSE, 0o755, None, "did not open its API port within 90 s"),
}


@pytest.mark.parametrize("case", BROKEN_INSTALLS)
def test_a_broken_starcraft_ii_is_one_error_line(case, tmp_path):
    """A StarCraft II that cannot run: one error line naming it and the fix, exit 2, no run
    folder, no process left. Checked before launching where it can be; a game that exits at once
    needs the real pysc2 (pysc2's wait is bounded: 90 s at most, here about a second)."""
    game, mode, removed, needle = BROKEN_INSTALLS[case]
    if game == FALSE and not REAL:
        pytest.skip(NOT_REAL)
    path = tmp_path / "StarCraftII"
    sc2_folder(path, open(FALSE, "rb").read() if game == FALSE else game, mode)
    if removed:
        shutil.rmtree(path / removed)
    env = dict(SC2PATH=str(path))
    if not REAL:  # the package check passes on the stand-in; the game is checked first
        env["PYTHONPATH"] = os.pathsep.join([STANDIN, os.environ.get("PYTHONPATH", "")])
    flags = ["--env-backend", "sc2", "--total-timesteps", "80"]
    res = run(SMAC[0], TINY + flags, tmp_path, env, check=False)
    assert res.returncode == 2 and res.stderr.startswith("error: "), res.stderr
    assert res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists()
    exe = str(path / "Versions" / "Base75689" / "SC2_x64")
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            assert exe not in open(cmdline, "rb").read().decode(errors="replace")


@pytest.mark.skipif(not REAL, reason=NOT_REAL)
def test_real_smac_reward_normaliser_is_the_maps(monkeypatch):
    """The real smac on a simulated game (tests/fake_sc2): make_envs and then evaluate's reset
    launch each game once, so every env's reward normaliser is the map's, 3s5z: 8 enemies x 10
    + 200 for the win + 3 stalkers x (80 + 80) + 5 zealots x (100 + 50) = 1510 (not 2740 after
    a second launch); an evaluation after an episode restarts the game, without a launch."""
    real_packages(monkeypatch)
    import pysc2.run_configs

    monkeypatch.syspath_prepend(FAKE_GAME)
    import fake_game

    monkeypatch.setattr(pysc2.run_configs, "get", fake_game.FakeRunConfig)
    S = load_script(SMAC[0])

    class Probe(S.StarCraft2):  # read in the workers through AsyncVectorEnv.call
        normaliser = property(lambda self: self.env.max_reward)
        launches = property(lambda self: fake_game.Counters.launches)

    monkeypatch.setattr(S, "StarCraft2", Probe)
    args = make_args(S, map="3s5z", env_backend="sc2", eval_episodes=1)
    envs, _ = S.make_envs(args, [1, 1001])
    eval_envs, first = S.make_envs(args, S.eval_seeds(args)[:1])
    try:
        actor = S.CategoricalActor(first["obs"].shape[-1], 14, 8, args)
        S.start_phase(actor, "ps", args)
        assert first["obs"].shape == (1, 8, 226 + 8)
        for _ in range(2):
            S.evaluate(args, actor, eval_envs)
            assert eval_envs.call("normaliser") == (1510,) and eval_envs.call("launches") == (1,)
        assert envs.call("normaliser") == (1510, 1510) and envs.call("launches") == (1, 1)
    finally:
        envs.close()
        eval_envs.close()
