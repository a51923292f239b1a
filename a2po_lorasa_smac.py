# ==== 1. DOCSTRING ====
"""A2PO + LoRASA on StarCraft: SMAC maps and SMACv2 tasks on StarCraft II, or JaxMARL's SMAX, in one self-contained file.

LoRASA (Zhang, Kapoor & Sun, "Low-Rank Agent-Specific Adaptation (LoRASA) for Multi-Agent Policy Learning", ICML 2025,
arXiv 2502.05573) trains one recurrent policy shared by all agents (phase ps), then freezes it and trains per-agent
low-rank adapters on every layer (phase lora): agent i acts with W_i = W0 + (alpha / r) B_i A_i. Reference code:
github.com/ZBN111/ICML2025_LoRASA (a fork of github.com/xihuai18/A2PO-ICLR2023). docs/method.md: the method as
implemented, each equation with its place in this file; docs/decisions.md: the deviations from the reference below.
A2PO (Wang et al., "Order Matters: Agent-by-agent Policy Optimization", ICLR 2023, arXiv 2302.06205) updates the agents
one at a time in a semi-greedy order, multiplies each agent's ratio by the clipped product of the other agents' ratios,
adapts the clip to the position and re-estimates the advantages with truncated importance traces (docs/method.md §11).
The defaults are the reference's SMAC A2PO: the ppo loop (epochs outside, agents inside, a new order every epoch), the
retrace trace, no two-stage critic. Everything but the update rule, its arguments and its trace functions is
mappo_lorasa_smac.py.

Usage (one run does both phases; the switch is at --lora-start env steps, by default a quarter of the run):
    python a2po_lorasa_smac.py --rank 8 --map 3s5z          # StarCraft II if installed, else SMAX (said at start)
    python a2po_lorasa_smac.py --map protoss_5_vs_5 --env-backend sc2        # a SMACv2 task (StarCraft II only)
    python a2po_lorasa_smac.py --checkpoint runs/<run>/ps_checkpoint.pt      # lora fine-tuning of a ps policy
SMAX is another simulator: its results are SMAX results (runs are named smax-<map>), never SMAC results. StarCraft II
is not bit-reproducible. Tested with torch 2.13.0, jax 0.10.2, jaxmarl 0.2.0, tyro 1.0.17, Python 3.11; smac and
smacv2 at the commits of requirements-sc2.txt (against a stand-in of their API: no StarCraft II on the test machines).

Deviations from the reference (docs/decisions.md), each commented where it happens:
  FIX 2 symmetric Huber loss; 3 self-contained checkpoints, both phases in one run; 4 value normalisers checkpointed;
  5 per-agent parameter groups by construction; 6 the critic's own learning rate; 7 the command line wins; 8 phase lora
  freezes every shared actor parameter; 9 one GRU cell, explicit merge(); 11 per-agent logged losses; 26 the critic
  optimiser and value normalisers continue across the switch; 29 paired seeds. SIMPLIFY 17 A, B adapters everywhere.
  KEEP 16 adapter init A = 0, B random; 18 agent biases untrained; 25 one value normaliser per agent; 28 timeouts are
  terminal (--bootstrap-timeouts). 31 the critic's input (--state-mode) replaces the reference's agent-specific
  feature-pruned state, which neither StarCraft package provides. A2PO: FIX 10 the other agents' ratios under no_grad;
  KEEP 13 the ppo loop gives every agent the first position's clip; 14 the ppo loop multiplies over every other agent;
  15 the retrace trace applies lambda twice; 23 trace ratios one step at a time from the stored hidden states; 24 order
  score |A / V| with normalised V; 30 the critic fits the traced returns, loss / n.
"""

# ==== 2. IMPORTS ====
import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import math
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
LayerName = Literal["fc1", "fc2a", "fc2b", "gru_x", "gru_h", "fc_post", "head"]  # the 7 adaptable layers, method §2
LAYER_NAMES = get_args(LayerName)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # name of this experiment (part of the run name)
    seed: int = 1  # seed of random, numpy, torch, the adapters and the envs (docs/method.md §8)
    cuda: bool = False  # run the networks on CUDA (64-unit networks are latency-bound: the CPU is usually faster)
    threads: int = 1  # torch threads in the update (rollouts use 1); 1 lets several runs share a machine
    run_dir: str = "runs"  # parent of the run folders (TensorBoard events and checkpoints)
    save_model: bool = True  # checkpoints at every evaluation, at the end, on Ctrl-C and at the switch
    checkpoint: Optional[str] = None  # start from this checkpoint.pt (a PS checkpoint: LoRA fine-tuning at once)
    resume: bool = False  # with --checkpoint: continue that run (its folder, arguments, step count, optimisers, RNG)
    eval_only: bool = False  # with --checkpoint: evaluate its policy on its task, print the result, write nothing

    total_timesteps: Optional[int] = None  # env step at which training ends (default 12M; --resume: the checkpoint's)
    num_envs: Optional[int] = None  # parallel training envs (default per task, TASK_DEFAULTS)
    num_steps: Optional[int] = None  # rollout length per env and iteration (default per task)
    learning_rate: Optional[float] = None  # actor Adam learning rate (default per task; the adapters in phase lora)
    critic_learning_rate: Optional[float] = None  # critic Adam learning rate (default per task)
    update_epochs: Optional[int] = None  # PPO epochs per iteration (default per task)
    num_minibatches: int = 1  # minibatches per epoch (reference: 1, one step per epoch on the whole batch)
    data_chunk_length: int = 10  # length of the recurrent training chunks
    gamma: float = 0.99  # discount factor
    gae_lambda: Optional[float] = None  # GAE lambda (default per task)
    clip_coef: float = 0.2  # PPO ratio clip
    value_clip_coef: float = 0.2  # value clip around the rollout's value
    ent_coef: Optional[float] = None  # entropy coefficient (default per task)
    vf_coef: float = 1.0  # value loss coefficient
    max_grad_norm: float = 10.0  # gradient-norm clip (per agent group in phase lora and in nps mode)
    huber_delta: float = 10.0  # delta of the Huber value loss
    adam_eps: float = 1e-5  # Adam epsilon
    hidden_size: int = 64  # width of every hidden layer
    eval_interval: int = 50  # evaluate and save every this many iterations, before the first and after the last
    eval_episodes: Optional[int] = None  # greedy evaluation episodes (default per task)
    bootstrap_timeouts: bool = False  # bootstrap episode timeouts from the final state (KEEP 28: off, they end episodes)

    share_mode: Literal["ps", "lorasa", "nps"] = "lorasa"  # lorasa: ps until --lora-start, then per-agent adapters
    rank: int = 8  # adapter rank r
    lora_alpha: Optional[float] = None  # adapters are scaled by alpha / r (default alpha = rank)
    lora_layers: Tuple[LayerName, ...] = LAYER_NAMES  # adapted layers (placement ablation)
    lora_start: Optional[int] = None  # env step of the phase switch (default total_timesteps // 4)
    lora_init: Literal["reference", "standard"] = "reference"  # A = 0, B random (KEEP 16) | A random, B = 0
    train_agent_bias: bool = False  # also train the per-agent adapter biases (KEEP 18)

    map: str = "3s5z"  # a SMAC map (3s5z, MMM2, corridor, ...), a SMACv2 task (protoss_5_vs_5, ...) or a SMAX map
    env_backend: Literal["auto", "sc2", "smax"] = "auto"  # auto: StarCraft II if installed with the map's package, else SMAX
    state_mode: Literal["ep_obs_id", "ep_id"] = "ep_obs_id"  # critic input: [state, obs_i, one-hot(i)] or [state, one-hot(i)]
    death_masking: bool = True  # a dead agent's critic input is zero but for its id

    a2po_loop: Literal["agent", "ppo"] = "ppo"  # agent: each agent runs all its epochs in turn; ppo: epochs outside
    a2po_order: Literal["semi_greedy", "random", "cyclic", "greedy"] = "semi_greedy"  # agent order (cyclic: 0 ... n-1)
    a2po_clip_schedule: Literal["reference", "position"] = "reference"  # reference: KEEP 13 in the ppo loop
    a2po_others: Literal["reference", "preceding"] = "reference"  # reference: KEEP 14 in the ppo loop
    others_clip_coef: float = 0.1  # clip eps_o of the other agents' ratio product (clipped as a whole)
    clip_tuner_weight: float = 0.5  # w of the clip schedule eps_k = eps (w k / n + 1 - w)
    trace_variant: Literal["retrace", "speedup"] = "retrace"  # retrace: per-step truncated ratios (the reference's on SMAC)
    trace_clip: float = 1.0  # truncation c of the ratios in the retrace trace
    trace_lambda_squared: bool = True  # KEEP 15: the retrace trace decays with gamma lambda^2 (off: Retrace-GAE)
    two_stage: bool = False  # per agent and epoch, a critic-only pass over its minibatches first
    approx_trace: bool = True  # the critic regresses onto the traced returns (KEEP 30; off: the GAE returns)


# The reference's settings (docs/method.md §10) for every map and where a map differs; the command line wins.
SUITE_DEFAULTS = dict(num_envs=10, num_steps=320, update_epochs=5, gae_lambda=0.95, learning_rate=5e-4, ent_coef=0.01,
                      critic_learning_rate=5e-4, eval_episodes=32, total_timesteps=12_000_000)  # fmt: skip
TASK_DEFAULTS = {"3s5z_vs_3s6z": dict(gae_lambda=0.90)}
TASK_KEYS = ("map", "env_backend", "state_mode", "hidden_size")  # a checkpoint fits only its own task
POSITIVE = (
    "threads", "total_timesteps", "num_envs", "num_steps", "learning_rate", "critic_learning_rate", "update_epochs",
    "num_minibatches", "data_chunk_length", "clip_coef", "value_clip_coef", "vf_coef", "max_grad_norm", "huber_delta",
    "adam_eps", "hidden_size", "eval_interval", "eval_episodes", "rank", "lora_alpha",
)  # fmt: skip


