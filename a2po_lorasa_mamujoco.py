# ==== 1. DOCSTRING ====
"""A2PO + LoRASA on Multi-Agent MuJoCo (gymnasium-robotics `mamujoco_v1`), one self-contained file.

LoRASA (Zhang, Kapoor & Sun, "Low-Rank Agent-Specific Adaptation for Multi-Agent Policy Learning", ICML 2025,
arXiv 2502.05573) trains one shared recurrent policy (phase `ps`), then freezes it and gives every agent its own
low-rank adapters on each layer (phase `lora`), so agent i acts with W_i = W0 + (alpha/r) B_i A_i.
Reference code: github.com/ZBN111/ICML2025_LoRASA (a fork of github.com/xihuai18/A2PO-ICLR2023, itself derived
from the MAPPO on-policy code). "Reference" below means what that code does.

A2PO (Wang et al., "Order Matters: Agent-by-agent Policy Optimization", ICLR 2023, arXiv 2302.06205) updates the
agents one at a time in a semi-greedy order, corrects each agent's ratio by the clipped product of the ratios of the
agents updated before it, widens the clip with the position, and re-estimates the advantages with truncated
importance traces; here as the reference runs it on MaMuJoCo (agent loop, two-stage critic; ../shared/spec/a2po.md).
Everything but the update rule, the A2PO arguments and the trace functions is identical to mappo_lorasa_mamujoco.py.

Usage (one run does both phases; the switch is at --lora-start env steps):
    python a2po_lorasa_mamujoco.py --scenario HalfCheetah --agent-conf 2x3               # ps pretraining -> lora
    python a2po_lorasa_mamujoco.py --checkpoint runs/<run>/ps_checkpoint.pt              # lora fine-tuning only
    python a2po_lorasa_mamujoco.py --share-mode ps      # parameter-sharing baseline (nps: one network per agent)
The paper does not state its phase-switch point; --lora-start defaults to a quarter of --total-timesteps.

Tested with: torch 2.13.0, gymnasium 1.3.0, gymnasium-robotics 1.4.2, mujoco 4.0.0, tyro 1.0.17, Python 3.11.

Deviations from the reference implementation (numbers are the defects of ../shared/spec/lorasa.md section 10):
  FIX  1  no policy-side action scaling; the env adapter maps tanh actions in [-1, 1] affinely onto [low, high].
  FIX  2  symmetric Huber value loss (the reference's is zero for errors < -delta).
  FIX  3  self-contained checkpoints; the switch happens inside one run; the step count continues the x-axis.
  FIX  4  all N value normalisers are checkpointed and restored.
  FIX  5  per-agent parameter groups are built by construction (separate leaf tensors), not by name matching.
  FIX  6  the critic optimiser uses --critic-learning-rate.           FIX 7  the command line always wins.
  FIX  8  phase lora freezes every shared actor parameter (LayerNorms and log-std too); no shared actor optimiser.
  FIX  9  one hand-written GRU cell in both phases; merge() is called explicitly before rollouts and evaluation.
  FIX 10  the preceding agents' ratios are computed under no_grad.
  FIX 11  logged losses are per-agent means.     FIX 12  padded action dims are masked (--mask-padded-actions).
  FIX 21  a time-limit truncation is bootstrapped from the true final observation (--truncation-bootstrap);
          the reference zeroes the advantage of the truncated step (its reward is lost).
  FIX 26  at the in-run switch the critic optimiser and value normalisers continue.
  SIMPLIFY 17  A, B adapters everywhere (the reference switches to a full per-agent delta when r >= min(in, out);
               B A already spans every matrix then).   SIMPLIFY 22  no per-vector z-scoring (the feature
               LayerNorm that follows normalises the same vector).
Reference quirks kept (KEEP-FOR-FIDELITY, each commented where it happens):
  16  adapter init A = 0, B ~ kaiming_uniform (--lora-init reference|standard).
  18  per-agent adapter biases exist but do not train (--train-agent-bias).
  19  Gaussian ratio and clip per action dimension, summed (--per-dim-ratio; off = joint log-prob).
  20  squashed Gaussian, sigma = 0.5 * sigmoid(log_std), log_std init 1.0, one-sample entropy estimate.
  22  no root (global) features in local observations (obs mode local_k), as in the reference.
  25  one value normaliser per agent in front of one shared critic; A2PO's critic fits the traced returns, loss / n.
  A2PO (a2po.md): 13 ppo loop: every agent gets the first position's clip (--a2po-clip-schedule reference|position);
  14 ppo loop: the others' product runs over all other agents (--a2po-others reference|preceding); 15 the default
  trace applies lambda twice (--trace-lambda-squared); 23 trace ratios one step at a time from the stored rollout
  hidden states, V_t stale under the current value normaliser; 24 order score |A / V| with normalised V.
Also: every evaluation reseeds its envs with the same seeds; on --resume the training envs start fresh episodes
(simulator states are not checkpointed). Environment: v5 MuJoCo tasks (the reference used gym v2 with mujoco-py), so
returns are not comparable with the paper.
"""

# ==== 2. IMPORTS ====
import contextlib
import dataclasses
import importlib.metadata
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

# ==== 3. ARGS ====
LAYER_NAMES = ("fc1", "fc2a", "fc2b", "gru_x", "gru_h", "fc_post", "head")  # the 7 adapted layers (lorasa.md section 2)


