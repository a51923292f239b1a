# ==== 1. DOCSTRING ====
"""A2PO + LoRASA on Multi-Agent MuJoCo (gymnasium-robotics `mamujoco_v1`), in one self-contained file.

LoRASA (Zhang, Kapoor & Sun, "Low-Rank Agent-Specific Adaptation (LoRASA) for Multi-Agent Policy Learning", ICML 2025,
arXiv 2502.05573) trains one recurrent policy shared by all agents (phase ps), then freezes it and trains per-agent
low-rank adapters on every layer (phase lora): agent i acts with W_i = W0 + (alpha / r) B_i A_i. Reference code:
github.com/ZBN111/ICML2025_LoRASA (a fork of github.com/xihuai18/A2PO-ICLR2023). docs/method.md: the method as
implemented, each equation with its place in this file; docs/decisions.md: the deviations from the reference below.
A2PO (Wang et al., "Order Matters: Agent-by-agent Policy Optimization", ICLR 2023, arXiv 2302.06205) updates the agents
one at a time in a semi-greedy order, multiplies each agent's ratio by the clipped product of the ratios of the agents
updated before it, widens the clip with the position and re-estimates the advantages with truncated importance traces
(docs/method.md §11). Everything but the update rule, its arguments and its trace functions is mappo_lorasa_mamujoco.py.

Usage (one run does both phases; the switch is at --lora-start env steps, by default a quarter of the run):
    python a2po_lorasa_mamujoco.py --scenario HalfCheetah --agent-conf 2x3        # ps pretraining, then lora
    python a2po_lorasa_mamujoco.py --checkpoint runs/<run>/ps_checkpoint.pt       # lora fine-tuning of a ps policy
    python a2po_lorasa_mamujoco.py --share-mode ps    # baselines: ps (one shared policy), nps (one per agent)
Tested with torch 2.13.0, gymnasium 1.3.0, gymnasium-robotics 1.4.2, mujoco 4.0.0, tyro 1.0.17, Python 3.11.

Deviations from the reference (docs/decisions.md), each commented where it happens:
  FIX 1 no policy-side action scaling; 2 symmetric Huber loss; 3 self-contained checkpoints, both phases in one run;
  4 value normalisers checkpointed; 5 per-agent parameter groups by construction; 6 the critic's own learning rate;
  7 the command line wins; 8 phase lora freezes every shared actor parameter; 9 one GRU cell, explicit merge(); 11
  per-agent logged losses; 12 padded action dims masked; 21 time-limit truncations bootstrapped from the true final
  observation; 26 the critic optimiser and value normalisers continue across the switch; 29 paired seeds.
  SIMPLIFY 17 A, B adapters everywhere; 22 no per-vector z-scoring. KEEP 16 adapter init A = 0, B random; 18 agent
  biases untrained; 19 Gaussian ratio and clip per action dim; 20 squashed Gaussian; 25 one value normaliser per agent;
  27 no root features. A2PO: FIX 10 the other agents' ratios under no_grad; KEEP 13 the ppo loop gives every agent the
  first position's clip; 14 the ppo loop multiplies over every other agent; 15 the retrace trace applies lambda twice;
  23 trace ratios one step at a time from the stored hidden states; 24 order score |A / V| with normalised V; 30 the
  critic fits the traced returns, loss / n.
  Also: gymnasium v5 tasks (the reference: gym v2), so returns are not comparable with the paper's.
"""

