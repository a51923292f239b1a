# ==== 1. DOCSTRING ====
"""MAPPO + LoRASA on StarCraft (SMAC, SMACv2 on StarCraft II; JaxMARL's SMAX), in one file.

LoRASA (Zhang, Kapoor & Sun, ICML 2025, arXiv 2502.05573) trains one recurrent policy shared by all
agents (phase ps), then freezes it and trains low-rank adapters per agent on every layer (phase
lora): agent i acts with W_i = W0 + (alpha / r) B_i A_i. One run does both phases.

    python mappo_lorasa_smac.py --map 3s5z  # StarCraft II if installed, else SMAX (said at start)
    python mappo_lorasa_smac.py --map protoss_5_vs_5 --env-backend sc2  # a SMACv2 task
    python mappo_lorasa_smac.py --checkpoint runs/<run>/ps_checkpoint.pt  # lora from ps
    python mappo_lorasa_smac.py --share-mode nps  # the baselines: ps, nps

SMAX is another simulator: its runs are named smax-<map> and are not SMAC results. docs/method.md
maps each equation to its function here; docs/decisions.md explains each deviation from the
reference code (github.com/ZBN111/ICML2025_LoRASA), cited in comments as FIX/KEEP n.
Jump to: LoRALinear, start_phase (the switch), CategoricalActor (action masks), update.
"""

# ==== 2. IMPORTS ====
import argparse
import atexit
import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import math
import multiprocessing
import os
import random
import re
import signal
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, Optional, Tuple, get_args

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

# ==== 3. ARGS ====
# the seven layers that can carry adapters (docs/method.md §2)
LayerName = Literal["fc1", "fc2a", "fc2b", "gru_x", "gru_h", "fc_post", "head"]


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[:-3]  # the experiment's name (in run names)
    seed: int = 1  # seed of random, numpy, torch, the adapters and the envs
    cuda: bool = False  # run the networks on CUDA (small networks: the CPU is usually faster)
    threads: int = 1  # torch threads in the update (rollouts use 1); 1 lets runs share a machine
    run_dir: str = "runs"  # parent of the run folders (TensorBoard events, checkpoints)
    save_model: bool = True  # checkpoints at every evaluation, the switch, the end and Ctrl-C
    checkpoint: Optional[str] = None  # start from this checkpoint.pt (ps checkpoint: lora at once)
    resume: bool = False  # with --checkpoint: continue that run (folder, steps, optimisers, RNG)
    eval_only: bool = False  # with --checkpoint: evaluate its policy, print (no run folder)
    track: bool = False  # follow the run in Weights & Biases (pip install wandb==0.23.1)
    wandb_project_name: str = "lorasa"  # the W&B project of --track
    wandb_entity: str = ""  # the W&B team of --track ("": your default entity)
    capture_video: bool = False  # film each evaluation (SMAX) or keep its replay (StarCraft II)

    total_timesteps: int = 12_000_000  # env steps of the whole run (--resume: may extend it)
    num_envs: int = 10  # parallel training envs
    num_steps: int = 320  # rollout steps per env and iteration
    learning_rate: float = 5e-4  # actor Adam learning rate (the adapters' in phase lora)
    critic_learning_rate: float = 5e-4  # critic Adam learning rate
    update_epochs: int = 5  # PPO epochs per iteration
    num_minibatches: int = 1  # minibatches per epoch (reference: 1)
    data_chunk_length: int = 10  # length of the recurrent training chunks
    gamma: float = 0.99  # discount factor
    gae_lambda: float = 0.95  # GAE lambda
    clip_coef: float = 0.2  # PPO ratio clip
    value_clip_coef: float = 0.2  # value clip around the rollout's value
    ent_coef: float = 0.01  # entropy coefficient
    vf_coef: float = 1.0  # value loss coefficient
    max_grad_norm: float = 10.0  # gradient-norm clip (per agent in phase lora and nps)
    huber_delta: float = 10.0  # delta of the Huber value loss
    adam_eps: float = 1e-5  # Adam epsilon
    hidden_size: int = 64  # width of every hidden layer
    eval_interval: int = 50  # evaluate and save every this many iterations (and first and last)
    eval_episodes: int = 32  # greedy evaluation episodes
    bootstrap_timeouts: bool = False  # bootstrap timeouts from the final state (KEEP 28: off)

    share_mode: Literal["ps", "lorasa", "nps"] = "lorasa"  # lorasa: ps, then adapters per agent
    rank: int = 8  # adapter rank r
    lora_alpha: Optional[float] = None  # adapters are scaled by alpha / r (default: alpha = rank)
    lora_layers: Tuple[LayerName, ...] = get_args(LayerName)  # adapted layers (placement ablation)
    lora_start: Optional[int] = None  # env step of the switch (default: total_timesteps // 4)
    lora_init: Literal["reference", "standard"] = "reference"  # A = 0 (KEEP 16) or B = 0
    train_agent_bias: bool = False  # also train the adapters' per-agent biases (KEEP 18)

    map: str = "3s5z"  # a SMAC map (3s5z, MMM2, ...), SMACv2 task (protoss_5_vs_5, ...) or SMAX map
    env_backend: Literal["auto", "sc2", "smax"] = "auto"  # auto: StarCraft II if there, else SMAX
    state_mode: Literal["ep_obs_id", "ep_id"] = "ep_obs_id"  # critic input (decision 31)
    death_masking: bool = True  # a dead agent's critic input is zero but for its id


# Where the reference's settings for a map differ from the defaults above (docs/method.md §10).
# They apply to the map that runs (--help shows them); flags given still win.
TASK_DEFAULTS = {"3s5z_vs_3s6z": dict(gae_lambda=0.90)}
# must match to load
TASK_KEYS = ("map", "env_backend", "state_mode", "hidden_size")


def fail(message):
    """One line on stderr, no traceback, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def task_defaults(argv):
    """The TASK_DEFAULTS of the map named in argv (read before tyro, so
    --help shows them)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--map", default=Args.map)
    task, _ = parser.parse_known_args(argv)
    return TASK_DEFAULTS.get(task.map, {})


def check(valid, key, args, accepted, problem="is invalid"):
    """One line naming the flag, its value and the accepted ones, unless
    `valid`."""
    if not valid:
        flag = "--" + key.replace("_", "-")
        fail(f"{flag} {getattr(args, key)} {problem}; accepted: {accepted}")


POSITIVE = """threads total_timesteps num_envs num_steps learning_rate critic_learning_rate
update_epochs num_minibatches data_chunk_length clip_coef value_clip_coef vf_coef max_grad_norm
huber_delta adam_eps hidden_size eval_interval eval_episodes rank lora_alpha"""


def finalize_args(args):
    """Derive the sizes and check every value, one line for a bad one,
    before anything is built. The backend and the map are checked by
    resolve_backend."""
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    if args.lora_start is None:
        args.lora_start = args.total_timesteps // 4
    for key in POSITIVE.split():
        check(getattr(args, key) > 0, key, args, "> 0")
    check(args.ent_coef >= 0, "ent_coef", args, ">= 0")
    for key in ("gamma", "gae_lambda"):
        check(0 < getattr(args, key) <= 1, key, args, "0 < value <= 1")
    chunk = f"multiples of --data-chunk-length {args.data_chunk_length}"
    check(args.num_steps % args.data_chunk_length == 0, "num_steps", args, chunk)
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    below = "is below one iteration"
    check(args.num_iterations >= 1, "total_timesteps", args, f">= {args.batch_size}", below)
    chunks = args.batch_size // args.data_chunk_length
    check(args.num_minibatches <= chunks, "num_minibatches", args, f"<= {chunks}")
    span = f"0 ... --total-timesteps ({args.total_timesteps})"
    check(0 <= args.lora_start <= args.total_timesteps, "lora_start", args, span)
    if args.track and importlib.util.find_spec("wandb") is None:
        fail("--track needs wandb, which is not installed: pip install wandb==0.23.1")
    return args


# ==== 4. ENVIRONMENT ====
# SMAC map: its episode limit (smac's map registry)
SMAC_MAPS = {
    "3m": 60,
    "8m": 120,
    "25m": 150,
    "5m_vs_6m": 70,
    "8m_vs_9m": 120,
    "10m_vs_11m": 150,
    "27m_vs_30m": 180,
    "MMM": 150,
    "MMM2": 180,
    "2s3z": 120,
    "3s5z": 150,
    "3s5z_vs_3s6z": 170,
    "3s_vs_3z": 150,
    "3s_vs_4z": 200,
    "3s_vs_5z": 250,
    "1c3s5z": 180,
    "2m_vs_1z": 150,
    "corridor": 400,
    "6h_vs_8z": 150,
    "2s_vs_1sc": 300,
    "so_many_baneling": 100,
    "bane_vs_bane": 200,
    "2c_vs_64zg": 400,
}
# a SMACv2 task: race, allies, enemies, e.g. zerg_10_vs_11
SMACV2_TASK = re.compile(r"(protoss|terran|zerg)_(\d+)_vs_(\d+)")
# SMACv2's official configs: unit types, their weights, the types that cannot be a team alone
SMACV2_TEAMS = {
    "protoss": (["stalker", "zealot", "colossus"], [0.45, 0.45, 0.1], []),
    "terran": (["marine", "marauder", "medivac"], [0.45, 0.45, 0.1], ["medivac"]),
    "zerg": (["zergling", "baneling", "hydralisk"], [0.45, 0.1, 0.45], ["baneling"]),
}
# jaxmarl 0.2.0's SMAX maps (its smacv2_* draw all six SMAX unit types: they are not SMACv2)
SMAX_MAPS = (
    "3m",
    "2s3z",
    "25m",
    "3s5z",
    "8m",
    "5m_vs_6m",
    "10m_vs_11m",
    "27m_vs_30m",
    "3s5z_vs_3s6z",
    "3s_vs_5z",
    "6h_vs_8z",
    "smacv2_5_units",
    "smacv2_10_units",
    "smacv2_20_units",
)


# seconds pysc2 waits for a launched game's API port (its default 360), also its socket timeout
# for every request: StarCraft II 4.10 opens the port within seconds, even ten games at once
SC2_TIMEOUT = 90


