"""The real smac and smacv2 on the simulated game of tests/fake_sc2 (pysc2, smac and smacv2 are
installed with pip --no-deps where wanted, never in CI: skipped there): both StarCraft II scripts'
whole runs on a SMAC map and a SMACv2 task, and what the StarCraft2 adapter reports at the end of
an episode that is won, lost, timed out or cut by a StarCraft II restart. Each check plays in its
own process: pysc2 refuses map lookups once smac and smacv2 are both imported in one."""

import collections
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPTS, load_script, make_args, only_run, present, sc2_folder, scalars

SMAC = present([s for s in SCRIPTS if s.endswith("smac.py")])
TESTS = os.path.join(ROOT, "tests")
FAKE_GAME = os.path.join(TESTS, "fake_sc2")
BASE = ("pysc2", "s2clientprotocol")
MISSING = {
    package: [name for name in (*BASE, package) if importlib.util.find_spec(name) is None]
    for package in ("smac", "smacv2")
}


def needs(package):
    missing = " ".join(MISSING[package])
    why = f"needs the real {missing} (pip install --no-deps, see tests/fake_sc2)"
    return pytest.mark.skipif(bool(MISSING[package]), reason=why)


# task -> its package, agents, actions (6 + enemies), episode limit, and, SMAC maps only, the
# reward normaliser: 3s5z, 8 enemies x 10 + 200 for the win + 3 x (80 + 80) + 5 x (100 + 50)
TASKS = {
    "3s5z": dict(package="smac", n=8, n_actions=14, limit=150, normaliser=1510),
    "protoss_5_vs_5": dict(package="smacv2", n=5, n_actions=11, limit=200, normaliser=None),
}
TASK_PARAMS = [pytest.param(task, marks=needs(TASKS[task]["package"])) for task in TASKS]
# pysc2's ConnectError as a game that never opens its port raises it; a step's restart
RELAUNCH = dict(FAKE_SC2_FAIL_STEP_AT="10", FAKE_SC2_FAIL_LAUNCH_AT="2")


def play(script, task, cwd, *extra, **env):
    """A whole run of `script` on the simulated game (tests/fake_sc2/fake_game.py runs it): two
    iterations of 2 envs x 40 steps, phase ps then lora, evaluations of 2 episodes at the start
    and the end. Returns the finished process and the games' launches and closes per process."""
    flags = ["--map", task, "--env-backend", "sc2", "--num-envs", "2", "--num-steps", "40"]
    flags += ["--total-timesteps", "160", "--eval-episodes", "2", *extra]
    log = cwd / "games.log"
    env = dict(
        os.environ, SC2PATH=str(sc2_folder(cwd / "StarCraftII")), FAKE_SC2_LOG=str(log), **env
    )
    command = [sys.executable, os.path.join(FAKE_GAME, "fake_game.py")]
    command += [os.path.join(ROOT, script), *flags]
    res = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    games = collections.defaultdict(list)
    for line in log.read_text().splitlines() if log.exists() else []:
        event, pid = line.split()
        games[pid].append(event)
    return res, dict(games)


