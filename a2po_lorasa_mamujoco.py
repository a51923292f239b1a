# ==== 1. DOCSTRING ====
"""A2PO + LoRASA on Multi-Agent MuJoCo (gymnasium-robotics `mamujoco_v1`), in one file.

LoRASA (Zhang, Kapoor & Sun, ICML 2025, arXiv 2502.05573) trains one recurrent policy shared by all
agents (phase ps), then freezes it and trains low-rank adapters per agent on every layer (phase
lora): agent i acts with W_i = W0 + (alpha / r) B_i A_i. One run does both phases. A2PO (Wang et
al., ICLR 2023, arXiv 2302.06205) updates the agents one at a time (docs/method.md §11).

    python a2po_lorasa_mamujoco.py --scenario HalfCheetah --agent-conf 2x3  # ps, then lora
    python a2po_lorasa_mamujoco.py --checkpoint runs/<run>/ps_checkpoint.pt  # lora from ps
    python a2po_lorasa_mamujoco.py --share-mode nps  # the baselines: ps, nps

docs/method.md maps each equation to its function here; docs/decisions.md explains each deviation
from the reference code (github.com/ZBN111/ICML2025_LoRASA), cited in comments as FIX/KEEP n.
Jump to: LoRALinear (the LoRA layer), start_phase (the switch), update (A2PO's order loop).
"""

# ==== 2. IMPORTS ====
import argparse
import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import math
import multiprocessing
import os
import random
import signal
import subprocess
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
# MuJoCo tasks and their built-in agent partitions (gymnasium-robotics 1.4.2)
BUILTIN_CONFS = {
    "HalfCheetah": ("2x3", "6x1"),
    "Ant": ("2x4", "2x4d", "4x2"),
    "Walker2d": ("2x3",),
    "Hopper": ("3x1",),
    "Humanoid": ("9|8",),
    "HumanoidStandup": ("9|8",),
    "Reacher": ("2x1",),
    "Swimmer": ("2x1",),
    "Pusher": ("3p",),
    "CoupledHalfCheetah": ("1p1",),
}


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
    capture_video: bool = False  # film 10 s of each evaluation's first episode (<run>/videos)

    total_timesteps: int = 12_000_000  # env steps of the whole run (--resume: may extend it)
    num_envs: int = 16  # parallel training envs
    num_steps: int = 250  # rollout steps per env and iteration
    learning_rate: float = 3e-4  # actor Adam learning rate (the adapters' in phase lora)
    critic_learning_rate: float = 3e-4  # critic Adam learning rate
    update_epochs: int = 3  # PPO epochs per iteration
    num_minibatches: int = 1  # minibatches per epoch (reference: 1)
    data_chunk_length: int = 10  # length of the recurrent training chunks
    gamma: float = 0.99  # discount factor
    gae_lambda: float = 0.93  # GAE lambda
    clip_coef: float = 0.2  # PPO ratio clip
    value_clip_coef: float = 0.2  # value clip around the rollout's value
    ent_coef: float = 0.0  # entropy coefficient
    vf_coef: float = 1.0  # value loss coefficient
    max_grad_norm: float = 10.0  # gradient-norm clip (per agent in phase lora and nps)
    huber_delta: float = 10.0  # delta of the Huber value loss
    adam_eps: float = 1e-5  # Adam epsilon
    hidden_size: int = 64  # width of every hidden layer
    eval_interval: int = 50  # evaluate and save every this many iterations (and first and last)
    eval_episodes: int = 10  # greedy evaluation episodes
    truncation_bootstrap: bool = True  # bootstrap time-limit truncations (FIX 21; off: reference)

    share_mode: Literal["ps", "lorasa", "nps"] = "lorasa"  # lorasa: ps, then adapters per agent
    rank: int = 8  # adapter rank r
    lora_alpha: Optional[float] = None  # adapters are scaled by alpha / r (default: alpha = rank)
    lora_layers: Tuple[LayerName, ...] = get_args(LayerName)  # adapted layers (placement ablation)
    lora_start: Optional[int] = None  # env step of the switch (default: total_timesteps // 4)
    lora_init: Literal["reference", "standard"] = "reference"  # A = 0 (KEEP 16) or B = 0
    train_agent_bias: bool = False  # also train the adapters' per-agent biases (KEEP 18)

    scenario: Literal[tuple(BUILTIN_CONFS)] = "HalfCheetah"  # MuJoCo task
    agent_conf: str = "2x3"  # agent partition: built-in, Walker2d 3x2 or one joint each (6x1)
    agent_obsk: int = 1  # observation depth k of the agents' local views
    obs_mode: Literal["local_k", "global"] = "local_k"  # global: every agent sees state()
    max_episode_steps: int = 1000  # episodes are truncated at this time limit
    mask_padded_actions: bool = True  # mask padded action dims (Humanoid 9|8) in the loss (FIX 12)
    per_dim_ratio: bool = True  # ratio and clip per action dim, summed (KEEP 19); off: joint
    async_envs: bool = False  # step the envs in subprocesses; pays off only with many cores

    a2po_loop: Literal["agent", "ppo"] = "agent"  # agent: turns run all epochs; ppo: epochs outside
    a2po_order: Literal["semi_greedy", "random", "cyclic", "greedy"] = "semi_greedy"  # agent order
    a2po_clip_schedule: Literal["reference", "position"] = "reference"  # KEEP 13 in the ppo loop
    a2po_others: Literal["reference", "preceding"] = "reference"  # KEEP 14 in the ppo loop
    others_clip_coef: float = 0.1  # clip eps_o of the other agents' ratio product (as a whole)
    clip_tuner_weight: float = 0.5  # w of the clip schedule eps_k = eps (w k / n + 1 - w)
    trace_variant: Literal["retrace", "speedup"] = "speedup"  # advantage trace (docs/method.md §11)
    trace_clip: float = 1.0  # truncation c of the ratios in the retrace trace
    trace_lambda_squared: bool = True  # KEEP 15: retrace decays by gamma lam^2 (off: gamma lam)
    two_stage: bool = True  # per agent and epoch, a critic-only pass over its minibatches first
    approx_trace: bool = True  # the critic fits the traced returns (KEEP 30; off: the GAE returns)