def find_sc2(sc2_path):
    """The game pysc2 would launch, the newest
    Versions/Base<build>/SC2_x64, and why it cannot run (None if it
    looks runnable: a Linux executable)."""
    versions = os.path.join(sc2_path, "Versions")
    names = os.listdir(versions) if os.path.isdir(versions) else []
    builds = [int(name[4:]) for name in names if re.fullmatch(r"Base\d+", name)]
    if not builds:
        game = "no StarCraft II build (Versions/Base<build>/SC2_x64; 4.10 is Base75689)"
        return None, f"{game} in {versions}; set $SC2PATH to the StarCraftII folder"
    exe = os.path.join(versions, f"Base{max(builds):05d}", "SC2_x64")
    if not os.path.isfile(exe):
        return exe, f"{exe} is missing (an incomplete StarCraft II)"
    if not os.access(exe, os.X_OK):
        return exe, f"{exe} is not executable; fix: chmod +x {exe}"
    with open(exe, "rb") as file:
        elf = file.read(4) == b"\x7fELF"
    return exe, None if elf else f"{exe} is not the game (not a Linux executable)"


def launch_problem(error):
    """The one line for a StarCraft II that failed to start or to go on:
    `error` is a worker's GameError "<pysc2's exception type>:
    <message>" (StarCraft2.reset, StarCraft2.step)."""
    sc2_path = os.path.expanduser(os.environ.get("SC2PATH", "~/StarCraftII"))
    exe, _ = find_sc2(sc2_path)
    if not str(error).startswith("ConnectError"):
        return f"StarCraft II failed ({error}); see the README section 'StarCraft II'"
    run = f"{exe} -listen 127.0.0.1 -port 5000 -dataDir {sc2_path}/"
    why = "it exited at once or is not the game"
    return f"{exe} did not open its API port within {SC2_TIMEOUT} s ({why}); run `{run}` to see why"


def resolve_backend(args):
    """Choose the backend and check what it needs, one line for what is
    missing (README section 'StarCraft II' installs it); sets
    args.env_backend and args.task (sc2-<map> or smax-<map>)."""
    sc2_path = os.path.expanduser(os.environ.get("SC2PATH", "~/StarCraftII"))
    smacv2_task = SMACV2_TASK.fullmatch(args.map)
    package = "smacv2" if smacv2_task else "smac"
    # every SMACv2 task plays on the map 32x32_flat
    map_name = "32x32_flat" if smacv2_task else args.map
    map_file = os.path.join(sc2_path, "Maps", "SMAC_Maps", f"{map_name}.SC2Map")
    # checked here what can be: pysc2 reports a broken game only after minutes, if at all
    _, broken = find_sc2(sc2_path)
    game = broken is None
    installed = importlib.util.find_spec(package) is not None
    if args.env_backend == "auto" and not (game and installed):
        why = f"the package {package} is not installed"
        why = why if game else f"StarCraft II not found in $SC2PATH={sc2_path}: {broken}"
        print(
            f"env backend: smax, JaxMARL's SMAX, not SMAC ({why};"
            " README 'StarCraft II' installs the real game)"
        )
    if args.env_backend == "auto":
        args.env_backend = "sc2" if game and installed else "smax"
    if args.env_backend == "smax" and args.map not in SMAX_MAPS:
        accepted = " ".join(SMAX_MAPS)
        fail(f"--map {args.map!r} is not a SMAX map (no substitute is used); accepted: {accepted}")
    if args.env_backend == "sc2" and not smacv2_task and args.map not in SMAC_MAPS:
        accepted = " ".join(SMAC_MAPS) + " and SMACv2 tasks such as protoss_5_vs_5"
        fail(f"--map {args.map!r} is unknown; accepted: {accepted}")
    needs = {
        broken: game,
        f"the map file {map_file} is missing": os.path.isfile(map_file),
        f"the package {package} is not installed": installed,
    }
    missing = [what for what, there in needs.items() if not there]
    if args.env_backend == "sc2" and missing:
        fail(f"--env-backend sc2: {missing[0]}; see the README section 'StarCraft II'")
    # in the run name: SMAX is never called SMAC
    args.task = f"{args.env_backend}-{args.map}"


def agent_inputs(obs, state, avail, state_mode, death_masking, xp):
    """One env's inputs per agent, with numpy or jax.numpy (xp): the
    actor's [obs_i, one-hot(i)]; the critic's [state, obs_i, one-hot(i)]
    or [state, one-hot(i)] (--state-mode, decision 31), zero but for the
    id while the agent is dead (--death-masking): only its no-op is
    available."""
    n_agents = obs.shape[0]
    ids = xp.eye(n_agents, dtype=xp.float32)
    state = xp.broadcast_to(state, (n_agents, state.shape[-1]))
    critic_input = xp.concatenate([state, obs], axis=1) if state_mode == "ep_obs_id" else state
    if death_masking:
        critic_input = critic_input * (avail[:, :1] == 0)
    critic_input = xp.concatenate([critic_input, ids], axis=1).astype(xp.float32)
    actor_input = xp.concatenate([obs, ids], axis=1).astype(xp.float32)
    return dict(obs=actor_input, state=critic_input, avail=avail)


class GameError(RuntimeError):
    """StarCraft II failed in an env worker: "<pysc2's exception type>:
    <message>" (pysc2's own types do not all survive gymnasium's
    re-raise in the main process)."""


class StarCraft2(gym.Env):
    """One StarCraft II env of `smac` (SMAC maps) or `smacv2` (its tasks) as a gymnasium.Env:
    observation {"obs", "state", "avail"} as agent_inputs, (N, ...) float32; step -> the team
    reward, terminated (the battle ended, or StarCraft II restarted), truncated (the episode
    limit), {"won": the battle was won}."""

    def __init__(self, map_name, seed, state_mode, death_masking):
        smacv2_task = SMACV2_TASK.fullmatch(map_name)
        # continuing_episode=True adds info["episode_limit"] at a timeout: told from a lost battle
        options = dict(seed=seed, continuing_episode=True)
        # import only the package the map needs: the two clash on map registration
        if smacv2_task:
            from smacv2.env import StarCraftCapabilityEnvWrapper

            race, allies, enemies = smacv2_task.groups()
            units, weights, exceptions = SMACV2_TEAMS[race]
            team = dict(dist_type="weighted_teams", unit_types=units, weights=weights)
            team.update(exception_unit_types=exceptions, observe=True)
            start = dict(dist_type="surrounded_and_reflect", p=0.5, map_x=32, map_y=32)
            config = dict(n_units=int(allies), n_enemies=int(enemies), team_gen=team)
            config.update(start_positions=start)
            options.update(conic_fov=False, use_unit_ranges=True, min_attack_range=2)
            options.update(obs_own_pos=True, map_name=f"10gen_{race}")
            self.env = StarCraftCapabilityEnvWrapper(capability_config=config, **options)
        else:
            from smac.env import StarCraft2Env

            # obs_last_action: the allies' last actions, as the reference (SIMPLIFY 32)
            self.env = StarCraft2Env(map_name=map_name, obs_last_action=True, **options)
        from absl import flags
        from absl import logging as absl_logging

        # the stand-in of the tests defines no pysc2 flags
        if "sc2_timeout" in flags.FLAGS:
            flags.FLAGS.sc2_timeout = SC2_TIMEOUT
        # pysc2's warnings of a failed launch: the main process says it in one line (make_envs)
        absl_logging.set_verbosity(absl_logging.FATAL)
        # a step since the last reset: the first reset() launches the game
        self.played = True
        # the last step restarted StarCraft II; the reward normaliser of the first launch
        self.restarted, self.max_reward = False, None
        self.modes = (state_mode, death_masking)
        info = self.env.get_env_info()
        n, n_actions = info["n_agents"], info["n_actions"]
        obs, state = np.zeros((n, info["obs_shape"])), np.zeros(info["state_shape"])
        inputs = agent_inputs(obs, state, np.zeros((n, n_actions)), *self.modes, np)
        spaces = {key: gym.spaces.Box(-np.inf, np.inf, x.shape) for key, x in inputs.items()}
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.MultiDiscrete([n_actions] * n)

    def observe(self):
        obs, state = self.env.get_obs(), self.env.get_state()
        avail = self.env.get_avail_actions()
        obs, state, avail = (np.array(x, np.float32) for x in (obs, state, avail))
        return agent_inputs(obs, state, avail, *self.modes, np)

    def reset(self, seed=None, options=None):
        # StarCraft II is seeded once, at its launch. Until a first episode ends, smac launches
        # the game at every reset and adds the enemies' health to its reward normaliser again:
        # no reset without a step since the last one (make_envs and evaluate both reset the
        # eval env), and the normaliser of the first launch is kept (a restart in the first
        # episode would relaunch; FIX 33)
        game = getattr(self.env, "env", self.env)  # smacv2's wrapper holds smac's env
        if self.played:
            if self.restarted and game._episode_count == 0:
                # smac's reset launches a new game: close the one its restart launched
                game._sc2_proc.close()
            try:
                self.env.reset()
            except Exception as error:
                raise GameError(f"{type(error).__name__}: {error}") from None
        self.max_reward = self.max_reward or game.max_reward
        game.max_reward = self.max_reward
        self.played = self.restarted = False
        # SMACv2's wrapper returns None after retrying a failed reset: read from the env
        return self.observe(), {}

    def step(self, action):
        try:
            reward, terminated, info = self.env.step(action.tolist())
        except Exception as error:
            # a failed relaunch after a restart: one error line in the main process
            raise GameError(f"{type(error).__name__}: {error}") from None
        self.played = True
        # after a StarCraft II restart step() returns (0, True, {}): a loss
        self.restarted = terminated and not info
        timeout = bool(info.get("episode_limit", False))
        won = bool(info.get("battle_won", False))
        return self.observe(), float(reward), terminated and not timeout, timeout, {"won": won}

    def replay(self):
        """--capture-video: the game's own replay (bytes of a .SC2Replay), from its launch on."""
        game = getattr(self.env, "env", self.env)
        try:
            return game._controller.save_replay()
        except Exception as error:
            raise GameError(f"{type(error).__name__}: {error}") from None

    def close(self):
        self.env.close()