def fail(message):
    """One line on stderr, no traceback, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def finalize_args(args):
    """Fill the per-task defaults the command line left unset, derive the sizes and check every value: one line naming
    the value and the accepted ones for each problem, before any env or network is built."""
    for key, value in {**SUITE_DEFAULTS, **TASK_DEFAULTS.get(args.map, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.lora_alpha = float(args.rank) if args.lora_alpha is None else args.lora_alpha
    args.lora_start = args.total_timesteps // 4 if args.lora_start is None else args.lora_start
    for key in POSITIVE:
        if not getattr(args, key) > 0:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid; accepted: > 0")
    for key in ("gamma", "gae_lambda"):
        if not 0 < getattr(args, key) <= 1:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid; accepted: 0 < value <= 1")
    if not args.ent_coef >= 0:
        fail(f"--ent-coef {args.ent_coef} is invalid; accepted: >= 0")
    if args.num_steps % args.data_chunk_length:
        fail(f"--num-steps {args.num_steps} is invalid; accepted: multiples of --data-chunk-length {args.data_chunk_length}")
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    if args.num_iterations < 1:
        fail(f"--total-timesteps {args.total_timesteps} is below one iteration; accepted: >= {args.batch_size}")
    if args.num_minibatches > args.batch_size // args.data_chunk_length:
        fail(f"--num-minibatches {args.num_minibatches} is invalid; accepted: <= {args.batch_size // args.data_chunk_length}")
    if not 0 <= args.lora_start <= args.total_timesteps:
        fail(f"--lora-start {args.lora_start} is invalid; accepted: 0 ... --total-timesteps ({args.total_timesteps})")
    for key in ("others_clip_coef", "trace_clip"):
        if not getattr(args, key) > 0:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid; accepted: > 0")
    if not 0 <= args.clip_tuner_weight <= 1:
        fail(f"--clip-tuner-weight {args.clip_tuner_weight} is invalid; accepted: 0 ... 1")
    return args


# ==== 4. ENVIRONMENT ====
SMAC_MAPS = {  # SMAC map: (allies, enemies, episode limit), from smac's map registry
    "3m": (3, 3, 60), "8m": (8, 8, 120), "25m": (25, 25, 150), "5m_vs_6m": (5, 6, 70), "8m_vs_9m": (8, 9, 120),
    "10m_vs_11m": (10, 11, 150), "27m_vs_30m": (27, 30, 180), "MMM": (10, 10, 150), "MMM2": (10, 12, 180),
    "2s3z": (5, 5, 120), "3s5z": (8, 8, 150), "3s5z_vs_3s6z": (8, 9, 170), "3s_vs_3z": (3, 3, 150), "3s_vs_4z": (3, 4, 200),
    "3s_vs_5z": (3, 5, 250), "1c3s5z": (9, 9, 180), "2m_vs_1z": (2, 1, 150), "corridor": (6, 24, 400),
    "6h_vs_8z": (6, 8, 150), "2s_vs_1sc": (2, 1, 300), "so_many_baneling": (7, 32, 100), "bane_vs_bane": (24, 24, 200),
    "2c_vs_64zg": (2, 64, 400),
}  # fmt: skip
SMACV2_TASK = re.compile(r"(protoss|terran|zerg)_(\d+)_vs_(\d+)")  # e.g. zerg_10_vs_11: 10 allies, 11 enemies
SMACV2_TEAMS = {  # the official SMACv2 capability configs: unit types, their weights, units that cannot make a team alone
    "protoss": (["stalker", "zealot", "colossus"], [0.45, 0.45, 0.1], []),
    "terran": (["marine", "marauder", "medivac"], [0.45, 0.45, 0.1], ["medivac"]),
    "zerg": (["zergling", "baneling", "hydralisk"], [0.45, 0.1, 0.45], ["baneling"]),
}
SMAX_MAPS = (  # the maps of jaxmarl 0.2.0's SMAX (its smacv2_* draw all six SMAX unit types: not SMACv2's tasks)
    "3m", "2s3z", "25m", "3s5z", "8m", "5m_vs_6m", "10m_vs_11m", "27m_vs_30m", "3s5z_vs_3s6z", "3s_vs_5z", "6h_vs_8z",
    "smacv2_5_units", "smacv2_10_units", "smacv2_20_units",
)  # fmt: skip


def resolve_backend(args):
    """Choose the backend and check what it needs, each problem in one line that names what is missing and the README
    section that installs it; sets args.env_backend and args.task ("sc2-<map>", or "smax-<map>": never called SMAC)."""
    sc2_path = os.path.expanduser(os.environ.get("SC2PATH", "~/StarCraftII"))
    smacv2_task = SMACV2_TASK.fullmatch(args.map)
    package = "smacv2" if smacv2_task else "smac"
    map_file = os.path.join(sc2_path, "Maps", "SMAC_Maps", "32x32_flat.SC2Map" if smacv2_task else f"{args.map}.SC2Map")
    game = os.path.isdir(os.path.join(sc2_path, "Versions"))
    installed = importlib.util.find_spec(package) is not None
    if args.env_backend == "auto":
        args.env_backend = "sc2" if game and installed else "smax"
        why = f"StarCraft II not found in $SC2PATH={sc2_path}" if not game else f"the package {package} is not installed"
        if args.env_backend == "smax":
            print(f"env backend: smax, JaxMARL's SMAX, not SMAC ({why}; README 'StarCraft II' installs the real game)")
    if args.env_backend == "smax" and args.map not in SMAX_MAPS:
        fail(f"--map {args.map!r} is not a SMAX map (no substitute is used); accepted: {' '.join(SMAX_MAPS)}")
    if args.env_backend == "sc2" and not smacv2_task and args.map not in SMAC_MAPS:
        fail(f"--map {args.map!r} is unknown; accepted: {' '.join(SMAC_MAPS)} and SMACv2 tasks such as protoss_5_vs_5")
    missing = [f"$SC2PATH/Versions ({sc2_path}/Versions)", f"the map file {map_file}", f"the package {package}"]
    missing = [what for what, there in zip(missing, (game, os.path.isfile(map_file), installed)) if not there]
    if args.env_backend == "sc2" and missing:
        fail(f"--env-backend sc2: {missing[0]} is missing; see the README section 'StarCraft II'")
    args.task = f"{args.env_backend}-{args.map}"


def agent_inputs(obs, state, avail, state_mode, death_masking, xp):
    """Each agent's inputs from one env's observation, with numpy or jax.numpy (xp): the actor's [obs_i, one-hot(i)];
    the critic's by --state-mode, [state, obs_i, one-hot(i)] or [state, one-hot(i)], zero but for the id of a dead agent
    with --death-masking (docs/method.md §9); dead <=> only the no-op is available."""
    n_agents = obs.shape[0]
    ids = xp.eye(n_agents, dtype=xp.float32)
    state = xp.broadcast_to(state, (n_agents, state.shape[-1]))
    critic_input = xp.concatenate([state, obs], axis=1) if state_mode == "ep_obs_id" else state
    if death_masking:
        critic_input = critic_input * (avail[:, :1] == 0)
    critic_input = xp.concatenate([critic_input, ids], axis=1).astype(xp.float32)
    return dict(obs=xp.concatenate([obs, ids], axis=1).astype(xp.float32), state=critic_input, avail=avail)


class StarCraft2(gym.Env):
    """One StarCraft II env of `smac` (SMAC maps) or of `smacv2` (capability tasks), as a gymnasium.Env for gymnasium's
    vector envs: observation {"obs": (N, obs_dim), "state": (N, state_dim), "avail": (N, n_actions)} (agent_inputs);
    step -> the team reward, terminated (the battle ended, or StarCraft II restarted), truncated (the episode limit),
    {"won": battle_won}."""

    def __init__(self, map_name, seed, state_mode, death_masking):
        smacv2_task = SMACV2_TASK.fullmatch(map_name)
        # continuing_episode=True only adds info["episode_limit"] at a timeout: truncated, told from a lost battle
        options = dict(seed=seed, continuing_episode=True)
        if smacv2_task:  # import only the package the map needs: both installed can clash on map registration
            from smacv2.env import StarCraftCapabilityEnvWrapper

            race, allies, enemies = smacv2_task.group(1), int(smacv2_task.group(2)), int(smacv2_task.group(3))
            units, weights, exceptions = SMACV2_TEAMS[race]
            team = dict(dist_type="weighted_teams", unit_types=units, weights=weights, exception_unit_types=exceptions)
            start = dict(dist_type="surrounded_and_reflect", p=0.5, map_x=32, map_y=32)
            config = dict(n_units=allies, n_enemies=enemies, team_gen=dict(team, observe=True), start_positions=start)
            options.update(conic_fov=False, use_unit_ranges=True, min_attack_range=2, obs_own_pos=True)
            self.env = StarCraftCapabilityEnvWrapper(capability_config=config, map_name=f"10gen_{race}", **options)
        else:
            from smac.env import StarCraft2Env

            self.env = StarCraft2Env(map_name=map_name, obs_last_action=True, **options)  # the reference's obs
        self.modes = (state_mode, death_masking)
        info = self.env.get_env_info()
        n_agents, n_actions = info["n_agents"], info["n_actions"]
        zeros = [np.zeros((n_agents, info["obs_shape"])), np.zeros(info["state_shape"]), np.zeros((n_agents, n_actions))]
        spaces = {
            key: gym.spaces.Box(-np.inf, np.inf, value.shape) for key, value in agent_inputs(*zeros, *self.modes, np).items()
        }
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.MultiDiscrete([n_actions] * n_agents)

    def observe(self):
        obs, state, avail = (
            np.array(x, np.float32) for x in (self.env.get_obs(), self.env.get_state(), self.env.get_avail_actions())
        )
        return agent_inputs(obs, state, avail, *self.modes, np)

    def reset(self, seed=None, options=None):  # StarCraft II is seeded once, at its launch
        self.env.reset()  # SMACv2's wrapper returns None after retrying a failed reset: the observation is read here
        return self.observe(), {}

    def step(self, action):
        reward, terminated, info = self.env.step(action.tolist())
        timeout = bool(info.get("episode_limit", False))
        won = bool(info.get("battle_won", False))  # after a StarCraft II restart step() returns (0, True, {}): a loss
        return self.observe(), float(reward), terminated and not timeout, timeout, {"won": won}

    def close(self):
        self.env.close()


def import_smax():
    """Import JaxMARL's SMAX quietly: its import prints to the process's stdout (one of its modules resets sys.stdout, so
    the redirect is at the file-descriptor level). XLA runs single-threaded, beside torch's one rollout thread (README)."""
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    streams = (sys.stdout, sys.stderr)
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            import jax
            import jax.numpy as jnp
            from jaxmarl.environments import smax
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        sys.stdout, sys.stderr = streams
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # the env step runs in this thread: no hand-over (README)
    return jax, jnp, smax