@dataclass
class Args:
    # >>> shared:args-prologue
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (goes into the run name)"""
    seed: int = 1
    """seed of random, numpy, torch and the environments (train env k: seed + 1000k; eval env k: 50000 seed + 10000k)"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    cuda: bool = False
    """run the networks on CUDA (off by default: these 64-unit networks are latency-bound, the CPU is usually faster)"""
    run_dir: str = "runs"
    """parent folder of the run folders (TensorBoard events and checkpoints go to RUN_DIR/<run_name>/)"""
    save_model: bool = True
    """write checkpoint.pt / adapters.pt at every evaluation and at the end, and ps_checkpoint.pt at the switch"""
    checkpoint: Optional[str] = None
    """start from this checkpoint.pt (a ps_checkpoint.pt under --share-mode lorasa starts LoRA fine-tuning at once)"""
    resume: bool = False
    """with --checkpoint: continue that run in its own folder (its arguments, step count, optimisers, RNG states)"""
    eval_only: bool = False
    """with --checkpoint: evaluate its policy on its task and print the result (--seed/--eval-episodes from the CLI)"""
    # <<< shared:args-prologue
    # >>> shared:args-ppo-mamujoco
    total_timesteps: Optional[int] = None
    """env step at which training ends (x-axis end; default 12M as the reference; with --resume the checkpoint's)"""
    num_envs: Optional[int] = None
    """parallel training envs (default per task, TASK_DEFAULTS)"""
    num_steps: Optional[int] = None
    """rollout length per env per iteration (default per task); must be a multiple of --data-chunk-length"""
    learning_rate: float = 3e-4
    """actor Adam learning rate (shared actor in phase ps, adapters in phase lora); no decay"""
    critic_learning_rate: float = 3e-4
    """critic Adam learning rate"""
    update_epochs: Optional[int] = None
    """PPO epochs per iteration (default per task: 5 HalfCheetah, 3 otherwise)"""
    num_minibatches: int = 1
    """minibatches per epoch (reference: 1, i.e. one gradient step per epoch on the whole batch)"""
    data_chunk_length: int = 10
    """length of the recurrent training chunks"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: Optional[float] = None
    """GAE lambda (default per task: 0.93, Humanoid 0.90)"""
    clip_coef: float = 0.2
    """PPO ratio clip"""
    value_clip_coef: float = 0.2
    """value clip around the rollout value"""
    ent_coef: float = 0.0
    """entropy coefficient (0 on MaMuJoCo: the entropy is only logged)"""
    vf_coef: float = 1.0
    """value loss coefficient"""
    max_grad_norm: float = 10.0
    """gradient-norm clip (per agent group in phase lora and in nps mode)"""
    huber_delta: float = 10.0
    """delta of the Huber value loss"""
    adam_eps: float = 1e-5
    """Adam epsilon"""
    hidden_size: int = 64
    """width of every hidden layer"""
    recurrent: bool = True
    """GRU policy and critic (off: the GRU and its LayerNorm are left out)"""
    eval_interval: int = 50
    """evaluate (and save) every this many iterations, plus before the first and after the last"""
    eval_episodes: int = 10
    """greedy evaluation episodes (one per eval env)"""
    # <<< shared:args-ppo-mamujoco
    truncation_bootstrap: bool = True
    """bootstrap a time-limit truncation from the true final observation (off: the reference zeroes its advantage)"""
    # >>> shared:args-lorasa
    share_mode: Literal["ps", "lorasa", "nps"] = "lorasa"
    """ps: one shared policy; lorasa: shared policy, then per-agent adapters from --lora-start; nps: one network per agent"""
    rank: int = 8
    """adapter rank r"""
    lora_alpha: Optional[float] = None
    """adapter scaling alpha (scaling alpha/r; default alpha = rank)"""
    lora_layers: Tuple[str, ...] = LAYER_NAMES
    """adapted layers by name (placement ablation): fc1 fc2a fc2b gru_x gru_h fc_post head"""
    lora_start: Optional[int] = None
    """env step of the phase switch (default total_timesteps // 4; the paper does not state its value)"""
    lora_init: Literal["reference", "standard"] = "reference"
    """adapter init: reference A=0, B~kaiming (quirk 16); standard A~kaiming, B=0 (LoRA paper); both give dW=0"""
    train_agent_bias: bool = False
    """also train per-agent adapter biases (the reference allocates them but every config leaves them untrained)"""
    # <<< shared:args-lorasa
    # A2PO (a2po.md; defaults: the reference on MaMuJoCo)
    a2po_loop: Literal["agent", "ppo"] = "agent"
    """agent: each agent runs all its epochs in turn (MaMuJoCo); ppo: epochs outside, agents inside (SMAC)"""
    a2po_order: Literal["semi_greedy", "random", "cyclic", "greedy"] = "semi_greedy"
    """agent order: semi_greedy (top |A/V| score, then random and top alternately), random, cyclic, greedy"""
    a2po_clip_schedule: Literal["reference", "position"] = "reference"
    """reference: eps_k by position in the agent loop, eps_1 for everyone in the ppo loop (quirk 13); position: eps_k"""
    a2po_others: Literal["reference", "preceding"] = "reference"
    """reference: predecessors in the agent loop, all other agents in the ppo loop (quirk 14); preceding: predecessors"""
    others_clip_coef: float = 0.1
    """clip eps_o of the preceding agents' ratio product (clipped as a whole to 1 +- eps_o)"""
    clip_tuner_weight: float = 0.5
    """w of the clip schedule eps_k = eps (w k / n + 1 - w): first agent eps (0.5 + 0.5 / n), last eps"""
    trace_variant: Optional[Literal["retrace", "speedup"]] = None
    """advantage trace (default per task: retrace HalfCheetah, speedup Ant, Walker2d, Humanoid)"""
    trace_clip: float = 1.0
    """truncation c of the importance ratios in the retrace variant (speedup truncates its cumulative product at 1)"""
    trace_lambda_squared: bool = True
    """reference quirk 15: the retrace trace applies lambda twice (decay gamma lambda^2); off: Retrace-GAE"""
    two_stage: bool = True
    """per agent and epoch, a critic-only pass over its minibatches before the actor + critic pass"""
    approx_trace: bool = True
    """the critic regresses onto the traced returns (off: onto the rollout's GAE returns)"""
    # Environment (MaMuJoCo)
    scenario: str = "HalfCheetah"
    """MuJoCo task: HalfCheetah Ant Walker2d Hopper Humanoid HumanoidStandup Reacher Swimmer Pusher CoupledHalfCheetah"""
    agent_conf: str = "2x3"
    """agent partition: a built-in one of mamujoco_v1, Walker2d 3x2 (reference), or one joint per agent (e.g. 6x1)"""
    agent_obsk: int = 1
    """observation depth k of each agent's local view (reference: 1)"""
    obs_mode: Optional[Literal["local_k", "global"]] = None
    """local_k: own joints + k-neighbours, no root features; global: every agent sees state() (default Humanoid)"""
    max_episode_steps: int = 1000
    """time limit of an episode (v5 default 1000; episodes are truncated there)"""
    mask_padded_actions: bool = True
    """mask padded action dims (unequal action sizes, e.g. Humanoid 9|8) out of log-probs, ratios and entropy"""
    per_dim_ratio: bool = True
    """reference quirk 19: ratio and clip per action dim, summed (off: one ratio of the joint log-prob)"""
    async_envs: bool = False
    """step the envs in subprocesses (gymnasium AsyncVectorEnv); only pays off with many cores"""


# Reference MaMuJoCo settings (lorasa.md section 9); fill only what the user left unset (the command line wins).
TASK_DEFAULTS = {
    ("HalfCheetah", "2x3"): dict(num_envs=16, num_steps=250, update_epochs=5, gae_lambda=0.93, trace_variant="retrace"),
    ("Ant", "4x2"): dict(num_envs=25, num_steps=160, update_epochs=3, gae_lambda=0.93, trace_variant="speedup"),
    ("Walker2d", "3x2"): dict(num_envs=16, num_steps=250, update_epochs=3, gae_lambda=0.93, trace_variant="speedup"),
    ("Humanoid", "9|8"): dict(num_envs=25, num_steps=160, update_epochs=3, gae_lambda=0.90, trace_variant="speedup"),
}
OTHER_TASK_DEFAULTS = dict(num_envs=16, num_steps=250, update_epochs=3, gae_lambda=0.93, trace_variant="speedup")
BUILTIN_CONFS = {  # gymnasium-robotics 1.4.2 (envs.md section 1)
    "HalfCheetah": ("2x3", "6x1"), "Ant": ("2x4", "2x4d", "4x2"), "Walker2d": ("2x3",), "Hopper": ("3x1",),
    "Humanoid": ("9|8",), "HumanoidStandup": ("9|8",), "Reacher": ("2x1",), "Swimmer": ("2x1",), "Pusher": ("3p",),
    "CoupledHalfCheetah": ("1p1",),
}
CUSTOM_CONFS = {("Walker2d", "3x2"): [("foot_joint", "leg_joint"), ("thigh_joint", "foot_left_joint"),
                                     ("leg_left_joint", "thigh_left_joint")]}  # the reference's Walker2d partition


EVAL_KEYS = ("seed", "eval_episodes", "max_episode_steps")  # what --eval-only takes from the command line


def fail(msg):
    """One clear line on stderr, no traceback, exit code 2 (before any env or network is built)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def finalize_args(args):
    """Fill per-task defaults, derive sizes and validate, each problem with one line naming the value."""
    # >>> shared:args-checks
    if args.resume and not args.checkpoint:
        fail("--resume needs --checkpoint PATH (the checkpoint.pt of the run to continue)")
    if args.eval_only and not args.checkpoint:
        fail("--eval-only needs --checkpoint PATH")
    ckpt = load_checkpoint_file(args.checkpoint) if args.checkpoint else None
    if args.resume or args.eval_only:  # the checkpoint's own task, shape and settings; only these come from the CLI
        cli = ("cuda", "checkpoint", "resume", "eval_only", "run_dir", "async_envs") + (EVAL_KEYS if args.eval_only else ())
        keep = {k: getattr(args, k) for k in cli}
        if args.resume:  # a longer run may be asked for; otherwise the checkpoint's own length
            keep["total_timesteps"] = args.total_timesteps or ckpt["args"]["total_timesteps"]
        args = Args(**{**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__}, **keep})
        args.lora_layers = tuple(args.lora_layers)
    args.total_timesteps = 12_000_000 if args.total_timesteps is None else args.total_timesteps
    if args.rank < 1:
        fail(f"--rank {args.rank} is invalid: the adapter rank must be an integer >= 1")
    args.lora_alpha = float(args.rank) if args.lora_alpha is None else args.lora_alpha
    if not args.lora_alpha > 0:
        fail(f"--lora-alpha {args.lora_alpha} is invalid: it must be > 0 (default: the rank)")
    names = [n for n in LAYER_NAMES if args.recurrent or not n.startswith("gru")]
    for name in args.lora_layers:
        if name not in names:
            fail(f"--lora-layers: unknown layer {name!r}; accepted: {' '.join(names)}")
    args.lora_layers = tuple(n for n in args.lora_layers if n in names)
    # <<< shared:args-checks
    if args.scenario not in BUILTIN_CONFS:
        fail(f"--scenario {args.scenario!r} is not supported; accepted: {' '.join(BUILTIN_CONFS)}")
    joints = mujoco_joint_labels(args.scenario)
    confs = BUILTIN_CONFS[args.scenario] + tuple(c for (s, c) in CUSTOM_CONFS if s == args.scenario)
    confs = tuple(dict.fromkeys(confs + ((f"{len(joints)}x1",) if joints else ())))
    if args.agent_conf not in confs:
        fail(f"--agent-conf {args.agent_conf!r} is not available for {args.scenario}; accepted: {' '.join(confs)}")
    if args.agent_obsk < 0:
        fail(f"--agent-obsk {args.agent_obsk} is invalid: it must be >= 0")
    defaults = TASK_DEFAULTS.get((args.scenario, args.agent_conf), OTHER_TASK_DEFAULTS)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.obs_mode is None:
        args.obs_mode = "global" if args.scenario.startswith("Humanoid") else "local_k"
    for key in ("others_clip_coef", "trace_clip"):
        if not getattr(args, key) > 0:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid: it must be > 0")
    if not 0 <= args.clip_tuner_weight <= 1:
        fail(f"--clip-tuner-weight {args.clip_tuner_weight} is invalid: accepted 0 ... 1")
    # >>> shared:args-derived
    for key in ("num_envs", "num_steps", "update_epochs", "num_minibatches", "data_chunk_length", "hidden_size",
                "eval_interval", "eval_episodes", "total_timesteps"):
        if getattr(args, key) < 1:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid: it must be >= 1")
    if args.num_steps % args.data_chunk_length:
        fail(f"--num-steps {args.num_steps} is not a multiple of --data-chunk-length {args.data_chunk_length}; "
             f"accepted: multiples of {args.data_chunk_length}")
    args.num_chunks = args.num_envs * args.num_steps // args.data_chunk_length
    if args.num_minibatches > args.num_chunks:
        fail(f"--num-minibatches {args.num_minibatches} exceeds the {args.num_chunks} chunks per iteration")
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // args.batch_size
    args.lora_start = args.total_timesteps // 4 if args.lora_start is None else args.lora_start
    if not 0 <= args.lora_start <= args.total_timesteps:
        fail(f"--lora-start {args.lora_start} is invalid: accepted 0 ... --total-timesteps ({args.total_timesteps})")
    if ckpt is not None:
        check_checkpoint(args, ckpt)
    if ckpt is None and args.num_iterations < 1:
        fail(f"--total-timesteps {args.total_timesteps} is below one iteration ({args.batch_size} steps)")
    return args, ckpt
    # <<< shared:args-derived


# ==== 4. ENVIRONMENT ====
def silence_mujoco():
    """envs.md section 1: drop MuJoCo's `settotalmass` deprecation warning (else printed and appended to
    MUJOCO_LOG.TXT in the working directory); forward any other MuJoCo warning to `warnings.warn`."""
    import mujoco

    def on_warning(msg):
        if "settotalmass" not in msg:
            warnings.warn(f"MuJoCo: {msg}")

    mujoco.set_mju_user_warning(on_warning)


def import_mamujoco():
    """Import under a stderr redirect: gymnasium_robotics prints an Adroit banner that warning filters cannot stop."""
    silence_mujoco()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        from gymnasium_robotics import mamujoco_v1
        from gymnasium_robotics.envs.multiagent_mujoco.obsk import get_parts_and_edges
    return mamujoco_v1, get_parts_and_edges


def mujoco_joint_labels(scenario):
    """Actuated joint labels of the single-agent task (for one-joint-per-agent partitions); () if it has none."""
    _, get_parts_and_edges = import_mamujoco()
    try:
        parts, _, _ = get_parts_and_edges(scenario, None)
    except Exception:  # the library raises a bare Exception for tasks without a single-agent partition (Pusher)
        return ()
    return tuple(node.label for node in parts[0])


class MaMuJoCoEnv(gym.Env):
    """Adapter of envs.md section 0 over one `mamujoco_v1.parallel_env`, as a gymnasium.Env so that LockstepEnvs or
    gymnasium's AsyncVectorEnv can step many of them (no autoreset: the script resets finished envs itself).
    observation = {"obs": (N, obs_dim) [obs_i zero-padded, one-hot(i)], "state": (N, state_dim) [state(), one-hot(i)]},
    float32; action (N, act_dim) in [-1, 1], padded dims ignored; reward = the shared team reward (a float)."""

    def __init__(self, scenario, agent_conf, agent_obsk=1, obs_mode="local_k", max_episode_steps=1000):
        mamujoco_v1, get_parts_and_edges = import_mamujoco()
        factorization = None
        if agent_conf not in BUILTIN_CONFS.get(scenario, ()):  # custom partition (envs.md section 1)
            parts, edges, globals_ = get_parts_and_edges(scenario, None)
            nodes = {node.label: node for node in parts[0]}
            groups = CUSTOM_CONFS.get((scenario, agent_conf), [(label,) for label in nodes])
            factorization = dict(partition=[tuple(nodes[x] for x in g) for g in groups], edges=edges, globals=globals_)
        # global_categories=(): the reference's local observations carry no root features (quirk 22)
        self.env = mamujoco_v1.parallel_env(scenario, agent_conf, agent_obsk=agent_obsk, agent_factorization=factorization,
                                            global_categories=(), max_episode_steps=max_episode_steps)
        self.agents = self.env.possible_agents
        self.n_agents = n = len(self.agents)
        self.global_obs = obs_mode == "global"
        state_len = self.env.state().shape[0]
        self.obs_sizes = [state_len if self.global_obs else self.env.observation_space(a).shape[0] for a in self.agents]
        self.act_sizes = [self.env.action_space(a).shape[0] for a in self.agents]
        self.obs_dim, self.state_dim, self.act_dim = max(self.obs_sizes) + n, state_len + n, max(self.act_sizes)
        self.act_mask = np.zeros((n, self.act_dim), np.float32)  # 1 on real action dims, 0 on padding
        for i, k in enumerate(self.act_sizes):
            self.act_mask[i, :k] = 1
        spaces = [self.env.action_space(a) for a in self.agents]  # FIX 1: a in [-1, 1] -> low + (a + 1)(high - low)/2
        self.scale, self.offset = [(s.high - s.low) / 2 for s in spaces], [(s.high + s.low) / 2 for s in spaces]
        self.obs, self.state = np.zeros((n, self.obs_dim), np.float32), np.zeros((n, self.state_dim), np.float32)
        self.obs[:, -n:] = self.state[:, -n:] = np.eye(n, dtype=np.float32)  # one-hot agent ids
        self.observation_space = gym.spaces.Dict(
            obs=gym.spaces.Box(-np.inf, np.inf, (n, self.obs_dim), np.float32),
            state=gym.spaces.Box(-np.inf, np.inf, (n, self.state_dim), np.float32))
        self.action_space = gym.spaces.Box(-1.0, 1.0, (n, self.act_dim), np.float32)

    def _observe(self, obs_dict):
        """Fill the preallocated float32 arrays (MaMuJoCo returns float64); callers copy them before the next call."""
        state = self.env.state()
        self.state[:, : -self.n_agents] = state
        for i, a in enumerate(self.agents):
            self.obs[i, : self.obs_sizes[i]] = state if self.global_obs else obs_dict[a]
        return dict(obs=self.obs, state=self.state)

    def reset(self, seed=None, options=None):
        obs, _ = self.env.reset(seed=seed)
        return self._observe(obs), {}

    def step(self, action):
        # FIX 1: map [-1, 1] affinely onto the joint bounds (Humanoid: +-0.4); padded dims are dropped here
        acts = {a: self.offset[i] + self.scale[i] * action[i, :k] for i, (a, k) in enumerate(zip(self.agents, self.act_sizes))}
        obs, rew, term, trunc, _ = self.env.step(acts)
        a0 = self.agents[0]  # shared reward and flags: identical for every agent
        return self._observe(obs), float(rew[a0]), bool(term[a0]), bool(trunc[a0]), {}


# >>> shared:lockstep
class LockstepEnvs:
    """Steps a list of adapters one after another in this process (the default: on few cores this beats subprocesses,
    envs.md section 0). Same calls as gymnasium's vector envs with autoreset disabled: `step(actions)` ->
    (obs dict of stacked arrays, rewards, terminated, truncated, {}); `reset(seed=list, options={"reset_mask": m})`."""

    def __init__(self, fns):
        self.envs = [fn() for fn in fns]
        self.num_envs, self.single_action_space = len(self.envs), self.envs[0].action_space
        self.obs = {k: np.zeros((self.num_envs, *s.shape), s.dtype) for k, s in self.envs[0].observation_space.items()}

    def _put(self, k, obs):
        for key, v in obs.items():
            self.obs[key][k] = v

    def reset(self, seed=None, options=None):
        mask = (options or {}).get("reset_mask", np.ones(self.num_envs, bool))
        for k in np.flatnonzero(mask):
            self._put(k, self.envs[k].reset(seed=None if seed is None else seed[k])[0])
        return {k: v.copy() for k, v in self.obs.items()}, {}

    def step(self, actions):
        rew, term, trunc = np.zeros(self.num_envs), np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool)
        for k, env in enumerate(self.envs):
            obs, rew[k], term[k], trunc[k], _ = env.step(actions[k])
            self._put(k, obs)
        return {k: v.copy() for k, v in self.obs.items()}, rew, term, trunc, {}

    def close(self):
        for env in self.envs:
            env.close()
# <<< shared:lockstep


def make_envs(args, n, seeds):
    """n adapters stepped in lockstep (--async-envs: in subprocesses); returns the envs and their first observation."""
    fns = [lambda: MaMuJoCoEnv(args.scenario, args.agent_conf, args.agent_obsk, args.obs_mode, args.max_episode_steps)
           for _ in range(n)]
    if args.async_envs:
        envs = gym.vector.AsyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    else:
        envs = LockstepEnvs(fns)
    obs, _ = envs.reset(seed=seeds)
    return envs, obs


def task_name(args):
    mode = f"local{args.agent_obsk}" if args.obs_mode == "local_k" else "global"
    return f"{args.scenario}-{args.agent_conf.replace('|', '_')}-{mode}"


# ==== 5. LAYERS: layer_init, LoRALinear, LayerNorm, GRU cell ====
# >>> shared:lora
def layer_init(weight, gain):
    """Orthogonal init with the given gain (sqrt 2 ReLU blocks, 0.01 action head, 1 GRU and critic head); bias 0."""
    nn.init.orthogonal_(weight, gain)
    return weight


def stack(params, agents):
    """Stack per-agent leaf tensors along a leading agent axis (all agents, or the listed ones)."""
    return torch.stack(list(params) if agents is None else [params[i] for i in agents])


class LoRALinear(nn.Module):
    """Multi-agent linear layer (lorasa.md section 3). Agent i computes y = x (W0 + s B_i A_i)^T + b0 + beta_i,
    A_i (r x in), B_i (out x r), s = alpha / r. Modes: ps (W0, b0 only), lorasa (shared + adapters, the adapters only
    once `lora_on`), nps (a full W_i, b_i per agent). Per-agent tensors are separate leaves (nn.ParameterList) so that
    each agent's optimiser and gradient clip see only its own group; the forward stacks them and computes all agents
    in one batched matmul. Input (n_agents, ..., in) -> (n_agents, ..., out)."""

    def __init__(self, n_in, n_out, n_agents, mode, adapt, rank=8, alpha=8.0, gain=1.0, lora_init="reference"):
        super().__init__()
        self.mode, self.adapt, self.lora_on, self.cache = mode, mode == "lorasa" and adapt, False, None
        if mode == "nps":
            self.weight_i = nn.ParameterList([layer_init(torch.empty(n_out, n_in), gain) for _ in range(n_agents)])
            self.bias_i = nn.ParameterList([torch.zeros(n_out) for _ in range(n_agents)])
            return
        self.weight = nn.Parameter(layer_init(torch.empty(n_out, n_in), gain))
        self.bias = nn.Parameter(torch.zeros(n_out))
        if self.adapt:
            self.scaling = alpha / rank
            kaiming = lambda *shape: nn.init.kaiming_uniform_(torch.empty(*shape), a=math.sqrt(5))
            if lora_init == "reference":  # KEEP 16: A = 0, B ~ kaiming_uniform(a=sqrt 5), the reverse of the LoRA paper
                a_init, b_init = (lambda: torch.zeros(rank, n_in)), (lambda: kaiming(n_out, rank))
            else:  # LoRA paper: A random, B = 0; either way dW = B A = 0 at the start of phase lora
                a_init, b_init = (lambda: kaiming(rank, n_in)), (lambda: torch.zeros(n_out, rank))
            self.lora_A = nn.ParameterList([a_init() for _ in range(n_agents)])
            self.lora_B = nn.ParameterList([b_init() for _ in range(n_agents)])
            # KEEP 18: per-agent biases exist (init 0); start_phase trains them only with --train-agent-bias
            self.lora_bias = nn.ParameterList([torch.zeros(n_out) for _ in range(n_agents)])

    def weights(self, agents=None):
        """(W, b) as used by the forward: shared (out, in), (out,) or per agent (n, out, in), (n, 1, out)."""
        if self.cache is not None and not torch.is_grad_enabled():  # merged weights (rollouts, evaluation)
            w, b = self.cache
            return (w, b) if agents is None or w.dim() == 2 else (w[agents], b[agents])
        if self.mode == "nps":
            return stack(self.weight_i, agents), stack(self.bias_i, agents)[:, None]
        if not (self.adapt and self.lora_on):
            return self.weight, self.bias
        delta = torch.bmm(stack(self.lora_B, agents), stack(self.lora_A, agents))  # B_i A_i, (n, out, in)
        return self.weight + self.scaling * delta, (self.bias + stack(self.lora_bias, agents))[:, None]

    def merge(self):
        """Precompute W_i = W0 + s B_i A_i, b_i = b0 + beta_i under no_grad (lorasa.md section 3)."""
        self.cache = None
        if self.mode == "nps" or (self.adapt and self.lora_on):  # shared-only layers have nothing to merge
            with torch.no_grad():
                self.cache = tuple(t.detach() for t in self.weights())

    def forward(self, x, agents=None, wb=None):
        w, b = self.weights(agents) if wb is None else wb
        if w.dim() == 2:  # one shared matrix for all agents
            return F.linear(x, w, b)
        return torch.baddbmm(b, x.flatten(1, -2), w.mT).view(*x.shape[:-1], -1)  # one batched op over agents

    def delta_norms(self):
        """||s B_i A_i||_F per agent (adapted layers only)."""
        with torch.no_grad():
            return self.scaling * torch.linalg.matrix_norm(torch.bmm(stack(self.lora_B, None), stack(self.lora_A, None)))


class MALayerNorm(nn.Module):
    """LayerNorm, shared (ps, lorasa: never adapted, frozen in phase lora) or one per agent (nps)."""

    def __init__(self, dim, n_agents, per_agent):
        super().__init__()
        self.per_agent, self.cache = per_agent, None
        if per_agent:
            self.weight_i = nn.ParameterList([torch.ones(dim) for _ in range(n_agents)])
            self.bias_i = nn.ParameterList([torch.zeros(dim) for _ in range(n_agents)])
        else:
            self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def merge(self):
        """nps: stack the per-agent affine parameters once for rollouts and evaluation (used under no_grad only)."""
        self.cache = None
        if self.per_agent:
            with torch.no_grad():
                self.cache = stack(self.weight_i, None).detach(), stack(self.bias_i, None).detach()

    def forward(self, x, agents=None):
        if not self.per_agent:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)  # eps 1e-5, as nn.LayerNorm
        shape = (-1,) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        if self.cache is not None and not torch.is_grad_enabled():
            w, b = self.cache if agents is None else (self.cache[0][agents], self.cache[1][agents])
        else:
            w, b = stack(self.weight_i, agents), stack(self.bias_i, agents)
        return F.layer_norm(x, x.shape[-1:]) * w.view(shape) + b.view(shape)
# <<< shared:lora


# >>> shared:gru
class GRU(nn.Module):
    """Hand-written GRU with `torch.nn.GRU` maths and gate layout [r, z, n] (lorasa.md section 2), used in both
    phases. Its input and hidden projections are LoRALinear layers (gru_x, gru_h): one adapter pair covers all gates.
    gx = Wx x + bx, gh = Wh h + bh;  r = sig(gx_r + gh_r), z = sig(gx_z + gh_z), n = tanh(gx_n + r * gh_n),
    h' = (1 - z) n + z h.  The hidden state is reset by h <- h * mask before every step."""

    def __init__(self, n_in, hidden, n_agents, mode, layers, lora_kw):
        super().__init__()
        self.gru_x = LoRALinear(n_in, 3 * hidden, n_agents, mode, "gru_x" in layers, gain=1.0, **lora_kw)
        self.gru_h = LoRALinear(hidden, 3 * hidden, n_agents, mode, "gru_h" in layers, gain=1.0, **lora_kw)

    def forward(self, x, h, masks, agents=None):
        """x (n, T, B, in), h (n, B, H), masks (T, B) -> hidden states after every step (n, T, B, H)."""
        gx = self.gru_x(x, agents)  # input projection for all T steps at once
        wb, H2 = self.gru_h.weights(agents), 2 * h.shape[-1]  # recurrent weights built once per call, not per step
        out = []
        for t in range(x.shape[1]):
            h = h * masks[t, :, None]
            gh = self.gru_h(h, agents, wb)
            r, z = torch.sigmoid(gx[:, t, :, :H2] + gh[..., :H2]).chunk(2, -1)
            n = torch.tanh(gx[:, t, :, H2:] + r * gh[..., H2:])
            h = n + z * (h - n)  # = (1 - z) n + z h
            out.append(h)
        return torch.stack(out, 1) if len(out) > 1 else h[:, None]