# Where the reference's settings for a task differ from the defaults above (docs/method.md §10).
# They apply to the task that runs, the default one too (--help shows them); flags given still win.
TASK_DEFAULTS = {
    "HalfCheetah": dict(trace_variant="retrace"),
    "HalfCheetah 2x3": dict(update_epochs=5),
    "Ant 4x2": dict(num_envs=25, num_steps=160),
    "Humanoid": dict(obs_mode="global"),
    "Humanoid 9|8": dict(num_envs=25, num_steps=160, gae_lambda=0.90),
    "HumanoidStandup": dict(obs_mode="global"),
}
TASK_KEYS = (
    "scenario",
    "agent_conf",
    "agent_obsk",
    "obs_mode",
    "hidden_size",
)  # must match to load


def fail(message):
    """One line on stderr, no traceback, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def task_defaults(argv):
    """The TASK_DEFAULTS of the task named in argv (read before tyro, so
    --help shows them)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--scenario", default=Args.scenario)
    parser.add_argument("--agent-conf", default=Args.agent_conf)
    task, _ = parser.parse_known_args(argv)
    scenario = TASK_DEFAULTS.get(task.scenario, {})
    return {**scenario, **TASK_DEFAULTS.get(f"{task.scenario} {task.agent_conf}", {})}


def check(valid, key, args, accepted, problem="is invalid"):
    """One line naming the flag, its value and the accepted ones, unless
    `valid`."""
    if not valid:
        flag = "--" + key.replace("_", "-")
        fail(f"{flag} {getattr(args, key)} {problem}; accepted: {accepted}")


POSITIVE = """threads total_timesteps num_envs num_steps learning_rate critic_learning_rate
update_epochs num_minibatches data_chunk_length clip_coef value_clip_coef vf_coef max_grad_norm
huber_delta adam_eps hidden_size eval_interval eval_episodes rank lora_alpha max_episode_steps"""


def finalize_args(args):
    """Derive the sizes and check every value, one line for a bad one,
    before anything is built."""
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    if args.lora_start is None:
        args.lora_start = args.total_timesteps // 4
    for key in POSITIVE.split():
        check(getattr(args, key) > 0, key, args, "> 0")
    for key in ("ent_coef", "agent_obsk"):
        check(getattr(args, key) >= 0, key, args, ">= 0")
    for key in ("gamma", "gae_lambda"):
        check(0 < getattr(args, key) <= 1, key, args, "0 < value <= 1")
    for key in ("others_clip_coef", "trace_clip"):
        check(getattr(args, key) > 0, key, args, "> 0")
    check(0 <= args.clip_tuner_weight <= 1, "clip_tuner_weight", args, "0 <= value <= 1")
    chunk = f"multiples of --data-chunk-length {args.data_chunk_length}"
    check(args.num_steps % args.data_chunk_length == 0, "num_steps", args, chunk)
    view = f"local{args.agent_obsk}" if args.obs_mode == "local_k" else "global"
    # in the run name
    args.task = f"{args.scenario}-{args.agent_conf.replace('|', '_')}-{view}"
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
WALKER2D_3X2 = (
    ("foot_joint", "leg_joint"),
    ("thigh_joint", "foot_left_joint"),
    ("leg_left_joint", "thigh_left_joint"),
)


def import_mamujoco():
    """Import MaMuJoCo quietly: its import prints a banner to stderr, and
    MuJoCo writes its `settotalmass` warning to MUJOCO_LOG.TXT in the
    working directory unless a handler is set."""
    import mujoco

    def on_mujoco_warning(message):
        if "settotalmass" not in message:
            warnings.warn(f"MuJoCo: {message}")

    mujoco.set_mju_user_warning(on_mujoco_warning)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        from gymnasium_robotics import mamujoco_v1
        from gymnasium_robotics.envs.multiagent_mujoco.obsk import get_parts_and_edges
    return mamujoco_v1, get_parts_and_edges


def custom_partition(scenario, agent_conf, get_parts_and_edges):
    """Walker2d 3x2 (the reference's) or one actuated joint per agent, e.g.
    HalfCheetah 6x1."""
    parts, edges, global_nodes = get_parts_and_edges(scenario, None)
    nodes = {node.label: node for node in parts[0]}
    groups = {f"{len(nodes)}x1": [(label,) for label in nodes]}
    if scenario == "Walker2d":
        groups["3x2"] = WALKER2D_3X2
    if agent_conf not in groups:
        accepted = " ".join([*BUILTIN_CONFS[scenario], *groups])
        fail(f"--agent-conf {agent_conf!r} is not available for {scenario}; accepted: {accepted}")
    partition = [tuple(nodes[label] for label in group) for group in groups[agent_conf]]
    return dict(partition=partition, edges=edges, globals=global_nodes)