def import_smax():
    """Import JaxMARL's SMAX alone: jaxmarl's __init__ imports every
    JaxMARL environment first (20 s on a small machine, and it prints), so
    SMAX is imported under bare parent packages, removed again afterwards
    (a later `import jaxmarl` runs the real ones). XLA runs
    single-threaded, beside torch's one rollout thread
    (docs/performance.md)."""
    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ.setdefault("XLA_FLAGS", flags)
    import jax
    import jax.numpy as jnp

    parents = [name for name in ("jaxmarl", "jaxmarl.environments") if name not in sys.modules]
    for name in parents:
        sys.modules[name] = importlib.util.module_from_spec(importlib.util.find_spec(name))
    try:
        from jaxmarl.environments import smax
    finally:
        for name in parents:
            del sys.modules[name]
    # the env steps in this thread: no hand-over to a dispatch thread (docs/performance.md)
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    # JAX warns at every fork; this process forks only to run ffmpeg (--capture-video) at once
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
    return jax, jnp, smax


@functools.lru_cache(maxsize=None)
def smax_functions(map_name, state_mode, death_masking):
    """JaxMARL's SMAX behind SMAC's API and action layout
    (docs/method.md §9): a map's jitted, vmapped reset, step and masked
    select, built once so that the envs of one map share them."""
    jax, jnp, smax = import_smax()
    # SMAC's episode limit, SMACv2's 200 for the smacv2_* maps
    limit = SMAC_MAPS.get(map_name, 200)
    # SMAX ends an episode one step after max_steps (it tests the count before counting the step)
    scenario = smax.map_name_to_scenario(map_name)
    env = smax.HeuristicEnemySMAX(scenario=scenario, max_steps=limit - 1)
    n = env.num_allies
    # SMAC's actions [no-op, stop, N, S, E, W, attack k] as SMAX's [N, E, S, W, stop, attack k]
    to_smax = jnp.array([4, 4, 0, 2, 1, 3] + [5 + k for k in range(env.num_enemies)])

    def observe(state, obs):
        alive = state.state.unit_alive[:n, None]
        avail = jnp.stack([env.get_avail_actions(state)[agent] for agent in env.agents])
        moves = avail[:, jnp.array([0, 2, 1, 3])]
        avail = jnp.concatenate([~alive, alive, moves, avail[:, 5:]], axis=1)
        agents_obs = jnp.stack([obs[agent] for agent in env.agents])
        avail, state = avail.astype(jnp.float32), obs["world_state"]
        return agent_inputs(agents_obs, state, avail, state_mode, death_masking, jnp)

    def reset(key):
        key, reset_key = jax.random.split(key)
        obs, state = env.reset(reset_key)
        # no weak types: one compilation of step
        state = jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), state)
        return key, state, observe(state, obs)

    def step(key, state, actions):
        key, step_key = jax.random.split(key)
        smax_actions = {agent: to_smax[actions[i]] for i, agent in enumerate(env.agents)}
        obs, state, rewards, dones, _ = env.step_env(step_key, state, smax_actions)
        alive = state.state.unit_alive
        # SMAX's info is empty: the win comes from the state after the step
        won = ~alive[n:].any() & alive[:n].any()
        terminated = ~alive[n:].any() | ~alive[:n].any()
        truncated = dones["__all__"] & ~terminated  # the episode limit
        reward = rewards[env.agents[0]]  # the team reward
        return key, state, observe(state, obs), reward, terminated, truncated, won

    def ticks(key, state, actions):
        """--capture-video: the world's ticks within one step of one env (the same key as step),
        positions and radii in map widths, health as a fraction."""
        _, step_key = jax.random.split(key)
        smax_actions = {agent: to_smax[actions[i]] for i, agent in enumerate(env.agents)}
        world = env.step_env(step_key, state, smax_actions, get_state_sequence=True)
        health = world.unit_health / env.unit_type_health[world.unit_types]
        radius = env.unit_type_radiuses[world.unit_types] / env.map_width
        return world.unit_positions / env.map_width, world.unit_alive, health, radius

    def select(mask, new, old):
        def where(a, b):
            return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

        return jax.tree.map(where, new, old)

    functions = (jax.vmap(reset), jax.vmap(step), select, ticks)
    return jax, *(jax.jit(function) for function in functions)


def draw_battle(positions, alive, health, radius, n_allies, size=240):
    """One frame of a SMAX battle (--capture-video): a dark-rimmed disc per living unit, 1.5 times
    its type's radius (to be seen), allies blue and enemies red, paler as they lose health.
    JaxMARL's SMAXVisualizer compiles a jax.lax.cond per unit and frame: seconds per frame here."""
    grid = (np.arange(size) + 0.5) / size
    frame = np.full((size, size, 3), 255.0)
    for k in np.flatnonzero(alive):
        color = np.array([40, 90, 220] if k < n_allies else [220, 50, 40])
        disc = (grid[None] - positions[k, 0]) ** 2 + (grid[:, None] - positions[k, 1]) ** 2
        frame[disc <= (1.5 * radius[k] + 1.5 / size) ** 2] = 60
        frame[disc <= (1.5 * radius[k]) ** 2] = 255 - (0.3 + 0.7 * health[k]) * (255 - color)
    # row 0 is the top of the map
    return frame[::-1].astype(np.uint8)


class SMAXEnvs:
    """JaxMARL's SMAX, all envs in one call (smax_functions), used like
    gymnasium's vector envs without autoreset: finished envs are reset
    on request (reset_mask). Observations as StarCraft2's, avail in
    SMAC's layout [no-op, stop, N, S, E, W, attack enemy k ...]."""

    def __init__(self, map_name, num_envs, args):
        functions = smax_functions(map_name, args.state_mode, args.death_masking)
        self.jax, self.reset_all, self.step_all, self.select, self.ticks = functions
        self.num_envs = num_envs
        # --capture-video: every second tick of 1/16 s at 16 frames per second, twice real time
        self.fps = 16
        self.reset(seed=list(range(num_envs)))
        shapes = {key: value.shape[1:] for key, value in self.observation.items()}
        spaces = {key: gym.spaces.Box(-np.inf, np.inf, shape) for key, shape in shapes.items()}
        self.single_observation_space = gym.spaces.Dict(spaces)

    def reset(self, seed=None, options=None):
        if seed is not None:
            self.keys = self.jax.vmap(self.jax.random.PRNGKey)(self.jax.numpy.asarray(seed))
        new = self.reset_all(self.keys)
        mask = (options or {}).get("reset_mask")
        if mask is not None:  # reset only these envs
            new = self.select(mask, new, (self.keys, self.states, self.observation))
        self.keys, self.states, self.observation = new
        return {key: np.array(value) for key, value in self.observation.items()}, {}

    def step(self, actions):
        out = self.step_all(self.keys, self.states, actions)
        self.keys, self.states, self.observation, reward, terminated, truncated, won = out
        # writable copies
        obs = {key: np.array(value) for key, value in self.observation.items()}
        info = {"won": np.array(won)}
        return obs, np.array(reward), np.array(terminated), np.array(truncated), info

    def film(self, actions):
        """--capture-video: the frames of env 0's coming step under `actions` (envs, agents)."""
        state = self.jax.tree.map(lambda x: x[0], self.states)
        ticks = self.ticks(self.keys[0], state, actions[0])
        positions, alive, health, radius = (np.array(x) for x in ticks)
        n = actions.shape[1]
        frames = zip(positions[1::2], alive[1::2], health[1::2])
        return [draw_battle(*frame, radius[0], n) for frame in frames]

    def close(self):
        pass


def make_worker_env(args, seed):
    """A StarCraft II env for an AsyncVectorEnv worker process, which
    leaves Ctrl-C to the main process: a terminal sends SIGINT to every
    process of the group, and the main one saves."""
    # not the vector env's probe in this process
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return StarCraft2(args.map, seed, args.state_mode, args.death_masking)