# <<< shared:gru


# ==== 6. ACTOR, CRITIC, VALUENORM ====
# >>> shared:trunk
class Trunk(nn.Module):
    """Feature LayerNorm -> 3 x (Linear-ReLU-LayerNorm) -> GRU -> LayerNorm -> 1 block (lorasa.md section 2)."""

    def __init__(self, n_in, args, n_agents, mode):
        super().__init__()
        H, per_agent, layers = args.hidden_size, mode == "nps", args.lora_layers if mode == "lorasa" else ()
        lora_kw = dict(rank=args.rank, alpha=args.lora_alpha, lora_init=args.lora_init)
        self.recurrent = args.recurrent
        self.feature_norm = MALayerNorm(n_in, n_agents, per_agent)
        dims = {"fc1": (n_in, H), "fc2a": (H, H), "fc2b": (H, H), "fc_post": (H, H)}
        self.fcs = nn.ModuleDict({k: LoRALinear(i, o, n_agents, mode, k in layers, gain=math.sqrt(2), **lora_kw)
                                  for k, (i, o) in dims.items()})
        self.norms = nn.ModuleDict({k: MALayerNorm(H, n_agents, per_agent) for k in dims})
        if args.recurrent:
            self.gru = GRU(H, H, n_agents, mode, layers, lora_kw)
            self.gru_norm = MALayerNorm(H, n_agents, per_agent)

    def forward(self, x, h, masks, agents=None):
        """x (n, T, B, in), h (n, B, H), masks (T, B) -> features (n, T, B, H), hidden after every step (n, T, B, H)."""
        block = lambda k, x: self.norms[k](F.relu(self.fcs[k](x, agents)), agents)
        x = block("fc2b", block("fc2a", block("fc1", self.feature_norm(x, agents))))
        if self.recurrent:
            hs = self.gru(x, h, masks, agents)
            x = self.gru_norm(hs, agents)
        else:  # feed-forward: the (unused) hidden state passes through
            hs = h[:, None].expand(-1, x.shape[1], -1, -1)
        return block("fc_post", x), hs


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def set_lora(model, on):
    """Switch the adapters (and the actor's log-std offsets) on or off; clears merged weights."""
    for m in model.modules():
        if hasattr(m, "lora_on"):
            m.lora_on, m.cache = on, None