class MaMuJoCoEnv(gym.Env):
    """One `mamujoco_v1.parallel_env` as a gymnasium.Env. Observation: "obs" (N, obs_dim) =
    [obs_i zero-padded, one-hot(i)], "state" (N, state_dim) = [state(), one-hot(i)], float32.
    Action (N, act_dim) in [-1, 1], padded to the largest agent. Reward: the shared team reward."""

    def __init__(
        self,
        scenario,
        agent_conf,
        agent_obsk=1,
        obs_mode="local_k",
        max_episode_steps=1000,
        render=False,
    ):
        mamujoco_v1, get_parts_and_edges = import_mamujoco()
        factorization = None
        if agent_conf not in BUILTIN_CONFS[scenario]:
            factorization = custom_partition(scenario, agent_conf, get_parts_and_edges)
        # KEEP 27: global_categories=(): the reference's local views carry no root features
        self.env = mamujoco_v1.parallel_env(
            scenario,
            agent_conf,
            agent_obsk=agent_obsk,
            agent_factorization=factorization,
            global_categories=(),
            max_episode_steps=max_episode_steps,
            # --capture-video: small frames, as MuJoCo renders in software without a GPU
            **(dict(render_mode="rgb_array", width=240, height=240) if render else {}),
        )
        self.rendering = render
        self.fps = self.env.single_agent_env.metadata["render_fps"]
        self.agents = self.env.possible_agents
        n = len(self.agents)
        self.global_obs = obs_mode == "global"
        state_size = self.env.state().shape[0]
        obs_size = max(self.env.observation_space(a).shape[0] for a in self.agents)
        self.obs = np.zeros((n, (state_size if self.global_obs else obs_size) + n), np.float32)
        self.state = np.zeros((n, state_size + n), np.float32)
        self.obs[:, -n:] = np.eye(n)  # one-hot agent ids
        self.state[:, -n:] = np.eye(n)
        # FIX 1: the env, not the policy, maps a in [-1, 1] onto each joint's bounds
        spaces = [self.env.action_space(a) for a in self.agents]
        self.act_sizes = [space.shape[0] for space in spaces]
        self.action_dims = np.zeros((n, max(self.act_sizes)), np.float32)
        for i, size in enumerate(self.act_sizes):
            # 1 on the agent's real dims, 0 on padding (FIX 12)
            self.action_dims[i, :size] = 1
        self.observation_space = gym.spaces.Dict(
            obs=gym.spaces.Box(-np.inf, np.inf, self.obs.shape, np.float32),
            state=gym.spaces.Box(-np.inf, np.inf, self.state.shape, np.float32),
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, self.action_dims.shape, np.float32)

    # observation normalisation belongs here, where rollouts, the truncation bootstrap's final
    # states and evaluations all pass (its statistics then belong in the checkpoint)
    def observe(self, obs):
        state = self.env.state()
        self.state[:, : len(state)] = state
        for i, agent in enumerate(self.agents):
            agent_obs = state if self.global_obs else obs[agent]
            self.obs[i, : len(agent_obs)] = agent_obs
        # the vector env copies them
        return dict(obs=self.obs, state=self.state)

    def reset(self, seed=None, options=None):
        obs, _ = self.env.reset(seed=seed)
        return self.observe(obs), {}

    def render(self):
        return self.env.render() if self.rendering else None

    def step(self, action):
        actions = {}
        # drop the padding, map onto the bounds
        for i, agent in enumerate(self.agents):
            space = self.env.action_space(agent)
            a = action[i, : self.act_sizes[i]]
            actions[agent] = space.low + (a + 1) * (space.high - space.low) / 2
        obs, rewards, terminations, truncations, _ = self.env.step(actions)
        # reward and flags are the same for every agent
        first = self.agents[0]
        reward = float(rewards[first])
        return self.observe(obs), reward, terminations[first], truncations[first], {}