# ==== 2. IMPORTS ====
import contextlib
import dataclasses
import functools
import importlib.metadata
import math
import os
import random
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
BUILTIN_CONFS = {  # the MuJoCo tasks and their built-in agent partitions (gymnasium-robotics 1.4.2)
    "HalfCheetah": ("2x3", "6x1"), "Ant": ("2x4", "2x4d", "4x2"), "Walker2d": ("2x3",), "Hopper": ("3x1",),
    "Humanoid": ("9|8",), "HumanoidStandup": ("9|8",), "Reacher": ("2x1",), "Swimmer": ("2x1",), "Pusher": ("3p",),
    "CoupledHalfCheetah": ("1p1",),
}  # fmt: skip


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
    truncation_bootstrap: bool = True  # bootstrap time-limit truncations (FIX 21; off: the reference)

    share_mode: Literal["ps", "lorasa", "nps"] = "lorasa"  # lorasa: ps until --lora-start, then per-agent adapters
    rank: int = 8  # adapter rank r
    lora_alpha: Optional[float] = None  # adapters are scaled by alpha / r (default alpha = rank)
    lora_layers: Tuple[LayerName, ...] = LAYER_NAMES  # adapted layers (placement ablation)
    lora_start: Optional[int] = None  # env step of the phase switch (default total_timesteps // 4)
    lora_init: Literal["reference", "standard"] = "reference"  # A = 0, B random (KEEP 16) | A random, B = 0
    train_agent_bias: bool = False  # also train the per-agent adapter biases (KEEP 18)

    scenario: Literal[tuple(BUILTIN_CONFS)] = "HalfCheetah"  # MuJoCo task
    agent_conf: str = "2x3"  # agent partition: built-in, Walker2d 3x2 (the reference's) or one joint per agent (6x1)
    agent_obsk: int = 1  # observation depth k of the agents' local views
    obs_mode: Optional[Literal["local_k", "global"]] = None  # global: every agent sees state() (default: Humanoid*)
    max_episode_steps: int = 1000  # time limit of an episode (episodes are truncated there)
    mask_padded_actions: bool = True  # mask padded action dims (Humanoid 9|8) out of the policy loss (FIX 12)
    per_dim_ratio: bool = True  # ratio and clip per action dim, summed (KEEP 19); off: one joint ratio
    async_envs: bool = False  # step the envs in subprocesses (AsyncVectorEnv); pays off only with many cores

    a2po_loop: Literal["agent", "ppo"] = "agent"  # agent: each agent runs all its epochs in turn; ppo: epochs outside
    a2po_order: Literal["semi_greedy", "random", "cyclic", "greedy"] = "semi_greedy"  # agent order (cyclic: 0 ... n-1)
    a2po_clip_schedule: Literal["reference", "position"] = "reference"  # reference: KEEP 13 in the ppo loop
    a2po_others: Literal["reference", "preceding"] = "reference"  # reference: KEEP 14 in the ppo loop
    others_clip_coef: float = 0.1  # clip eps_o of the other agents' ratio product (clipped as a whole)
    clip_tuner_weight: float = 0.5  # w of the clip schedule eps_k = eps (w k / n + 1 - w)
    trace_variant: Optional[Literal["retrace", "speedup"]] = None  # default: retrace on HalfCheetah, else speedup
    trace_clip: float = 1.0  # truncation c of the ratios in the retrace trace
    trace_lambda_squared: bool = True  # KEEP 15: the retrace trace decays with gamma lambda^2 (off: Retrace-GAE)
    two_stage: bool = True  # per agent and epoch, a critic-only pass over its minibatches first
    approx_trace: bool = True  # the critic regresses onto the traced returns (KEEP 30; off: the GAE returns)


# The reference's settings (docs/method.md §10) for every task and where a task differs; the command line wins.
SUITE_DEFAULTS = dict(num_envs=16, num_steps=250, update_epochs=3, gae_lambda=0.93, learning_rate=3e-4, ent_coef=0.0,
                      critic_learning_rate=3e-4, eval_episodes=10, total_timesteps=12_000_000)  # fmt: skip
TASK_DEFAULTS = {
    ("HalfCheetah", "2x3"): dict(update_epochs=5),
    ("Ant", "4x2"): dict(num_envs=25, num_steps=160),
    ("Humanoid", "9|8"): dict(num_envs=25, num_steps=160, gae_lambda=0.90),
}
TASK_KEYS = ("scenario", "agent_conf", "agent_obsk", "obs_mode", "hidden_size")  # a checkpoint fits only its own task
POSITIVE = (
    "threads", "total_timesteps", "num_envs", "num_steps", "learning_rate", "critic_learning_rate", "update_epochs",
    "num_minibatches", "data_chunk_length", "clip_coef", "value_clip_coef", "vf_coef", "max_grad_norm", "huber_delta",
    "adam_eps", "hidden_size", "eval_interval", "eval_episodes", "rank", "lora_alpha", "max_episode_steps",
)  # fmt: skip


