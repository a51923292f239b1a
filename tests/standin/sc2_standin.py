"""A stand-in for the StarCraft2Env API of `smac` (github.com/oxwhirl/smac, commit d6aab33) and `smacv2`
(github.com/oxwhirl/smacv2, commit 577ab5a), for testing the scripts' sc2 adapter where StarCraft II cannot run.

What it reproduces, compared against those packages' source and, for the env-info figures, against the real packages
installed in a scratch environment (their get_env_info() works without the game):
- the constructor's keyword arguments (map_name, seed, obs_last_action, continuing_episode, ...; smacv2 adds
  capability_config, obs_own_pos, use_unit_ranges, ...) and KeyError for an unknown map;
- get_env_info() = {state_shape, obs_shape, n_actions, n_agents, episode_limit, ...}, the real figures below;
- reset() launches the game on first use: FileNotFoundError when $SC2PATH/Versions is missing, as pysc2; it returns
  (list of obs, state); smacv2's capability wrapper retries a CannotResetException and then returns None;
- step(actions) -> (reward, terminated, info) with info {battle_won, dead_allies, dead_enemies} and, with
  continuing_episode=True, episode_limit=True at the limit (terminated is True there too); after a StarCraft II
  protocol error it relaunches the game and returns (0, True, {}), without counting the episode;
- max_reward, smac's reward normaliser, grows by the enemies' health at every launch (a reset while no episode has
  ended launches; _sc2_proc is the game, GameProcess.running counts those not closed);
- get_obs() a list of float32 arrays, get_state() a float32 array, get_avail_actions() lists of ints with
  0 no-op (only for dead units, then the only one), 1 stop, 2-5 moves, 6 + k attack enemy k.
The battle itself is a toy (scripted damage), not StarCraft.
"""

import os

import numpy as np

# get_env_info() of the real packages: (state_shape, obs_shape without last action, obs_shape with it, n_actions,
# n_agents, n_enemies, episode_limit); smacv2 tasks have obs_last_action=False
ENV_INFO = {
    "3m": (48, 30, 48, 9, 3, 3, 60),
    "8m": (168, 80, 178, 14, 8, 8, 120),
    "2s3z": (120, 80, 124, 11, 5, 5, 120),
    "3s5z": (216, 128, 226, 14, 8, 8, 150),
    "MMM2": (322, 176, 338, 18, 10, 12, 180),
    "corridor": (282, 156, 306, 30, 6, 24, 400),
    ("10gen_protoss", 5, 5): (130, 92, 92, 11, 5, 5, 200),
    ("10gen_terran", 5, 5): (120, 82, 82, 11, 5, 5, 200),
    ("10gen_zerg", 5, 5): (120, 82, 82, 11, 5, 5, 200),
    ("10gen_zerg", 10, 11): (306, 170, 170, 17, 10, 11, 200),
    ("10gen_terran", 20, 23): (858, 346, 346, 29, 20, 23, 200),
}


class CannotResetException(Exception):
    pass


class GameProcess:
    """pysc2's StarCraftProcess: counts the games running in this process."""

    running = 0

    def __init__(self):
        GameProcess.running += 1

    def close(self):
        GameProcess.running -= 1


class Controller:
    """pysc2's RemoteController, as far as the scripts use it: save_replay() returns the game's
    replay since its launch (here: the map and the steps its env played)."""

    def __init__(self, env):
        self.env = env

    def save_replay(self):
        return f"replay of {self.env.map_name}: {self.env._steps_total} steps".encode()