def renderer_works():
    """--capture-video: whether MuJoCo renders here, tried in a subprocess before MuJoCo is
    imported (it chooses its OpenGL once, at import: EGL without a display). If not: one
    warning, and the run goes on without video."""
    chosen = not os.environ.get("DISPLAY") and "MUJOCO_GL" not in os.environ
    if chosen:
        os.environ["MUJOCO_GL"] = "egl"
    probe = "import mujoco; m = mujoco.MjModel.from_xml_string('<mujoco/>'); "
    probe += "r = mujoco.Renderer(m, 8, 8); r.update_scene(mujoco.MjData(m)); r.render()"
    try:
        tried = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
        if tried.returncode == 0:
            return True
        why = (tried.stderr.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired:
        why = "no frame within 60 s"
    print(f"warning: --capture-video: MuJoCo cannot render here, no video ({why})", file=sys.stderr)
    if chosen:
        del os.environ["MUJOCO_GL"]
    return False


def make_env(args, render=False):
    task = (args.scenario, args.agent_conf, args.agent_obsk, args.obs_mode)
    return MaMuJoCoEnv(*task, args.max_episode_steps, render)


def make_worker_env(args, render=False):
    """An env in an AsyncVectorEnv worker process, which leaves Ctrl-C to
    the main process: a terminal sends SIGINT to every process of the
    group, and the main one saves before it exits."""
    # not the vector env's probe in this process
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return make_env(args, render)


def make_envs(args, seeds, record=False):
    """Gymnasium's vector env without autoreset (the rollout resets
    finished envs itself, after keeping their final state), and its
    first observation; `record`: its first env renders (--capture-video)."""
    make = make_worker_env if args.async_envs else make_env
    env_fns = [functools.partial(make, args, record and k == 0) for k in range(len(seeds))]
    vector = gym.vector.AsyncVectorEnv if args.async_envs else gym.vector.SyncVectorEnv
    envs = vector(env_fns, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    return envs, envs.reset(seed=seeds)[0]


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


class GaussianActor(RecurrentNetwork):
    """Squashed Gaussian policy (KEEP 20, docs/method.md §4): a = tanh(u), u ~ N(mean, std),
    std = 0.5 sigmoid(log_std + d_i), d_i agent i's log-std adapter (phase lora).
    `action_dims` (N, act_dim): 1 on each agent's real action dims, 0 on padding (FIX 12)."""

    def __init__(self, obs_dim, act_dim, n_agents, args, action_dims=None):
        nps = args.share_mode == "nps"
        adapted = args.lora_layers if args.share_mode == "lorasa" else ()
        # the adapters' own (FIX 29)
        generator = torch.Generator().manual_seed(args.seed)
        super().__init__(obs_dim, act_dim, n_agents, args, 0.01, nps, adapted, generator)
        self.nps = nps
        if nps:
            self.nps_log_std = nn.ParameterList([torch.ones(act_dim) for _ in range(n_agents)])
        else:
            # a logit, not log(sigma): std = 0.5 sigmoid(log_std) (the reference's name and init,
            # sigma 0.366)
            self.log_std = nn.Parameter(torch.ones(act_dim))
            # agent i's log-std adapter d_i: 0 until it trains in phase lora
            self.lora_std = nn.ParameterList([torch.zeros(act_dim) for _ in range(n_agents)])
        if action_dims is None or not args.mask_padded_actions:
            action_dims = torch.ones(n_agents, act_dim)
        self.register_buffer("action_dims", action_dims.float(), persistent=False)

    def log_std_of(self, agents=None):
        """(n, act_dim): log_std + d_i, or agent i's own log-std (nps)."""
        if self.nps:
            return stack(self.nps_log_std, agents)
        return self.log_std + stack(self.lora_std, agents)

    def forward(self, obs, h, masks, agents=None):
        """obs (n, T, B, obs_dim) -> mean (n, T, B, act_dim), std (n, 1, 1, act_dim), the hidden
        state after the last step (n, B, H)."""
        mean, hs = super().forward(obs, h, masks, agents)
        std = 0.5 * torch.sigmoid(self.log_std_of(agents))
        return mean, std[:, None, None], hs[:, -1]


EPS = float(np.finfo(np.float32).eps)
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def squashed_log_prob(mean, std, action):
    """Per-dim log-prob of a = tanh(u), u ~ N(mean, std) (method §4):
    log N(atanh(clamp(a, +-(1 - eps))); mean, std) - log(1 - a^2 + eps)."""
    u = torch.atanh(action.clamp(-1 + EPS, 1 - EPS))
    log_normal = -0.5 * ((u - mean) / std).pow(2) - std.log() - LOG_SQRT_2PI
    return log_normal - torch.log(1 - action.pow(2) + EPS)


def squashed_entropy(mean, std):
    """KEEP 20: a one-sample estimate per dim, H(N(mean, std)) + log(1 -
    tanh(u)^2 + eps)."""
    u = mean + std * torch.randn_like(mean)
    return 0.5 + LOG_SQRT_2PI + std.log() + torch.log(1 - torch.tanh(u).pow(2) + EPS)


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
    log_std = actor.nps_log_std if actor.nps else actor.lora_std
    return params + [log_std[i]]


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
    bad_masks[t] = 0: step t - 1 was a truncation whose advantage is zeroed (reference).
    boot[t] = 1: step t was a truncation bootstrapped from its final state (FIX 21)."""

    def __init__(self, args, n_agents, obs_dim, state_dim, act_dim, device):
        N, T, E, H = n_agents, args.num_steps, args.num_envs, args.hidden_size
        self.obs = torch.zeros(N, T + 1, E, obs_dim, device=device)
        self.state = torch.zeros(N, T + 1, E, state_dim, device=device)
        self.actor_h = torch.zeros(N, T + 1, E, H, device=device)
        self.critic_h = torch.zeros(N, T + 1, E, H, device=device)
        self.masks = torch.ones(T + 1, E, device=device)
        self.bad_masks = torch.ones(T + 1, E, device=device)
        self.actions = torch.zeros(N, T, E, act_dim, device=device)
        self.logprobs = torch.zeros(N, T, E, act_dim, device=device)
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

    def roll(self):
        for tensor in (self.obs, self.state, self.actor_h, self.critic_h):
            tensor[:, 0] = tensor[:, -1]
        self.masks[0] = self.masks[-1]


def collect_rollout(args, envs, actor, buf):
    """One sampled policy call for all envs and agents per step; finished
    envs are reset after their final state is kept (FIX 21). Returns the
    finished episodes' (return, length) and the seconds spent in the
    envs."""
    T, E = args.num_steps, args.num_envs
    rewards = np.zeros((T, E), np.float32)
    terminated = np.zeros((T, E), bool)
    truncated = np.zeros((T, E), bool)
    finished = []
    env_seconds = 0.0
    # u = mean + std * noise
    noise = torch.randn(buf.actions.shape, device=buf.actions.device)
    # each agent's weights once per rollout, not per step
    with merged_weights(actor):
        for t in range(T):
            with torch.inference_mode():
                mean, std, h = actor(buf.obs[:, t, None], buf.actor_h[:, t], buf.masks[t, None])
            action = torch.tanh(mean[:, 0] + std[:, 0] * noise[:, t])
            buf.actor_h[:, t + 1] = h
            buf.actions[:, t] = action
            buf.logprobs[:, t] = squashed_log_prob(mean[:, 0], std[:, 0], action)
            actions = buf.actions[:, t].transpose(0, 1).cpu().numpy()
            if not np.isfinite(actions).all():
                raise FloatingPointError("non-finite actions")
            start = time.time()
            obs, rewards[t], terminated[t], truncated[t], _ = envs.step(actions)
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
            finished += zip(buf.episode_return[done], buf.episode_length[done])
            buf.episode_return[done] = 0
            buf.episode_length[done] = 0
    # a termination at the time limit is a termination
    time_limit = torch.as_tensor(truncated & ~terminated)
    # reward shaping belongs here, not in the env: evaluation returns stay the task's own
    buf.rewards.copy_(torch.as_tensor(rewards))
    buf.boot.copy_(time_limit & args.truncation_bootstrap)
    buf.bad_masks[1:] = 1.0 - (time_limit & (not args.truncation_bootstrap)).float()
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
    V standardised over all entries (method §6). A bootstrapped
    truncation adds gamma V(s_final) to its reward (FIX 21; the episode
    still ends there)."""
    values = value_norm.denormalize(buf.values)
    final_values = value_norm.denormalize(buf.final_values)
    rewards = buf.rewards + args.gamma * buf.boot * final_values
    returns = gae(rewards, values, buf.masks, buf.bad_masks, args.gamma, args.gae_lambda)
    advantages = returns - values[:, :-1]
    advantages = (advantages - advantages.mean()) / (advantages.std(correction=0) + 1e-5)
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


def retrace_trace(deltas, rho, masks, bad_masks, gamma, lam, c_bar=1.0, lambda_squared=True):
    """Trace (a) of docs/method.md §11, time-major: deltas, rho (T, ...); masks, bad_masks
    (T + 1, ...). c_t = lam min(rho_t, c_bar) (KEEP 15: lam again on top of gamma lam;
    --no-trace-lambda-squared: min(rho_t, c_bar)), A_T = 0,
    A_t = b_{t+1} [delta_t + gamma lam m_{t+1} c_{t+1} A_{t+1}]. rho = 1: GAE(lam^2) (GAE(lam))."""
    T = deltas.shape[0]
    c = rho.clamp(max=c_bar) * (lam if lambda_squared else 1.0)
    advantages = torch.zeros_like(deltas)
    for t in reversed(range(T)):
        traced = c[t + 1] * advantages[t + 1] if t + 1 < T else 0.0
        advantages[t] = bad_masks[t + 1] * (deltas[t] + gamma * lam * masks[t + 1] * traced)
    return advantages


def speedup_trace(deltas, rho, masks, bad_masks, gamma, lam):
    """Trace (b) of docs/method.md §11: A_t = sum_{k>=t} (gamma lam)^{k-t} C_{t,k}
    prod_{j=t+1..k} m_j prod_{j=t..k} b_{j+1} delta_k, C_{t,t} = 1, C_{t,k} = min(1, rho_k
    C_{t,k-1}); rho = 1 gives GAE(lam). O(T^2): vectorised over t, a loop over k."""
    advantages = torch.zeros_like(deltas)
    # row t: (gamma lam)^{k-t} prod m prod b; 0 until k = t
    weight = torch.zeros_like(deltas)
    trace = torch.zeros_like(deltas)  # row t: C_{t,k}; 0 until k = t
    for k in range(deltas.shape[0]):
        # the masks are 0 or 1: exact
        weight *= gamma * lam * masks[k] * bad_masks[k + 1]
        trace = (rho[k] * trace).clamp(max=1.0)
        weight[k] = bad_masks[k + 1]
        trace[k] = 1.0
        advantages += weight * trace * deltas[k]
    return advantages


def trace_deltas(args, buf, value_norm, i, last_value):
    """Agent i's TD errors (T, E) for its trace, de-normalised with VN_i's statistics at the time
    of the trace: delta_t = r_t + gamma b_t V(s_final) + gamma V_{t+1} m_{t+1} - V_t, V_t the
    rollout's values, V_T = last_value (normalised, from the current critic), b_t = buf.boot[t]."""
    value = value_norm.denormalize(torch.cat([buf.values[[i], :-1], last_value], 1), [i])[0]
    rewards = (
        buf.rewards + args.gamma * buf.boot * value_norm.denormalize(buf.final_values[[i]], [i])[0]
    )
    return rewards + args.gamma * value[1:] * buf.masks[1:] - value[:-1], value


def clip_eps(args, position, n_agents):
    """docs/method.md §11: eps_k = eps (w k / n + 1 - w), k the 1-based position, w
    --clip-tuner-weight."""
    w = args.clip_tuner_weight
    return args.clip_coef * (w * position / n_agents + 1 - w)


def agent_order(kind, scores):
    """docs/method.md §11. semi_greedy: the highest score first, then
    alternately a uniformly random and the highest of the remaining
    agents; greedy: by score; random: a uniform permutation
    (HAPPO-like); cyclic: 0 ... n - 1."""
    if kind == "random":
        return torch.randperm(len(scores)).tolist()
    ranked = torch.argsort(scores, descending=True, stable=True).tolist()
    if kind == "cyclic":  # 0 ... n - 1 every iteration, as the reference
        ranked.sort()
    order = []
    while ranked:
        pick_random = kind == "semi_greedy" and len(order) % 2 == 1
        order.append(ranked.pop(int(torch.randint(len(ranked), ())) if pick_random else 0))
    return order


@torch.no_grad()
def policy_ratios(args, actor, data, agents, cache, stepwise):
    """r_j of `agents` under their current policies over the whole batch,
    (len(agents), T * E) by flat (t, env) index: one ratio per sample,
    the mean of the per-dim ratios over the real dims (KEEP 19, FIX 12)
    or with --no-per-dim-ratio the joint ratio. stepwise: one step at a
    time from the stored rollout hidden states (KEEP 23, the reference's
    trace evaluation); else on the training chunks from their stored
    start hidden states, as the surrogate sees them (FIX 10). Evaluating
    the policies is most of the update's time, and an agent's ratio only
    changes when a parameter its policy reads changes: the shared ones
    and its own group. PyTorch counts every in-place change of a tensor
    (`_version`, e.g. optimizer.step()), so each ratio is kept in
    `cache` with the versions of those parameters and computed again
    only when they differ; no code elsewhere has to drop an entry after
    a step. `cache`: a dict, owned by this function."""
    # each parameter's agent; None: a shared one, which every agent's policy reads
    owner = {id(p): j for j in range(actor.n_agents) for p in agent_parameters(actor, j, args)}
    params = [(owner.get(id(p)), p._version) for p in actor.parameters()]
    versions = {j: [v for k, v in params if k in (None, j)] for j in agents}
    todo = [j for j in agents if cache.get((stepwise, j), (None,))[0] != versions[j]]
    if todo:  # in one batched call: one policy evaluation for all of them
        T = len(data["step"])
        x = {key: data[key][todo] for key in ("obs", "actor_h", "actions", "logprobs")}
        if stepwise:  # each (t, env) a sequence of length 1, in order
            x = {key: v[:, :T].flatten(1, 2)[:, None] for key, v in x.items()}
            x.update(
                actor_h=x["actor_h"][:, 0],
                masks=data["masks"][:T].reshape(1, -1),
                step=data["step"],
            )
        else:
            x.update(masks=data["masks"], step=data["step"])
            x = next(chunk_minibatches(x, T, args.data_chunk_length, 1))
        mean, std, _ = actor(x["obs"], x["actor_h"], x["masks"], todo)
        dims = actor.action_dims[todo][:, None, None]
        log_ratio = (squashed_log_prob(mean, std, x["actions"]) - x["logprobs"]) * dims
        if args.per_dim_ratio:
            ratio = (log_ratio.exp() * dims).sum(-1) / dims.sum(-1)
        else:
            ratio = log_ratio.sum(-1).exp()
        # back in flat (t, env) order: argsort inverts the samples' permutation
        ratios = ratio.flatten(1)[:, x["step"].flatten().argsort()]
        for j, r in zip(todo, ratios):
            cache[stepwise, j] = versions[j], r
    return torch.stack([cache[stepwise, j][1] for j in agents])


@torch.no_grad()
def trace_agent(args, models, buf, data, i, agents, cache, returns, stats):
    """docs/method.md §11: agent i's returns re-estimated with rho_t = prod_{j in agents} r_j,
    V_T from the current critic, all de-normalised with VN_i's statistics now; then every agent's
    advantages R - V standardised over all entries. Returns new returns and advantages."""
    actor, critic, value_norm = models
    last_value, _ = critic(buf.state[[i], -1:], buf.critic_h[[i], -1], buf.masks[-1:], [i])
    deltas, value = trace_deltas(args, buf, value_norm, i, last_value)
    rho = policy_ratios(args, actor, data, agents, cache, True).prod(0).view_as(buf.rewards)
    trace = (buf.masks, buf.bad_masks, args.gamma, args.gae_lambda)
    if args.trace_variant == "speedup":
        traced = speedup_trace(deltas, rho, *trace)
    else:
        traced = retrace_trace(deltas, rho, *trace, args.trace_clip, args.trace_lambda_squared)
    # a new tensor: the caller's is left as it was
    returns = returns.clone()
    returns[i] = traced + value[:-1]
    gaps = returns - value_norm.denormalize(buf.values[:, :-1])
    advantages = (gaps - gaps.mean()) / (gaps.std(correction=0) + 1e-5)
    stats["a2po/trace_rho_mean"].append(rho.mean().item())
    stats["a2po/trace_trunc_frac"].append((rho > args.trace_clip).float().mean().item())
    # from the rollout's GAE advantages
    gap = advantages[i] - data["advantages"][i]
    stats["a2po/trace_adv_gap"].append(gap.abs().mean().item())
    return returns, advantages


def critic_step(args, critic, value_norm, critic_optim, mb, i, stats):
    """One critic step on agent i's rows of the minibatch, its loss / n
    (KEEP 30)."""
    # agent i's normaliser first takes them (reference)
    value_norm.update(mb["returns"], [i])
    critic_loss = value_loss(args, critic, value_norm, mb, [i]) / critic.n_agents
    critic_optim.zero_grad()
    (args.vf_coef * critic_loss).backward()
    stats["losses/critic_grad_norm"].append(
        clip_and_step([critic_optim], [list(critic.parameters())], args.max_grad_norm)
    )
    stats["losses/value_loss"].append(critic_loss.item() * critic.n_agents)


def turn(args, phase, models, optimizers, data, i, others, eps, cache, stats):
    """Agent i's turn (docs/method.md §11) on its rows of `data`: its
    epochs (ppo loop: one), each [--two-stage: a critic-only pass over
    its minibatches, then] per minibatch an actor step on the clipped
    surrogate of its ratio times the others' clipped product, and a
    critic step. Phase ps steps the shared optimiser
    (agent i's loss / n); lora and nps only agent i's own, so that only
    agent i's policy changes in its turn."""
    actor, critic, value_norm = models
    actor_optims, actor_groups, critic_optim = optimizers
    # the optimiser that steps: the shared one, or agent i's
    k = 0 if phase == "ps" else i
    # (1, 1, 1, act_dim): 0 on padded dims (FIX 12)
    dims = actor.action_dims[[i]][:, None, None]
    # KEEP 19: a ratio and a clip per action dim, summed; or one joint ratio
    ratio_dims = dims if args.per_dim_ratio else dims[..., :1]
    turn_data = {key: x[[i]] if x.dim() > 2 else x for key, x in data.items()}
    for _ in range(1 if args.a2po_loop == "ppo" else args.update_epochs):
        minibatches = list(
            chunk_minibatches(
                turn_data, args.num_steps, args.data_chunk_length, args.num_minibatches
            )
        )
        for mb in minibatches if args.two_stage else []:
            critic_step(args, critic, value_norm, critic_optim, mb, i, stats)
        for mb in minibatches:
            mean, std, _ = actor(mb["obs"], mb["actor_h"], mb["masks"], [i])
            log_ratio = (squashed_log_prob(mean, std, mb["actions"]) - mb["logprobs"]) * dims
            if not args.per_dim_ratio:
                log_ratio = log_ratio.sum(-1, keepdim=True)
            ratio = log_ratio.exp()
            # FIX 10: times the other agents' current ratios on the same samples
            if others:
                product = policy_ratios(args, actor, data, others, cache, False).prod(0)[mb["step"]]
                stats["others_ratio"].append(product.flatten())
                # the product is clipped as a whole
                clip = args.others_clip_coef
                ratio = ratio * product.clamp(1 - clip, 1 + clip)[..., None]
            advantage = mb["advantages"][..., None]
            surrogate = torch.min(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)
            policy_loss = -(surrogate * ratio_dims).sum(-1)
            entropy = (squashed_entropy(mean, std) * dims).sum(-1)
            loss = policy_loss.mean() - args.ent_coef * entropy.mean()
            actor_optims[k].zero_grad()
            # ps: / n (reference)
            (loss / actor.n_agents if phase == "ps" else loss).backward()
            stats["losses/actor_grad_norm"].append(
                clip_and_step([actor_optims[k]], [actor_groups[k]], args.max_grad_norm)
            )
            critic_step(args, critic, value_norm, critic_optim, mb, i, stats)
            with torch.no_grad():
                entries = (ratio_dims * torch.ones_like(log_ratio)).sum().item()
                approx_kl = ((log_ratio.exp() - 1 - log_ratio) * ratio_dims).sum().item() / entries
                clipfrac = (((ratio - 1).abs() > eps) * ratio_dims).sum().item() / entries
            stats["losses/policy_loss"].append(policy_loss.mean().item())
            stats["losses/entropy"].append(entropy.mean().item())
            stats["losses/approx_kl"].append(approx_kl)
            stats["losses/clipfrac"].append(clipfrac)


def update(args, phase, actor, critic, value_norm, optimizers, buf, returns, advantages):
    """A2PO (docs/method.md §11): the agents take turns in a semi-greedy
    order. Agent i at position k maximises the clipped surrogate of r_i
    clip(prod_{j in others} r_j, 1 +- eps_o) with the clip eps_k, on
    advantages re-traced with the ratios of the agents updated so far;
    the shared critic steps on agent i's rows in its turn."""
    N = actor.n_agents
    models = (actor, critic, value_norm)
    # the rollout's batch, its GAE advantages, and each (t, env)'s flat index (a minibatch's
    # look-up of the cached ratios)
    data = {
        key: getattr(buf, key)
        for key in ("obs", "state", "actor_h", "critic_h", "masks", "actions", "logprobs", "values")
    }
    data.update(advantages=advantages, step=torch.arange(buf.rewards.numel()).view_as(buf.rewards))
    # KEEP 24: the order score |A / V| with normalised V
    normalised = buf.values[:, :-1]
    scores = (advantages / torch.where(normalised == 0, 1e-8, normalised)).abs().mean((1, 2))
    traced = returns  # the returns re-estimated so far (none yet: GAE's)
    cache, stats = {}, defaultdict(list)
    # before the update changes VN
    values = value_norm.denormalize(buf.values[:, :-1])
    stats["losses/explained_variance"] = [(1 - (returns - values).var() / returns.var()).item()]
    ppo_loop = args.a2po_loop == "ppo"
    # agent loop: epochs in turn()
    for epoch in range(args.update_epochs if ppo_loop else 1):
        # ppo loop: each later epoch first re-traces every agent with all agents' ratios
        for j in range(N) if epoch > 0 else []:
            traced, advantages = trace_agent(
                args, models, buf, data, j, range(N), cache, traced, stats
            )
        order = agent_order(args.a2po_order, scores)
        for position, i in enumerate(order, start=1):
            # agent i's advantages under the agents updated so far (and its own)
            if position > 1:
                traced, advantages = trace_agent(
                    args, models, buf, data, i, order[:position], cache, traced, stats
                )
            # KEEP 13: the reference's ppo loop gives every agent the first position's clip
            first = ppo_loop and args.a2po_clip_schedule == "reference"
            eps = clip_eps(args, 1 if first else position, N)
            # KEEP 14: the reference's ppo loop multiplies every other agent's ratio, the agent
            # loop its predecessors'
            every_other = ppo_loop and args.a2po_others == "reference"
            others = [j for j in range(N) if j != i] if every_other else order[: position - 1]
            # KEEP 30: the critic regresses onto the traced returns (--no-approx-trace: GAE's)
            turn_data = dict(
                data, advantages=advantages, returns=traced if args.approx_trace else returns
            )
            turn(args, phase, models, optimizers, turn_data, i, others, eps, cache, stats)
            # the last epoch's
            stats[f"a2po/order_pos/agent_{i}"] = [position]
            stats[f"a2po/clip_eps/pos_{position}"] = [eps]
    if "others_ratio" in stats:  # over every sample of every minibatch
        product = torch.cat(stats.pop("others_ratio"))
        for name in ("mean", "min", "max"):
            stats[f"a2po/others_ratio_{name}"] = [getattr(product, name)().item()]
    return {key: float(np.mean(values)) for key, values in stats.items()}


# ==== 9. EVALUATION ====
def eval_seeds(args):
    """The eval envs' own seed stream, the same at every evaluation
    (docs/method.md §8)."""
    return [args.seed * 50000 + 10000 * k for k in range(args.eval_episodes)]


@torch.inference_mode()
def evaluate(args, actor, envs):
    """Greedy evaluation (tanh of the mean), one episode per eval env: the
    mean team return."""
    # greedy: a sampled evaluation needs a torch.Generator of its own, or drawing from the global
    # RNG would change the training run with --eval-interval
    n = envs.num_envs
    obs, _ = envs.reset(seed=eval_seeds(args))
    h = torch.zeros(actor.n_agents, n, args.hidden_size, device=actor.action_dims.device)
    masks = torch.ones(1, n, device=h.device)
    episode_return = np.zeros(n)
    episode_length = np.zeros(n)
    done = np.zeros(n, bool)
    # --capture-video: the first env's first 10 s (rendering does not change the simulation)
    frames = []
    film = 10 * envs.get_attr("fps")[0] if args.capture_video else 0
    # each agent's weights once per evaluation, not per step
    with merged_weights(actor):
        while not done.all():
            if not done[0] and len(frames) < film:
                frames.append(envs.call("render")[0])
            obs = torch.as_tensor(obs["obs"], device=h.device).transpose(0, 1)[:, None]
            mean, _, h = actor(obs, h, masks)
            actions = torch.tanh(mean[:, 0]).transpose(0, 1).cpu().numpy()
            if not np.isfinite(actions).all():
                raise FloatingPointError("non-finite actions in evaluation")
            obs, reward, terminated, truncated, _ = envs.step(actions)
            episode_return += reward * ~done
            episode_length += ~done
            ended = terminated | truncated
            done |= ended
            # keep the vector env steppable; no counting
            if ended.any() and not done.all():
                obs, _ = envs.reset(options={"reset_mask": ended})
    result = dict(episodic_return=episode_return.mean(), episodic_length=episode_length.mean())
    result["num_episodes"] = n
    if frames:
        result["frames"] = frames
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


def eval_only_path(args, global_step):
    """--eval-only --capture-video: <checkpoint folder>/videos/eval-only_<step>_<unix time>, beside
    the run's own videos, never one of them."""
    name = f"eval-only_{global_step}_{int(time.time())}"
    return os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "videos", name)


def log_evaluation(writer, args, actor, envs, global_step):
    start = time.time()
    result = evaluate(args, actor, envs)
    frames = result.pop("frames", [])
    for key, value in result.items():
        writer.add_scalar(f"eval/{key}", value, global_step)
    writer.add_scalar("perf/eval_s", time.time() - start, global_step)
    print(f"  eval @ step {global_step}: return {result['episodic_return']:.2f}")
    if frames:
        path = os.path.join(writer.log_dir, "videos", f"eval_{global_step}.mp4")
        save_video(path, frames, envs.get_attr("fps")[0], global_step, writer)


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
        keep += ["wandb_project_name", "wandb_entity", "async_envs", "capture_video"]
        if args.eval_only:
            keep += ["seed", "eval_episodes", "max_episode_steps"]
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
    """Per adapted layer A (N, r, in), B (N, out, r), bias (N, out),
    scaling; and the log-std offsets (N, act_dim): what phase lora
    learned, for use outside these scripts."""
    adapters = {"log_std_offset": stack(actor.lora_std).detach().cpu()}
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
    packages = ("torch", "gymnasium-robotics", "mujoco", "tyro")
    versions = {f"version/{p}": importlib.metadata.version(p) for p in packages}
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
    if finished:
        stats["charts/episodic_return"] = float(np.mean([r for r, _ in finished]))
        stats["charts/episodic_length"] = float(np.mean([n for _, n in finished]))
    # how far each agent moved from the shared weights: sum ||s B_i A_i||_F
    with torch.no_grad():
        adapted = [m for m in actor.modules() if isinstance(m, LoRALinear) and m.lora_on]
        deltas = [m.scaling * torch.bmm(stack(m.lora_B), stack(m.lora_A)) for m in adapted]
        for i, log_std in enumerate(actor.log_std_of().mean(-1).tolist()):
            norms = [torch.linalg.matrix_norm(delta[i]).item() for delta in deltas]
            stats[f"lorasa/delta_norm/agent_{i}"] = sum(norms)
            stats[f"lorasa/log_std/agent_{i}"] = log_std
    for key, value in stats.items():
        writer.add_scalar(key, value, global_step)
    episodic = stats.get("charts/episodic_return", float("nan"))
    times = f"rollout {stats['perf/rollout_s']:.2f}s update {stats['perf/update_s']:.2f}s"
    progress = f"iter {iteration}/{args.num_iterations} step {global_step} phase {phase}"
    print(f"{progress} return {episodic:9.2f} | {times}", flush=True)


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
    if checkpoint is not None:
        check_checkpoint(args, checkpoint)
    if args.capture_video:
        args.capture_video = renderer_works()
    # a bad --agent-conf fails here, before anything is written
    env = make_env(args)
    run_path = None if args.eval_only else make_run_dir(args)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # one torch thread in rollouts and evaluations: idle threads spin after every small matmul
    # and slow the env steps beside them (docs/performance.md); the update uses --threads
    torch.set_num_threads(1)

    n_agents, obs_dim = env.obs.shape
    state_dim = env.state.shape[1]
    act_dim = env.action_dims.shape[1]
    action_dims = torch.as_tensor(env.action_dims)
    actor = GaussianActor(obs_dim, act_dim, n_agents, args, action_dims).to(device)
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
    eval_envs, _ = make_envs(args, eval_seeds(args), record=args.capture_video)

    if args.eval_only:
        result = evaluate(args, actor, eval_envs)
        returns = f"return {result['episodic_return']:.2f}"
        print(f"eval {args.task} step {global_step}: {returns}, {args.eval_episodes} episodes")
        if "frames" in result:
            path = f"{eval_only_path(args, global_step)}.mp4"
            save_video(path, result["frames"], eval_envs.get_attr("fps")[0], global_step)
        sys.exit(0)

    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        # before the writer: W&B hooks into TensorBoard's
        track_run(args, run_path)
    writer = SummaryWriter(run_path)
    versions = log_start(writer, args, actor, critic, global_step)
    # new seeds on --resume: the simulators' states are not in the checkpoint
    train_seeds = [args.seed + 1000 * k + global_step for k in range(args.num_envs)]
    envs, obs = make_envs(args, train_seeds)
    buf = RolloutBuffer(args, n_agents, obs_dim, state_dim, act_dim, device)
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
    except FloatingPointError as error:
        last = last_checkpoint or "none (--no-save-model, or none written yet)"
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