def fail(message):
    """One line on stderr, no traceback, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def finalize_args(args):
    """Fill the per-task defaults the command line left unset, derive the sizes and check every value: one line naming
    the value and the accepted ones for each problem, before any env or network is built."""
    for key, value in {**SUITE_DEFAULTS, **TASK_DEFAULTS.get((args.scenario, args.agent_conf), {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.obs_mode = args.obs_mode or ("global" if args.scenario.startswith("Humanoid") else "local_k")
    args.lora_alpha = float(args.rank) if args.lora_alpha is None else args.lora_alpha
    args.lora_start = args.total_timesteps // 4 if args.lora_start is None else args.lora_start
    for key in POSITIVE:
        if not getattr(args, key) > 0:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid; accepted: > 0")
    for key in ("gamma", "gae_lambda"):
        if not 0 < getattr(args, key) <= 1:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid; accepted: 0 < value <= 1")
    for key in ("ent_coef", "agent_obsk"):
        if not getattr(args, key) >= 0:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid; accepted: >= 0")
    if args.num_steps % args.data_chunk_length:
        fail(f"--num-steps {args.num_steps} is invalid; accepted: multiples of --data-chunk-length {args.data_chunk_length}")
    view = f"local{args.agent_obsk}" if args.obs_mode == "local_k" else "global"
    args.task = f"{args.scenario}-{args.agent_conf.replace('|', '_')}-{view}"  # in the run name and the logs
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    if args.num_iterations < 1:
        fail(f"--total-timesteps {args.total_timesteps} is below one iteration; accepted: >= {args.batch_size}")
    if args.num_minibatches > args.batch_size // args.data_chunk_length:
        fail(f"--num-minibatches {args.num_minibatches} is invalid; accepted: <= {args.batch_size // args.data_chunk_length}")
    if not 0 <= args.lora_start <= args.total_timesteps:
        fail(f"--lora-start {args.lora_start} is invalid; accepted: 0 ... --total-timesteps ({args.total_timesteps})")
    if args.trace_variant is None:  # the reference's: speedup trace everywhere but on HalfCheetah
        args.trace_variant = "retrace" if args.scenario == "HalfCheetah" else "speedup"
    for key in ("others_clip_coef", "trace_clip"):
        if not getattr(args, key) > 0:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid; accepted: > 0")
    if not 0 <= args.clip_tuner_weight <= 1:
        fail(f"--clip-tuner-weight {args.clip_tuner_weight} is invalid; accepted: 0 ... 1")
    return args


# ==== 4. ENVIRONMENT ====
WALKER2D_3X2 = (("foot_joint", "leg_joint"), ("thigh_joint", "foot_left_joint"), ("leg_left_joint", "thigh_left_joint"))


def import_mamujoco():
    """Import MaMuJoCo without stray output (docs/method.md §9): its import prints a banner to stderr, and MuJoCo appends
    its `settotalmass` warning to MUJOCO_LOG.TXT in the working directory unless a warning handler is installed."""
    import mujoco

    def on_mujoco_warning(message):
        if "settotalmass" not in message:
            warnings.warn(f"MuJoCo: {message}")

    mujoco.set_mju_user_warning(on_mujoco_warning)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        from gymnasium_robotics import mamujoco_v1
        from gymnasium_robotics.envs.multiagent_mujoco.obsk import get_parts_and_edges
    return mamujoco_v1, get_parts_and_edges


class MaMuJoCoEnv(gym.Env):
    """One `mamujoco_v1.parallel_env` as a gymnasium.Env: observation {"obs": (N, obs_dim) [obs_i zero-padded, one-hot(i)],
    "state": (N, state_dim) [state(), one-hot(i)]} float32, action (N, act_dim) in [-1, 1], the shared team reward."""

    def __init__(self, scenario, agent_conf, agent_obsk=1, obs_mode="local_k", max_episode_steps=1000):
        mamujoco_v1, get_parts_and_edges = import_mamujoco()
        factorization = None
        if agent_conf not in BUILTIN_CONFS[scenario]:  # Walker2d 3x2 or one actuated joint per agent (docs/method.md §9)
            parts, edges, global_nodes = get_parts_and_edges(scenario, None) if scenario != "Pusher" else ([()], None, None)
            nodes = {node.label: node for node in parts[0]}
            custom = {
                f"{len(nodes)}x1": [(label,) for label in nodes],
                "3x2": WALKER2D_3X2 if scenario == "Walker2d" else None,
            }
            if custom.get(agent_conf) is None:
                accepted = " ".join([*BUILTIN_CONFS[scenario], *(conf for conf, groups in custom.items() if groups)])
                fail(f"--agent-conf {agent_conf!r} is not available for {scenario}; accepted: {accepted}")
            partition = [tuple(nodes[label] for label in group) for group in custom[agent_conf]]
            factorization = dict(partition=partition, edges=edges, globals=global_nodes)
        options = dict(agent_obsk=agent_obsk, agent_factorization=factorization, max_episode_steps=max_episode_steps)
        # KEEP 27: global_categories=(), the reference's local observations carry no root features
        self.env = mamujoco_v1.parallel_env(scenario, agent_conf, global_categories=(), **options)
        self.agents = self.env.possible_agents
        self.n_agents = len(self.agents)
        self.global_obs = obs_mode == "global"
        state_size = self.env.state().shape[0]
        self.obs_sizes = [state_size if self.global_obs else self.env.observation_space(a).shape[0] for a in self.agents]
        self.act_sizes = [self.env.action_space(a).shape[0] for a in self.agents]
        self.obs = np.zeros((self.n_agents, max(self.obs_sizes) + self.n_agents), np.float32)
        self.state = np.zeros((self.n_agents, state_size + self.n_agents), np.float32)
        self.obs[:, -self.n_agents :] = np.eye(self.n_agents)  # one-hot agent ids
        self.state[:, -self.n_agents :] = np.eye(self.n_agents)
        self.action_dims = np.array([[1.0] * k + [0.0] * (max(self.act_sizes) - k) for k in self.act_sizes], np.float32)
        spaces = [self.env.action_space(a) for a in self.agents]  # FIX 1: a in [-1, 1] -> low + (a + 1) (high - low) / 2
        self.action_scale = [(space.high - space.low) / 2 for space in spaces]
        self.action_offset = [(space.high + space.low) / 2 for space in spaces]
        self.observation_space = gym.spaces.Dict(
            obs=gym.spaces.Box(-np.inf, np.inf, self.obs.shape, np.float32),
            state=gym.spaces.Box(-np.inf, np.inf, self.state.shape, np.float32),
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, self.action_dims.shape, np.float32)

    def observe(self, obs):  # MaMuJoCo's float64 observations into the float32 arrays (the vector env copies them)
        state = self.env.state()
        self.state[:, : -self.n_agents] = state
        for i, agent in enumerate(self.agents):
            self.obs[i, : self.obs_sizes[i]] = state if self.global_obs else obs[agent]
        return dict(obs=self.obs, state=self.state)

    def reset(self, seed=None, options=None):
        obs, _ = self.env.reset(seed=seed)
        return self.observe(obs), {}

    def step(self, action):
        actions = {}
        for i, agent in enumerate(self.agents):  # FIX 1: [-1, 1] onto the joint bounds (Humanoid +-0.4); drop padding
            actions[agent] = self.action_offset[i] + self.action_scale[i] * action[i, : self.act_sizes[i]]
        obs, rewards, terminations, truncations, _ = self.env.step(actions)
        first = self.agents[0]  # the reward and the flags are the same for every agent
        return self.observe(obs), float(rewards[first]), bool(terminations[first]), bool(truncations[first]), {}


def make_envs(args, seeds):
    """One env per seed in gymnasium's SyncVectorEnv (AsyncVectorEnv) with autoreset off, and the first observation."""
    make_env = functools.partial(
        MaMuJoCoEnv, args.scenario, args.agent_conf, args.agent_obsk, args.obs_mode, args.max_episode_steps
    )
    vector_env = gym.vector.AsyncVectorEnv if args.async_envs else gym.vector.SyncVectorEnv
    envs = vector_env([make_env] * len(seeds), autoreset_mode=gym.vector.AutoresetMode.DISABLED)
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