@pytest.mark.parametrize("task", TASK_PARAMS)
@pytest.mark.parametrize("script", SMAC, ids=lambda s: s[:-3])
def test_real_whole_run(script, task, tmp_path):
    """A whole run on the real smac (3s5z) or smacv2 (protoss_5_vs_5): exit 0, nothing on stderr,
    both phases, the evaluations, the checkpoints, the eval game's replays (--capture-video); each
    game launched once and closed at the end."""
    spec = TASKS[task]
    res, games = play(script, task, tmp_path, "--capture-video")
    assert res.returncode == 0 and res.stderr == "", res.stdout[-2000:] + res.stderr[-3000:]
    out = res.stdout
    assert "env backend" not in out  # the game, not SMAX
    assert "version/pysc2=4.0.0" in out and f"version/{spec['package']}=" in out
    assert "version/sc2_build=Base75689" in out
    assert f"{spec['n']} agents," in out
    lines = [line.split(" win rate")[0] for line in out.splitlines() if " win rate " in line]
    expected = ["  eval @ step 0:", "iter 1/2 step 80 phase ps", "iter 2/2 step 160 phase lora"]
    assert lines == expected + ["  eval @ step 160:"], out[-3000:]
    assert "  phase switch at step 80: shared actor frozen, adapters on" in out
    # two training games and the eval game: one launch each, each closed at the exit
    assert sorted(games.values()) == [["launch", "close"]] * 3, games
    run_dir = only_run(tmp_path)
    name = f"sc2-{task}__{script[:-3]}__lorasa-r8__1__"
    assert os.path.basename(run_dir).startswith(name), run_dir
    assert {"checkpoint.pt", "adapters.pt", "ps_checkpoint.pt"} <= set(os.listdir(run_dir))
    s = scalars(run_dir)
    assert s["eval/num_episodes"] == [(0, 2), (160, 2)]
    assert s["charts/phase"] == [(80, 0), (160, 1)]
    for _, value in s["eval/win_rate"] + s.get("charts/win_rate", []):
        assert 0 <= value <= 1
    for _, value in s["eval/episodic_length"]:
        assert 1 <= value <= spec["limit"]
    if task == "3s5z":  # the random policy beats the passive toy enemies within 40 steps
        assert "charts/win_rate" in s
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ckpt["args"]["env_backend"] == "sc2" and ckpt["args"]["map"] == task
    assert ckpt["global_step"] == 160 and ckpt["phase"] == "lora"
    # the replay pysc2's controller returns, saved after each evaluation into one file (the fake
    # game's replay holds its game loop: two evaluations of 2 episodes were played)
    replay = os.path.join(run_dir, "videos", "eval.SC2Replay")
    assert os.listdir(os.path.dirname(replay)) == ["eval.SC2Replay"]
    assert out.count(f"replay: {os.path.relpath(replay, tmp_path)}") == 2
    assert int(open(replay, "rb").read().decode().split("game loop ")[1]) >= 4 * 8
    n, n_actions = spec["n"], spec["n_actions"]
    assert ckpt["actor"][f"head.lora_B.{n - 1}"].shape == (n_actions, 8)
    assert f"head.lora_B.{n}" not in ckpt["actor"]
    ps = torch.load(os.path.join(run_dir, "ps_checkpoint.pt"), weights_only=True)
    assert ps["global_step"] == 80 and ps["phase"] == "ps"


def greedy(env, obs):
    """Each living agent attacks the first enemy in range, else moves towards the nearest living
    enemy (positions read from the smac env); a dead one no-ops."""
    sc2 = env.env
    actions = []
    for i, avail in enumerate(obs["avail"]):
        attacks = np.flatnonzero(avail[6:])
        if avail[0]:  # dead
            actions.append(0)
            continue
        if len(attacks):
            actions.append(6 + attacks[0])
            continue
        me = sc2.agents[i].pos
        enemies = [e.pos for e in sc2.enemies.values() if e.health > 0]
        target = min(enemies, key=lambda p: (p.x - me.x) ** 2 + (p.y - me.y) ** 2)
        dx, dy = target.x - me.x, target.y - me.y
        # smac: 2 north (+y), 3 south, 4 east (+x), 5 west
        move = (4 if dx > 0 else 5) if abs(dx) > abs(dy) else (2 if dy > 0 else 3)
        actions.append(move if avail[move] else 1)
    return np.array(actions)


def stop(env, obs):
    return np.array([0 if avail[0] else 1 for avail in obs["avail"]])