@functools.lru_cache(maxsize=None)
def smax_functions(map_name, state_mode, death_masking):
    """JaxMARL's SMAX behind SMAC's API and action layout (docs/method.md §9): a map's jitted, vmapped reset, step and
    masked reset, built once so that envs of the same size share their compilation."""
    jax, jnp, smax = import_smax()
    limit = SMAC_MAPS.get(map_name, (0, 0, 200))[2]  # SMAC's episode limit (200 as SMACv2's for the smacv2_* maps)
    # SMAX ends an episode one step after `max_steps` (it tests the step count before counting the step): limit - 1
    env = smax.HeuristicEnemySMAX(scenario=smax.map_name_to_scenario(map_name), max_steps=limit - 1)
    n = env.num_allies
    to_smax = jnp.array([4, 4, 0, 2, 1, 3] + [5 + k for k in range(env.num_enemies)])  # SMAC action -> SMAX action

    def observe(state, obs):
        alive = state.state.unit_alive[:n, None]
        avail = jnp.stack([env.get_avail_actions(state)[agent] for agent in env.agents])  # [N, E, S, W, stop, attack]
        avail = jnp.concatenate([~alive, alive, avail[:, jnp.array([0, 2, 1, 3])], avail[:, 5:]], axis=1)  # SMAC's layout
        agents_obs = jnp.stack([obs[agent] for agent in env.agents])
        return agent_inputs(agents_obs, obs["world_state"], avail.astype(jnp.float32), state_mode, death_masking, jnp)

    def reset(key):
        key, reset_key = jax.random.split(key)
        obs, state = env.reset(reset_key)
        state = jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), state)  # no weak types: one compilation
        return key, state, observe(state, obs)

    def step(key, state, actions):
        key, step_key = jax.random.split(key)
        smax_actions = {agent: to_smax[actions[i]] for i, agent in enumerate(env.agents)}
        obs, state, rewards, dones, _ = env.step_env(step_key, state, smax_actions)
        alive = state.state.unit_alive
        won = ~alive[n:].any() & alive[:n].any()  # SMAX's info is empty: the win comes from the post-step state
        terminated = ~alive[n:].any() | ~alive[:n].any()
        truncated = dones["__all__"] & ~terminated  # the episode limit
        return key, state, observe(state, obs), rewards[env.agents[0]], terminated, truncated, won

    def select(mask, new, old):
        return jax.tree.map(lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)

    return jax, jax.jit(jax.vmap(reset)), jax.jit(jax.vmap(step)), jax.jit(select)


class SMAXEnvs:
    """JaxMARL's SMAX for all envs at once (smax_functions), with the calls of gymnasium's vector envs without autoreset:
    finished envs are reset on request (reset_mask). Observations as StarCraft2's, with SMAC's avail = [dead, alive, N,
    S, E, W, attack enemy k ...]."""

    def __init__(self, map_name, num_envs, args):
        self.jax, self.reset_all, self.step_all, self.select = smax_functions(map_name, args.state_mode, args.death_masking)
        self.num_envs = num_envs
        self.keys = self.jax.vmap(self.jax.random.PRNGKey)(self.jax.numpy.arange(num_envs))
        self.keys, self.states, self.observation = self.reset_all(self.keys)
        shapes = {key: value.shape[1:] for key, value in self.observation.items()}
        self.single_observation_space = gym.spaces.Dict(
            {key: gym.spaces.Box(-np.inf, np.inf, shape) for key, shape in shapes.items()}
        )

    def reset(self, seed=None, options=None):
        if seed is not None:
            self.keys = self.jax.vmap(self.jax.random.PRNGKey)(self.jax.numpy.asarray(seed))
        keys, states, observation = self.reset_all(self.keys)
        mask = (options or {}).get("reset_mask")
        if mask is None:
            self.keys, self.states, self.observation = keys, states, observation
        else:
            self.keys, self.states, self.observation = self.select(
                mask, (keys, states, observation), (self.keys, self.states, self.observation)
            )
        return {key: np.array(value) for key, value in self.observation.items()}, {}

    def step(self, actions):
        self.keys, self.states, self.observation, reward, terminated, truncated, won = self.step_all(
            self.keys, self.states, actions
        )
        observation = {key: np.array(value) for key, value in self.observation.items()}  # writable copies
        return observation, np.array(reward), np.array(terminated), np.array(truncated), {"won": np.array(won)}

    def close(self):
        pass


def make_envs(args, seeds):
    """sc2: one StarCraft II env per seed, each in its own process (gymnasium's AsyncVectorEnv without autoreset, as the
    reference's subprocess envs); smax: all envs in one jitted call. The envs and their first observation."""
    if args.env_backend == "smax":
        envs = SMAXEnvs(args.map, len(seeds), args)
    else:
        make_env = [functools.partial(StarCraft2, args.map, seed, args.state_mode, args.death_masking) for seed in seeds]
        envs = gym.vector.AsyncVectorEnv(make_env, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    return envs, envs.reset(seed=seeds)[0]


# ==== 5. LAYERS ====
def stack(params, agents=None):
    """Per-agent leaf tensors stacked along a leading agent axis (all agents, or the listed ones)."""
    return torch.stack(list(params) if agents is None else [params[i] for i in agents])


class LoRALinear(nn.Module):
    """Multi-agent linear layer (docs/method.md §3): y_i = x (W0 + s B_i A_i)^T + b0 + beta_i, A_i (r x in), B_i (out x r),
    s = alpha / r. Modes: ps (W0, b0), lorasa (+ adapters if rank > 0, counted once `lora_on`), nps (W_i, b_i per agent).
    Per-agent tensors are separate leaves, each agent's optimiser and gradient clip see only its own (FIX 5)."""

    def __init__(self, n_in, n_out, n_agents, mode, gain, rank=0, alpha=1.0, init="reference", generator=None):
        super().__init__()
        self.mode = mode
        self.adapted = mode == "lorasa" and rank > 0
        self.lora_on = False
        self.merged = None
        if mode == "nps":  # orthogonal init: gain sqrt 2 for ReLU blocks, 0.01 for the action head, 1 otherwise
            self.weight_i = nn.ParameterList([nn.init.orthogonal_(torch.empty(n_out, n_in), gain) for _ in range(n_agents)])
            self.bias_i = nn.ParameterList([torch.zeros(n_out) for _ in range(n_agents)])
            return
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(n_out, n_in), gain))
        self.bias = nn.Parameter(torch.zeros(n_out))
        if self.adapted:
            self.scaling = alpha / rank
            self.lora_A = nn.ParameterList([torch.zeros(rank, n_in) for _ in range(n_agents)])
            self.lora_B = nn.ParameterList([torch.zeros(n_out, rank) for _ in range(n_agents)])
            # KEEP 16: the reference draws B (A = 0), the LoRA paper A (B = 0); from the adapters' own generator (FIX 29)
            for tensor in self.lora_B if init == "reference" else self.lora_A:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
            self.lora_bias = nn.ParameterList([torch.zeros(n_out) for _ in range(n_agents)])  # KEEP 18: untrained

    def weights(self, agents=None):
        """(W, b): shared (out, in), (out,) or per agent (n, out, in), (n, 1, out); under torch.inference_mode (rollouts,
        evaluation: all agents) the merged ones, computed once per update by merge_weights()."""
        if self.merged is not None and torch.is_inference_mode_enabled():
            return self.merged
        if self.mode == "nps":
            return stack(self.weight_i, agents), stack(self.bias_i, agents)[:, None]
        if not (self.adapted and self.lora_on):
            return self.weight, self.bias
        delta = torch.bmm(stack(self.lora_B, agents), stack(self.lora_A, agents))  # B_i A_i, (n, out, in)
        return self.weight + self.scaling * delta, (self.bias + stack(self.lora_bias, agents))[:, None]

    def merge_weights(self):
        with torch.no_grad():  # W_i = W0 + s B_i A_i, b_i = b0 + beta_i
            self.merged = tuple(tensor.detach() for tensor in self.weights())

    def forward(self, x, agents=None, weights=None):
        weight, bias = self.weights(agents) if weights is None else weights
        if weight.dim() == 2:  # one matrix shared by all agents
            return F.linear(x, weight, bias)
        return torch.baddbmm(bias, x.flatten(1, -2), weight.mT).view(*x.shape[:-1], weight.shape[1])  # one batched matmul


class AgentLayerNorm(nn.Module):
    """LayerNorm over the last dim, shared (ps, lorasa: never adapted, frozen in phase lora) or one per agent (nps)."""

    def __init__(self, dim, n_agents, per_agent):
        super().__init__()
        self.per_agent = per_agent
        self.merged = None
        if per_agent:
            self.weight_i = nn.ParameterList([torch.ones(dim) for _ in range(n_agents)])
            self.bias_i = nn.ParameterList([torch.zeros(dim) for _ in range(n_agents)])
        else:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))

    def merge_weights(self):
        with torch.no_grad():
            self.merged = (stack(self.weight_i), stack(self.bias_i)) if self.per_agent else None

    def forward(self, x, agents=None):
        if not self.per_agent:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)  # eps 1e-5, as nn.LayerNorm
        if self.merged is not None and torch.is_inference_mode_enabled():  # all agents
            weight, bias = self.merged
        else:
            weight, bias = stack(self.weight_i, agents), stack(self.bias_i, agents)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return F.layer_norm(x, x.shape[-1:]) * weight.view(shape) + bias.view(shape)