class GaussianActor(RecurrentNetwork):
    """Squashed Gaussian (KEEP 20, docs/method.md §4): a = tanh(u), u ~ N(mean, 0.5 sigmoid(log_std + d_i)), d_i agent i's
    offset in phase lora. `action_dims` (N, act_dim): 1 on the agents' real action dims, 0 on padding (FIX 12)."""

    def __init__(self, obs_dim, act_dim, n_agents, args, action_dims=None):
        generator = torch.Generator().manual_seed(args.seed)  # the adapters' own generator (FIX 29)
        super().__init__(obs_dim, act_dim, n_agents, args.share_mode, args, 0.01, generator)
        if args.share_mode == "nps":
            self.log_std_i = nn.ParameterList([torch.ones(act_dim) for _ in range(n_agents)])
        else:
            self.log_std = nn.Parameter(torch.ones(act_dim))  # the reference's init 1.0 (sigma ~ 0.366)
        if args.share_mode == "lorasa":  # the per-agent offsets d_i train whenever the adapters do
            self.lora_std = nn.ParameterList([torch.zeros(act_dim) for _ in range(n_agents)])
        self.merged = None
        if action_dims is None or not args.mask_padded_actions:
            action_dims = torch.ones(n_agents, act_dim)
        self.register_buffer("action_dims", action_dims, persistent=False)

    def log_std_of(self, agents=None):
        if hasattr(self, "log_std_i"):
            return stack(self.log_std_i, agents)
        if self.lora_on:
            return self.log_std + stack(self.lora_std, agents)
        return self.log_std.expand(self.n_agents if agents is None else len(agents), -1)

    def merge_weights(self):
        with torch.no_grad():  # sigma does not depend on the state: once per update
            self.merged = 0.5 * torch.sigmoid(self.log_std_of())[:, None, None]

    def forward(self, obs, h, masks, agents=None):
        """obs (n, T, B, obs_dim) -> mean (n, T, B, act_dim), std (n, 1, 1, act_dim), hidden after the last step (n, B, H)."""
        mean, hs = super().forward(obs, h, masks, agents)
        merged = self.merged is not None and torch.is_inference_mode_enabled()  # all agents
        std = self.merged if merged else 0.5 * torch.sigmoid(self.log_std_of(agents))[:, None, None]
        return mean, std, hs[:, -1]