def episode(env, obs, policy, max_steps=1000, before_step=None):
    """One episode from `obs`: steps until it ends; returns what the adapter reported."""
    rewards = []
    for step in range(max_steps):
        if before_step:
            before_step(step)
        obs, reward, terminated, truncated, info = env.step(policy(env, obs))
        rewards.append(reward)
        assert isinstance(reward, float) and set(info) == {"won"}
        if terminated or truncated:
            break
    sc2 = env.env
    return dict(
        steps=len(rewards),
        episode_return=float(sum(rewards)),
        last_reward=float(rewards[-1]),
        terminated=bool(terminated),
        truncated=bool(truncated),
        won=bool(info["won"]),
        normaliser=float(sc2.max_reward),
    )


def enemies_value(env):
    """What a perfect win of this episode is worth to smac before scaling: the enemies' health
    and shield, 10 per kill, 200 for the win."""
    enemies = env.env.enemies.values()
    return sum(e.health_max + e.shield_max + 10 for e in enemies) + 200


def episode_ends(script, task, restart_in_first_episode=False):
    """Plays the adapter (`script`'s StarCraft2) on the simulated game, one env, episode after
    episode: won, lost (the allies killed), timed out, cut by a StarCraft II restart (the game's
    connection fails in a step: smac's full_restart), won again. Returns what it reported, with
    the launches and closes of games. With restart_in_first_episode: the restart cuts the first
    episode, then one episode is won. Run in its own process (fake_game installed)."""
    import fake_game
    from s2clientprotocol import debug_pb2

    counters = fake_game.Counters
    S = load_script(script)
    args = make_args(S, map=task, env_backend="sc2")
    env = S.StarCraft2(task, 1, args.state_mode, args.death_masking)
    report = dict(episodes=[])

    def reset():
        obs, _ = env.reset()
        return obs, dict(value=enemies_value(env), launches=counters.launches)

    def restart_at(step):
        if step == 2:  # the third step's connection fails
            counters.fail_step_at = env.env._controller.steps + 1

    def record(how, result, value):
        counters.fail_step_at = None
        result.update(how=how, value=value, launches=counters.launches, closes=counters.closes)
        report["episodes"].append(result)

    obs, first = reset()
    report.update(first_normaliser=float(env.env.max_reward), first=first)
    if restart_in_first_episode:
        record("restart", episode(env, obs, greedy, before_step=restart_at), first["value"])
        obs, start = reset()
        record("win", episode(env, obs, greedy), start["value"])
        env.close()
        return report
    record("win", episode(env, obs, greedy), first["value"])
    obs, start = reset()

    def kill_the_allies(step):
        if step == 1:  # after one step of the battle
            tags = [unit.tag for unit in env.env.agents.values() if unit.health > 0]
            kill = debug_pb2.DebugCommand(kill_unit=debug_pb2.DebugKillUnit(tag=tags))
            env.env._controller.debug([kill])

    record("loss", episode(env, obs, greedy, before_step=kill_the_allies), start["value"])
    obs, start = reset()
    record("timeout", episode(env, obs, stop), start["value"])
    obs, start = reset()
    record("restart", episode(env, obs, greedy, before_step=restart_at), start["value"])
    obs, start = reset()
    report["launches_by_the_reset"] = counters.launches - start["launches"]
    record("win", episode(env, obs, greedy), start["value"])
    env.close()
    report["closes"] = counters.closes
    return report