class StarCraft2Env:
    # test hooks: every `restart_every`-th step of the process's envs hits a protocol error; the first
    # `failed_resets` resets of a smacv2 env raise CannotResetException
    restart_every = int(os.environ.get("STANDIN_RESTART_EVERY", "0"))
    failed_resets = int(os.environ.get("STANDIN_FAILED_RESETS", "0"))

    def __init__(self, map_name="8m", seed=None, continuing_episode=False, obs_last_action=False, capability_config=None,
                 **kwargs):  # fmt: skip
        key = (
            map_name
            if capability_config is None
            else (map_name, capability_config["n_units"], capability_config["n_enemies"])
        )
        state, obs, obs_last, n_actions, n_agents, n_enemies, limit = ENV_INFO[
            key
        ]  # KeyError, as the real registry
        self.map_name = map_name
        self.state_size, self.obs_size = state, obs_last if obs_last_action else obs
        self.n_actions, self.n_agents, self.n_enemies, self.episode_limit = (
            n_actions,
            n_agents,
            n_enemies,
            limit,
        )
        self.continuing_episode = continuing_episode
        self._seed = seed
        self._episode_count = 0
        self._steps_total = 0
        # smac's reward normaliser: the win and kill bonuses, plus the enemies' health at each launch
        self.max_reward = 200 + 10 * n_enemies
        self._sc2_proc = None
        self.rng = np.random.default_rng(seed)
        self.health = np.ones(n_agents + n_enemies)

    def get_env_info(self):
        return {"state_shape": self.state_size, "obs_shape": self.obs_size, "n_actions": self.n_actions,
                "n_agents": self.n_agents, "episode_limit": self.episode_limit}  # fmt: skip

    def _launch(self):
        versions = os.path.join(
            os.path.expanduser(os.environ.get("SC2PATH", "~/StarCraftII")), "Versions"
        )
        if not os.path.isdir(versions):
            raise FileNotFoundError(2, "No such file or directory", versions)
        self._sc2_proc = GameProcess()
        self._controller = Controller(self)
        self.max_reward += self.n_enemies  # smac adds the enemies' health at every launch

    def reset(self, episode_config=None):
        if self._episode_count == 0:
            self._launch()
        self._episode_steps = 0
        self.health = np.ones(self.n_agents + self.n_enemies)
        self.won = self.lost = False
        return self.get_obs(), self.get_state()

    def step(self, actions):
        actions = [int(a) for a in actions]
        avail = self.get_avail_actions()
        assert all(avail[i][a] for i, a in enumerate(actions)), "an unavailable action was sent"
        self._steps_total += 1
        if self.restart_every and self._steps_total % self.restart_every == 0:
            # the real env relaunches StarCraft II after a protocol error (full_restart), and does
            # not count the episode
            self._sc2_proc.close()
            self._launch()
            return 0, True, {}
        self._episode_steps += 1
        before = self.health.copy()
        for a in actions:  # attacks hit their target; then the enemies hit random allies
            if a >= 6:
                self.health[self.n_agents + a - 6] = max(
                    0.0, self.health[self.n_agents + a - 6] - 0.2
                )
        alive_enemies = int((self.health[self.n_agents :] > 0).sum())
        for _ in range(alive_enemies):
            target = self.rng.integers(self.n_agents)
            self.health[target] = max(0.0, self.health[target] - 0.08)
        dead_allies = int((self.health[: self.n_agents] == 0).sum())
        dead_enemies = int((self.health[self.n_agents :] == 0).sum())
        reward = float((before - self.health)[self.n_agents :].sum())
        info = {"battle_won": False, "dead_allies": dead_allies, "dead_enemies": dead_enemies}
        terminated = False
        if dead_enemies == self.n_enemies:
            terminated, info["battle_won"] = True, True
            reward += 1.0
        elif dead_allies == self.n_agents:
            terminated = True
        elif self._episode_steps >= self.episode_limit:
            terminated = True
            if self.continuing_episode:
                info["episode_limit"] = True
        if terminated:
            self._episode_count += 1
        return reward, terminated, info

    def get_obs(self):
        return [np.full(self.obs_size, self.health[i], np.float32) for i in range(self.n_agents)]

    def get_state(self):
        state = np.zeros(self.state_size, np.float32)
        state[: len(self.health)] = self.health[: self.state_size]
        return state

    def get_avail_agent_actions(self, agent_id):
        if self.health[agent_id] == 0:
            return [1] + [0] * (self.n_actions - 1)  # a dead unit can only no-op
        enemies = [int(h > 0) for h in self.health[self.n_agents :]]
        return [0, 1, 1, 1, 1, 1] + enemies[: self.n_actions - 6]

    def get_avail_actions(self):
        return [self.get_avail_agent_actions(i) for i in range(self.n_agents)]

    def get_stats(self):
        return {}

    def close(self):
        if self._sc2_proc is not None:
            self._sc2_proc.close()
            self._sc2_proc = None


class StarCraftCapabilityEnvWrapper:
    """smacv2's wrapper: a StarCraft2Env with a capability config; reset() retries a CannotResetException and then
    returns None (as the real wrapper does)."""

    def __init__(self, **kwargs):
        assert {"n_units", "n_enemies"} <= set(kwargs["capability_config"])
        self.env = StarCraft2Env(**kwargs)
        self.resets = 0

    def reset(self):
        try:
            self.resets += 1
            if self.resets <= self.env.failed_resets:
                raise CannotResetException("waited for units to spawn and they didn't")
            return self.env.reset({})
        except CannotResetException:
            self.reset()

    def __getattr__(self, name):
        return getattr(self.env, name)

    def get_env_info(self):
        return dict(self.env.get_env_info(), cap_shape=3)