def merge(*models):
    """Precompute every layer's per-agent weights (and the std) for rollouts and evaluation; call after each update.
    The merged weights are used only under no_grad, so training always sees the live parameters."""
    for m in (m for model in models for m in model.modules()):
        if hasattr(m, "cache"):
            m.merge()


def unmerge(*models):
    """Drop merged weights (before an update, whose no_grad forwards must see the parameters as they change)."""
    for m in (m for model in models for m in model.modules()):
        if hasattr(m, "cache"):
            m.cache = None


def start_phase(actor, phase, args):
    """ps: one Adam over the shared actor (adapters off, untrained); lora: every shared actor parameter frozen
    (FIX 8), adapters on at dW = 0, one Adam per agent over its own group (lorasa.md section 1); nps: one Adam per
    agent over its whole network. The critic optimiser and value normalisers are not touched (FIX 26).
    Returns the actor's parameter groups and their optimisers (fresh Adam states)."""
    set_lora(actor, phase == "lora")
    for n, p in actor.named_parameters():
        train = ("lora_" in n) == (phase == "lora") or phase == "nps"
        p.requires_grad_(train and ("lora_bias" not in n or args.train_agent_bias))  # KEEP 18
    groups = [[p for n, p in actor.named_parameters() if "lora_" not in n]] if phase == "ps" else agent_groups(actor)
    optims = [torch.optim.Adam(g, lr=args.learning_rate, eps=args.adam_eps) for g in groups]
    merge(actor)
    return groups, optims


def agent_groups(model):
    """Agent i's parameter group, by construction: entry i of every per-agent ParameterList that trains
    (lorasa: A_i, B_i, log-std offset d_i [, beta_i]; nps: agent i's whole network). Fixes defect 5."""
    lists = [m for m in model.modules() if isinstance(m, nn.ParameterList)]
    return [[pl[i] for pl in lists if pl[i].requires_grad] for i in range(len(lists[0]))]
# <<< shared:trunk


class Actor(nn.Module):
    """Recurrent squashed-Gaussian actor (reference gaussian_version 3, KEEP 20): mu = head(trunk(obs)),
    log sigma~_i = log_std (shared) + d_i (agent i's offset, phase lora), sigma = 0.5 sigmoid(log sigma~), a = tanh(u),
    u ~ N(mu, sigma)."""

    def __init__(self, obs_dim, act_dim, n_agents, args):
        super().__init__()
        mode = args.share_mode
        self.trunk = Trunk(obs_dim, args, n_agents, mode)
        self.head = LoRALinear(args.hidden_size, act_dim, n_agents, mode, "head" in args.lora_layers, gain=0.01,
                               rank=args.rank, alpha=args.lora_alpha, lora_init=args.lora_init)
        if mode == "nps":
            self.log_std_i = nn.ParameterList([torch.ones(act_dim) for _ in range(n_agents)])
        else:
            self.log_std = nn.Parameter(torch.ones(act_dim))  # reference log_std init 1.0 (sigma ~ 0.366)
            if mode == "lorasa":  # the per-agent std offset d_i, always adapted when r > 0
                self.lora_std = nn.ParameterList([torch.zeros(act_dim) for _ in range(n_agents)])
        self.lora_on, self.cache, self.n_agents = False, None, n_agents

    def log_std_of(self, agents=None):
        """(n, act_dim) effective log sigma~ of the given agents."""
        n = self.n_agents if agents is None else len(agents)
        if hasattr(self, "log_std_i"):
            return stack(self.log_std_i, agents)
        if self.lora_on:
            return self.log_std + stack(self.lora_std, agents)
        return self.log_std.expand(n, -1)

    def merge(self):
        """The std is state-independent: computed once per update for rollouts and evaluation (no_grad only)."""
        self.cache = None
        with torch.no_grad():
            self.cache = self.std_of(None).detach()

    def std_of(self, agents):
        if self.cache is not None and not torch.is_grad_enabled():
            return self.cache if agents is None else self.cache[agents]
        return 0.5 * torch.sigmoid(self.log_std_of(agents))[:, None, None]  # sigma = 0.5 sigmoid(log sigma~)

    def forward(self, obs, h, masks, agents=None):
        """obs (n, T, B, obs_dim) -> mean (n, T, B, act_dim), std (n, 1, 1, act_dim), next h (n, B, H)."""
        x, hs = self.trunk(obs, h, masks, agents)
        return self.head(x, agents), self.std_of(agents), hs[:, -1]


EPS = float(np.finfo(np.float32).eps)


LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def squashed_log_prob(mean, std, action):
    """Per-dimension log-prob of a = tanh(u), u ~ N(mean, std) (reference: not summed over dims):
    log N(atanh(clamp(a, +-(1-eps))); mean, std) - log(1 - a^2 + eps)."""
    u = torch.atanh(action.clamp(-1 + EPS, 1 - EPS))
    return -0.5 * ((u - mean) / std).pow(2) - std.log() - LOG_SQRT_2PI - torch.log(1 - action.pow(2) + EPS)


def squashed_entropy(mean, std):
    """KEEP 20: one-sample estimate, per dim, H(N(mean, std)) + log(1 - tanh(u)^2 + eps) with a fresh u ~ N(mean, std)."""
    u = mean + std * torch.randn_like(mean)
    return 0.5 + LOG_SQRT_2PI + std.log() + torch.log(1 - torch.tanh(u).pow(2) + EPS)


class Critic(nn.Module):
    """Centralised recurrent critic: input state_i = [state(), one-hot(i)]; the actor's trunk + Linear(H -> 1).
    One network for all agents (nps: one per agent), never adapted, trainable in both phases."""

    def __init__(self, state_dim, n_agents, args):
        super().__init__()
        mode = "nps" if args.share_mode == "nps" else "ps"
        self.trunk = Trunk(state_dim, args, n_agents, mode)
        self.head = LoRALinear(args.hidden_size, 1, n_agents, mode, False, gain=1.0)

    def forward(self, state, h, masks, agents=None):
        """state (n, T, B, state_dim) -> normalised values (n, T, B), hidden after every step (n, T, B, H)."""
        x, hs = self.trunk(state, h, masks, agents)
        return self.head(x, agents)[..., 0], hs