def make_envs(args, seeds):
    """sc2: one StarCraft II per seed, each in its own process (gymnasium's
    AsyncVectorEnv without autoreset, as the reference's subprocess
    envs); smax: all envs in one jitted call. Returns the envs and their
    first observation; a game that did not start: one line, exit 2."""
    if args.env_backend == "smax":
        envs = SMAXEnvs(args.map, len(seeds), args)
        return envs, envs.reset(seed=seeds)[0]
    make = [functools.partial(make_worker_env, args, seed) for seed in seeds]
    envs = gym.vector.AsyncVectorEnv(make, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    # at any exit, fail() included, each worker closes its game (a terminated one would not)
    atexit.register(envs.close)
    # gymnasium repeats a failed worker's traceback as warnings: the error line says it all
    warnings.filterwarnings("ignore", message=".*ERROR: ")
    try:
        return envs, envs.reset(seed=seeds)[0]
    except GameError as error:
        fail(launch_problem(error))


# ==== 5. LAYERS ====
def stack(params, agents=None):
    """Per-agent tensors of a ParameterList stacked on a leading agent axis
    (all, or `agents`)."""
    return torch.stack([params[i] for i in (range(len(params)) if agents is None else agents)])


def agent_linear(x, weight, bias):
    """x (n, ..., in) times one shared weight (out, in), bias (out,), or
    times each agent's own weight (n, out, in), bias (n, 1, out): all
    agents in one batched matmul."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    y = torch.baddbmm(bias, x.flatten(1, -2), weight.mT)
    return y.view(*x.shape[:-1], weight.shape[1])


class LoRALinear(nn.Module):
    """A linear layer shared by all agents plus one low-rank adapter per agent (docs/method.md §3):
    y_i = x (W0 + s B_i A_i)^T + b0 + beta_i, A_i (r, in), B_i (out, r), s = alpha / r.
    Before the switch (`lora_on` False) it is the shared layer alone; rank 0: never adapted.
    Each agent's A_i, B_i, beta_i are tensors of their own, so that each agent's optimiser and
    gradient clip see only its own (FIX 5)."""

    def __init__(self, n_in, n_out, n_agents, gain, rank, alpha, init, generator):
        super().__init__()
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(n_out, n_in), gain))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.rank = rank
        self.scaling = alpha / max(rank, 1)
        self.lora_on = False  # set by start_phase
        self.merged = None  # set inside merged_weights()
        agents = range(n_agents if rank else 0)
        self.lora_A = nn.ParameterList([torch.zeros(rank, n_in) for _ in agents])
        self.lora_B = nn.ParameterList([torch.zeros(n_out, rank) for _ in agents])
        # a per-agent bias beside the adapter, trained with --train-agent-bias (KEEP 18)
        self.lora_bias = nn.ParameterList([torch.zeros(n_out) for _ in agents])
        # KEEP 16: the reference draws B (A = 0), the LoRA paper A (B = 0): both start at dW = 0.
        # Drawn from the adapters' own generator, so that a lorasa run equals the ps run of its
        # seed until the switch (FIX 29).
        for tensor in self.lora_B if init == "reference" else self.lora_A:
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)

    # a changed adapter form belongs in weights(): forward, the GRU's hidden path and
    # merged_weights all take the weights from there
    def weights(self, agents=None):
        """The (W, b) the agents act with: the shared (out, in), (out,) before the switch; after it
        W_i = W0 + s B_i A_i (n, out, in) and b_i = b0 + beta_i (n, 1, out), computed per call."""
        if self.merged is not None:
            weight, bias = self.merged  # the shared ones at the switch (see merged_weights)
            if agents is None or weight.dim() == 2:
                return weight, bias
            return weight[agents], bias[agents]
        if not self.lora_on:
            return self.weight, self.bias
        delta = torch.bmm(stack(self.lora_B, agents), stack(self.lora_A, agents))
        bias = self.bias + stack(self.lora_bias, agents)
        return self.weight + self.scaling * delta, bias[:, None]

    def forward(self, x, agents=None):
        return agent_linear(x, *self.weights(agents))


class AgentLinear(nn.Module):
    """One independent linear layer per agent, for the nps baseline: y_i = x W_i^T + b_i."""

    def __init__(self, n_in, n_out, n_agents, gain):
        super().__init__()
        weights = [nn.init.orthogonal_(torch.empty(n_out, n_in), gain) for _ in range(n_agents)]
        self.weight = nn.ParameterList(weights)
        self.bias = nn.ParameterList([torch.zeros(n_out) for _ in range(n_agents)])
        self.merged = None  # set inside merged_weights()

    def weights(self, agents=None):
        if self.merged is not None:
            return self.merged if agents is None else [w[agents] for w in self.merged]
        return stack(self.weight, agents), stack(self.bias, agents)[:, None]

    def forward(self, x, agents=None):
        return agent_linear(x, *self.weights(agents))


class SharedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm (never adapted, frozen in phase lora), called like the
    per-agent layers."""

    def forward(self, x, agents=None):
        return super().forward(x)


class AgentLayerNorm(nn.Module):
    """One LayerNorm per agent over the last dim, for the nps baseline."""

    def __init__(self, dim, n_agents):
        super().__init__()
        self.weight = nn.ParameterList([torch.ones(dim) for _ in range(n_agents)])
        self.bias = nn.ParameterList([torch.zeros(dim) for _ in range(n_agents)])
        self.merged = None  # set inside merged_weights()

    def weights(self, agents=None):
        if self.merged is not None:
            return self.merged if agents is None else [w[agents] for w in self.merged]
        return stack(self.weight, agents), stack(self.bias, agents)

    def forward(self, x, agents=None):
        weight, bias = self.weights(agents)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return F.layer_norm(x, x.shape[-1:]) * weight.view(shape) + bias.view(shape)


@contextlib.contextmanager
def merged_weights(*models):
    """Inside the block every layer uses each agent's weights computed once
    on entry, not per call: rollouts and evaluations call the policy
    once per env step with unchanged weights. A parameter changed inside
    the block (its weights would be stale) raises on exit."""
    kinds = (LoRALinear, AgentLinear, AgentLayerNorm)
    layers = [m for model in models for m in model.modules() if isinstance(m, kinds)]
    params = [p for model in models for p in model.parameters()]
    # PyTorch counts every in-place change of a tensor
    versions = [p._version for p in params]
    with torch.no_grad():
        for layer in layers:
            layer.merged = [w.detach() for w in layer.weights()]
            if isinstance(layer, LoRALinear) and layer.lora_on:
                # every adapter still zero (at the switch): act through the shared layer, as in
                # phase ps, so that the first evaluation and rollout of phase lora equal the ps
                # run's bit for bit; the batched matmul rounds differently in the last bit, and
                # HalfCheetah's dynamics amplify that into a different return
                shared = [layer.weight.detach(), layer.bias.detach()]
                pairs = zip(layer.merged, shared)
                zero = [torch.equal(w, s.expand_as(w)) for w, s in pairs]
                if all(zero):
                    layer.merged = shared
    try:
        yield
    finally:
        for layer in layers:
            layer.merged = None
    if versions != [p._version for p in params]:
        raise RuntimeError("parameters changed inside merged_weights(): stale weights were used")


# ==== 6. ACTOR, CRITIC, VALUENORM ====
class RecurrentNetwork(nn.Module):
    """All agents at once (docs/method.md §2): feature LayerNorm -> fc1, fc2a, fc2b blocks
    (Linear-ReLU-LayerNorm) -> GRU -> LayerNorm -> fc_post block -> head. nps: every layer per
    agent; otherwise shared, with adapters from `generator` on the layers named in `adapted`."""

    def __init__(self, n_in, n_out, n_agents, args, head_gain, nps, adapted, generator=None):
        super().__init__()
        hidden = args.hidden_size

        def linear(name, n_in, n_out, gain):
            if nps:
                return AgentLinear(n_in, n_out, n_agents, gain)
            rank = args.rank if name in adapted else 0
            init = args.lora_init
            return LoRALinear(n_in, n_out, n_agents, gain, rank, args.lora_alpha, init, generator)

        def norm(dim):
            return AgentLayerNorm(dim, n_agents) if nps else SharedLayerNorm(dim)

        self.n_agents = n_agents
        self.feature_norm = norm(n_in)
        sizes = dict(fc1=(n_in, hidden), fc2a=(hidden, hidden), fc2b=(hidden, hidden))
        sizes["fc_post"] = (hidden, hidden)
        # gain sqrt 2 before a ReLU, 1 for the GRU, head_gain for the head (orthogonal init)
        fcs = {name: linear(name, *size, math.sqrt(2)) for name, size in sizes.items()}
        self.fcs = nn.ModuleDict(fcs)
        self.norms = nn.ModuleDict({name: norm(hidden) for name in sizes})
        self.gru_x = linear("gru_x", hidden, 3 * hidden, 1.0)
        self.gru_h = linear("gru_h", hidden, 3 * hidden, 1.0)
        self.gru_norm = norm(hidden)
        self.head = linear("head", hidden, n_out, head_gain)

    def forward(self, x, h, masks, agents=None):
        """x (n, T, B, in), h (n, B, H), masks (T, B) -> outputs (n, T, B, out), the hidden state
        after every step (n, T, B, H); n = all agents or len(agents)."""
        x = self.feature_norm(x, agents)
        for name in ("fc1", "fc2a", "fc2b"):
            x = self.norms[name](F.relu(self.fcs[name](x, agents)), agents)
        hs = self.gru(x, h, masks, agents)
        x = self.fcs["fc_post"](self.gru_norm(hs, agents), agents)
        x = self.norms["fc_post"](F.relu(x), agents)
        return self.head(x, agents), hs

    def gru(self, x, h, masks, agents=None):
        """torch.nn.GRU's equations, gates [r, z, n] (FIX 9): h <- h * mask_t, then
        r, z = sig(gx_rz + gh_rz), n = tanh(gx_n + r gh_n), h' = (1 - z) n + z h,
        gx = W_x x + b_x (all steps at once), gh = W_h h + b_h (one step at a time)."""
        hidden = h.shape[-1]
        gx_rz, gx_n = self.gru_x(x, agents).split([2 * hidden, hidden], dim=-1)
        # once per call, not once per step
        weight, bias = self.gru_h.weights(agents)
        outputs = []
        # unbind, not gx[:, t]: the backward of indexing allocates a gx-sized zero tensor per step
        steps = zip(gx_rz.unbind(1), gx_n.unbind(1), masks[..., None])
        for gx_rz_t, gx_n_t, mask_t in steps:
            h = h * mask_t
            gh_rz, gh_n = agent_linear(h, weight, bias).split([2 * hidden, hidden], dim=-1)
            r, z = torch.sigmoid(gx_rz_t + gh_rz).chunk(2, dim=-1)
            n = torch.tanh(gx_n_t + r * gh_n)
            h = n + z * (h - n)  # = (1 - z) n + z h
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class CategoricalActor(RecurrentNetwork):
    """Categorical policy over SMAC's actions (docs/method.md §4): the
    logits of unavailable actions are -1e10 in rollouts, training and
    evaluation, so an unavailable action is never sampled, has
    probability 0 and gets no gradient."""

    def __init__(self, obs_dim, n_actions, n_agents, args):
        nps = args.share_mode == "nps"
        adapted = args.lora_layers if args.share_mode == "lorasa" else ()
        # the adapters' own (FIX 29)
        generator = torch.Generator().manual_seed(args.seed)
        super().__init__(obs_dim, n_actions, n_agents, args, 0.01, nps, adapted, generator)
        self.nps = nps

    def forward(self, obs, h, masks, avail, agents=None):
        """obs (n, T, B, obs_dim), avail (n, T, B, n_actions) -> masked logits (n, T, B,
        n_actions), the hidden state after the last step (n, B, H)."""
        logits, hs = super().forward(obs, h, masks, agents)
        return logits.masked_fill(avail == 0, -1e10), hs[:, -1]


class Critic(RecurrentNetwork):
    """Centralised critic (docs/method.md §5): one for all agents
    (nps: one each), never adapted. Outputs normalised values (n, T, B)
    and the hidden states."""

    def __init__(self, state_dim, n_agents, args):
        nps = args.share_mode == "nps"
        super().__init__(state_dim, 1, n_agents, args, 1.0, nps, adapted=())

    def forward(self, state, h, masks, agents=None):
        values, hs = super().forward(state, h, masks, agents)
        return values[..., 0], hs


class ValueNorm(nn.Module):
    """One running normaliser of the returns per agent (docs/method.md §5, KEEP 25): exponential
    averages (beta) of R, of R^2 and of 1 (the debiasing term d >= 1e-5) per agent;
    mean = avg(R) / d, var = max(avg(R^2) / d - mean^2, 1e-2)."""

    def __init__(self, n_agents, beta=0.99999):
        super().__init__()
        self.beta = beta
        self.register_buffer("stats", torch.zeros(3, n_agents, dtype=torch.float64))

    def update(self, returns, agents=None):
        """returns (n, ...) of all agents, or of `agents`."""
        i = slice(None) if agents is None else agents
        x = returns.detach().flatten(1).double()
        batch = torch.stack([x.mean(1), x.pow(2).mean(1), torch.ones_like(x[:, 0])])
        self.stats[:, i] = self.beta * self.stats[:, i] + (1 - self.beta) * batch

    def mean_std(self, x, agents):
        mean, mean_sq, debias = self.stats[:, slice(None) if agents is None else agents]
        mean = mean / debias.clamp(min=1e-5)
        var = (mean_sq / debias.clamp(min=1e-5) - mean.pow(2)).clamp(min=1e-2)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return mean.float().view(shape), var.sqrt().float().view(shape)

    def normalize(self, x, agents=None):
        mean, std = self.mean_std(x, agents)
        return (x - mean) / std

    def denormalize(self, x, agents=None):
        mean, std = self.mean_std(x, agents)
        return x * std + mean


def agent_parameters(actor, i, args):
    """Agent i's own actor parameters: its adapters (lorasa) or its whole
    network (nps)."""
    params = []
    for module in actor.modules():
        if isinstance(module, LoRALinear) and module.rank:
            params += [module.lora_A[i], module.lora_B[i]]
            # the reference never trains the per-agent biases (KEEP 18)
            params += [module.lora_bias[i]] if args.train_agent_bias else []
        elif isinstance(module, (AgentLinear, AgentLayerNorm)):
            params += [module.weight[i], module.bias[i]]
    return params


def start_phase(actor, phase, args):
    """The actor parameters that train and their optimisers, fresh (docs/method.md §1).
    ps: the shared actor, one Adam. lora: the adapters on (the policy is unchanged: dW = 0),
    every shared parameter frozen (FIX 8), one Adam per agent over its adapters (FIX 5).
    nps: one Adam per agent over its network. The critic is not touched (FIX 26)."""
    for module in actor.modules():
        if isinstance(module, LoRALinear):
            module.lora_on = phase == "lora" and module.rank > 0
    # a parameter added to the actor trains in phase ps unless its name contains "lora_"; in phases
    # lora and nps only what agent_parameters lists trains (in nps, one it misses raises)
    if phase == "ps":  # every adapter parameter's name starts with lora_
        groups = [[p for name, p in actor.named_parameters() if "lora_" not in name]]
    else:
        groups = [agent_parameters(actor, i, args) for i in range(actor.n_agents)]
    trains = {id(p) for group in groups for p in group}
    if phase == "nps" and len(trains) < len(list(actor.parameters())):
        raise RuntimeError("nps: a parameter outside agent_parameters would never train")
    for param in actor.parameters():
        param.requires_grad_(id(param) in trains)
    optimizers = [torch.optim.Adam(g, lr=args.learning_rate, eps=args.adam_eps) for g in groups]
    return groups, optimizers


# ==== 7. ROLLOUT BUFFER, CHUNKS, GAE ====
class RolloutBuffer:
    """One iteration's data (docs/method.md §7), agent-major: (N, T[+1], E, ...) or (T[+1], E).
    Row T becomes the next iteration's row 0. masks[t] = 0: an episode ended at step t - 1.
    active[t] = 0: the agent is dead at step t (only its no-op is available).
    boot[t] = 1: step t was a timeout bootstrapped from its final state (--bootstrap-timeouts)."""

    def __init__(self, args, n_agents, obs_dim, state_dim, n_actions, device):
        N, T, E, H = n_agents, args.num_steps, args.num_envs, args.hidden_size
        self.obs = torch.zeros(N, T + 1, E, obs_dim, device=device)
        self.state = torch.zeros(N, T + 1, E, state_dim, device=device)
        self.avail = torch.ones(N, T + 1, E, n_actions, device=device)
        self.active = torch.ones(N, T + 1, E, device=device)
        self.actor_h = torch.zeros(N, T + 1, E, H, device=device)
        self.critic_h = torch.zeros(N, T + 1, E, H, device=device)
        self.masks = torch.ones(T + 1, E, device=device)
        self.actions = torch.zeros(N, T, E, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(N, T, E, device=device)
        # normalised; row T: V_T
        self.values = torch.zeros(N, T + 1, E, device=device)
        self.rewards = torch.zeros(T, E, device=device)
        self.boot = torch.zeros(T, E, device=device)
        self.final_state = torch.zeros(N, T, E, state_dim, device=device)
        self.final_values = torch.zeros(N, T, E, device=device)
        self.episode_return = np.zeros(E)
        self.episode_length = np.zeros(E, dtype=np.int64)

    def put_obs(self, t, obs):
        self.obs[:, t] = torch.as_tensor(obs["obs"]).transpose(0, 1)
        self.state[:, t] = torch.as_tensor(obs["state"]).transpose(0, 1)
        self.avail[:, t] = torch.as_tensor(obs["avail"]).transpose(0, 1)
        # a dead agent has only the no-op available
        self.active[:, t] = self.avail[:, t, :, 0] == 0

    def roll(self):
        for tensor in (self.obs, self.state, self.avail, self.active, self.actor_h, self.critic_h):
            tensor[:, 0] = tensor[:, -1]
        self.masks[0] = self.masks[-1]


def collect_rollout(args, envs, actor, buf):
    """One sampled policy call for all envs and agents per step; finished
    envs are reset after their final state is kept
    (--bootstrap-timeouts). Returns the finished episodes'
    (return, length, won) and the seconds spent in the envs."""
    T, E = args.num_steps, args.num_envs
    rewards = np.zeros((T, E), np.float32)
    terminated = np.zeros((T, E), bool)
    truncated = np.zeros((T, E), bool)
    finished = []
    env_seconds = 0.0
    # argmax(logits + Gumbel noise) samples the policy: 10x cheaper per step than Categorical
    uniform = torch.rand(*buf.actions.shape, buf.avail.shape[-1], device=buf.actions.device)
    gumbel = -torch.log(-torch.log(uniform))
    # each agent's weights once per rollout, not per step
    with merged_weights(actor):
        for t in range(T):
            with torch.inference_mode():
                inputs = (buf.obs[:, t, None], buf.actor_h[:, t], buf.masks[t, None])
                logits, h = actor(*inputs, buf.avail[:, t, None])
            if not torch.isfinite(logits).all():
                raise FloatingPointError("non-finite policy")
            action = (logits[:, 0] + gumbel[:, t]).argmax(-1)
            buf.actor_h[:, t + 1] = h
            buf.actions[:, t] = action
            log_probs = logits[:, 0].log_softmax(-1)
            buf.logprobs[:, t] = log_probs.gather(-1, action[..., None])[..., 0]
            actions = action.T.cpu().numpy()
            start = time.time()
            obs, rewards[t], terminated[t], truncated[t], info = envs.step(actions)
            done = terminated[t] | truncated[t]
            # keep the true final state, then reset those envs
            if done.any():
                buf.final_state[:, t] = torch.as_tensor(obs["state"]).transpose(0, 1)
                obs, _ = envs.reset(options={"reset_mask": done})
            env_seconds += time.time() - start
            buf.put_obs(t + 1, obs)
            buf.masks[t + 1] = torch.as_tensor(~done)
            buf.episode_return += rewards[t]
            buf.episode_length += 1
            won = info["won"][done]
            finished += zip(buf.episode_return[done], buf.episode_length[done], won)
            buf.episode_return[done] = 0
            buf.episode_length[done] = 0
    # reward shaping belongs here, not in the env: evaluation returns stay the task's own
    buf.rewards.copy_(torch.as_tensor(rewards))
    # KEEP 28: by default a timeout ends its episode like the battle's end, nothing bootstrapped
    buf.boot.copy_(torch.as_tensor(truncated & ~terminated & args.bootstrap_timeouts))
    return finished, env_seconds


@torch.inference_mode()
def critic_values(critic, buf):
    """The critic's values of the whole rollout in one call over its states
    (row T: V_T), its hidden states for the chunks, and the values of
    the bootstrapped steps' final states."""
    values, hs = critic(buf.state, buf.critic_h[:, 0], buf.masks)
    buf.values.copy_(values)
    buf.critic_h[:, 1:] = hs[:, :-1]
    steps, env_ids = buf.boot.nonzero(as_tuple=True)
    final_state = buf.final_state[:, steps, env_ids, None].transpose(1, 2)
    no_reset = buf.masks.new_ones(1, len(steps))
    final_values, _ = critic(final_state, hs[:, steps, env_ids], no_reset)
    buf.final_values[:, steps, env_ids] = final_values[:, 0]


def gae(rewards, values, masks, bad_masks, gamma, lam):
    """GAE (docs/method.md §7) along axis -2: rewards (..., T, E); values, masks, bad_masks
    (..., T + 1, E). delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t,
    A_t = (delta_t + gamma lam m_{t+1} A_{t+1}) b_{t+1}. Returns A + V (the returns)."""
    advantages = torch.zeros_like(values[..., :-1, :])
    last = torch.zeros_like(values[..., 0, :])
    for t in reversed(range(rewards.shape[-2])):
        next_value = values[..., t + 1, :] * masks[..., t + 1, :]
        delta = rewards[..., t, :] + gamma * next_value - values[..., t, :]
        last = delta + gamma * lam * masks[..., t + 1, :] * last
        last = last * bad_masks[..., t + 1, :]
        advantages[..., t, :] = last
    return advantages + values[..., :-1, :]


def compute_returns(args, buf, value_norm):
    """Returns by GAE on the values de-normalised per agent; advantages R -
    V standardised over the entries where the agent is alive
    (method §6). A bootstrapped timeout adds gamma V(s_final) to its
    reward (--bootstrap-timeouts; the episode still ends there)."""
    values = value_norm.denormalize(buf.values)
    final_values = value_norm.denormalize(buf.final_values)
    rewards = buf.rewards + args.gamma * buf.boot * final_values
    # no advantage is zeroed: a timeout is terminal or bootstrapped (KEEP 28)
    bad_masks = torch.ones_like(buf.masks)
    returns = gae(rewards, values, buf.masks, bad_masks, args.gamma, args.gae_lambda)
    advantages = returns - values[:, :-1]
    active = advantages[buf.active[:, :-1] > 0]
    advantages = (advantages - active.mean()) / (active.std(correction=0) + 1e-5)
    return returns, advantages


def chunk_minibatches(data, T, chunk_length, num_minibatches):
    """Every env's stream cut into chunks of `chunk_length` steps, shuffled into minibatches
    (method §6): (N, T[+1], E, ...) -> (N, L, chunks, ...), (T[+1], E) -> (L, chunks), and a
    hidden state (key ending in `_h`) -> the stored one at each chunk's start (N, chunks, H)."""
    # a new entry must take one of these three forms
    C = T // chunk_length
    chunked = {}
    for key, x in data.items():
        if key.endswith("_h"):
            chunked[key] = x[:, :T:chunk_length].flatten(1, 2)
        elif x.dim() == 2:
            chunked[key] = x[:T].unflatten(0, (C, chunk_length)).transpose(0, 1).flatten(1, 2)
        else:
            x = x[:, :T].unflatten(1, (C, chunk_length))
            chunked[key] = x.transpose(1, 2).flatten(2, 3)
    n_chunks = C * data["masks"].shape[-1]
    for index in torch.randperm(n_chunks).chunk(num_minibatches):
        yield {
            key: x[:, index] if key.endswith("_h") or x.dim() == 2 else x[:, :, index]
            for key, x in chunked.items()
        }


# ==== 8. UPDATE ====
def huber(x, delta):
    """Symmetric Huber loss (FIX 2: the reference's is zero for x <
    -delta)."""
    return torch.where(x.abs() <= delta, 0.5 * x.pow(2), delta * (x.abs() - 0.5 * delta))


def value_loss(args, critic, value_norm, mb, agents=None):
    """Clipped Huber value loss (docs/method.md §5), in normalised units, over all steps:
    mean max(Huber(norm(R) - V), Huber(norm(R) - V_clip)), V_clip = V_old + clip(V - V_old)."""
    values, _ = critic(mb["state"], mb["critic_h"], mb["masks"], agents)
    target = value_norm.normalize(mb["returns"], agents)
    change = (values - mb["values"]).clamp(-args.value_clip_coef, args.value_clip_coef)
    clipped = mb["values"] + change
    error = huber(target - values, args.huber_delta)
    clipped_error = huber(target - clipped, args.huber_delta)
    return torch.max(error, clipped_error).mean()


def clip_and_step(optimizers, groups, max_norm):
    """Clip each group's gradient norm on its own, then step every
    optimiser; returns the mean pre-clip norm. A non-finite norm stops
    training before any step (never saves bad weights)."""
    norms = torch.stack([nn.utils.clip_grad_norm_(group, max_norm) for group in groups])
    if not torch.isfinite(norms).all():
        raise FloatingPointError("non-finite gradients")
    for optimizer in optimizers:
        optimizer.step()
    return norms.mean().item()


def update(args, phase, actor, critic, value_norm, optimizers, buf, returns, advantages):
    """MAPPO (docs/method.md §6): update_epochs x num_minibatches steps on
    the chunked batch, all agents at once; each actor step is followed
    by a critic step on the same minibatch. Policy loss and entropy are
    means over the steps where the agent is alive (active masks)."""
    actor_optims, actor_groups, critic_optim = optimizers
    data = dict(obs=buf.obs, state=buf.state, actor_h=buf.actor_h, critic_h=buf.critic_h)
    data.update(masks=buf.masks, actions=buf.actions, logprobs=buf.logprobs, values=buf.values)
    data.update(avail=buf.avail, active=buf.active, returns=returns, advantages=advantages)
    stats = defaultdict(list)
    values = value_norm.denormalize(buf.values[:, :-1])
    stats["explained_variance"] = [(1 - (returns - values).var() / returns.var()).item()]
    for epoch in range(args.update_epochs):
        for mb in chunk_minibatches(
            data, args.num_steps, args.data_chunk_length, args.num_minibatches
        ):
            logits, _ = actor(mb["obs"], mb["actor_h"], mb["masks"], mb["avail"])
            log_probs = logits.log_softmax(-1)
            log_prob = log_probs.gather(-1, mb["actions"][..., None])[..., 0]
            log_ratio = log_prob - mb["logprobs"]
            ratio = log_ratio.exp()
            clipped = ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
            advantage = mb["advantages"]
            surrogate = torch.min(ratio * advantage, clipped * advantage)
            # 0 where the agent is dead: no policy loss, no entropy there
            active = mb["active"]
            policy_loss = -surrogate * active  # (N, L, B)
            # an unavailable action adds 0 * -1e10 = 0
            entropy = -(log_probs.exp() * log_probs).sum(-1) * active
            # an added loss term takes the same reduction, or its weight changes at the switch
            if phase == "ps":  # the mean over all agents' active samples
                count = active.sum().clamp(min=1)
                loss = (policy_loss.sum() - args.ent_coef * entropy.sum()) / count
            else:
                # per-agent means, summed: each agent gets its own PPO gradient
                count = active.sum((1, 2)).clamp(min=1)
                loss = policy_loss.sum((1, 2)) - args.ent_coef * entropy.sum((1, 2))
                loss = (loss / count).sum()
            for optimizer in actor_optims:
                optimizer.zero_grad()
            loss.backward()
            grad_norm = clip_and_step(actor_optims, actor_groups, args.max_grad_norm)

            # the normalisers take each minibatch's returns before its value loss (reference)
            value_norm.update(mb["returns"])
            critic_loss = value_loss(args, critic, value_norm, mb)
            critic_optim.zero_grad()
            (args.vf_coef * critic_loss).backward()
            critic_params = [list(critic.parameters())]
            critic_grad_norm = clip_and_step([critic_optim], critic_params, args.max_grad_norm)

            with torch.no_grad():
                entries = active.sum().clamp(min=1)
                approx_kl = ((ratio - 1 - log_ratio) * active).sum() / entries
                clipfrac = (((ratio - 1).abs() > args.clip_coef) * active).sum() / entries
            # FIX 11: means over the agents' active samples
            stats["policy_loss"].append((policy_loss.sum() / entries).item())
            stats["entropy"].append((entropy.sum() / entries).item())
            stats["approx_kl"].append(approx_kl.item())
            stats["clipfrac"].append(clipfrac.item())
            stats["value_loss"].append(critic_loss.item())
            stats["actor_grad_norm"].append(grad_norm)
            stats["critic_grad_norm"].append(critic_grad_norm)
    return {f"losses/{key}": float(np.mean(values)) for key, values in stats.items()}


# ==== 9. EVALUATION ====
def eval_seeds(args):
    """The eval envs' own seed stream, the same at every evaluation
    (docs/method.md §8)."""
    return [args.seed * 50000 + 10000 * k for k in range(args.eval_episodes)]


@torch.inference_mode()
def evaluate(args, actor, envs):
    """Greedy evaluation: exactly --eval-episodes episodes, shared out
    evenly over the eval envs (each plays its share in turn). win_rate:
    the fraction won, from each episode's win flag (a timeout or a
    StarCraft II restart is a loss)."""
    # greedy: a sampled evaluation needs a torch.Generator of its own, or drawing from the global
    # RNG would change the training run with --eval-interval
    n = envs.num_envs
    share = [args.eval_episodes // n + (k < args.eval_episodes % n) for k in range(n)]
    remaining = np.array(share)
    obs, _ = envs.reset(seed=eval_seeds(args)[:n])
    device = next(actor.parameters()).device
    h = torch.zeros(actor.n_agents, n, args.hidden_size, device=device)
    masks = torch.ones(1, n, device=device)
    episode_return = np.zeros(n)
    episode_length = np.zeros(n)
    episodes = []
    # --capture-video on SMAX: env 0's first episode, up to 20 s of video (40 s of battle)
    frames = []
    film = 20 * envs.fps if args.capture_video and args.env_backend == "smax" else 0
    # each agent's weights once per evaluation, not per step
    with merged_weights(actor):
        while remaining.any():
            obs, avail = (
                torch.as_tensor(obs[k]).transpose(0, 1)[:, None] for k in ("obs", "avail")
            )
            logits, h = actor(obs.to(device), h, masks, avail.to(device))
            actions = logits[:, 0].argmax(-1).T.cpu().numpy()
            if remaining[0] == share[0] and len(frames) < film:
                frames += envs.film(actions)
            obs, reward, terminated, truncated, info = envs.step(actions)
            episode_return += reward
            episode_length += 1
            done = terminated | truncated
            # episodes beyond an env's share are not counted
            counted = done & (remaining > 0)
            won = info["won"][counted]
            episodes += zip(won, episode_return[counted], episode_length[counted])
            remaining[counted] -= 1
            episode_return[done] = 0
            episode_length[done] = 0
            # a new episode starts from h = 0
            masks = torch.as_tensor(~done, device=device)[None].float()
            # every finished env plays on: all step together
            if done.any() and remaining.any():
                obs, _ = envs.reset(options={"reset_mask": done})
    won, returns, lengths = np.array(episodes, dtype=np.float64).T
    result = dict(win_rate=won.mean(), episodic_return=returns.mean())
    result.update(episodic_length=lengths.mean(), num_episodes=len(won))
    if frames:
        result["frames"] = frames[:film]
    if args.capture_video and args.env_backend == "sc2":
        result["replay"] = envs.call("replay")[0]
    return result


def save_video(path, frames, fps, global_step, writer=None):
    """--capture-video: the frames as the mp4 `path`, and in TensorBoard
    (W&B too with --track); a missing codec is one warning."""
    try:
        import imageio

        os.makedirs(os.path.dirname(path), exist_ok=True)
        imageio.mimsave(path, frames, fps=fps)
    except Exception as error:  # noqa: BLE001 - no codec, no folder: the run goes on
        why = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        print(f"warning: --capture-video: no video ({why})", file=sys.stderr)
        return
    if writer is not None:
        video = torch.as_tensor(np.stack(frames)).permute(0, 3, 1, 2)[None]
        writer.add_video("eval/video", video, global_step, fps=fps)
    print(f"  video: {path}")


def save_replay(path, replay):
    """--capture-video on StarCraft II: the replay as `path`, written
    atomically; a failed write is one warning."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.tmp{os.getpid()}", "wb") as file:
            file.write(replay)
        os.replace(f"{path}.tmp{os.getpid()}", path)
    except OSError as error:
        print(f"warning: --capture-video: no replay ({error})", file=sys.stderr)
        return
    print(f"  replay: {path}")


def save_film(result, envs, path, global_step, writer=None):
    """What evaluate recorded with --capture-video: SMAX's film as
    <path>.mp4, StarCraft II's replay as <path>.SC2Replay."""
    if "frames" in result:
        save_video(f"{path}.mp4", result.pop("frames"), envs.fps, global_step, writer)
    if "replay" in result:
        save_replay(f"{path}.SC2Replay", result.pop("replay"))


def eval_only_path(args, global_step):
    """--eval-only --capture-video: <checkpoint folder>/videos/eval-only_<step>_<unix time>, beside
    the run's own videos, never one of them."""
    name = f"eval-only_{global_step}_{int(time.time())}"
    return os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "videos", name)


def log_evaluation(writer, args, actor, envs, global_step):
    start = time.time()
    result = evaluate(args, actor, envs)
    # StarCraft II's replay holds the eval game from its launch: one file, replaced each time
    name = f"eval_{global_step}" if args.env_backend == "smax" else "eval"
    save_film(result, envs, os.path.join(writer.log_dir, "videos", name), global_step, writer)
    for key, value in result.items():
        writer.add_scalar(f"eval/{key}", value, global_step)
    writer.add_scalar("perf/eval_s", time.time() - start, global_step)
    returns = f"return {result['episodic_return']:.2f}"
    print(f"  eval @ step {global_step}: win rate {result['win_rate']:.3f}, {returns}")


# ==== 10. CHECKPOINTS ====
# checkpoints of earlier versions of the scripts are refused
CHECKPOINT_FORMAT = 2


def load_checkpoint(args):
    """Read --checkpoint, one line if it is not a checkpoint of these
    scripts. --resume and --eval-only take its task and settings, and
    from the command line a few flags (--resume: a longer run;
    --eval-only: seed and episodes)."""
    if args.checkpoint is None:
        if args.resume or args.eval_only:
            flag = "resume" if args.resume else "eval-only"
            fail(f"--{flag} needs --checkpoint PATH (a checkpoint.pt of these scripts)")
        return args, None
    try:
        checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - missing or unreadable: the same one line
        fail(f"--checkpoint {args.checkpoint!r} cannot be read ({type(error).__name__})")
    if not isinstance(checkpoint, dict) or not {"args", "actor", "phase"} <= set(checkpoint):
        why = "is not a checkpoint of these scripts (adapters.pt holds adapters only)"
        fail(f"--checkpoint {args.checkpoint!r} {why}")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        fail(f"--checkpoint {args.checkpoint!r} was written by an earlier version of the scripts")
    if args.resume or args.eval_only:
        keep = ["cuda", "threads", "checkpoint", "resume", "eval_only", "run_dir", "track"]
        keep += ["wandb_project_name", "wandb_entity", "capture_video"]
        if args.eval_only:
            keep += ["seed", "eval_episodes"]
        elif args.total_timesteps != Args.total_timesteps:
            # a longer run (not the default)
            keep += ["total_timesteps"]
        saved = {k: v for k, v in checkpoint["args"].items() if k in Args.__dataclass_fields__}
        taken = Args(**{**saved, **{key: getattr(args, key) for key in keep}})
        # named, so that a flag changed (or added to Args) since that run is never lost silently;
        # a value other than the Args default counts as given
        fields = Args.__dataclass_fields__
        typed = {k: v for k, v in vars(args).items() if v != fields[k].default}
        differ = {k: v for k, v in typed.items() if getattr(taken, k) != v}
        if differ:
            named = [f"{k}={getattr(taken, k)!r} (not {v!r})" for k, v in differ.items()]
            print("the checkpoint's settings win: " + ", ".join(named))
        args = taken
    return args, checkpoint


def check_checkpoint(args, checkpoint):
    """One line if the checkpoint is of another task or shape, or one this
    mode cannot load."""
    saved = checkpoint["args"]
    for key in TASK_KEYS:
        if saved[key] != getattr(args, key):
            flag = f"--{key.replace('_', '-')} {saved[key]}"
            fail(
                f"--checkpoint is for {key}={saved[key]!r}, not {getattr(args, key)!r}; use {flag}"
            )
    accepted = {"ps": ("ps",), "lorasa": ("ps", "lora"), "nps": ("nps",)}[args.share_mode]
    if checkpoint["phase"] not in accepted:
        fail(
            f"--checkpoint holds a phase-{checkpoint['phase']} policy ({saved['share_mode']} run),"
            f" which --share-mode {args.share_mode} cannot load; accepted: {' '.join(accepted)}"
        )
    adapter_keys = ("rank", "lora_alpha", "lora_layers", "train_agent_bias")
    for key in adapter_keys if checkpoint["phase"] == "lora" else ():
        if saved[key] != getattr(args, key):  # trained adapters must fit
            fail(f"--checkpoint has adapters with {key}={saved[key]!r}, not {getattr(args, key)!r}")
    step = checkpoint["global_step"]
    if not args.eval_only and step >= args.total_timesteps:
        fail(
            f"--total-timesteps {args.total_timesteps} leaves nothing to train after step {step};"
            f" accepted: > {step}"
        )


def load_weights(args, checkpoint, actor, critic, value_norm, critic_optim):
    """Load a checkpoint's networks; returns the phase, step and iteration to go on from. A ps
    checkpoint gives the shared weights only: this run's adapters keep their init (dW = 0)."""
    from_ps = checkpoint["phase"] == "ps"
    actor_state = {k: v for k, v in checkpoint["actor"].items() if not (from_ps and "lora_" in k)}
    strict = not from_ps
    missing, unexpected = actor.load_state_dict(actor_state, strict=strict)
    # from a ps checkpoint only adapters may be missing: a shared layer must not keep its init
    if unexpected or any("lora_" not in key for key in missing):
        names = ", ".join(unexpected + missing)
        why = f"does not fit this actor (missing or unexpected: {names})"
        fail(f"--checkpoint {args.checkpoint!r} {why}; accepted: the same networks")
    critic.load_state_dict(checkpoint["critic"])
    value_norm.load_state_dict(checkpoint["value_norm"])
    critic_optim.load_state_dict(checkpoint["critic_optim"])
    for group in critic_optim.param_groups:  # this run's settings, not the saved optimiser's
        group.update(lr=args.critic_learning_rate, eps=args.adam_eps)
    global_step = checkpoint["global_step"]  # the x-axis continues
    if args.resume:
        return checkpoint["phase"], global_step, checkpoint["iteration"]
    # lora at once
    phase = "lora" if args.share_mode == "lorasa" else checkpoint["phase"]
    return phase, global_step, global_step // args.batch_size


def make_run_dir(args):
    """A new run folder under --run-dir (never an existing one), or with
    --resume the checkpoint's own; one line if it cannot be written."""
    name = f"{args.task}__{args.exp_name}__{args.share_mode}-r{args.rank}__{args.seed}"
    path = os.path.join(args.run_dir, f"{name}__{int(time.time())}")
    if args.resume:
        path = os.path.dirname(os.path.abspath(args.checkpoint))
    # a run of the same name in the same second
    while not args.resume and os.path.exists(path):
        path += "+"
    try:
        os.makedirs(path, exist_ok=args.resume)
        if not os.access(path, os.W_OK):
            raise PermissionError(path)
    except OSError as error:
        why = f"cannot write {path!r} ({type(error).__name__})"
        fail(f"--run-dir {args.run_dir!r}: {why}; accepted: a writable folder")
    return path


def adapters_only(actor):
    """Per adapted layer A (N, r, in), B (N, out, r), bias (N, out) and
    scaling: what phase lora learned, for use outside these scripts."""
    adapters = {}
    for name, module in actor.named_modules():
        if isinstance(module, LoRALinear) and module.rank:
            parts = dict(A=module.lora_A, B=module.lora_B, bias=module.lora_bias)
            adapters[name] = {key: stack(part).detach().cpu() for key, part in parts.items()}
            adapters[name]["scaling"] = module.scaling
    return adapters


def save_checkpoint(path, args, progress, actor, critic, value_norm, optimizers):
    """Write checkpoint.pt atomically (a temporary file, then a rename), in
    phase lora with adapters.pt beside it; refuses non-finite weights.
    `progress`: phase, global_step, iteration and the package versions."""
    actor_optims, _, critic_optim = optimizers
    payload = dict(format=CHECKPOINT_FORMAT, args=dataclasses.asdict(args), **progress)
    payload.update(actor=actor.state_dict(), critic=critic.state_dict())
    payload.update(value_norm=value_norm.state_dict(), critic_optim=critic_optim.state_dict())
    payload["actor_optim"] = [optimizer.state_dict() for optimizer in actor_optims]
    payload["rng"] = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available():
        payload["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    for key in ("actor", "critic"):
        if not all(t.isfinite().all() for t in payload[key].values() if t.is_floating_point()):
            raise FloatingPointError(f"non-finite {key} weights")
    files = {path: payload}
    if os.path.basename(path) == "checkpoint.pt" and progress["phase"] == "lora":
        files[os.path.join(os.path.dirname(path), "adapters.pt")] = adapters_only(actor)
    for file, content in files.items():
        torch.save(content, f"{file}.tmp{os.getpid()}")
        os.replace(f"{file}.tmp{os.getpid()}", file)
    return path


class CtrlC:
    """First Ctrl-C: the iteration finishes, a checkpoint is saved, exit
    130 (no half-applied update is saved). Second Ctrl-C: quit at once."""

    def __init__(self):
        self.pressed = False
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        print("Ctrl-C: finishing the iteration, then saving (again: quit now)", file=sys.stderr)


def track_run(args, run_path):
    """--track: Weights & Biases follows the run, as in CleanRL: it syncs
    the TensorBoard events; its config is the effective arguments; its
    files go to <run dir>/wandb/."""
    import wandb

    wandb.init(
        project=args.wandb_project_name,
        entity=args.wandb_entity or None,
        sync_tensorboard=True,
        config=vars(args),
        name=os.path.basename(run_path),
        # beside the run folders, not inside one: W&B copies the events it syncs into its own
        dir=args.run_dir,
        save_code=True,
    )


def log_start(writer, args, actor, critic, global_step):
    """The effective arguments and versions (printed and in TensorBoard),
    and the sizes."""
    packages = ["torch", "tyro", "jax", "jaxmarl"]
    versions = {}
    if args.env_backend == "sc2":
        packages = ["torch", "tyro", "pysc2", "smac", "smacv2"]
        # the game's build: the newest Versions/Base*, as pysc2 picks it
        sc2_path = os.path.expanduser(os.environ.get("SC2PATH", "~/StarCraftII"))
        versions["version/sc2_build"] = max(os.listdir(os.path.join(sc2_path, "Versions")))
    # sc2 needs only one of smac and smacv2, the package of its map
    for package in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[f"version/{package}"] = importlib.metadata.version(package)
    hparams = {**vars(args), **versions}
    print(" ".join(f"{key}={value}" for key, value in hparams.items()))
    table = "\n".join(f"|{k}|{str(v).replace('|', '&#124;')}|" for k, v in hparams.items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    n = actor.n_agents
    adapters = sum(p.numel() for p in agent_parameters(actor, 0, args)) if not actor.nps else 0
    shared = sum(p.numel() for name, p in actor.named_parameters() if "lora_" not in name)
    shared = shared // n if actor.nps else shared
    sizes = dict(shared_params=shared, adapter_params_per_agent=adapters, nps_params=n * shared)
    sizes["critic_params"] = sum(p.numel() for p in critic.parameters())
    for key, value in sizes.items():
        writer.add_scalar(f"lorasa/{key}", value, global_step)
    print(f"{n} agents, {sizes}")
    return versions


def log_iteration(writer, args, iteration, phase, actor, groups, stats, finished, global_step):
    """One iteration's TensorBoard scalars and its line on stdout."""
    stats["charts/phase"] = {"ps": 0, "lora": 1, "nps": 2}[phase]
    stats["perf/SPS_update"] = args.batch_size / stats["perf/update_s"]
    stats["lorasa/trainable_params"] = sum(p.numel() for group in groups for p in group)
    if finished:  # the training episodes, sampled actions
        returns, lengths, won = np.array(finished, dtype=np.float64).T
        stats["charts/episodic_return"] = returns.mean()
        stats["charts/episodic_length"] = lengths.mean()
        stats["charts/win_rate"] = won.mean()
    # how far each agent moved from the shared weights: sum ||s B_i A_i||_F
    with torch.no_grad():
        adapted = [m for m in actor.modules() if isinstance(m, LoRALinear) and m.lora_on]
        deltas = [m.scaling * torch.bmm(stack(m.lora_B), stack(m.lora_A)) for m in adapted]
        for i in range(actor.n_agents):
            norms = [torch.linalg.matrix_norm(delta[i]).item() for delta in deltas]
            stats[f"lorasa/delta_norm/agent_{i}"] = sum(norms)
    for key, value in stats.items():
        writer.add_scalar(key, value, global_step)
    win_rate = stats.get("charts/win_rate", float("nan"))
    times = f"rollout {stats['perf/rollout_s']:.2f}s update {stats['perf/update_s']:.2f}s"
    progress = f"iter {iteration}/{args.num_iterations} step {global_step} phase {phase}"
    print(f"{progress} win rate {win_rate:.3f} | {times}", flush=True)


def resume_training(checkpoint, actor_optims, device):
    """--resume: the actor optimisers' states and the RNG the training loop
    draws from."""
    for optimizer, state in zip(actor_optims, checkpoint["actor_optim"]):
        optimizer.load_state_dict(state)
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])


# ==== 11. MAIN ====
if __name__ == "__main__":
    args = tyro.cli(Args, default=Args(**task_defaults(sys.argv[1:])))
    args, checkpoint = load_checkpoint(args)
    args = finalize_args(args)
    # a bad --map or a broken game fails here, before anything is started
    resolve_backend(args)
    if checkpoint is not None:
        check_checkpoint(args, checkpoint)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # one torch thread in rollouts and evaluations: idle threads spin after every small matmul
    # and slow the env steps beside them (docs/performance.md); the update uses --threads
    torch.set_num_threads(1)

    # StarCraft II as the reference: one eval env plays every episode in turn; SMAX one env each
    eval_count = args.eval_episodes if args.env_backend == "smax" else 1
    eval_envs, first = make_envs(args, eval_seeds(args)[:eval_count])
    _, n_agents, obs_dim = first["obs"].shape  # (envs, agents, obs_dim)
    state_dim, n_actions = first["state"].shape[-1], first["avail"].shape[-1]
    actor = CategoricalActor(obs_dim, n_actions, n_agents, args).to(device)
    critic = Critic(state_dim, n_agents, args).to(device)
    value_norm = ValueNorm(n_agents).to(device)
    lr, eps = args.critic_learning_rate, args.adam_eps
    critic_optim = torch.optim.Adam(critic.parameters(), lr=lr, eps=eps)
    phase = "nps" if args.share_mode == "nps" else "ps"
    global_step, iteration = 0, 0
    if checkpoint is not None:
        models = (actor, critic, value_norm, critic_optim)
        phase, global_step, iteration = load_weights(args, checkpoint, *models)
    actor_groups, actor_optims = start_phase(actor, phase, args)
    if args.resume:
        resume_training(checkpoint, actor_optims, device)

    if args.eval_only:
        result = evaluate(args, actor, eval_envs)
        returns = f"return {result['episodic_return']:.2f}, {args.eval_episodes} episodes"
        print(f"eval {args.task} step {global_step}: win rate {result['win_rate']:.3f}, {returns}")
        save_film(result, eval_envs, eval_only_path(args, global_step), global_step)
        sys.exit(0)

    # new seeds on --resume: the simulators' states are not in the checkpoint
    train_seeds = [args.seed + 1000 * k + global_step for k in range(args.num_envs)]
    envs, obs = make_envs(args, train_seeds)
    # after the games started: a failed launch leaves no run folder
    run_path = make_run_dir(args)
    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        # before the writer: W&B hooks into TensorBoard's
        track_run(args, run_path)
    writer = SummaryWriter(run_path)
    versions = log_start(writer, args, actor, critic, global_step)
    buf = RolloutBuffer(args, n_agents, obs_dim, state_dim, n_actions, device)
    buf.put_obs(0, obs)
    last_checkpoint = args.checkpoint
    ctrl_c = CtrlC()

    def save(name):
        """The training state now, as <run folder>/<name>; None with
        --no-save-model."""
        if not args.save_model:
            return None
        progress = dict(phase=phase, global_step=global_step, iteration=iteration)
        progress["versions"] = versions
        optimizers = (actor_optims, actor_groups, critic_optim)
        models = (actor, critic, value_norm, optimizers)
        return save_checkpoint(os.path.join(run_path, name), args, progress, *models)

    start_step, start_time = global_step, time.time()
    try:
        if not args.resume:
            log_evaluation(writer, args, actor, eval_envs, global_step)
            last_checkpoint = save("checkpoint.pt") or last_checkpoint
        while iteration < args.num_iterations and not ctrl_c.pressed:
            iteration += 1
            if phase == "ps" and args.share_mode == "lorasa" and global_step >= args.lora_start:
                save("ps_checkpoint.pt")
                phase = "lora"
                # new actor optimisers: a learning-rate schedule must set their lr after this
                actor_groups, actor_optims = start_phase(actor, phase, args)
                print(f"  phase switch at step {global_step}: shared actor frozen, adapters on")

            rollout_start = time.time()
            finished, env_seconds = collect_rollout(args, envs, actor, buf)
            global_step += args.batch_size

            update_start = time.time()
            torch.set_num_threads(args.threads)
            critic_values(critic, buf)  # V(s_t) for GAE and the value clip
            returns, advantages = compute_returns(args, buf, value_norm)
            optimizers = (actor_optims, actor_groups, critic_optim)
            models = (actor, critic, value_norm, optimizers)
            stats = update(args, phase, *models, buf, returns, advantages)
            torch.set_num_threads(1)
            stats["charts/dead_ratio"] = 1 - buf.active[:, 1:].mean().item()
            buf.roll()

            stats["charts/learning_rate"] = actor_optims[0].param_groups[0]["lr"]
            stats["perf/rollout_s"] = update_start - rollout_start
            stats["perf/update_s"] = time.time() - update_start
            stats["perf/SPS_env"] = args.batch_size / env_seconds
            stats["charts/SPS"] = int((global_step - start_step) / (time.time() - start_time))
            logged = (stats, finished, global_step)
            log_iteration(writer, args, iteration, phase, actor, actor_groups, *logged)
            if iteration % args.eval_interval == 0 or iteration == args.num_iterations:
                log_evaluation(writer, args, actor, eval_envs, global_step)
                last_checkpoint = save("checkpoint.pt") or last_checkpoint
        if ctrl_c.pressed:
            save("checkpoint.pt")
            print(f"interrupted: checkpoint of step {global_step} in {run_path}", file=sys.stderr)
    except (GameError, FloatingPointError) as error:
        last = last_checkpoint or "none (--no-save-model, or none written yet)"
        if isinstance(error, GameError):
            # StarCraft II failed in the run, e.g. a relaunch after a restart
            fail(f"{launch_problem(error)}; the last checkpoint is {last}")
        diverged = f"training diverged at step {global_step} ({error})"
        print(f"error: {diverged}; the last good checkpoint is {last}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print(f"quit at step {global_step}; the last checkpoint is kept", file=sys.stderr)
        sys.exit(130)
    finally:
        writer.close()
    envs.close()
    eval_envs.close()
    sys.exit(130 if ctrl_c.pressed else 0)