# ==== 6. ACTOR, CRITIC, VALUENORM ====
class RecurrentNetwork(nn.Module):
    """Feature LayerNorm -> fc1, fc2a, fc2b blocks (Linear-ReLU-LayerNorm) -> GRU -> LayerNorm -> fc_post block -> head
    (docs/method.md §2), all agents at once; in lorasa mode the layers in --lora-layers get adapters from `generator`."""

    def __init__(self, n_in, n_out, n_agents, mode, args, head_gain, generator=None):
        super().__init__()
        hidden = args.hidden_size
        per_agent = mode == "nps"

        def linear(name, n_in, n_out, gain):
            rank = args.rank if mode == "lorasa" and name in args.lora_layers else 0
            return LoRALinear(n_in, n_out, n_agents, mode, gain, rank, args.lora_alpha, args.lora_init, generator)

        self.n_agents = n_agents
        self.lora_on = False
        self.feature_norm = AgentLayerNorm(n_in, n_agents, per_agent)
        sizes = {"fc1": (n_in, hidden), "fc2a": (hidden, hidden), "fc2b": (hidden, hidden), "fc_post": (hidden, hidden)}
        self.fcs = nn.ModuleDict({name: linear(name, *size, math.sqrt(2)) for name, size in sizes.items()})
        self.norms = nn.ModuleDict({name: AgentLayerNorm(hidden, n_agents, per_agent) for name in sizes})
        self.gru_x = linear("gru_x", hidden, 3 * hidden, 1.0)
        self.gru_h = linear("gru_h", hidden, 3 * hidden, 1.0)
        self.gru_norm = AgentLayerNorm(hidden, n_agents, per_agent)
        self.head = linear("head", hidden, n_out, head_gain)

    def forward(self, x, h, masks, agents=None):
        """x (n, T, B, in), h (n, B, H), masks (T, B) -> outputs (n, T, B, out), hidden after every step (n, T, B, H)."""
        x = self.feature_norm(x, agents)
        for name in ("fc1", "fc2a", "fc2b"):
            x = self.norms[name](F.relu(self.fcs[name](x, agents)), agents)
        hs = self.gru(x, h, masks, agents)
        x = self.norms["fc_post"](F.relu(self.fcs["fc_post"](self.gru_norm(hs, agents), agents)), agents)
        return self.head(x, agents), hs

    def gru(self, x, h, masks, agents=None):
        """`torch.nn.GRU`'s maths and gates [r, z, n] in both phases (FIX 9, docs/method.md §2): h <- h * mask, then
        r, z = sig(gx_rz + gh_rz), n = tanh(gx_n + r gh_n), h' = (1 - z) n + z h with gx = Wx x + bx, gh = Wh h + bh.
        x (n, T, B, H), h (n, B, H), masks (T, B) -> the hidden state after every step (n, T, B, H)."""
        hidden = h.shape[-1]
        gx_rz, gx_n = self.gru_x(x, agents).split([2 * hidden, hidden], dim=-1)  # the input projection of all steps
        weights = self.gru_h.weights(agents)  # built once per call, not per step
        outputs = []
        # unbind, not gx[:, t]: the backward of indexing fills a zero tensor the size of gx for every step
        for gx_rz_t, gx_n_t, mask_t in zip(gx_rz.unbind(1), gx_n.unbind(1), masks[..., None]):
            h = h * mask_t
            gh_rz, gh_n = self.gru_h(h, agents, weights).split([2 * hidden, hidden], dim=-1)
            r, z = torch.sigmoid(gx_rz_t + gh_rz).chunk(2, dim=-1)
            n = torch.tanh(gx_n_t + r * gh_n)
            h = n + z * (h - n)  # = (1 - z) n + z h
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class CategoricalActor(RecurrentNetwork):
    """Categorical policy over SMAC's actions (docs/method.md §4): logits = network(obs), the logits of unavailable
    actions set to -1e10 in rollouts, training and evaluation, so an unavailable action is never sampled, its probability
    is exactly 0 and it gets no gradient."""

    def __init__(self, obs_dim, n_actions, n_agents, args):
        generator = torch.Generator().manual_seed(args.seed)  # the adapters' own generator (FIX 29)
        super().__init__(obs_dim, n_actions, n_agents, args.share_mode, args, 0.01, generator)

    def forward(self, obs, h, masks, avail, agents=None):
        """obs (n, T, B, obs_dim), avail (n, T, B, n_actions) -> masked logits (n, T, B, n_actions), the hidden state
        after the last step (n, B, H)."""
        logits, hs = super().forward(obs, h, masks, agents)
        return logits.masked_fill(avail == 0, -1e10), hs[:, -1]


class Critic(RecurrentNetwork):
    """Centralised critic (§5), one for all agents (nps: one each), never adapted; it outputs normalised values (n, T, B)."""

    def __init__(self, state_dim, n_agents, args):
        super().__init__(state_dim, 1, n_agents, "nps" if args.share_mode == "nps" else "ps", args, 1.0)

    def forward(self, state, h, masks, agents=None):
        values, hs = super().forward(state, h, masks, agents)
        return values[..., 0], hs


class ValueNorm(nn.Module):
    """One running return normaliser per agent, agent axis first (docs/method.md §5, KEEP 25): running_mean <- beta
    running_mean + (1 - beta) mean(R), running_mean_sq likewise with R^2, debiasing_term <- beta debiasing_term + 1 - beta;
    mean = running_mean / d, var = max(running_mean_sq / d - mean^2, 1e-2), d = max(debiasing_term, 1e-5)."""

    def __init__(self, n_agents, beta=0.99999):
        super().__init__()
        self.beta = beta
        self.register_buffer("running_mean", torch.zeros(n_agents, dtype=torch.float64))
        self.register_buffer("running_mean_sq", torch.zeros(n_agents, dtype=torch.float64))
        self.register_buffer("debiasing_term", torch.zeros(n_agents, dtype=torch.float64))

    def update(self, returns, agents=None):
        index = slice(None) if agents is None else agents
        returns = returns.detach().flatten(1).double()
        self.running_mean[index] = self.beta * self.running_mean[index] + (1 - self.beta) * returns.mean(1)
        self.running_mean_sq[index] = self.beta * self.running_mean_sq[index] + (1 - self.beta) * returns.pow(2).mean(1)
        self.debiasing_term[index] = self.beta * self.debiasing_term[index] + (1 - self.beta)

    def mean_std(self, x, agents):
        index = slice(None) if agents is None else agents
        debiasing_term = self.debiasing_term[index].clamp(min=1e-5)
        mean = self.running_mean[index] / debiasing_term
        var = (self.running_mean_sq[index] / debiasing_term - mean.pow(2)).clamp(min=1e-2)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return mean.float().view(shape), var.sqrt().float().view(shape)

    def normalize(self, x, agents=None):
        mean, std = self.mean_std(x, agents)
        return (x - mean) / std

    def denormalize(self, x, agents=None):
        mean, std = self.mean_std(x, agents)
        return x * std + mean


def merge(*models):
    """Precompute the per-agent weights that rollouts and evaluation use (under torch.inference_mode); after every update."""
    for model in models:
        for module in model.modules():
            if hasattr(module, "merge_weights"):
                module.merge_weights()


def start_phase(actor, phase, args):
    """The actor parameters that train and their optimisers, fresh (docs/method.md §1). ps: the shared actor, one Adam;
    lora: every shared actor parameter frozen (FIX 8), adapters on at dW = 0, one Adam per agent over its own group
    (FIX 5); nps: one Adam per agent over its network. The critic side is not touched (FIX 26)."""
    for module in actor.modules():
        if hasattr(module, "lora_on"):
            module.lora_on = phase == "lora"
    for name, param in actor.named_parameters():
        trains = phase == "nps" or ("lora_" in name) == (phase == "lora")
        param.requires_grad_(trains and ("lora_bias" not in name or args.train_agent_bias))  # KEEP 18
    if phase == "ps":
        groups = [[param for name, param in actor.named_parameters() if "lora_" not in name]]
    else:  # agent i's group: entry i of every per-agent ParameterList that trains
        lists = [module for module in actor.modules() if isinstance(module, nn.ParameterList)]
        groups = [[plist[i] for plist in lists if plist[i].requires_grad] for i in range(actor.n_agents)]
    optimizers = [torch.optim.Adam(group, lr=args.learning_rate, eps=args.adam_eps) for group in groups]
    merge(actor)
    return groups, optimizers