# >>> shared:valuenorm
class ValueNorm(nn.Module):
    """One running return normaliser per agent (lorasa.md section 5, KEEP 25), with debiasing:
    m <- b m + (1-b) mean(R), q <- b q + (1-b) mean(R^2), d <- b d + (1-b), b = 0.99999;
    mu = m / max(d, 1e-5), var = max(q / max(d, 1e-5) - mu^2, 1e-2)."""

    def __init__(self, n_agents, beta=0.99999):
        super().__init__()
        self.beta = beta
        for k in ("m", "q", "d"):
            self.register_buffer(k, torch.zeros(n_agents, dtype=torch.float64))

    def update(self, x, agents=None):
        """x (n, ...): returns of the given agents (all when None), leading agent axis."""
        idx = slice(None) if agents is None else torch.as_tensor(agents, device=self.m.device)
        x, b = x.detach().flatten(1).double(), self.beta
        self.m[idx] = b * self.m[idx] + (1 - b) * x.mean(1)
        self.q[idx] = b * self.q[idx] + (1 - b) * x.pow(2).mean(1)
        self.d[idx] = b * self.d[idx] + (1 - b)

    def stats(self, x, agents, dim):
        idx = slice(None) if agents is None else torch.as_tensor(agents, device=self.m.device)
        mu = self.m[idx] / self.d[idx].clamp(min=1e-5)
        var = (self.q[idx] / self.d[idx].clamp(min=1e-5) - mu.pow(2)).clamp(min=1e-2)
        shape = [1] * x.dim()
        shape[dim] = -1
        return mu.float().view(shape), var.sqrt().float().view(shape)

    def normalize(self, x, agents=None, dim=0):
        mu, std = self.stats(x, agents, dim)
        return (x - mu) / std

    def denormalize(self, x, agents=None, dim=0):
        mu, std = self.stats(x, agents, dim)
        return x * std + mu
# <<< shared:valuenorm


# ==== 7. ROLLOUT BUFFER, CHUNKS, GAE ====
class Buffer:
    """Time-major rollout storage: row t holds what the policy saw at step t; rows 0 and T are the iteration's
    boundary (row T is copied to row 0 after the update, so rollouts continue across iterations).
    masks[t] = 0 if an episode ended at step t-1 (the hidden state is reset before step t)."""

    def __init__(self, T, E, N, obs_dim, state_dim, act_dim, H, device):
        z = lambda *s: torch.zeros(*s, device=device)
        self.obs, self.state = z(T + 1, N, E, obs_dim), z(T + 1, N, E, state_dim)
        self.actor_h, self.critic_h = z(T + 1, N, E, H), z(T + 1, N, E, H)
        self.masks, self.bad_masks = torch.ones(T + 1, E, device=device), torch.ones(T + 1, E, device=device)
        self.actions, self.logprobs, self.means = z(T, N, E, act_dim), z(T, N, E, act_dim), z(T, N, E, act_dim)
        self.values = z(T + 1, N, E)  # normalised critic outputs; row T = bootstrap value
        self.final_values = z(T, N, E)  # normalised V(true final state) where a truncation happened at step t
        self.boot = z(T, E)  # 1 where step t was a time-limit truncation that is bootstrapped (FIX 21)
        self.rewards = z(T, E)

    def roll(self):
        for k in ("obs", "state", "actor_h", "critic_h", "masks", "bad_masks"):
            getattr(self, k)[0] = getattr(self, k)[-1]


