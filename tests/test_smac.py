"""The StarCraft scripts: SMAX end to end (the real JaxMARL environment), the StarCraft II adapter against a stand-in
of smac's and smacv2's API (tests/standin; StarCraft II cannot run here), the masks, the win flag and bad input."""

import importlib.util
import inspect
import os
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPTS, load_script, make_args, only_run, present, run, scalars

SMAC = present([s for s in SCRIPTS if s.endswith("smac.py")])
STANDIN = os.path.join(ROOT, "tests", "standin")
TINY = ["--map", "3m", "--num-envs", "2", "--num-steps", "40", "--eval-episodes", "2"]


@pytest.fixture(scope="module")
def fake_sc2(tmp_path_factory):
    """A StarCraft II folder with what pysc2 looks for (Versions/, the map files), and the stand-in packages."""
    path = tmp_path_factory.mktemp("StarCraftII")
    (path / "Versions" / "Base75689").mkdir(parents=True)
    (path / "Maps" / "SMAC_Maps").mkdir(parents=True)
    for name in ("3m", "32x32_flat"):
        (path / "Maps" / "SMAC_Maps" / f"{name}.SC2Map").write_bytes(b"")
    return dict(SC2PATH=str(path), PYTHONPATH=os.pathsep.join([STANDIN, os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module", params=SMAC, ids=lambda s: s[:-3])
def smax_run(request, tmp_path_factory):
    """The headline command, shortened to two iterations: SMAX 3s5z (no StarCraft II here), the switch inside the run."""
    cwd = tmp_path_factory.mktemp(request.param[:-3])
    res = run(request.param, ["--rank", "8", "--map", "3s5z", "--total-timesteps", "6400", "--eval-episodes", "4"], cwd)
    return request.param, cwd, only_run(cwd), res


def test_headline_command_on_smax(smax_run):
    script, cwd, run_dir, res = smax_run
    assert "env backend: smax, JaxMARL's SMAX, not SMAC" in res.stdout and "README 'StarCraft II'" in res.stdout
    assert "phase switch at step 3200" in res.stdout and res.stderr == ""
    assert os.path.basename(run_dir).startswith(f"smax-3s5z__{script[:-3]}__lorasa-r8__1__")  # never called SMAC
    assert {"checkpoint.pt", "adapters.pt", "ps_checkpoint.pt"} <= set(os.listdir(run_dir))
    s = scalars(run_dir)
    for tag in ["eval/win_rate", "eval/episodic_return", "eval/num_episodes", "charts/win_rate", "charts/dead_ratio",
                "charts/episodic_return", "losses/policy_loss", "losses/entropy", "perf/SPS_env", "lorasa/delta_norm/agent_7",
                "lorasa/adapter_params_per_agent"]:  # fmt: skip
        assert tag in s, tag
    assert [v for _, v in s["eval/num_episodes"]] == [4, 4] and [v for _, v in s["charts/phase"]] == [0, 1]
    obs_dim, n_actions = 205 + 8, 14  # SMAX 3s5z: 205 obs, 192 world state, 13 actions (+ SMAC's no-op)
    assert s["lorasa/adapter_params_per_agent"][0][1] == 8 * obs_dim + 8192 + 8 * n_actions
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ckpt["args"]["env_backend"] == "smax" and ckpt["actor"]["head.lora_B.7"].shape == (n_actions, 8)
    assert ckpt["critic"]["fcs.fc1.weight"].shape == (64, 192 + 205 + 8)  # --state-mode ep_obs_id


@pytest.mark.parametrize("script", SMAC, ids=lambda s: s[:-3])
@pytest.mark.parametrize("mode", ["ps", "nps"])
def test_smax_baselines_run(script, mode, tmp_path):
    run(script, TINY + ["--total-timesteps", "160", "--share-mode", mode, "--state-mode", "ep_id"], tmp_path)
    s = scalars(only_run(tmp_path))
    assert set(v for _, v in s["charts/phase"]) == {0 if mode == "ps" else 2} and "eval/win_rate" in s


def test_eval_only_resume_and_ps_checkpoint_on_smax(smax_run, tmp_path):
    script, _, run_dir, _ = smax_run
    res = run(
        script, ["--checkpoint", os.path.join(run_dir, "checkpoint.pt"), "--eval-only", "--eval-episodes", "4"], tmp_path
    )
    last = scalars(run_dir)["eval/win_rate"][-1][1]
    assert f"eval smax-3s5z step 6400: win rate {last:.3f}," in res.stdout and os.listdir(tmp_path) == []
    copy = tmp_path / "run"
    copy.mkdir()
    for name in os.listdir(run_dir):
        (copy / name).write_bytes(open(os.path.join(run_dir, name), "rb").read())
    run(script, ["--checkpoint", str(copy / "checkpoint.pt"), "--resume", "--total-timesteps", "9600"], tmp_path)
    assert [step for step, _ in scalars(copy)["charts/phase"]] == [3200, 6400, 9600]
    fine_tune = tmp_path / "fine_tune"
    fine_tune.mkdir()
    run(script, ["--map", "3s5z", "--num-envs", "2", "--num-steps", "40", "--total-timesteps", "3280", "--eval-episodes", "2",
                 "--rank", "4", "--checkpoint", str(copy / "ps_checkpoint.pt")], fine_tune)  # fmt: skip
    assert scalars(only_run(fine_tune))["charts/phase"] == [(3280, 1)]  # LoRA from the first iteration; the x-axis continues


def test_sc2_backend_against_the_standin(fake_sc2, tmp_path):
    """The sc2 path end to end, on the stand-in: SMAC map 3m and SMACv2 task protoss_5_vs_5, with StarCraft II restarts
    and a failed SMACv2 reset inside the run."""
    env = dict(fake_sc2, STANDIN_RESTART_EVERY="23", STANDIN_FAILED_RESETS="1")
    for name in ("3m", "protoss_5_vs_5"):
        cwd = tmp_path / name
        cwd.mkdir()
        run(SMAC[0], TINY[2:] + ["--map", name, "--total-timesteps", "160", "--env-backend", "sc2"], cwd, env)
        run_dir = only_run(cwd)
        assert os.path.basename(run_dir).startswith(f"sc2-{name}__")
        s = scalars(run_dir)
        assert "eval/win_rate" in s and s["eval/num_episodes"][-1][1] == 2
    res = run(SMAC[0], TINY + ["--total-timesteps", "80"], tmp_path / "3m", env)  # auto picks the game when it is there
    assert "env backend" not in res.stdout


def test_starcraft2_adapter_api(fake_sc2, monkeypatch):
    """Shapes, dtypes, the win flag, the timeout, the restart case and dead units' actions, on the stand-in."""
    for key, value in fake_sc2.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(STANDIN)
    for module in [name for name in sys.modules if name.split(".")[0] in ("smac", "smacv2", "sc2_standin")]:
        monkeypatch.delitem(sys.modules, module)
    S = load_script(SMAC[0])
    args = make_args(S, map="3m", env_backend="sc2")
    env = S.StarCraft2("3m", 1, args.state_mode, args.death_masking)
    obs, _ = env.reset()
    assert obs["obs"].shape == (3, 48 + 3) and obs["state"].shape == (3, 48 + 48 + 3) and obs["avail"].shape == (3, 9)
    assert all(x.dtype == np.float32 for x in obs.values()) and obs in env.observation_space
    ended, steps = False, 0
    while not ended:
        actions = np.array([np.flatnonzero(a)[-1] for a in obs["avail"]])  # attack the last available enemy
        obs, reward, terminated, truncated, info = env.step(actions)
        steps += 1
        ended = terminated or truncated
        dead = obs["avail"][:, 0] == 1
        assert (obs["avail"][dead, 1:] == 0).all()  # a dead unit can only no-op
        assert (obs["state"][dead, :-3] == 0).all() and (obs["state"][dead, -3:] == np.eye(3)[dead]).all()  # masked
    assert terminated and info["won"] and isinstance(reward, float)
    env.env.health[:] = 1.0  # a toy battle that nobody wins: the episode limit is a truncation, not a loss
    env.env._episode_steps = 59
    _, _, terminated, truncated, info = env.step(np.ones(3, int))
    assert truncated and not terminated and not info["won"]
    env.env.restart_every, env.env._steps_total = 1, 0  # a StarCraft II protocol error: (0, True, {}) is a loss
    _, reward, terminated, truncated, info = env.step(np.ones(3, int))
    assert terminated and not truncated and not info["won"] and reward == 0
    v2 = S.StarCraft2("protoss_5_vs_5", 1, args.state_mode, args.death_masking)
    v2.env.env.failed_resets = 2  # smacv2's wrapper retries and returns None; the adapter reads the env afterwards
    obs, _ = v2.reset()
    assert obs["obs"].shape == (5, 92 + 5) and v2.env.resets == 3


@pytest.mark.skipif(importlib.util.find_spec("smac") is None, reason="the real smac package is not installed")
def test_standin_matches_the_real_packages():
    """Where the real smac / smacv2 are installed: their get_env_info() and constructor parameters match the stand-in's."""
    sys.path.insert(0, STANDIN)
    import sc2_standin
    from smac.env import StarCraft2Env

    for name in ("3m", "8m", "2s3z", "3s5z", "MMM2", "corridor"):
        for last_action in (False, True):
            real = StarCraft2Env(map_name=name, obs_last_action=last_action).get_env_info()
            fake = sc2_standin.StarCraft2Env(map_name=name, obs_last_action=last_action).get_env_info()
            assert {key: real[key] for key in fake} == fake, name
    assert {"map_name", "seed", "obs_last_action", "continuing_episode"} <= set(inspect.signature(StarCraft2Env).parameters)


def test_smax_adapter_layout_win_flag_and_remap():
    """SMAX behind SMAC's API: the action remap (SMAC N/S/E/W/stop onto SMAX's), availability in SMAC's layout, the win
    flag from the post-step state, a timeout as truncation."""
    S = load_script(SMAC[0])
    args = make_args(S, map="3m", env_backend="smax")
    envs = S.SMAXEnvs("3m", 2, args)
    obs, _ = envs.reset(seed=[0, 1])
    assert obs["obs"].shape == (2, 3, 75 + 3) and obs["state"].shape == (2, 3, 72 + 75 + 3) and obs["avail"].shape == (2, 3, 9)
    assert (obs["avail"][..., 0] == 0).all() and (obs["avail"][..., 1] == 1).all()  # alive: no no-op, stop available
    jax = envs.jax
    moves = {}
    for smac_action in (1, 2, 3, 4, 5):  # stop, north, south, east, west
        envs.reset(seed=[0, 1])
        before = np.array(envs.states.state.unit_positions[0, :3])
        envs.step(np.full((2, 3), smac_action))
        moves[smac_action] = (np.array(envs.states.state.unit_positions[0, :3]) - before).mean(0)
    for smac_action, direction in ((2, (0, 1)), (3, (0, -1)), (4, (1, 0)), (5, (-1, 0))):
        assert moves[smac_action] @ np.array(direction) > 0.9 * np.linalg.norm(moves[smac_action]), moves
    assert np.linalg.norm(moves[1]) < 0.1 * np.linalg.norm(moves[2]), moves
    envs.reset(seed=[0, 1])
    health = envs.states.state.unit_health.at[0, 3:].set(0.0)  # env 0: every enemy dead; env 1: every ally dead
    health = health.at[1, :3].set(0.0)
    envs.states = envs.states.replace(state=envs.states.state.replace(unit_health=health))
    _, _, terminated, truncated, info = envs.step(np.ones((2, 3), int))
    assert terminated.tolist() == [True, True] and info["won"].tolist() == [True, False] and not truncated.any()
    envs.reset(seed=[0, 1])
    step = jax.numpy.full_like(envs.states.state.step, 59)  # the 60th step: the last of 3m's episode limit
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
    chosen = buf.avail[:, :-1].gather(-1, buf.actions[..., None])[..., 0]
    assert (chosen == 1).all()  # sampled only among the available actions, dead units included (no-op)
    avail = torch.ones(3, 1, 5, 9)
    avail[..., 7] = 0  # action 7 unavailable everywhere
    logits, _ = actor(torch.randn(3, 1, 5, 78), torch.zeros(3, 5, 64), torch.ones(1, 5), avail)
    probs = logits.softmax(-1)
    assert (probs[..., 7] == 0).all() and torch.isfinite(logits).all()
    loss = (logits.log_softmax(-1) * torch.rand_like(probs) * avail).sum() + (probs * torch.randn_like(probs)).sum()
    loss.backward()
    assert (
        (actor.head.weight.grad[7] == 0).all() and actor.head.bias.grad[7] == 0 and actor.head.weight.grad[6].abs().sum() > 0
    )


@pytest.mark.parametrize("script", SMAC, ids=lambda s: s[:-3])
def test_dead_steps_do_not_enter_the_policy_loss(script):
    """Active masks: advantages and actions at steps where an agent is dead change nothing in the update (A2PO: in its
    others' ratios and traces either; a fixed order, since the order score reads every step as the reference's does)."""
    S = load_script(script)
    results = []
    for change in (False, True):
        torch.manual_seed(0)
        kw = dict(a2po_order="cyclic") if script.startswith("a2po") else {}
        args = make_args(S, map="3m", env_backend="smax", num_envs=3, num_steps=20, update_epochs=2, share_mode="ps", **kw)
        actor, critic, value_norm = S.CategoricalActor(12, 9, 2, args), S.Critic(15, 2, args), S.ValueNorm(2)
        groups, optimizers = S.start_phase(actor, "ps", args)
        critic_optim = torch.optim.Adam(critic.parameters(), lr=1e-3)
        buf = S.RolloutBuffer(args, 2, 12, 15, 9, "cpu")
        generator = torch.Generator().manual_seed(1)
        buf.obs.normal_(generator=generator)
        buf.state.normal_(generator=generator)
        buf.actions.random_(1, 9, generator=generator)
        buf.logprobs.fill_(-np.log(9))  # about the initial policy's: ratios near 1, inside the clips
        buf.active[1, 5:15] = 0  # agent 1 dead from step 5 to 14
        advantages = torch.randn(2, 20, 3, generator=generator)
        returns = torch.randn(2, 20, 3, generator=generator)
        if change:
            advantages[1, 5:15] *= -10
            buf.actions[1, 5:15] = 0
        torch.manual_seed(2)
        S.update(args, actor, critic, value_norm, optimizers, groups, critic_optim, buf, returns, advantages, "ps")
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
            assert inputs["state"].shape == (3, width) and (inputs["state"][:, -3:] == np.eye(3)).all()
            assert (inputs["state"][1, :-3] == 0).all() == masking and (inputs["state"][0, :5] == 7).all()


def test_bad_maps_and_a_missing_game(tmp_path, monkeypatch, capsys):
    S = load_script(SMAC[0])
    monkeypatch.setenv("SC2PATH", str(tmp_path))
    cases = [
        (dict(map="MMM2", env_backend="smax"), ["'MMM2' is not a SMAX map", "3s5z", "smacv2_5_units"]),
        (dict(map="protoss_5_vs_5", env_backend="smax"), ["not a SMAX map", "no substitute"]),
        (dict(map="foo", env_backend="sc2"), ["'foo' is unknown", "MMM2", "protoss_5_vs_5"]),
        (dict(map="3s5z", env_backend="sc2"), ["--env-backend sc2", f"{tmp_path}/Versions", "README"]),
    ]
    for kw, needles in cases:
        with pytest.raises(SystemExit) as error:
            S.resolve_backend(make_args(S, **kw))
        err = capsys.readouterr().err
        assert error.value.code == 2 and err.count("\n") == 1 and all(needle in err for needle in needles), err