# ==== 7. ROLLOUT BUFFER, CHUNKS, GAE ====
class RolloutBuffer:
    """One iteration (docs/method.md §7), (N, T[+1], E, ...) or (T[+1], E); row T becomes the next row 0. masks[t] = 0:
    an episode ended at step t - 1; active[t] = 0: the agent was dead at step t; boot[t] = 1: step t was a timeout
    bootstrapped from its final state (--bootstrap-timeouts), valued final_values[:, t]; bad_masks are all 1 (KEEP 28)."""

    def __init__(self, args, n_agents, obs_dim, state_dim, n_actions, device):
        N, T, E, H = n_agents, args.num_steps, args.num_envs, args.hidden_size
        self.obs = torch.zeros(N, T + 1, E, obs_dim, device=device)
        self.state = torch.zeros(N, T + 1, E, state_dim, device=device)
        self.avail = torch.ones(N, T + 1, E, n_actions, device=device)
        self.active = torch.ones(N, T + 1, E, device=device)
        self.actor_h = torch.zeros(N, T + 1, E, H, device=device)
        self.critic_h = torch.zeros(N, T + 1, E, H, device=device)
        self.masks = torch.ones(T + 1, E, device=device)
        self.bad_masks = torch.ones(T + 1, E, device=device)
        self.actions = torch.zeros(N, T, E, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(N, T, E, device=device)
        self.values = torch.zeros(N, T + 1, E, device=device)  # normalised; column T: the bootstrap value V_T
        self.rewards = torch.zeros(T, E, device=device)
        self.boot = torch.zeros(T, E, device=device)
        self.final_state = torch.zeros(N, T, E, state_dim, device=device)
        self.final_values = torch.zeros(N, T, E, device=device)
        self.episode_return = np.zeros(E)
        self.episode_length = np.zeros(E, dtype=np.int64)

    def put_obs(self, t, observation):
        self.obs[:, t] = torch.as_tensor(observation["obs"]).transpose(0, 1)
        self.state[:, t] = torch.as_tensor(observation["state"]).transpose(0, 1)
        self.avail[:, t] = torch.as_tensor(observation["avail"]).transpose(0, 1)
        self.active[:, t] = self.avail[:, t, :, 0] == 0  # dead <=> only the no-op is available

    def roll(self):
        for tensor in (self.obs, self.state, self.avail, self.active, self.actor_h, self.critic_h):
            tensor[:, 0] = tensor[:, -1]
        self.masks[0] = self.masks[-1]


def collect_rollout(args, envs, actor, buf):
    """Fill the buffer with one sampled policy call for all envs and agents per step, resetting finished envs after their
    final state is kept (for --bootstrap-timeouts). Returns the finished episodes' (return, length, won) and the
    seconds in the envs."""
    T, E = args.num_steps, args.num_envs
    rewards = np.zeros((T, E), np.float32)
    terminated = np.zeros((T, E), bool)
    truncated = np.zeros((T, E), bool)
    finished = []
    env_seconds = 0.0
    gumbel = -torch.log(-torch.log(torch.rand(*buf.actions.shape, buf.avail.shape[-1], device=buf.actions.device)))
    for t in range(T):
        with torch.inference_mode():
            logits, h = actor(buf.obs[:, t, None], buf.actor_h[:, t], buf.masks[t, None], buf.avail[:, t, None])
            buf.actor_h[:, t + 1] = h
            buf.actions[:, t] = (logits[:, 0] + gumbel[:, t]).argmax(-1)  # a sample of the categorical (Gumbel-max)
            buf.logprobs[:, t] = logits[:, 0].log_softmax(-1).gather(-1, buf.actions[:, t, :, None])[..., 0]
        if not torch.isfinite(buf.logprobs[:, t]).all():
            raise FloatingPointError("non-finite policy")
        start = time.time()
        observation, rewards[t], terminated[t], truncated[t], info = envs.step(buf.actions[:, t].T.cpu().numpy())
        done = terminated[t] | truncated[t]
        if done.any():
            buf.final_state[:, t] = torch.as_tensor(observation["state"]).transpose(0, 1)  # the final state, before the reset
            observation, _ = envs.reset(options={"reset_mask": done})
        env_seconds += time.time() - start
        buf.put_obs(t + 1, observation)
        buf.masks[t + 1] = torch.as_tensor(~done)
        buf.episode_return += rewards[t]
        buf.episode_length += 1
        finished += list(zip(buf.episode_return[done], buf.episode_length[done], info["won"][done]))
        buf.episode_return[done] = 0
        buf.episode_length[done] = 0
    buf.rewards.copy_(torch.as_tensor(rewards))
    buf.boot.copy_(torch.as_tensor(truncated & ~terminated & args.bootstrap_timeouts))  # KEEP 28: off, timeouts end
    return finished, env_seconds


@torch.inference_mode()
def critic_values(critic, buf):
    """The critic values the rollout afterwards in one pass over its states (column T: V_T; its inputs never depend on its
    outputs), keeping its hidden states for the chunks, and each bootstrapped step's final state from the step's one."""
    values, hs = critic(buf.state, buf.critic_h[:, 0], buf.masks)
    buf.values.copy_(values)
    buf.critic_h[:, 1:] = hs[:, :-1]
    steps, env_ids = buf.boot.nonzero(as_tuple=True)
    final_state = buf.final_state[:, steps, env_ids, None].transpose(1, 2)
    final_values, _ = critic(final_state, hs[:, steps, env_ids], buf.masks.new_ones(1, len(steps)))
    buf.final_values[:, steps, env_ids] = final_values[:, 0]


def gae(rewards, values, masks, bad_masks, gamma, lam):
    """GAE (docs/method.md §7) along axis -2 of rewards (..., T, E), values, masks, bad_masks (..., T + 1, E); returns
    A_t + V_t, with delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t and A_t = (delta_t + gamma lam m_{t+1} A_{t+1}) b_{t+1}."""
    advantages = torch.zeros_like(values[..., :-1, :])
    last = torch.zeros_like(values[..., 0, :])
    for t in reversed(range(rewards.shape[-2])):
        delta = rewards[..., t, :] + gamma * values[..., t + 1, :] * masks[..., t + 1, :] - values[..., t, :]
        last = (delta + gamma * lam * masks[..., t + 1, :] * last) * bad_masks[..., t + 1, :]
        advantages[..., t, :] = last
    return advantages + values[..., :-1, :]


def compute_returns(args, buf, value_norm):
    """Returns by GAE on values de-normalised per agent and advantages R - V standardised over the entries where the
    agent is alive (§6); a bootstrapped timeout adds gamma V(s_final) to its reward (the episode still ends there)."""
    values = value_norm.denormalize(buf.values)
    rewards = buf.rewards + args.gamma * buf.boot * value_norm.denormalize(buf.final_values)
    returns = gae(rewards, values, buf.masks, buf.bad_masks, args.gamma, args.gae_lambda)
    advantages = returns - values[:, :-1]
    active = advantages[buf.active[:, :-1] > 0]
    return returns, (advantages - active.mean()) / (active.std(correction=0) + 1e-5)


def chunk_minibatches(data, T, chunk_length, num_minibatches):
    """Every env's stream in chunks of `chunk_length` steps, shuffled into minibatches (§6): (N, T[+1], E, ...) becomes
    (N, L, chunks, ...), (T[+1], E) (L, chunks), and a hidden state (`*_h`) the stored one at each chunk start."""
    C = T // chunk_length
    chunked = {}
    for key, x in data.items():
        if key.endswith("_h"):
            chunked[key] = x[:, :T:chunk_length].flatten(1, 2)
        elif x.dim() == 2:
            chunked[key] = x[:T].unflatten(0, (C, chunk_length)).transpose(0, 1).flatten(1, 2)
        else:
            chunked[key] = x[:, :T].unflatten(1, (C, chunk_length)).transpose(1, 2).flatten(2, 3)
    for index in torch.randperm(C * data["masks"].shape[-1], device=data["masks"].device).chunk(num_minibatches):
        yield {key: x[:, index] if key.endswith("_h") or x.dim() == 2 else x[:, :, index] for key, x in chunked.items()}


def retrace_trace(deltas, rho, masks, bad_masks, gamma, lam, c_bar=1.0, lambda_squared=True):
    """Trace (a) of docs/method.md §11, time-major: deltas, rho (T, ...); masks, bad_masks (T + 1, ...).
    c_t = lam min(rho_t, c_bar) (KEEP 15: lam again on top of gamma lam; --no-trace-lambda-squared: min(rho_t, c_bar)),
    A_T = 0, A_t = b_{t+1} [delta_t + gamma lam m_{t+1} c_{t+1} A_{t+1}]. rho = 1 gives GAE(lam^2) (GAE(lam))."""
    c = rho.clamp(max=c_bar) * (lam if lambda_squared else 1.0)
    advantages = torch.zeros_like(deltas)
    last = torch.zeros_like(deltas[0])
    for t in reversed(range(deltas.shape[0])):
        traced = c[t + 1] * last if t + 1 < deltas.shape[0] else 0.0
        last = bad_masks[t + 1] * (deltas[t] + gamma * lam * masks[t + 1] * traced)
        advantages[t] = last
    return advantages


def speedup_trace(deltas, rho, masks, bad_masks, gamma, lam):
    """Trace (b) of docs/method.md §11: A_t = sum_{k>=t} (gamma lam)^{k-t} C_{t,k} prod_{j=t+1..k} m_j
    prod_{j=t..k} b_{j+1} delta_k with C_{t,t} = 1, C_{t,k} = min(1, rho_k C_{t,k-1}); rho = 1 gives GAE(lam). O(T^2):
    vectorised over t, a loop over k."""
    advantages = torch.zeros_like(deltas)
    decay = torch.zeros_like(deltas)  # (gamma lam)^{k-t} prod m, per start t
    trace = torch.zeros_like(deltas)  # C_{t,k}
    boot = torch.zeros_like(deltas)  # prod b
    for k in range(deltas.shape[0]):
        decay[:k] *= gamma * lam * masks[k]
        trace[:k] = (rho[k] * trace[:k]).clamp(max=1.0)
        boot[:k] *= bad_masks[k + 1]
        decay[k] = 1.0
        trace[k] = 1.0
        boot[k] = bad_masks[k + 1]
        advantages[: k + 1] += decay[: k + 1] * trace[: k + 1] * boot[: k + 1] * deltas[k]
    return advantages


def trace_deltas(args, buf, value_norm, i, last_value):
    """Agent i's TD errors (T, E) for its trace, de-normalised with VN_i's statistics at the time of the trace:
    delta_t = r_t + gamma b_t V(s_final) + gamma V_{t+1} m_{t+1} - V_t, V_t the rollout's values, V_T = last_value
    (normalised, from the current critic), b_t = buf.boot[t] = 1 where step t is a bootstrapped truncation."""
    value = value_norm.denormalize(torch.cat([buf.values[[i], :-1], last_value], dim=1), [i])[0]  # (T + 1, E)
    rewards = buf.rewards + args.gamma * buf.boot * value_norm.denormalize(buf.final_values[[i]], [i])[0]
    return rewards + args.gamma * value[1:] * buf.masks[1:] - value[:-1], value


def clip_eps(args, position, n_agents):
    """docs/method.md §11: eps_k = eps (w k / n + 1 - w), k = the 1-based position, w = --clip-tuner-weight."""
    return args.clip_coef * (args.clip_tuner_weight * position / n_agents + 1 - args.clip_tuner_weight)


def agent_order(kind, scores):
    """docs/method.md §11. semi_greedy: the highest score first, then alternately a uniformly random and the highest of
    the remaining agents; greedy: by score; random: a uniform permutation (HAPPO-like); cyclic: 0 ... n - 1."""
    if kind == "random":
        return torch.randperm(len(scores)).tolist()
    if kind == "cyclic":
        return list(range(len(scores)))
    ranked = torch.argsort(scores, descending=True, stable=True).tolist()
    order = []
    while ranked:
        pick_random = kind == "semi_greedy" and len(order) % 2 == 1
        order.append(ranked.pop(int(torch.randint(len(ranked), ())) if pick_random else 0))
    return order


# ==== 8. UPDATE ====
def huber(x, delta):
    """Symmetric Huber loss (FIX 2: the reference's is zero for x < -delta)."""
    return torch.where(x.abs() <= delta, 0.5 * x.pow(2), delta * (x.abs() - 0.5 * delta))


def value_loss(args, critic, value_norm, mb, agents=None):
    """Clipped Huber value loss (docs/method.md §5): each agent's normaliser first takes this minibatch's returns, then
    L = mean max(Huber(norm(R) - V), Huber(norm(R) - V_clip)), V_clip = V_old + clamp(V - V_old, +-0.2); no masks."""
    values, _ = critic(mb["state"], mb["critic_h"], mb["masks"], agents)
    value_norm.update(mb["returns"], agents)
    target = value_norm.normalize(mb["returns"], agents)
    clipped = mb["values"] + (values - mb["values"]).clamp(-args.value_clip_coef, args.value_clip_coef)
    return torch.max(huber(target - values, args.huber_delta), huber(target - clipped, args.huber_delta)).mean()


def clip_and_step(optimizers, groups, max_norm):
    """Clip each group's gradient norm on its own, then step every optimiser; returns the mean pre-clip norm. A
    non-finite norm stops training before any step, so that a diverged run never overwrites good weights."""
    norms = torch.stack([nn.utils.clip_grad_norm_(group, max_norm) for group in groups])
    if not torch.isfinite(norms).all():
        raise FloatingPointError("non-finite gradients")
    for optimizer in optimizers:
        optimizer.step()
    return norms.mean().item()


def update(args, actor, critic, value_norm, actor_optims, actor_groups, critic_optim, buf, returns, advantages, phase):
    """A2PO (docs/method.md §11): the agents are updated one at a time in a semi-greedy order. Agent i at position k
    maximises the clipped surrogate of w_i * clip(prod_{j in P} r_j, 1 +- eps_o) with the clip eps_k, on advantages
    re-estimated with truncated importance traces of the agents updated so far; the shared critic steps on agent i's rows
    in its turn. Phase ps steps the shared optimiser once per turn (loss / n); phases lora and nps step only agent i's
    optimiser, so that only agent i's policy changes in its turn. A dead agent's step (active mask 0) has ratio 1 in the
    products and traces and adds nothing to the policy loss or the entropy; advantages are standardised over the active
    entries, the order score and the value loss take every step (the reference)."""
    N, T, E = buf.actions.shape[:3]
    data = dict(obs=buf.obs, state=buf.state, actor_h=buf.actor_h, critic_h=buf.critic_h, masks=buf.masks)
    data.update(avail=buf.avail, active=buf.active, actions=buf.actions, logprobs=buf.logprobs, values=buf.values)
    data.update(step=torch.arange(T * E).view(T, E))  # each (t, env)'s flat index: a minibatch's look-up of cached ratios
    rollout_advantages = advantages  # standardised GAE advantages: the first agent's
    traced_returns = returns.clone()
    targets = returns.clone()  # the critic's regression targets
    values = buf.values[:, :T]  # KEEP 24: the order score |A / V| with the normalised values (only a zero guarded)
    scores = (advantages / torch.where(values == 0, 1e-8, values)).abs().mean((1, 2))
    cache = {}  # whole-buffer ratio of each agent for the traces, dropped when its policy changes
    sequence_cache = {}  # the same on the training chunks, for the others' product
    stats = defaultdict(list)

    def active_ratio(logits, actions, old_log_probs, active):
        """r_j = pi_j(a) / pi_j,old(a) of the stored actions, 1 where agent j is dead."""
        log_ratio = logits.log_softmax(-1).gather(-1, actions[..., None])[..., 0] - old_log_probs
        return torch.where(active > 0, log_ratio.exp(), 1.0)

    @torch.no_grad()
    def buffer_ratios(agents):
        """r_j over the whole buffer, (len(agents), T, E), one step at a time from the stored rollout hidden states
        (KEEP 23, the reference's trace evaluation), batched over agents and steps."""
        todo = [j for j in agents if j not in cache]
        if todo:
            obs = buf.obs[todo, :T].reshape(len(todo), 1, T * E, -1)
            avail = buf.avail[todo, :T].reshape(len(todo), 1, T * E, -1)
            logits, _ = actor(
                obs, buf.actor_h[todo, :T].reshape(len(todo), T * E, -1), buf.masks[:T].reshape(1, -1), avail, todo
            )
            ratios = active_ratio(
                logits[:, 0], buf.actions[todo].flatten(1), buf.logprobs[todo].flatten(1), buf.active[todo, :T].flatten(1)
            )
            cache.update({j: ratio.view(T, E) for j, ratio in zip(todo, ratios)})
        return torch.stack([cache[j] for j in agents])

    @torch.no_grad()
    def sequence_ratios(agents):
        """r_j over the whole buffer, (len(agents), T * E), evaluated on the training chunks from their stored start
        hidden states as the surrogate is, under no_grad (FIX 10), batched over agents."""
        todo = [j for j in agents if j not in sequence_cache]
        if todo:
            keys = ("obs", "actor_h", "avail", "actions", "logprobs", "active")
            todo_data = dict({key: data[key][todo] for key in keys}, masks=buf.masks, step=data["step"])
            chunks = next(chunk_minibatches(todo_data, T, args.data_chunk_length, 1))
            logits, _ = actor(chunks["obs"], chunks["actor_h"], chunks["masks"], chunks["avail"], todo)
            ratios = active_ratio(logits, chunks["actions"], chunks["logprobs"], chunks["active"])
            for j, ratio in zip(todo, ratios):
                sequence_cache[j] = torch.empty(T * E).index_put_((chunks["step"].flatten(),), ratio.flatten())
        return torch.stack([sequence_cache[j] for j in agents])

    @torch.no_grad()
    def trace_update(i, agents):
        """docs/method.md §11: agent i's advantages re-estimated with rho_t = prod_{j in agents} r_j (the agents updated so
        far and i itself), V_T from the current critic, everything de-normalised with VN_i's current statistics."""
        nonlocal advantages
        last_value, _ = critic(buf.state[[i], T, None], buf.critic_h[[i], T], buf.masks[T, None], [i])
        deltas, value = trace_deltas(args, buf, value_norm, i, last_value)
        rho = buffer_ratios(agents).prod(0)
        if args.trace_variant == "speedup":
            traced = speedup_trace(deltas, rho, buf.masks, buf.bad_masks, args.gamma, args.gae_lambda)
        else:
            lam_squared = args.trace_lambda_squared
            traced = retrace_trace(
                deltas, rho, buf.masks, buf.bad_masks, args.gamma, args.gae_lambda, args.trace_clip, lam_squared
            )
        traced_returns[i] = traced + value[:-1]
        if args.approx_trace:  # KEEP 30: the critic regresses onto the traced return
            targets[i] = traced_returns[i]
        gaps = traced_returns - value_norm.denormalize(buf.values[:, :T])
        active_gaps = gaps[buf.active[:, :T] > 0]  # standardised over all agents' active entries
        advantages = (gaps - active_gaps.mean()) / (active_gaps.std(correction=0) + 1e-5)
        stats["trace_rho"].append(rho.mean().item())
        stats["trace_trunc"].append((rho > args.trace_clip).float().mean().item())
        stats["trace_adv_gap"].append((advantages[i] - rollout_advantages[i]).abs().mean().item())

    def critic_step(i, mb):
        critic_loss = value_loss(args, critic, value_norm, mb, [i]) / N  # KEEP 30: loss / n
        critic_optim.zero_grad()
        (args.vf_coef * critic_loss).backward()
        stats["critic_grad_norm"].append(clip_and_step([critic_optim], [list(critic.parameters())], args.max_grad_norm))
        stats["value_loss"].append(critic_loss.item() * N)

    def turn(i, others, eps):
        """Agent i's epochs: [--two-stage: a critic-only pass over its minibatches], then an actor step on the surrogate
        and a critic step per minibatch, on agent i's rows; the others' ratios come from sequence_ratios."""
        optimizer, group = (actor_optims[0], actor_groups[0]) if phase == "ps" else (actor_optims[i], actor_groups[i])
        turn_data = {key: x[[i]] if x.dim() > 2 else x for key, x in data.items()}
        turn_data.update(advantages=advantages[[i]], returns=targets[[i]])
        for _ in range(1 if args.a2po_loop == "ppo" else args.update_epochs):
            minibatches = list(chunk_minibatches(turn_data, T, args.data_chunk_length, args.num_minibatches))
            for mb in minibatches if args.two_stage else []:
                critic_step(i, mb)
            for mb in minibatches:
                others_ratio = torch.ones_like(mb["advantages"])
                if others:  # FIX 10: the other agents' current ratios on the same samples, under no_grad
                    product = sequence_ratios(others).prod(0)[mb["step"]][None]
                    others_ratio = product.clamp(1 - args.others_clip_coef, 1 + args.others_clip_coef)  # as a whole
                    stats["others_ratio"].append(product.flatten())
                logits, _ = actor(mb["obs"], mb["actor_h"], mb["masks"], mb["avail"], [i])
                log_probs = logits.log_softmax(-1)
                log_ratio = log_probs.gather(-1, mb["actions"][..., None])[..., 0] - mb["logprobs"]
                ratio = log_ratio.exp() * others_ratio
                advantage = mb["advantages"]
                surrogate = torch.min(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)
                entropy = -(log_probs.exp() * log_probs).sum(-1)  # an unavailable action adds 0 * -1e10 = 0
                active = mb["active"]
                count = active.sum().clamp(min=1)
                policy_loss = -(surrogate * active).sum() / count  # the mean over agent i's active samples
                loss = policy_loss - args.ent_coef * (entropy * active).sum() / count
                optimizer.zero_grad()
                (loss / N if phase == "ps" else loss).backward()  # phase ps divides agent i's loss by n
                stats["actor_grad_norm"].append(clip_and_step([optimizer], [group], args.max_grad_norm))
                for j in range(N) if phase == "ps" else [i]:  # whose policy changed: everyone's (shared weights) or i's
                    cache.pop(j, None)
                    sequence_cache.pop(j, None)
                critic_step(i, mb)
                with torch.no_grad():
                    stats["approx_kl"].append(((log_ratio.exp() - 1 - log_ratio) * active).sum().item() / count.item())
                    stats["clipfrac"].append((((ratio - 1).abs() > eps) * active).sum().item() / count.item())
                stats["policy_loss"].append(policy_loss.item())
                stats["entropy"].append((entropy * active).sum().item() / count.item())

    positions = [0] * N
    clips = {}
    for epoch in range(args.update_epochs if args.a2po_loop == "ppo" else 1):  # agent loop: epochs inside turn()
        if epoch > 0:  # ppo loop: every epoch after the first re-traces every agent with all agents' ratios
            for j in range(N):
                trace_update(j, list(range(N)))
        order = agent_order(args.a2po_order, scores)
        for position, i in enumerate(order, start=1):
            if position > 1:
                trace_update(i, order[:position])
            # KEEP 13: the reference's ppo loop gives every agent the first position's clip
            first_clip = args.a2po_clip_schedule == "reference" and args.a2po_loop == "ppo"
            clips[position] = clip_eps(args, 1 if first_clip else position, N)
            positions[i] = position
            # KEEP 14: the reference's ppo loop multiplies over every other agent's ratio, the agent loop over predecessors
            every_other = args.a2po_others == "reference" and args.a2po_loop == "ppo"
            turn(i, [j for j in range(N) if j != i] if every_other else order[: position - 1], clips[position])
    out = {f"losses/{key}": float(np.mean(stats[key])) for key in ("policy_loss", "value_loss", "entropy", "approx_kl")}
    out.update({f"losses/{key}": float(np.mean(stats[key])) for key in ("clipfrac", "actor_grad_norm", "critic_grad_norm")})
    out.update({f"a2po/order_pos/agent_{i}": position for i, position in enumerate(positions)})
    out.update({f"a2po/clip_eps/pos_{position}": clip for position, clip in clips.items()})
    if stats["others_ratio"]:
        product = torch.cat(stats["others_ratio"])
        out.update({"a2po/others_ratio_mean": product.mean().item(), "a2po/others_ratio_min": product.min().item()})
        out["a2po/others_ratio_max"] = product.max().item()
    for key, tag in (("trace_rho", "trace_rho_mean"), ("trace_trunc", "trace_trunc_frac"), ("trace_adv_gap", "trace_adv_gap")):
        if stats[key]:  # no traces when a single agent is updated
            out[f"a2po/{tag}"] = float(np.mean(stats[key]))
    return out


# ==== 9. EVALUATION ====
@torch.inference_mode()
def evaluate(args, actor, envs):
    """Greedy evaluation (docs/method.md §8): the most probable available action, zero initial hidden state, merged
    adapters; exactly --eval-episodes episodes, shared out evenly over the eval envs (each runs its share in turn), env k
    seeded 50000 seed + 10000 k every time. win_rate = won episodes / episodes from each episode's own win flag (a
    timeout or a StarCraft II restart is a loss); the mean team return and length."""
    n = envs.num_envs
    remaining = np.array([args.eval_episodes // n + (k < args.eval_episodes % n) for k in range(n)])
    observation, _ = envs.reset(seed=[args.seed * 50000 + 10000 * k for k in range(n)])
    h = torch.zeros(actor.n_agents, n, args.hidden_size, device=next(actor.parameters()).device)
    masks = torch.ones(1, n, device=h.device)
    episode_return = np.zeros(n)
    episode_length = np.zeros(n)
    episodes = []
    while remaining.any():
        obs = torch.as_tensor(observation["obs"], device=h.device).transpose(0, 1)[:, None]
        logits, h = actor(obs, h, masks, torch.as_tensor(observation["avail"], device=h.device).transpose(0, 1)[:, None])
        observation, reward, terminated, truncated, info = envs.step(logits[:, 0].argmax(-1).T.cpu().numpy())
        episode_return += reward
        episode_length += 1
        done = terminated | truncated
        episodes += list(
            zip(
                info["won"][done & (remaining > 0)],
                episode_return[done & (remaining > 0)],
                episode_length[done & (remaining > 0)],
            )
        )
        remaining[done & (remaining > 0)] -= 1
        episode_return[done] = 0
        episode_length[done] = 0
        masks = torch.as_tensor(~done, dtype=torch.float32, device=h.device)[None]  # a new episode starts from h = 0
        if done.any() and remaining.any():
            observation, _ = envs.reset(options={"reset_mask": done})
    won, returns, lengths = (np.array(column, dtype=np.float64) for column in zip(*episodes))
    return dict(win_rate=won.mean(), episodic_return=returns.mean(), episodic_length=lengths.mean(), num_episodes=len(won))


# ==== 10. CHECKPOINTS ====
def load_checkpoint(args):
    """Read --checkpoint (one line if it is not a checkpoint of these scripts). --resume and --eval-only take its task,
    shape and settings, and a few from the command line (--resume: a longer run; --eval-only: seed and episodes)."""
    if args.checkpoint is None:
        if args.resume or args.eval_only:
            fail(f"--{'resume' if args.resume else 'eval-only'} needs --checkpoint PATH (a checkpoint.pt of these scripts)")
        return args, None
    try:
        checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a missing or unreadable file gets the same one-line answer
        fail(f"--checkpoint {args.checkpoint!r} cannot be read as a checkpoint ({type(error).__name__})")
    if not isinstance(checkpoint, dict) or not {"args", "actor", "phase"} <= set(checkpoint):
        fail(f"--checkpoint {args.checkpoint!r} is not a checkpoint of these scripts (adapters.pt holds adapters only)")
    if args.resume or args.eval_only:
        keep = ["cuda", "threads", "checkpoint", "resume", "eval_only", "run_dir", "async_envs"]
        keep += ["seed", "eval_episodes", "max_episode_steps"] if args.eval_only else ["total_timesteps"]
        saved = {key: value for key, value in checkpoint["args"].items() if key in Args.__dataclass_fields__}
        args = Args(**{**saved, **{key: getattr(args, key) for key in keep if hasattr(args, key)}})
        args.total_timesteps = args.total_timesteps or saved["total_timesteps"]
    return args, checkpoint


def check_checkpoint(args, checkpoint):
    """One line if the checkpoint is of another task or shape, or one this share mode cannot start from."""
    saved = checkpoint["args"]
    for key in TASK_KEYS:
        if saved[key] != getattr(args, key):
            flag = f"--{key.replace('_', '-')} {saved[key]}"
            fail(f"--checkpoint is for {key}={saved[key]!r}, this run has {getattr(args, key)!r}; accepted: {flag}")
    accepted = {"ps": ("ps",), "lorasa": ("ps", "lora"), "nps": ("nps",)}[args.share_mode]
    if checkpoint["phase"] not in accepted:
        source = f"a phase-{checkpoint['phase']} policy ({saved['share_mode']} run)"
        fail(f"--checkpoint holds {source}, which --share-mode {args.share_mode} cannot load; accepted: {' '.join(accepted)}")
    for key in ("rank", "lora_alpha", "lora_layers", "train_agent_bias") if checkpoint["phase"] == "lora" else ():
        if saved[key] != getattr(args, key):  # trained adapters must fit
            fail(f"--checkpoint has adapters with {key}={saved[key]!r}, this run has {getattr(args, key)!r}")
    if not args.eval_only and checkpoint["global_step"] >= args.total_timesteps:
        step = checkpoint["global_step"]
        fail(f"--total-timesteps {args.total_timesteps} leaves nothing to train after step {step}; accepted: > {step}")


def make_run_dir(args):
    """The run's folder: with --resume the checkpoint's own, otherwise a new one under --run-dir (never an existing
    folder); one line if it cannot be written."""
    name = f"{args.task}__{args.exp_name}__{args.share_mode}-r{args.rank}__{args.seed}__{int(time.time())}"
    path = os.path.dirname(os.path.abspath(args.checkpoint)) if args.resume else os.path.join(args.run_dir, name)
    while not args.resume and os.path.exists(path):  # a run of the same name started in the same second
        path += "+"
    try:
        os.makedirs(path, exist_ok=args.resume)
        if not os.access(path, os.W_OK):
            raise PermissionError(path)
    except OSError as error:
        fail(f"--run-dir {args.run_dir!r}: cannot write {path!r} ({type(error).__name__}); accepted: a writable folder")
    return path


def save_checkpoint(path, payload, actor):
    """Write `payload` atomically, and beside a checkpoint.pt of phase lora adapters.pt (per adapted layer A (N, r, in),
    B (N, out, r), bias (N, out), scaling; the log-std offsets (N, act_dim)). Refuses non-finite weights (docs §8)."""
    for key in ("actor", "critic"):
        if not all(tensor.isfinite().all() for tensor in payload[key].values() if tensor.is_floating_point()):
            raise FloatingPointError(f"non-finite {key} weights")
    files = {path: payload}
    if os.path.basename(path) == "checkpoint.pt" and actor.lora_on:
        adapters = {"log_std_offset": stack(actor.lora_std).detach().cpu()} if hasattr(actor, "lora_std") else {}
        for name, module in actor.named_modules():
            if isinstance(module, LoRALinear) and module.adapted:
                parts = dict(A=module.lora_A, B=module.lora_B, bias=module.lora_bias)
                adapters[name] = {key: stack(part).detach().cpu() for key, part in parts.items()}
                adapters[name]["scaling"] = module.scaling
        files[os.path.join(os.path.dirname(path), "adapters.pt")] = adapters
    for file, content in files.items():
        torch.save(content, f"{file}.tmp{os.getpid()}")
        os.replace(f"{file}.tmp{os.getpid()}", file)


# ==== 11. MAIN ====
if __name__ == "__main__":
    args, checkpoint = load_checkpoint(tyro.cli(Args))
    args = finalize_args(args)
    resolve_backend(args)
    if checkpoint is not None:
        check_checkpoint(args, checkpoint)
    run_path = None if args.eval_only else make_run_dir(args)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cuda and device.type != "cuda":
        warnings.warn("--cuda given but CUDA is not available: running on the CPU")
    # one torch thread in rollouts and evaluation: idle worker threads spin after every small matmul and slow the env
    # steps next to them (README, Performance); the update uses --threads
    torch.set_num_threads(1)

    # env setup: StarCraft II as the reference (eval: one env running all episodes), SMAX vectorised
    envs, observation = make_envs(args, [args.seed + 1000 * k for k in range(args.num_envs)])
    eval_count = args.eval_episodes if args.env_backend == "smax" else 1
    eval_envs, _ = make_envs(args, [args.seed * 50000 + 10000 * k for k in range(eval_count)])
    n_agents, obs_dim = envs.single_observation_space["obs"].shape
    state_dim = envs.single_observation_space["state"].shape[1]
    n_actions = envs.single_observation_space["avail"].shape[1]
    actor = CategoricalActor(obs_dim, n_actions, n_agents, args).to(device)
    critic = Critic(state_dim, n_agents, args).to(device)
    value_norm = ValueNorm(n_agents).to(device)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate, eps=args.adam_eps)
    phase = "nps" if args.share_mode == "nps" else "ps"
    global_step = 0
    iteration = 0
    if checkpoint is not None:
        # a PS-phase checkpoint gives the shared weights only: this run's adapters keep their init (dW = 0; any rank,
        # alpha, layer set and init); any other checkpoint loads strictly
        ps_checkpoint = checkpoint["phase"] == "ps"
        actor_state = {key: value for key, value in checkpoint["actor"].items() if "lora_" not in key or not ps_checkpoint}
        actor.load_state_dict(actor_state, strict=not ps_checkpoint)
        critic.load_state_dict(checkpoint["critic"])
        value_norm.load_state_dict(checkpoint["value_norm"])
        critic_optim.load_state_dict(checkpoint["critic_optim"])
        global_step = checkpoint["global_step"]  # the x-axis continues
        iteration = checkpoint["iteration"] if args.resume else global_step // args.batch_size
        if args.resume:
            phase = checkpoint["phase"]
        elif args.share_mode == "lorasa":  # a PS checkpoint starts the fine-tuning at once
            phase = "lora"
    actor_groups, actor_optims = start_phase(actor, phase, args)
    merge(critic)
    if args.resume:
        for optimizer, state in zip(actor_optims, checkpoint["actor_optim"]):
            optimizer.load_state_dict(state)
        torch.set_rng_state(checkpoint["rng"]["torch"])  # the only generator the training loop draws from
        if device.type == "cuda" and checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])

    if args.eval_only:
        result = evaluate(args, actor, eval_envs)
        returns = f"return {result['episodic_return']:.2f}, {result['num_episodes']} episodes"
        print(f"eval {args.task} step {global_step}: win rate {result['win_rate']:.3f}, {returns}")
        sys.exit(0)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_path)
    packages = ["torch", "jax", "jaxmarl"] if args.env_backend == "smax" else ["torch", "pysc2", "smac", "smacv2"]
    versions = {}
    for package in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    if args.env_backend == "sc2":  # the game's build: the newest Versions/Base* folder, as pysc2 picks it
        versions["sc2_build"] = max(os.listdir(os.path.expanduser(os.environ.get("SC2PATH", "~/StarCraftII") + "/Versions")))
    hparams = {**vars(args), "n_agents": n_agents, "device": str(device), **{f"version/{k}": v for k, v in versions.items()}}
    table = "\n".join(f"|{key}|{str(value).replace('|', '&#124;')}|" for key, value in hparams.items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    shared = sum(p.numel() for n, p in actor.named_parameters() if "lora_" not in n) // (n_agents if phase == "nps" else 1)
    adapters = [p for n, p in actor.named_parameters() if "lora_" in n and ("lora_bias" not in n or args.train_agent_bias)]
    counts = dict(shared_params=shared, adapter_params_per_agent=sum(p.numel() for p in adapters) // n_agents)
    counts.update(nps_params=n_agents * shared, critic_params=sum(p.numel() for p in critic.parameters()))  # one each
    for key, value in counts.items():
        writer.add_scalar(f"lorasa/{key}", value, global_step)
    print(f"{os.path.basename(run_path)}: {n_agents} agents, obs {obs_dim}, state {state_dim}, actions {n_actions}; {counts}")

    buf = RolloutBuffer(args, n_agents, obs_dim, state_dim, n_actions, device)
    buf.put_obs(0, observation)
    last_checkpoint = args.checkpoint
    stop = []

    def save(name):
        global last_checkpoint
        if args.save_model:
            rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else [])
            state = dict(actor=actor.state_dict(), critic=critic.state_dict(), value_norm=value_norm.state_dict(), rng=rng)
            state.update(actor_optim=[o.state_dict() for o in actor_optims], critic_optim=critic_optim.state_dict())
            run = dict(args=dataclasses.asdict(args), phase=phase, global_step=global_step, iteration=iteration)
            save_checkpoint(os.path.join(run_path, name), {**run, **state, "versions": versions}, actor)
            last_checkpoint = os.path.join(run_path, name)

    def evaluate_and_save():
        start = time.time()
        result = evaluate(args, actor, eval_envs)
        for key, value in result.items():
            writer.add_scalar(f"eval/{key}", value, global_step)
        writer.add_scalar("perf/eval_s", time.time() - start, global_step)
        print(f"  eval @ step {global_step}: win rate {result['win_rate']:.3f}, return {result['episodic_return']:.2f}")
        save("checkpoint.pt")

    def on_ctrl_c(signum, frame):
        """First Ctrl-C: finish the iteration, save, exit 130 (no half-applied update is saved); second: quit now."""
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print("Ctrl-C: finishing this iteration, then saving a checkpoint (Ctrl-C again quits at once)", file=sys.stderr)

    signal.signal(signal.SIGINT, on_ctrl_c)
    start_step = global_step
    start_time = time.time()
    try:
        if not args.resume:
            evaluate_and_save()
        while iteration < args.num_iterations and not stop:
            iteration += 1
            if phase == "ps" and args.share_mode == "lorasa" and global_step >= args.lora_start:
                save("ps_checkpoint.pt")
                phase = "lora"
                actor_groups, actor_optims = start_phase(actor, phase, args)  # the policy is unchanged: dW = 0
                print(f"  phase switch at step {global_step}: shared actor frozen, adapters on")

            rollout_start = time.time()
            finished, env_seconds = collect_rollout(args, envs, actor, buf)
            global_step += args.batch_size
            rollout_seconds = time.time() - rollout_start

            update_start = time.time()
            torch.set_num_threads(args.threads)
            critic_values(critic, buf)  # V(s_t) for GAE and the value clip
            returns, advantages = compute_returns(args, buf, value_norm)
            optimizers = (actor_optims, actor_groups, critic_optim)
            stats = update(args, actor, critic, value_norm, *optimizers, buf, returns, advantages, phase)
            merge(actor, critic)  # rollouts and evaluation use the merged weights
            torch.set_num_threads(1)
            update_seconds = time.time() - update_start

            values = value_norm.denormalize(buf.values[:, :-1])
            stats["losses/explained_variance"] = (1 - (returns - values).var() / returns.var()).item()
            stats["charts/dead_ratio"] = 1 - buf.active[:, 1:].mean().item()
            buf.roll()
            stats["charts/SPS"] = int((global_step - start_step) / (time.time() - start_time))
            stats["charts/learning_rate"] = args.learning_rate
            stats["charts/phase"] = {"ps": 0, "lora": 1, "nps": 2}[phase]
            stats.update({"perf/rollout_s": rollout_seconds, "perf/update_s": update_seconds})
            stats.update({"perf/SPS_env": args.batch_size / env_seconds, "perf/SPS_update": args.batch_size / update_seconds})
            stats["lorasa/trainable_params"] = sum(p.numel() for group in actor_groups for p in group)
            with torch.no_grad():  # how far each agent's weights moved from the shared ones: sum_l ||s B_i A_i||_F
                adapted = [m for m in actor.modules() if getattr(m, "adapted", False)]
                deltas = [m.scaling * torch.linalg.matrix_norm(torch.bmm(stack(m.lora_B), stack(m.lora_A))) for m in adapted]
            for i in range(n_agents):
                stats[f"lorasa/delta_norm/agent_{i}"] = sum(delta[i].item() for delta in deltas)
            if finished:
                stats["charts/episodic_return"] = float(np.mean([r for r, _, _ in finished]))
                stats["charts/episodic_length"] = float(np.mean([n for _, n, _ in finished]))
                stats["charts/win_rate"] = float(np.mean([won for _, _, won in finished]))  # stochastic training episodes
            for key, value in stats.items():
                writer.add_scalar(key, value, global_step)
            episodic = f"win rate {stats['charts/win_rate']:.3f}" if finished else "win rate   n/a"
            times = f"rollout {rollout_seconds:.2f}s update {update_seconds:.2f}s"
            print(f"iter {iteration}/{args.num_iterations} step {global_step} phase {phase} {episodic} | {times}", flush=True)
            if iteration % args.eval_interval == 0 or iteration == args.num_iterations:
                evaluate_and_save()
        if stop:
            save("checkpoint.pt")
            print(f"interrupted: checkpoint of step {global_step} saved in {run_path}", file=sys.stderr)
    except FloatingPointError as error:
        last = last_checkpoint or "none (--no-save-model, or none written yet)"
        print(f"error: training diverged at step {global_step} ({error}); the last good checkpoint is {last}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print(f"quit at step {global_step}; the last checkpoint in {run_path} is kept", file=sys.stderr)
        sys.exit(130)
    finally:
        writer.close()
    envs.close()
    eval_envs.close()
    sys.exit(130 if stop else 0)