# >>> shared:gae
def gae(rewards, values, masks, bad_masks, gamma, lam):
    """GAE (lorasa.md section 7), time-major: rewards (T, ...), values/masks/bad_masks (T+1, ...), values
    de-normalised. delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t;  A_t = (delta_t + gamma lam m_{t+1} A_{t+1}) b_{t+1}.
    Returns the returns R_t = A_t + V_t."""
    adv, last = torch.zeros_like(values[:-1]), torch.zeros_like(values[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * values[t + 1] * masks[t + 1] - values[t]
        last = (delta + gamma * lam * masks[t + 1] * last) * bad_masks[t + 1]
        adv[t] = last
    return adv + values[:-1]
# <<< shared:gae


# >>> shared:chunks
def chunk_minibatches(data, T, L, num_minibatches):
    """Cut every (env) stream of the time-major tensors in `data` into chunks of L steps and shuffle the chunks
    (lorasa.md section 6.3). Tensors with an agent axis, (T, N, E, ...), come out as (N, L, B, ...); (T, E) ones
    as (L, B); keys ending in `_h` are hidden states and keep only the chunk's first step: (N, B, H)."""
    E = data["masks"].shape[1]
    C = T // L
    perm = torch.randperm(C * E, device=data["masks"].device)
    out = {}
    for k, v in data.items():
        if k.endswith("_h"):  # stored rollout hidden state at each chunk start
            out[k] = v[:T:L].permute(1, 0, 2, 3).reshape(v.shape[1], C * E, -1)
        elif v.dim() == 2:  # (T, E) -> (L, C*E)
            out[k] = v[:T].view(C, L, E).transpose(0, 1).reshape(L, C * E)
        else:  # (T, N, E, ...) -> (N, L, C*E, ...)
            x = v[:T].reshape(C, L, *v.shape[1:]).movedim(2, 0)
            out[k] = x.transpose(1, 2).reshape(x.shape[0], L, C * E, *v.shape[3:])
    for idx in perm.chunk(num_minibatches):
        yield {k: v[:, idx] if k.endswith("_h") or v.dim() == 2 else v[:, :, idx] for k, v in out.items()}
# <<< shared:chunks


def pick(mb, agents):
    """The given agents' rows of a chunked minibatch (every tensor but the (L, B) masks has a leading agent axis)."""
    return {k: v if k == "masks" else v[agents] for k, v in mb.items()}


def retrace_trace(deltas, rho, masks, bad_masks, gamma, lam, c_bar=1.0, lambda_squared=True):
    """a2po.md section 5(a), time-major (deltas, rho (T, ...); masks, bad_masks (T+1, ...)):
    c_t = lam min(rho_t, c_bar) (KEEP 15: lam again on top of gamma lam; --no-trace-lambda-squared: min(rho_t, c_bar)),
    A_T = 0, A_t = b_{t+1} [delta_t + gamma lam m_{t+1} c_{t+1} A_{t+1}]. rho = 1 gives GAE(lam^2) (GAE(lam))."""
    c = rho.clamp(max=c_bar) * (lam if lambda_squared else 1.0)
    adv, last = torch.zeros_like(deltas), torch.zeros_like(deltas[0])
    for t in reversed(range(deltas.shape[0])):
        nxt = c[t + 1] * last if t + 1 < deltas.shape[0] else 0.0
        last = bad_masks[t + 1] * (deltas[t] + gamma * lam * masks[t + 1] * nxt)
        adv[t] = last
    return adv


def speedup_trace(deltas, rho, masks, bad_masks, gamma, lam):
    """a2po.md section 5(b): A_t = sum_{k>=t} (gamma lam)^{k-t} C_{t,k} prod_{j=t+1..k} m_j prod_{j=t..k} b_{j+1} delta_k,
    C_{t,t} = 1, C_{t,k} = min(1, rho_k C_{t,k-1}): a cumulative product truncated at 1. rho = 1 gives GAE(lam).
    O(T^2): vectorised over t, a loop over k."""
    adv, P, C, B = (torch.zeros_like(deltas) for _ in range(4))
    for k in range(deltas.shape[0]):
        P[:k] *= gamma * lam * masks[k]
        C[:k] = (rho[k] * C[:k]).clamp(max=1.0)
        B[:k] *= bad_masks[k + 1]
        P[k], C[k], B[k] = 1.0, 1.0, bad_masks[k + 1]
        adv[: k + 1] += P[: k + 1] * C[: k + 1] * B[: k + 1] * deltas[k]
    return adv


# ==== 8. UPDATE (A2PO) ====
# >>> shared:losses
def huber(x, delta):
    """Symmetric Huber loss (FIX 2: the reference's is zero for x < -delta)."""
    a = x.abs()
    return torch.where(a <= delta, 0.5 * x.pow(2), delta * (a - 0.5 * delta))


def value_loss_fn(args, critic, value_norm, mb, agents=None):
    """Clipped value loss (lorasa.md section 5): the value normaliser is updated with this minibatch's returns of
    each agent before the targets are normalised; L = mean max(Huber(R~ - V), Huber(R~ - V_clip)), no masks."""
    values, _ = critic(mb["state"], mb["critic_h"], mb["masks"], agents)
    value_norm.update(mb["returns"], agents)
    target = value_norm.normalize(mb["returns"], agents)
    v_clip = mb["values"] + (values - mb["values"]).clamp(-args.value_clip_coef, args.value_clip_coef)
    return torch.max(huber(target - values, args.huber_delta), huber(target - v_clip, args.huber_delta)).mean()


def step_groups(optims, groups, max_norm):
    """Clip each group's gradient norm on its own, then step its optimiser; returns the mean pre-clip norm."""
    norms = [nn.utils.clip_grad_norm_(g, max_norm) for g in groups]
    for opt in optims:
        opt.step()
    return torch.stack(norms).mean().item()
# <<< shared:losses


# >>> shared:policy-mamujoco
def action_mask(args, act_mask):
    """(n, 1, 1, act_dim) weights of the action dims: 0 on padding (FIX 12), unless --no-mask-padded-actions."""
    return (act_mask if args.mask_padded_actions else torch.ones_like(act_mask))[:, None, None]


def policy_terms(args, actor, mb, advantages, clip, act_mask, agents=None, others=None):
    """Per-sample clipped surrogate, entropy, approx-KL and clip fraction of the given agents, (n, L, B) each.
    KEEP 19 (--per-dim-ratio): ratio w_d = exp(log pi_d - log pi_old_d) and clip per action dim, summed over dims;
    FIX 12: padded dims (act_mask 0) contribute nothing. `others` (n, L, B), optional, multiplies the ratio
    (A2PO's clipped product of the preceding agents' ratios; no gradient flows into it)."""
    mean, std, _ = actor(mb["obs"], mb["actor_h"], mb["masks"], agents)
    logp = squashed_log_prob(mean, std, mb["actions"])
    m = action_mask(args, act_mask)
    logr = (logp - mb["logprobs"]) * m
    if not args.per_dim_ratio:
        logr = logr.sum(-1, keepdim=True)
    ratio, adv = logr.exp(), advantages[..., None]
    if others is not None:
        ratio = ratio * others[..., None]
    surr = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    dims = m if args.per_dim_ratio else torch.ones_like(surr)
    entropy = (squashed_entropy(mean, std) * m).sum(-1)
    with torch.no_grad():
        kl = ((logr.exp() - 1 - logr) * dims).sum(-1) / dims.sum(-1)  # the agent's own policy change
        clipped = (((ratio - 1).abs() > clip).float() * dims).sum(-1) / dims.sum(-1)
    return -(surr * dims).sum(-1), entropy, kl, clipped
# <<< shared:policy-mamujoco


def clip_eps(args, position, n_agents):
    """a2po.md section 4: eps_k = eps (w k / n + 1 - w), k = 1-based position, w = --clip-tuner-weight (0.5)."""
    w = args.clip_tuner_weight
    return args.clip_coef * (w * position / n_agents + 1 - w)


def agent_order(kind, scores, iteration):
    """a2po.md section 2. semi_greedy: highest score first, then alternately a uniformly random and the highest of
    the remaining agents; greedy: by score; random: a uniform permutation (HAPPO-like); cyclic: rotate each iteration."""
    n = len(scores)
    if kind == "random":
        return torch.randperm(n).tolist()
    if kind == "cyclic":
        return [(iteration + k) % n for k in range(n)]
    ranked = torch.argsort(scores, descending=True, stable=True).tolist()
    if kind == "greedy":
        return ranked
    order = []
    while ranked:
        order.append(ranked.pop(0 if len(order) % 2 == 0 else int(torch.randint(len(ranked), ()))))
    return order


def update(args, actor, critic, value_norm, actor_optims, actor_groups, critic_optim, data, advantages, phase, act_mask,
           ctx):
    """A2PO (a2po.md sections 3-9): the agents are updated one at a time in a semi-greedy order. Agent i at position
    k maximises the clipped surrogate of w_i * clip(prod_{j in P} r_j, 1 +- eps_o) with clip eps_k, on advantages
    re-estimated with truncated importance traces of the agents already updated; the shared critic steps on agent i's
    rows inside its turn. Phase ps steps the shared optimiser once per agent turn (loss / n); phases lora and nps step
    only agent i's optimiser, so only agent i's policy parameters change during its turn."""
    N, T, E = act_mask.shape[0], args.num_steps, args.num_envs
    stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "actor_grad_norm",
                             "critic_grad_norm", "others_ratio", "trace_rho", "trace_trunc", "trace_adv_gap")}
    masks, bad_masks, rewards = data["masks"][:, None], ctx["bad_masks"][:, None], ctx["rewards"]
    gae_adv = advantages.clone()  # pooled standardised GAE advantages (the first agent's)
    adv, returns_tr, targets = advantages.clone(), data["returns"].clone(), data["returns"].clone()
    vn = data["values"][:T]  # KEEP 24: order score |A / V| with the normalised values, an exact zero guarded
    scores = (advantages / torch.where(vn == 0, torch.full_like(vn, 1e-8), vn)).abs().mean((0, 2))
    m_act = action_mask(args, act_mask)[:, 0]  # (N, 1, act_dim)
    cache = {}  # whole-buffer per-step ratio of each agent, invalidated when its policy changes

    @torch.no_grad()
    def mean_ratio(logp, old, m):
        """Gaussian: the mean over (real) dims of the per-dim ratios (KEEP 19); joint ratio with --no-per-dim-ratio."""
        if args.per_dim_ratio:
            return (((logp - old) * m).exp() * m).sum(-1) / m.sum(-1)
        return ((logp - old) * m).sum(-1).exp()

    @torch.no_grad()
    def buffer_ratios(agents):
        """r_j over the whole buffer, (len(agents), T, E), one step at a time from the stored rollout hidden
        states (KEEP 23: the reference's trace evaluation), batched over agents and steps."""
        todo = [j for j in agents if j not in cache]
        if todo:
            obs = data["obs"][:T, todo].transpose(0, 1).reshape(len(todo), 1, T * E, -1)
            h = data["actor_h"][:T, todo].transpose(0, 1).reshape(len(todo), T * E, -1)
            mean, std, _ = actor(obs, h, data["masks"][:T].reshape(1, T * E), agents=todo)
            old = data["logprobs"][:, todo].transpose(0, 1).reshape(len(todo), 1, T * E, -1)
            acts = data["actions"][:, todo].transpose(0, 1).reshape(len(todo), 1, T * E, -1)
            r = mean_ratio(squashed_log_prob(mean, std, acts), old, m_act[todo][:, None]).view(len(todo), T, E)
            cache.update({j: r[n] for n, j in enumerate(todo)})
        return torch.stack([cache[j] for j in agents])

    @torch.no_grad()
    def trace_update(i, S):
        """a2po.md section 5: agent i's advantages re-estimated with rho_t = prod_{j in S} r_j (S: agents updated
        so far and i itself), V_T from the current critic, delta_t de-normalised with VN_i's current statistics."""
        nonlocal adv
        v_T, _ = critic(data["state"][T, [i]][:, None], data["critic_h"][T, [i]], data["masks"][T][None], agents=[i])
        v = torch.cat([data["values"][:T, [i]], v_T.transpose(0, 1)])  # (T+1, 1, E), normalised
        V = value_norm.denormalize(v, agents=[i], dim=1)
        rho = buffer_ratios(S).prod(0)[:, None]  # (T, 1, E)
        delta = rewards[:, [i]] + args.gamma * V[1:] * masks[1:] - V[:-1]
        if args.trace_variant == "speedup":
            a_i = speedup_trace(delta, rho, masks, bad_masks, args.gamma, args.gae_lambda)
        else:
            a_i = retrace_trace(delta, rho, masks, bad_masks, args.gamma, args.gae_lambda, args.trace_clip,
                                args.trace_lambda_squared)
        returns_tr[:, [i]] = a_i + V[:-1]
        if args.approx_trace:  # the critic regresses onto the traced return
            targets[:, [i]] = returns_tr[:, [i]]
        a = returns_tr - value_norm.denormalize(data["values"][:T], dim=1)
        adv = (a - a.mean()) / (a.std(correction=0) + 1e-5)  # standardised over all agents' entries
        stats["trace_rho"].append(rho.mean().item())
        stats["trace_trunc"].append((rho > args.trace_clip).float().mean().item())
        stats["trace_adv_gap"].append((adv[:, i] - gae_adv[:, i]).abs().mean().item())

    def critic_step(i, mb):
        v_loss = value_loss_fn(args, critic, value_norm, mb, agents=[i]) / N  # KEEP 25: loss / n
        critic_optim.zero_grad(set_to_none=True)
        (args.vf_coef * v_loss).backward()
        stats["critic_grad_norm"].append(step_groups([critic_optim], [list(critic.parameters())], args.max_grad_norm))
        stats["value_loss"].append(v_loss.item() * N)

    def turn(i, P, eps):
        """One agent's epochs: [two-stage: a critic-only pass over its minibatches], then actor + critic steps.
        Only the rows this turn reads are chunked: agent i (row 0), then its predecessors P (rows 1...)."""
        opt, group = (actor_optims[0], actor_groups[0]) if phase == "ps" else (actor_optims[i], actor_groups[i])
        rows = [i, *P]  # advantages and targets do not change within a turn
        full = {k: v[:, rows] if v.dim() > 2 else v for k, v in dict(data, advantages=adv, returns=targets).items()}
        for _ in range(1 if args.a2po_loop == "ppo" else args.update_epochs):
            mbs = list(chunk_minibatches(full, T, args.data_chunk_length, args.num_minibatches))
            if args.two_stage:
                for mb in mbs:
                    critic_step(i, pick(mb, [0]))
            for mb in mbs:
                mb_i, g = pick(mb, [0]), None
                if P:  # no_grad: the preceding agents' current ratios on the same samples (FIX 10)
                    with torch.no_grad():
                        mean, std, _ = actor(mb["obs"][1:], mb["actor_h"][1:], mb["masks"], agents=P)
                        r = mean_ratio(squashed_log_prob(mean, std, mb["actions"][1:]), mb["logprobs"][1:], m_act[P][:, None])
                        prod = r.prod(0, keepdim=True)
                        g = prod.clamp(1 - args.others_clip_coef, 1 + args.others_clip_coef)  # clipped as a whole
                    stats["others_ratio"].append(prod.flatten())
                pg, ent, kl, clipped = policy_terms(args, actor, mb_i, mb_i["advantages"], eps, act_mask[[i]], [i], g)
                scale = 1.0 / N if phase == "ps" else 1.0  # phase ps divides agent i's loss by n
                opt.zero_grad(set_to_none=True)
                (scale * (pg.mean() - args.ent_coef * ent.mean())).backward()
                stats["actor_grad_norm"].append(step_groups([opt], [group], args.max_grad_norm))
                critic_step(i, mb_i)
                for k, v in zip(("policy_loss", "entropy", "approx_kl", "clipfrac"), (pg, ent, kl, clipped)):
                    stats[k].append(v.mean().item())
        for j in (range(N) if phase == "ps" else [i]):  # whose policy changed: all (shared weights) or agent i
            cache.pop(j, None)

    def others_of(i, order, pos):
        """KEEP 14: the reference loop order decides - agent loop: predecessors; ppo loop: every other agent."""
        if args.a2po_others == "reference" and args.a2po_loop == "ppo":
            return [j for j in range(N) if j != i]
        return order[:pos]

    positions, eps_used = [0] * N, {}
    epochs = args.update_epochs if args.a2po_loop == "ppo" else 1
    for epoch in range(epochs):  # agent loop: one pass, each agent runs all its epochs in `turn`
        if epoch > 0:  # ppo loop: every epoch after the first re-traces every agent with all agents' ratios
            for j in range(N):
                trace_update(j, list(range(N)))
        order = agent_order(args.a2po_order, scores, ctx["iteration"])
        for pos, i in enumerate(order):
            if pos > 0:
                trace_update(i, order[: pos + 1])
            # KEEP 13: the reference's ppo loop gives every agent the first position's clip
            k = 1 if args.a2po_clip_schedule == "reference" and args.a2po_loop == "ppo" else pos + 1
            eps_used[pos + 1] = clip_eps(args, k, N)
            positions[i] = pos + 1
            turn(i, others_of(i, order, pos), eps_used[pos + 1])
    out = {f"losses/{k}": float(np.mean(stats[k])) for k in ("policy_loss", "value_loss", "entropy", "approx_kl",
                                                              "clipfrac", "actor_grad_norm", "critic_grad_norm")}
    out.update({f"a2po/order_pos/agent_{i}": p for i, p in enumerate(positions)})
    out.update({f"a2po/clip_eps/pos_{k}": e for k, e in eps_used.items()})
    if stats["others_ratio"]:
        r = torch.cat(stats["others_ratio"])
        out.update({"a2po/others_ratio_mean": r.mean().item(), "a2po/others_ratio_min": r.min().item(),
                    "a2po/others_ratio_max": r.max().item()})
    for k, tag in (("trace_rho", "trace_rho_mean"), ("trace_trunc", "trace_trunc_frac"), ("trace_adv_gap", "trace_adv_gap")):
        if stats[k]:  # no traces when a single agent is updated
            out[f"a2po/{tag}"] = float(np.mean(stats[k]))
    return out