def in_own_process(function, *arguments):
    """function(*arguments) of this module, in a new process playing the simulated game; its
    result comes back as JSON (the last line of its stdout)."""
    name = __name__
    code = f"import json, fake_game; fake_game.install(); from {name} import {function.__name__}"
    code += f"\nprint(json.dumps({function.__name__}(*{arguments!r})))"
    path = os.pathsep.join([TESTS, FAKE_GAME, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    command = [sys.executable, "-c", code]
    res = subprocess.run(command, cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


def perfect_win(result, normaliser):
    """smac's scaled return of a win without losses: reward_scale_rate 20 x the episode's value
    over the normaliser (20 on a SMAC map, where every episode has the same enemies)."""
    return 20 * result["value"] / normaliser


@pytest.mark.parametrize("task", TASK_PARAMS)
@pytest.mark.parametrize("script", SMAC, ids=lambda s: s[:-3])
def test_real_episode_ends_win_loss_timeout_restart(script, task):
    """What the adapter reports, on the real smac / smacv2: a win (terminated, won), a loss
    (terminated, not won), a timeout at the episode limit (truncated only), a StarCraft II restart
    (terminated, not won, reward 0; one relaunch, the crashed game closed); smac's reward
    normaliser stays the map's through all of it (a perfect win returns 20 before and after)."""
    spec = TASKS[task]
    report = in_own_process(episode_ends, script, task)
    normaliser = report["first_normaliser"]
    if spec["normaliser"] is not None:
        assert normaliser == spec["normaliser"]
    else:  # SMACv2: the first episode's enemies (random teams), 5 x 10 + 200 and their health
        assert normaliser == report["first"]["value"] > 250
    assert report["first"]["launches"] == 1
    win, loss, timeout, restart, win_again = report["episodes"]
    assert [e["how"] for e in report["episodes"]] == ["win", "loss", "timeout", "restart", "win"]
    for e in report["episodes"]:
        assert e["normaliser"] == normaliser, e
    for e in (win, win_again):
        assert e["terminated"] and not e["truncated"] and e["won"], e
        assert 1 < e["steps"] < spec["limit"], e
        assert e["episode_return"] == pytest.approx(perfect_win(e, normaliser), rel=1e-5), e
    assert win["episode_return"] == pytest.approx(20, rel=1e-5)
    assert loss["terminated"] and not loss["truncated"] and not loss["won"], loss
    # smac's defeat reward is 0, and nothing was hit at the allies' death
    assert loss["steps"] == 2 and loss["last_reward"] == 0, loss
    assert timeout["truncated"] and not timeout["terminated"] and not timeout["won"], timeout
    assert timeout["steps"] == spec["limit"] and timeout["episode_return"] == 0, timeout
    assert restart["terminated"] and not restart["truncated"] and not restart["won"], restart
    assert restart["steps"] == 3 and restart["last_reward"] == 0, restart
    # the crashed game closed, one new one launched; the next reset launched nothing
    assert (restart["launches"], restart["closes"]) == (2, 1), restart
    assert report["launches_by_the_reset"] == 0 and win_again["launches"] == 2
    assert report["closes"] == 2  # close() closes the game that runs


@pytest.mark.parametrize("task", TASK_PARAMS)
@pytest.mark.parametrize("script", SMAC, ids=lambda s: s[:-3])
def test_real_restart_in_the_first_episode_keeps_the_normaliser(script, task):
    """A StarCraft II restart that cuts the first episode: the next reset must neither relaunch
    (a game left running) nor change smac's reward normaliser (a perfect win still returns 20)."""
    report = in_own_process(episode_ends, script, task, True)
    restart, win = report["episodes"]
    assert restart["terminated"] and not restart["won"] and restart["last_reward"] == 0
    assert (restart["launches"], restart["closes"]) == (2, 1), restart
    assert win["won"] and win["normaliser"] == report["first_normaliser"], report
    assert win["launches"] - win["closes"] == 1, win  # only the game in play is running
    normaliser = report["first_normaliser"]
    assert win["episode_return"] == pytest.approx(perfect_win(win, normaliser), rel=1e-5)


@pytest.mark.parametrize("task", TASK_PARAMS[:1])
@pytest.mark.parametrize("script", SMAC, ids=lambda s: s[:-3])
def test_real_failed_relaunch_in_a_run_is_one_error_line(script, task, tmp_path):
    """The game restarts in a step (the connection fails at each game's 10th step) and the
    relaunch fails as a game that never opens its port: one `error:` line, as a failed first
    launch gives, exit 2, no traceback."""
    res, games = play(script, task, tmp_path, **RELAUNCH)
    assert any("failed" in events for events in games.values()), games
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.returncode == 2 and res.stderr.startswith("error: "), res.stderr[-3000:]
    assert res.stderr.count("\n") == 1 and "did not open its API port" in res.stderr