EPS = float(np.finfo(np.float32).eps)
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def squashed_log_prob(mean, std, action):
    """Per-dim log-prob of a = tanh(u), u ~ N(mean, std) (§4): log N(atanh(clamp(a, +-(1-eps))); mean, std) - log(1-a^2+eps)"""
    u = torch.atanh(action.clamp(-1 + EPS, 1 - EPS))
    return -0.5 * ((u - mean) / std).pow(2) - std.log() - LOG_SQRT_2PI - torch.log(1 - action.pow(2) + EPS)


def squashed_entropy(mean, std):
    """KEEP 20: a one-sample estimate per dim, H(N(mean, std)) + log(1 - tanh(u)^2 + eps), u ~ N(mean, std)."""
    u = mean + std * torch.randn_like(mean)
    return 0.5 + LOG_SQRT_2PI + std.log() + torch.log(1 - torch.tanh(u).pow(2) + EPS)


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
    an episode ended at step t - 1; bad_masks[t] = 0: a truncation whose advantage is zeroed (--no-truncation-bootstrap);
    boot[t] = 1: step t was a truncation bootstrapped from the true final state (FIX 21), valued final_values[:, t]."""

    def __init__(self, args, n_agents, obs_dim, state_dim, act_dim, device):
        N, T, E, H = n_agents, args.num_steps, args.num_envs, args.hidden_size
        self.obs = torch.zeros(N, T + 1, E, obs_dim, device=device)
        self.state = torch.zeros(N, T + 1, E, state_dim, device=device)
        self.actor_h = torch.zeros(N, T + 1, E, H, device=device)
        self.critic_h = torch.zeros(N, T + 1, E, H, device=device)
        self.masks = torch.ones(T + 1, E, device=device)
        self.bad_masks = torch.ones(T + 1, E, device=device)
        self.actions = torch.zeros(N, T, E, act_dim, device=device)
        self.means = torch.zeros(N, T, E, act_dim, device=device)
        self.logprobs = torch.zeros(N, T, E, act_dim, device=device)
        self.values = torch.zeros(N, T + 1, E, device=device)  # normalised; column T: the bootstrap value V_T
        self.rewards = torch.zeros(T, E, device=device)
        self.boot = torch.zeros(T, E, device=device)
        self.final_state = torch.zeros(N, T, E, state_dim, device=device)
        self.final_values = torch.zeros(N, T, E, device=device)
        self.episode_return = np.zeros(E)
        self.episode_length = np.zeros(E, dtype=np.int64)

    def put_obs(self, t, obs):
        self.obs[:, t] = torch.as_tensor(obs["obs"]).transpose(0, 1)
        self.state[:, t] = torch.as_tensor(obs["state"]).transpose(0, 1)

    def roll(self):
        for tensor in (self.obs, self.state, self.actor_h, self.critic_h):
            tensor[:, 0] = tensor[:, -1]
        self.masks[0] = self.masks[-1]


def collect_rollout(args, envs, actor, buf):
    """Fill the buffer with one sampled policy call for all envs and agents per step, resetting finished envs after their
    true final state is kept (FIX 21). Returns the finished episodes' (return, length) and the seconds in the envs."""
    T, E = args.num_steps, args.num_envs
    rewards = np.zeros((T, E), np.float32)
    terminated = np.zeros((T, E), bool)
    truncated = np.zeros((T, E), bool)
    finished = []
    env_seconds = 0.0
    noise = torch.randn(buf.actions.shape, device=buf.actions.device)  # u = mean + std * noise
    for t in range(T):
        with torch.inference_mode():
            mean, std, h = actor(buf.obs[:, t, None], buf.actor_h[:, t], buf.masks[t, None])
            buf.actor_h[:, t + 1] = h
            buf.actions[:, t] = torch.tanh(mean[:, 0] + std[:, 0] * noise[:, t])
            buf.means[:, t] = mean[:, 0]
        actions = buf.actions[:, t].transpose(0, 1).cpu().numpy()
        if not np.isfinite(actions).all():
            raise FloatingPointError("non-finite actions")
        start = time.time()
        obs, rewards[t], terminated[t], truncated[t], _ = envs.step(actions)
        done = terminated[t] | truncated[t]
        if done.any():
            buf.final_state[:, t] = torch.as_tensor(obs["state"]).transpose(0, 1)  # the true final state, before the reset
            obs, _ = envs.reset(options={"reset_mask": done})
        env_seconds += time.time() - start
        buf.put_obs(t + 1, obs)
        buf.masks[t + 1] = torch.as_tensor(~done)
        buf.episode_return += rewards[t]
        buf.episode_length += 1
        finished += list(zip(buf.episode_return[done], buf.episode_length[done]))
        buf.episode_return[done] = 0
        buf.episode_length[done] = 0
    time_limit = torch.as_tensor(truncated & ~terminated)  # a termination at the time limit is a termination
    buf.rewards.copy_(torch.as_tensor(rewards))
    buf.boot.copy_(time_limit & args.truncation_bootstrap)
    buf.bad_masks[1:] = 1.0 - (time_limit & (not args.truncation_bootstrap)).float()  # the reference zeroes A_t
    buf.logprobs.copy_(squashed_log_prob(buf.means, std, buf.actions))  # std does not depend on the state
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
    """Returns by GAE on values de-normalised per agent and advantages R - V standardised over all entries (§6); a
    bootstrapped truncation adds gamma V(s_final) to its reward (FIX 21; the episode still ends: m_{t+1} = 0)."""
    values = value_norm.denormalize(buf.values)
    rewards = buf.rewards + args.gamma * buf.boot * value_norm.denormalize(buf.final_values)
    returns = gae(rewards, values, buf.masks, buf.bad_masks, args.gamma, args.gae_lambda)
    advantages = returns - values[:, :-1]
    return returns, (advantages - advantages.mean()) / (advantages.std(correction=0) + 1e-5)


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
    optimiser, so that only agent i's policy changes in its turn."""
    N, T, E = buf.actions.shape[:3]
    data = dict(obs=buf.obs, state=buf.state, actor_h=buf.actor_h, critic_h=buf.critic_h, masks=buf.masks)
    data.update(actions=buf.actions, logprobs=buf.logprobs, values=buf.values)
    data.update(step=torch.arange(T * E).view(T, E))  # each (t, env)'s flat index: a minibatch's look-up of cached ratios
    dims = actor.action_dims[:, None, None]  # (N, 1, 1, act_dim): 0 on padded dims (FIX 12)
    ratio_dims = dims if args.per_dim_ratio else torch.ones_like(dims[..., :1])  # a ratio per dim, or one joint ratio
    rollout_advantages = advantages  # standardised GAE advantages: the first agent's
    traced_returns = returns.clone()
    targets = returns.clone()  # the critic's regression targets
    values = buf.values[:, :T]  # KEEP 24: the order score |A / V| with the normalised values (only a zero guarded)
    scores = (advantages / torch.where(values == 0, 1e-8, values)).abs().mean((1, 2))
    cache = {}  # whole-buffer ratio of each agent for the traces, dropped when its policy changes
    sequence_cache = {}  # the same on the training chunks, for the others' product
    stats = defaultdict(list)

    def mean_ratio(log_probs, old_log_probs, agents):
        """KEEP 19: the mean over the real dims of the per-dim ratios; with --no-per-dim-ratio the joint ratio."""
        log_ratio = (log_probs - old_log_probs) * dims[agents]
        if args.per_dim_ratio:
            return (log_ratio.exp() * dims[agents]).sum(-1) / dims[agents].sum(-1)
        return log_ratio.sum(-1).exp()

    @torch.no_grad()
    def buffer_ratios(agents):
        """r_j over the whole buffer, (len(agents), T, E), one step at a time from the stored rollout hidden states
        (KEEP 23, the reference's trace evaluation), batched over agents and steps."""
        todo = [j for j in agents if j not in cache]
        if todo:
            obs = buf.obs[todo, :T].reshape(len(todo), 1, T * E, -1)
            mean, std, _ = actor(obs, buf.actor_h[todo, :T].reshape(len(todo), T * E, -1), buf.masks[:T].reshape(1, -1), todo)
            log_probs = squashed_log_prob(mean, std, buf.actions[todo].reshape(len(todo), 1, T * E, -1))
            ratios = mean_ratio(log_probs, buf.logprobs[todo].reshape(len(todo), 1, T * E, -1), todo).view(len(todo), T, E)
            cache.update({j: ratio for j, ratio in zip(todo, ratios)})
        return torch.stack([cache[j] for j in agents])

    @torch.no_grad()
    def sequence_ratios(agents):
        """r_j over the whole buffer, (len(agents), T * E), evaluated on the training chunks from their stored start
        hidden states as the surrogate is, under no_grad (FIX 10), batched over agents."""
        todo = [j for j in agents if j not in sequence_cache]
        if todo:
            keys = ("obs", "actor_h", "actions", "logprobs")
            todo_data = dict({key: data[key][todo] for key in keys}, masks=buf.masks, step=data["step"])
            chunks = next(chunk_minibatches(todo_data, T, args.data_chunk_length, 1))
            mean, std, _ = actor(chunks["obs"], chunks["actor_h"], chunks["masks"], todo)
            ratios = mean_ratio(squashed_log_prob(mean, std, chunks["actions"]), chunks["logprobs"], todo)
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
        advantages = (gaps - gaps.mean()) / (gaps.std(correction=0) + 1e-5)  # standardised over all agents' entries
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
                mean, std, _ = actor(mb["obs"], mb["actor_h"], mb["masks"], [i])
                log_ratio = (squashed_log_prob(mean, std, mb["actions"]) - mb["logprobs"]) * dims[[i]]
                if not args.per_dim_ratio:  # KEEP 19: by default a ratio and a clip per action dim, summed
                    log_ratio = log_ratio.sum(-1, keepdim=True)
                ratio = log_ratio.exp() * others_ratio[..., None]
                advantage = mb["advantages"][..., None]
                surrogate = torch.min(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)
                policy_loss = -(surrogate * ratio_dims[[i]]).sum(-1)
                entropy = (squashed_entropy(mean, std) * dims[[i]]).sum(-1)
                loss = policy_loss.mean() - args.ent_coef * entropy.mean()
                optimizer.zero_grad()
                (loss / N if phase == "ps" else loss).backward()  # phase ps divides agent i's loss by n
                stats["actor_grad_norm"].append(clip_and_step([optimizer], [group], args.max_grad_norm))
                for j in range(N) if phase == "ps" else [i]:  # whose policy changed: everyone's (shared weights) or i's
                    cache.pop(j, None)
                    sequence_cache.pop(j, None)
                critic_step(i, mb)
                with torch.no_grad():
                    entries = (ratio_dims[[i]] * torch.ones_like(log_ratio)).sum().item()
                    stats["approx_kl"].append(((log_ratio.exp() - 1 - log_ratio) * ratio_dims[[i]]).sum().item() / entries)
                    stats["clipfrac"].append((((ratio - 1).abs() > eps) * ratio_dims[[i]]).sum().item() / entries)
                stats["policy_loss"].append(policy_loss.mean().item())
                stats["entropy"].append(entropy.mean().item())

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
    """Greedy evaluation (§8), one episode per eval env seeded 50000 seed + 10000 k every time: the mean team return."""
    n = envs.num_envs
    obs, _ = envs.reset(seed=[args.seed * 50000 + 10000 * k for k in range(n)])
    h = torch.zeros(actor.n_agents, n, args.hidden_size, device=actor.action_dims.device)
    masks = torch.ones(1, n, device=h.device)
    episode_return = np.zeros(n)
    episode_length = np.zeros(n)
    done = np.zeros(n, bool)
    while not done.all():
        mean, _, h = actor(torch.as_tensor(obs["obs"], device=h.device).transpose(0, 1)[:, None], h, masks)
        actions = torch.tanh(mean[:, 0]).transpose(0, 1).cpu().numpy()
        if not np.isfinite(actions).all():
            raise FloatingPointError("non-finite actions in evaluation")
        obs, reward, terminated, truncated, _ = envs.step(actions)
        episode_return += reward * ~done
        episode_length += ~done
        ended = terminated | truncated
        done |= ended
        if ended.any() and not done.all():  # keeps the vector env steppable; later episodes do not count
            obs, _ = envs.reset(options={"reset_mask": ended})
    return dict(episodic_return=episode_return.mean(), episodic_length=episode_length.mean(), num_episodes=n)


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
    if checkpoint is not None:
        check_checkpoint(args, checkpoint)
    # env setup: one env in this process first, so that a bad --agent-conf or env error surfaces before anything else
    env = MaMuJoCoEnv(args.scenario, args.agent_conf, args.agent_obsk, args.obs_mode, args.max_episode_steps)
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

    n_agents = env.n_agents
    obs_dim = env.obs.shape[1]
    state_dim = env.state.shape[1]
    act_dim = env.action_dims.shape[1]
    eval_envs, _ = make_envs(args, [args.seed * 50000 + 10000 * k for k in range(args.eval_episodes)])
    actor = GaussianActor(obs_dim, act_dim, n_agents, args, torch.as_tensor(env.action_dims)).to(device)
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
        print(f"eval {args.task} step {global_step}: return {result['episodic_return']:.2f}, {args.eval_episodes} runs")
        sys.exit(0)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_path)
    versions = {package: importlib.metadata.version(package) for package in ("torch", "gymnasium-robotics", "mujoco", "tyro")}
    hparams = {**vars(args), "n_agents": n_agents, "device": str(device), **{f"version/{k}": v for k, v in versions.items()}}
    table = "\n".join(f"|{key}|{str(value).replace('|', '&#124;')}|" for key, value in hparams.items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    shared = sum(p.numel() for n, p in actor.named_parameters() if "lora_" not in n) // (n_agents if phase == "nps" else 1)
    adapters = [p for n, p in actor.named_parameters() if "lora_" in n and ("lora_bias" not in n or args.train_agent_bias)]
    counts = dict(shared_params=shared, adapter_params_per_agent=sum(p.numel() for p in adapters) // n_agents)
    counts.update(nps_params=n_agents * shared, critic_params=sum(p.numel() for p in critic.parameters()))  # one each
    for key, value in counts.items():
        writer.add_scalar(f"lorasa/{key}", value, global_step)
    print(f"{os.path.basename(run_path)}: {n_agents} agents, obs {obs_dim}, state {state_dim}, act {act_dim}; {counts}")

    envs, obs = make_envs(args, [args.seed + 1000 * k + global_step for k in range(args.num_envs)])  # resume: new seeds
    buf = RolloutBuffer(args, n_agents, obs_dim, state_dim, act_dim, device)
    buf.put_obs(0, obs)
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
        print(f"  eval @ step {global_step}: return {result['episodic_return']:.2f}, length {result['episodic_length']:.1f}")
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
            for i, log_std in enumerate(actor.log_std_of().mean(-1).tolist()):
                stats[f"lorasa/delta_norm/agent_{i}"] = sum(delta[i].item() for delta in deltas)
                stats[f"lorasa/log_std/agent_{i}"] = log_std
            if finished:
                stats["charts/episodic_return"] = float(np.mean([r for r, _ in finished]))
                stats["charts/episodic_length"] = float(np.mean([n for _, n in finished]))
            for key, value in stats.items():
                writer.add_scalar(key, value, global_step)
            episodic = f"return {stats['charts/episodic_return']:9.2f}" if finished else "return       n/a"
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