# ==== 9. EVALUATION ====
# >>> shared:evaluate-mamujoco
@torch.no_grad()
def evaluate(args, actor, envs, n_agents, device):
    """Greedy evaluation (lorasa.md section 8): action tanh(mean), zero initial hidden state, merged adapters; one
    episode per eval env, env k seeded 50000 seed + 10000 k at every evaluation (exactly --eval-episodes episodes).
    Returns the mean team return (the shared reward summed over the episode, not x N) and length."""
    n = envs.num_envs
    obs, _ = envs.reset(seed=[args.seed * 50000 + 10000 * k for k in range(n)])
    h = torch.zeros(n_agents, n, args.hidden_size, device=device)
    masks = torch.ones(1, n, device=device)
    ret, length, done = np.zeros(n), np.zeros(n), np.zeros(n, bool)
    while not done.all():
        x = torch.as_tensor(obs["obs"], device=device).transpose(0, 1)[:, None]
        mean, _, h = actor(x, h, masks)
        obs, reward, term, trunc, _ = envs.step(torch.tanh(mean[:, 0]).transpose(0, 1).cpu().numpy())
        ret += reward * ~done
        length += ~done
        done |= term | trunc
    return dict(episodic_return=float(ret.mean()), episodic_length=float(length.mean()), num_episodes=n)
# <<< shared:evaluate-mamujoco


# ==== 10. CHECKPOINTS ====
# >>> shared:checkpoint
def atomic_save(obj, path):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    np_state = np.random.get_state()
    return dict(python=random.getstate(), numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                  *np_state[2:]], torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state):
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def adapters_state(actor):
    """adapters.pt: per adapted layer, A stacked (n_agents, r, in), B stacked (n_agents, out, r), the scaling."""
    out = {}
    for name, m in actor.named_modules():
        if isinstance(m, LoRALinear) and m.adapt:
            out[name] = dict(A=stack(m.lora_A, None).detach().cpu(), B=stack(m.lora_B, None).detach().cpu(),
                             bias=stack(m.lora_bias, None).detach().cpu(), scaling=m.scaling)
    if hasattr(actor, "lora_std"):
        out["log_std_offset"] = stack(actor.lora_std, None).detach().cpu()
    return out


def load_checkpoint_file(path):
    if not os.path.isfile(path):
        fail(f"--checkpoint {path!r}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        fail(f"--checkpoint {path!r} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or "actor" not in ckpt or "args" not in ckpt:
        fail(f"--checkpoint {path!r} is not a checkpoint of these scripts (adapters.pt holds adapters only)")
    return ckpt
# <<< shared:checkpoint


def load_actor(actor, state):
    """Load actor weights; adapters absent from the checkpoint (a --share-mode ps run) keep their fresh dW = 0
    init, adapters present in it but not in this actor (ps or nps run from a lorasa PS checkpoint) are dropped."""
    own = actor.state_dict()
    state = {k: v for k, v in state.items() if k in own or "lora_" not in k}
    missing = [k for k in own if k not in state and "lora_" not in k]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        fail(f"--checkpoint actor does not fit this network (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            fail(f"--checkpoint actor tensor {k} has shape {tuple(v.shape)}, this network needs {tuple(own[k].shape)}")
    actor.load_state_dict({**own, **state})


SHAPE_KEYS = ("hidden_size", "recurrent")
TASK_KEYS = ("scenario", "agent_conf", "agent_obsk", "obs_mode")


def check_checkpoint(args, ckpt):
    """Refuse a checkpoint of another task or shape, with the reason, before anything is built."""
    saved = ckpt["args"]
    for key in TASK_KEYS + SHAPE_KEYS:
        if saved.get(key) != getattr(args, key):
            fail(f"--checkpoint is for {key}={saved.get(key)!r}, this run has {key}={getattr(args, key)!r}; "
                 f"pass --{key.replace('_', '-')} {saved.get(key)} or another checkpoint")
    compatible = {"ps": ("ps",), "lorasa": ("ps", "lora"), "nps": ("nps",)}[args.share_mode]
    saved_phase = ckpt["phase"] if saved["share_mode"] != "lorasa" or ckpt["phase"] == "lora" else "ps"
    if saved_phase not in compatible:
        fail(f"--checkpoint holds a {saved['share_mode']} policy (phase {ckpt['phase']}) which --share-mode "
             f"{args.share_mode} cannot load; accepted phases: {' '.join(compatible)}")
    if saved_phase == "lora":
        for key in ("rank", "lora_alpha", "lora_layers", "train_agent_bias"):
            if tuple(np.atleast_1d(saved[key])) != tuple(np.atleast_1d(getattr(args, key))):
                fail(f"--checkpoint has adapters with {key}={saved[key]!r}, this run has {key}={getattr(args, key)!r}")
    if not args.eval_only and ckpt["global_step"] >= args.total_timesteps:
        fail(f"--total-timesteps {args.total_timesteps} leaves nothing to train: the checkpoint is at step "
             f"{ckpt['global_step']}; accepted: a larger --total-timesteps")


# ==== 11. MAIN ====
def param_count(params):
    return sum(p.numel() for p in params)


if __name__ == "__main__":
    args, ckpt = finalize_args(tyro.cli(Args))

    # >>> shared:seeding
    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cuda and device.type != "cuda":
        warnings.warn("--cuda given but CUDA is not available: running on the CPU")
    # <<< shared:seeding

    # ---- environments (validate one env in-process first: errors surface before the training envs start) ----
    probe = MaMuJoCoEnv(args.scenario, args.agent_conf, args.agent_obsk, args.obs_mode, args.max_episode_steps)
    N, obs_dim, state_dim, act_dim = probe.n_agents, probe.obs_dim, probe.state_dim, probe.act_dim
    act_mask = torch.as_tensor(probe.act_mask, device=device)
    probe.close()
    eval_envs, _ = make_envs(args, args.eval_episodes, [args.seed * 50000 + 10000 * k for k in range(args.eval_episodes)])

    # ---- networks, optimisers ----
    actor, critic = Actor(obs_dim, act_dim, N, args).to(device), Critic(state_dim, N, args).to(device)
    value_norm = ValueNorm(N).to(device)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate, eps=args.adam_eps)
    shared_actor_params = [p for n, p in actor.named_parameters() if "lora_" not in n]
    phase = "nps" if args.share_mode == "nps" else "ps"
    global_step, start_iteration = 0, 0
    if ckpt is not None:
        load_actor(actor, ckpt["actor"])
        critic.load_state_dict(ckpt["critic"])
        value_norm.load_state_dict(ckpt["value_norm"])
        critic_optim.load_state_dict(ckpt["critic_optim"])
        global_step = ckpt["global_step"]
        start_iteration = ckpt["iteration"] if args.resume else global_step // args.batch_size
        # --resume continues the saved phase; otherwise a PS checkpoint under --share-mode lorasa fine-tunes at once
        phase = ckpt["phase"] if args.resume else ("lora" if args.share_mode == "lorasa" else ckpt["phase"])
    actor_groups, actor_optims = start_phase(actor, phase, args)
    merge(critic)
    if args.resume and ckpt["phase"] == phase:
        for opt, state in zip(actor_optims, ckpt["actor_optim"]):
            opt.load_state_dict(state)
        set_rng_state(ckpt["rng"])

    if args.eval_only:
        t0 = time.time()
        torch.set_num_threads(1)  # small batched matmuls next to env steps (see the rollout)
        result = evaluate(args, actor, eval_envs, N, device)
        print(f"eval {task_name(args)} {args.share_mode} step {global_step}: return {result['episodic_return']:.2f} "
              f"length {result['episodic_length']:.1f} over {result['num_episodes']} episodes ({time.time() - t0:.1f}s)")
        eval_envs.close()
        sys.exit(0)

    # >>> shared:logging
    from torch.utils.tensorboard import SummaryWriter

    if args.resume:
        run_path = os.path.dirname(os.path.abspath(args.checkpoint))
        run_name = os.path.basename(run_path)
    else:
        run_name = f"{task_name(args)}__{args.exp_name}__{args.share_mode}-r{args.rank}__{args.seed}__{int(time.time())}"
        run_path, suffix = os.path.join(args.run_dir, run_name), 1
        while os.path.exists(run_path):  # never write into an existing run folder
            run_path, suffix = os.path.join(args.run_dir, f"{run_name}-{suffix}"), suffix + 1
        os.makedirs(run_path)
    writer = SummaryWriter(run_path)
    versions = {"python": sys.version.split()[0], "torch": str(torch.__version__)}
    for pkg in ("numpy", "gymnasium", "gymnasium-robotics", "mujoco", "pettingzoo", "jaxmarl", "smac", "smacv2", "pysc2"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    hparams = {**dataclasses.asdict(args), **{f"version/{k}": v for k, v in versions.items()},
               "device": str(device), "task": task_name(args), "n_agents": N}
    table = "\n".join(f"|{k}|{str(v).replace('|', '&#124;')}|" for k, v in hparams.items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    # <<< shared:logging
    n_shared = param_count(shared_actor_params) // (N if args.share_mode == "nps" else 1)  # one policy's size
    n_adapter = sum(p.numel() for n, p in actor.named_parameters()  # what phase lora trains per agent
                    if "lora_" in n and n.endswith(".0") and ("lora_bias" not in n or args.train_agent_bias))
    writer.add_scalar("lorasa/shared_params", n_shared, global_step)
    writer.add_scalar("lorasa/adapter_params_per_agent", n_adapter, global_step)
    writer.add_scalar("lorasa/nps_params", N * n_shared, global_step)
    writer.add_scalar("lorasa/critic_params", param_count(critic.parameters()), global_step)
    print(f"{run_name}: {N} agents, obs {obs_dim}, state {state_dim}, act {act_dim}; actor {n_shared} shared params, "
          f"{n_adapter} adapter params per agent; {args.num_iterations} iterations of {args.batch_size} steps")

    # ---- training envs and buffer ----
    T, E, H = args.num_steps, args.num_envs, args.hidden_size
    env_seeds = [args.seed + 1000 * k + global_step for k in range(E)]  # resume: fresh episodes, new seeds
    envs, first_obs = make_envs(args, E, env_seeds)
    buf = Buffer(T, E, N, obs_dim, state_dim, act_dim, H, device)
    buf.obs[0] = torch.as_tensor(first_obs["obs"], device=device).transpose(0, 1)
    buf.state[0] = torch.as_tensor(first_obs["state"], device=device).transpose(0, 1)
    ep_return, ep_length = np.zeros(E), np.zeros(E, dtype=np.int64)

    def save(name, iteration, step):
        payload = dict(args=dataclasses.asdict(args), phase=phase, global_step=step, iteration=iteration,
                       actor=actor.state_dict(), critic=critic.state_dict(), value_norm=value_norm.state_dict(),
                       actor_optim=[o.state_dict() for o in actor_optims], critic_optim=critic_optim.state_dict(),
                       rng=rng_state(), task=task_name(args), versions=versions)
        atomic_save(payload, os.path.join(run_path, name))
        if name == "checkpoint.pt" and actor.lora_on:
            atomic_save(adapters_state(actor), os.path.join(run_path, "adapters.pt"))

    def log_eval(iteration):
        t0 = time.time()
        torch.set_num_threads(1)  # see the rollout
        result = evaluate(args, actor, eval_envs, N, device)
        torch.set_num_threads(update_threads)
        for k, v in result.items():
            writer.add_scalar(f"eval/{k}", v, global_step)
        writer.add_scalar("perf/eval_s", time.time() - t0, global_step)
        print(f"  eval @ step {global_step}: return {result['episodic_return']:.2f}, length {result['episodic_length']:.1f}")
        if args.save_model:
            save("checkpoint.pt", iteration, global_step)

    iteration, start_step, start_time, update_threads = start_iteration, global_step, time.time(), torch.get_num_threads()
    stop = []

    def on_ctrl_c(signum, frame):
        """First Ctrl-C: finish this iteration, save, exit 130 (no half-applied update is saved); second: quit now."""
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        print("Ctrl-C: finishing this iteration, then saving a checkpoint (Ctrl-C again quits at once)", file=sys.stderr)

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        if not args.resume:
            log_eval(iteration)
        while iteration < args.num_iterations and not stop:
            iteration += 1
            if args.share_mode == "lorasa" and phase == "ps" and global_step >= args.lora_start:
                if args.save_model:
                    save("ps_checkpoint.pt", iteration - 1, global_step)
                phase = "lora"
                actor_groups, actor_optims = start_phase(actor, phase, args)  # the policy is unchanged: dW = 0 (tested)
                print(f"  phase switch at step {global_step}: shared actor frozen, adapters on")
            # ---- rollout: one batched policy call for all envs and agents per step ----
            t_roll, t_env, finished, finals = time.time(), 0.0, [], []
            rew_np, term_np, trunc_np = np.zeros((T, E)), np.zeros((T, E), bool), np.zeros((T, E), bool)
            # one thread while the envs step: idle PyTorch worker threads spin after each small matmul and slow the
            # env steps on the other core (measured: +70% rollout speed on 2 cores); all threads again for the update
            torch.set_num_threads(1)
            noise = torch.randn(T, N, E, act_dim, device=device)  # training rollouts always sample: u = mean + std * noise
            for t in range(T):
                with torch.inference_mode():
                    mean, std, h = actor(buf.obs[t][:, None], buf.actor_h[t], buf.masks[t][None])
                    action = torch.tanh(mean[:, 0] + std[:, 0] * noise[t])
                buf.actor_h[t + 1], buf.actions[t], buf.means[t] = h, action, mean[:, 0]
                t0 = time.time()
                obs, reward, term, trunc, _ = envs.step(action.transpose(0, 1).cpu().numpy())
                done = term | trunc
                if done.any():  # own bookkeeping: keep the true final observation, then reset those envs
                    final_state = torch.as_tensor(obs["state"], device=device).transpose(0, 1)
                    obs, _ = envs.reset(options={"reset_mask": done})
                t_env += time.time() - t0
                rew_np[t], term_np[t], trunc_np[t] = reward, term, trunc
                ep_return += reward
                ep_length += 1
                buf.obs[t + 1] = torch.as_tensor(obs["obs"], device=device).transpose(0, 1)
                buf.state[t + 1] = torch.as_tensor(obs["state"], device=device).transpose(0, 1)
                buf.masks[t + 1] = torch.as_tensor(1.0 - done, device=device)
                if args.truncation_bootstrap and (trunc & ~term).any():  # FIX 21: keep the true final state
                    finals += [(t, int(e), final_state[:, e]) for e in np.flatnonzero(trunc & ~term)]
                for k in np.flatnonzero(done):
                    finished.append((ep_return[k], ep_length[k]))
                    ep_return[k], ep_length[k] = 0, 0
                global_step += E
            boot = torch.as_tensor(trunc_np & ~term_np, device=device)  # time-limit truncations (termination wins)
            buf.rewards.copy_(torch.as_tensor(rew_np, device=device))
            # FIX 21: bootstrapped truncations enter the rewards below; reference (--no-truncation-bootstrap):
            # b_{t+1} = 0 zeroes the truncated step's advantage
            buf.boot.copy_(boot & args.truncation_bootstrap)
            buf.bad_masks[1:] = 1.0 - (boot & (not args.truncation_bootstrap)).float()
            with torch.inference_mode():
                buf.logprobs.copy_(squashed_log_prob(buf.means, std[:, 0], buf.actions))  # std is state-independent
                # The critic's inputs never depend on its outputs, so it runs once over the whole rollout as a
                # sequence (states 0..T; row T gives the bootstrap value V_T), collecting its hidden states for replay.
                values, hs = critic(buf.state.transpose(0, 1), buf.critic_h[0], buf.masks)
                buf.values.copy_(values.transpose(0, 1))
                buf.critic_h[1:] = hs[:, :T].transpose(0, 1)
                buf.final_values.zero_()
                if finals:  # V(true final state) with the critic's hidden state after the truncated step
                    ts, es, fs = zip(*finals)
                    v_final, _ = critic(torch.stack(fs, 1)[:, None], hs[:, list(ts), list(es)],
                                        torch.ones(1, len(ts), device=device))
                    buf.final_values[list(ts), :, list(es)] = v_final[:, 0].T
            torch.set_num_threads(update_threads)
            t_roll = time.time() - t_roll

            # ---- returns and advantages (lorasa.md section 6.1, 7) ----
            t_up = time.time()
            values = value_norm.denormalize(buf.values, dim=1)  # (T+1, N, E), per-agent statistics
            # FIX 21: r_t + gamma V(s_final) on bootstrapped truncations (the episode still ends there: m_{t+1} = 0)
            rewards = buf.rewards[:, None] + args.gamma * buf.boot[:, None] * value_norm.denormalize(buf.final_values, dim=1)
            returns = gae(rewards, values, buf.masks[:, None], buf.bad_masks[:, None], args.gamma, args.gae_lambda)
            adv = returns - values[:-1]
            adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-5)  # pooled over (t, env, agent), all active
            data = dict(obs=buf.obs, state=buf.state, actor_h=buf.actor_h, critic_h=buf.critic_h, masks=buf.masks,
                        actions=buf.actions, logprobs=buf.logprobs, values=buf.values, returns=returns)
            unmerge(actor, critic)
            ctx = dict(rewards=rewards, bad_masks=buf.bad_masks, iteration=iteration)
            stats = update(args, actor, critic, value_norm, actor_optims, actor_groups, critic_optim, data, adv, phase,
                           act_mask, ctx)
            merge(actor, critic)  # rollouts and evaluation use the merged weights
            buf.roll()
            t_up = time.time() - t_up

            # ---- logging ----
            # >>> shared:iteration-log-mamujoco
            for k, v in stats.items():
                writer.add_scalar(k, v, global_step)
            y, v_pred = returns.flatten(), value_norm.denormalize(buf.values[:-1], dim=1).flatten()
            ev = float(1 - (y - v_pred).var() / y.var()) if y.var() > 0 else float("nan")
            writer.add_scalar("losses/explained_variance", ev, global_step)
            writer.add_scalar("charts/learning_rate", args.learning_rate, global_step)
            writer.add_scalar("charts/phase", {"ps": 0, "lora": 1, "nps": 2}[phase], global_step)
            sps = int((global_step - start_step) / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("perf/rollout_s", t_roll, global_step)
            writer.add_scalar("perf/update_s", t_up, global_step)
            writer.add_scalar("perf/SPS_env", args.batch_size / max(t_env, 1e-9), global_step)
            writer.add_scalar("perf/SPS_update", args.batch_size / max(t_up, 1e-9), global_step)
            writer.add_scalar("lorasa/trainable_params", param_count(p for g in actor_groups for p in g), global_step)
            adapted = [m for m in lora_modules(actor) if m.adapt] if actor.lora_on else []
            delta = sum(m.delta_norms() for m in adapted) if adapted else torch.zeros(N)
            log_std = actor.log_std_of(list(range(N))).mean(-1)
            for i in range(N):
                writer.add_scalar(f"lorasa/delta_norm/agent_{i}", delta[i].item(), global_step)
                writer.add_scalar(f"lorasa/log_std/agent_{i}", log_std[i].item(), global_step)
            if finished:
                writer.add_scalar("charts/episodic_return", np.mean([f[0] for f in finished]), global_step)
                writer.add_scalar("charts/episodic_length", np.mean([f[1] for f in finished]), global_step)
            last = f"return {np.mean([f[0] for f in finished]):9.2f}" if finished else "return       n/a"
            print(f"iter {iteration}/{args.num_iterations} step {global_step} phase {phase} {last} | SPS {sps} "
                  f"(env {args.batch_size / max(t_env, 1e-9):.0f}) | rollout {t_roll:.2f}s update {t_up:.2f}s "
                  f"| pg {stats['losses/policy_loss']:.4f} v {stats['losses/value_loss']:.4f}", flush=True)
            # <<< shared:iteration-log-mamujoco
            if iteration % args.eval_interval == 0 or iteration == args.num_iterations:
                log_eval(iteration)
    except KeyboardInterrupt:
        print(f"quit at step {global_step}; the last checkpoint in {run_path} is kept", file=sys.stderr)
        writer.close()
        sys.exit(130)
    if stop:
        if args.save_model:
            save("checkpoint.pt", iteration, global_step)
        print(f"interrupted: checkpoint of step {global_step} saved in {run_path}", file=sys.stderr)
        writer.close()
        sys.exit(130)
    envs.close()
    eval_envs.close()
    writer.close()
