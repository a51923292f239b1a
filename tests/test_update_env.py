"""The MAPPO update on synthetic batches, the rollout on the real simulator (truncation bootstrap), and the MaMuJoCo
adapter (dims, dtypes, partitions, stray output)."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script, make_args

M = load_script("mappo_lorasa_mamujoco.py")


def synthetic_batch(args, N=2, obs_dim=9, state_dim=12, act_dim=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    buf = M.RolloutBuffer(args, N, obs_dim, state_dim, act_dim, "cpu")
    for tensor in (buf.obs, buf.state, buf.values):
        tensor.normal_(generator=generator)
    buf.actions.uniform_(-0.9, 0.9, generator=generator)
    buf.logprobs.normal_(-0.5, 0.1, generator=generator)
    T, E = args.num_steps, args.num_envs
    return buf, torch.randn(N, T, E, generator=generator), torch.randn(N, T, E, generator=generator)


def build(mode, act_dim=3, action_dims=None, **kw):
    torch.manual_seed(0)
    args = make_args(M, share_mode=mode, num_steps=20, num_envs=3, update_epochs=2, **kw)
    actor, critic, value_norm = (
        M.GaussianActor(9, act_dim, 2, args, action_dims),
        M.Critic(12, 2, args),
        M.ValueNorm(2),
    )
    phase = {"ps": "ps", "lorasa": "lora", "nps": "nps"}[mode]
    groups, optimizers = M.start_phase(actor, phase, args)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=1e-3)
    return args, actor, critic, value_norm, optimizers, groups, critic_optim, phase


@pytest.mark.parametrize("mode", ["ps", "lorasa", "nps"])
def test_update_moves_only_what_the_phase_trains(mode):
    """Phase lora: the shared actor (Linears, LayerNorms, log-std) stays bit-identical, the adapters move; the critic
    trains in every phase."""
    args, actor, critic, value_norm, optimizers, groups, critic_optim, phase = build(mode)
    buf, returns, advantages = synthetic_batch(args)
    before = {n: p.detach().clone() for n, p in actor.named_parameters()}
    critic_before = [p.detach().clone() for p in critic.parameters()]
    models = (actor, critic, value_norm, (optimizers, groups, critic_optim))
    stats = M.update(args, phase, *models, buf, returns, advantages)
    assert all(np.isfinite(v) for v in stats.values())
    for n, p in actor.named_parameters():
        moved = not torch.equal(before[n], p)
        if mode == "lorasa":
            assert moved == (("lora_A" in n) or ("lora_B" in n) or ("lora_std" in n)), n
        else:
            assert moved or "lora_" in n, n
    assert all(not torch.equal(a, b) for a, b in zip(critic_before, critic.parameters()))
    assert (
        value_norm.stats[2].min() > 0
    )  # every agent's normaliser saw returns (its debiasing term)


@pytest.mark.parametrize("per_dim", [True, False])
def test_padded_action_dims_do_not_enter_the_update(per_dim):
    """Humanoid 9|8 (FIX 12): agent 1's padded 9th dim must not change the update; unmasked, it would."""
    action_dims = torch.tensor([[1.0] * 9, [1.0] * 8 + [0.0]])
    results = []
    for mask, flip in [(True, False), (True, True), (False, False), (False, True)]:
        parts = build("ps", 9, action_dims, mask_padded_actions=mask, per_dim_ratio=per_dim)
        args, actor = parts[0], parts[1]
        buf, returns, advantages = synthetic_batch(args, act_dim=9)
        if flip:  # other values in agent 1's padded dim
            buf.actions[1, ..., 8] *= -1
            buf.logprobs[1, ..., 8] += 3.0
        torch.manual_seed(1)
        args, actor, critic, value_norm, optimizers, groups, critic_optim, phase = parts
        M.update(
            args,
            phase,
            actor,
            critic,
            value_norm,
            (optimizers, groups, critic_optim),
            buf,
            returns,
            advantages,
        )
        results.append(torch.cat([p.detach().flatten() for p in actor.parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.allclose(results[2], results[3])


def test_rollout_bootstraps_truncations_from_the_true_final_state():
    """FIX 21 on the real simulator: at a time-limit truncation the return is r + gamma V(true final state), with V the
    critic's value of the state MuJoCo reached (replayed independently), not of the reset state that replaces it; the
    reference's mode (--no-truncation-bootstrap) zeroes the step's advantage (R = V)."""
    for bootstrap in (True, False):
        args = make_args(
            M, num_envs=2, num_steps=10, max_episode_steps=5, truncation_bootstrap=bootstrap
        )
        torch.manual_seed(3)
        env = M.MaMuJoCoEnv(args.scenario, args.agent_conf, max_episode_steps=5)
        actor = M.GaussianActor(env.obs.shape[1], 3, 2, args)
        critic = M.Critic(env.state.shape[1], 2, args)
        value_norm = M.ValueNorm(2)
        value_norm.update(
            torch.randn(2, 50) * 3 + 1
        )  # non-trivial statistics: de-normalising matters
        seeds = [11, 12]
        envs, obs = M.make_envs(args, seeds)
        buf = M.RolloutBuffer(args, 2, env.obs.shape[1], env.state.shape[1], 3, "cpu")
        buf.put_obs(0, obs)
        M.collect_rollout(args, envs, actor, buf)
        M.critic_values(critic, buf)
        returns, _ = M.compute_returns(args, buf, value_norm)
        assert (
            buf.masks[5].tolist() == [0, 0]
            and buf.masks[10].tolist() == [0, 0]
            and buf.masks[1:5].all()
        )
        for e, seed in enumerate(seeds):
            replay = M.MaMuJoCoEnv(args.scenario, args.agent_conf, max_episode_steps=5)
            states = [torch.as_tensor(replay.reset(seed=seed)[0]["state"].copy())]
            for t in range(5):
                observation, reward, _, truncated, _ = replay.step(buf.actions[:, t, e].numpy())
                states.append(torch.as_tensor(observation["state"].copy()))
                assert reward == pytest.approx(
                    buf.rewards[t, e].item(), rel=1e-6
                ) and truncated == (t == 4)
            true_final = states[-1]
            assert not torch.allclose(true_final, buf.state[:, 5, e])  # row 5 holds the reset state
            with (
                torch.no_grad()
            ):  # the critic over the true states s_0 ... s_5, zero initial hidden state
                values, _ = critic(
                    torch.stack(states, 1)[:, :, None], torch.zeros(2, 1, 64), torch.ones(6, 1)
                )
            V = value_norm.denormalize(values[:, :, 0])
            if bootstrap:
                torch.testing.assert_close(
                    buf.final_values[:, 4, e], values[:, 5, 0], atol=1e-5, rtol=1e-5
                )
                expected = buf.rewards[4, e] + args.gamma * V[:, 5]
            else:
                assert buf.bad_masks[5, e] == 0 and buf.boot[4, e] == 0
                expected = V[:, 4]
            torch.testing.assert_close(returns[:, 4, e], expected, atol=1e-4, rtol=1e-5)
        envs.close()


def run_in_subprocess(code, cwd):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))  # fmt: skip


def test_mamujoco_adapter_dims_dtypes_and_no_stray_output(tmp_path):
    code = """
import numpy as np, mappo_lorasa_mamujoco as m
for sc, conf, mode, expect in [("HalfCheetah", "2x3", "local_k", (2, 7 + 2, 17 + 2, 3)),
                               ("Walker2d", "3x2", "local_k", (3, None, 17 + 3, 2)),
                               ("Walker2d", "6x1", "local_k", (6, None, 17 + 6, 1)),
                               ("Humanoid", "9|8", "global", (2, 348 + 2, 348 + 2, 9))]:
    env = m.MaMuJoCoEnv(sc, conf, 1, mode)
    obs, _ = env.reset(seed=0)
    n, od, sd, ad = expect
    assert (len(env.agents), env.state.shape[1], env.action_dims.shape[1]) == (n, sd, ad), sc
    assert od is None or env.obs.shape[1] == od, env.obs.shape
    assert obs["obs"].dtype == np.float32 and obs["state"].dtype == np.float32
    assert (obs["obs"][:, -n:] == np.eye(n)).all() and (obs["state"][:, -n:] == np.eye(n)).all()
    out = env.step(np.ones((n, ad), np.float32))
    assert out[0]["obs"].dtype == np.float32 and isinstance(out[1], float)
    if conf == "3x2":
        labels = [[node.label for node in part] for part in env.env.agent_action_partitions]
        assert labels == [["foot_joint", "leg_joint"], ["thigh_joint", "foot_left_joint"],
                          ["leg_left_joint", "thigh_left_joint"]], labels
    if sc == "Humanoid":
        assert env.act_sizes == [9, 8] and env.action_dims[1].tolist() == [1] * 8 + [0]
        ctrl = env.env.single_agent_env.unwrapped.data.ctrl
        assert np.allclose(ctrl, 0.4), ctrl  # [-1, 1] mapped onto the +-0.4 joint bounds
        assert np.allclose(obs["obs"][0, :348], obs["state"][0, :348])  # global obs mode: every agent sees state()
"""
    res = run_in_subprocess(code, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == "", (
        res.stdout,
        res.stderr,
    )  # no Adroit banner, no MuJoCo warning
    assert not os.path.exists(tmp_path / "MUJOCO_LOG.TXT")


def test_episode_ends_with_truncation_at_the_limit():
    env = M.MaMuJoCoEnv("HalfCheetah", "2x3", 1, "local_k", max_episode_steps=5)
    env.reset(seed=0)
    flags = [env.step(np.zeros((2, 3), np.float32))[2:4] for _ in range(5)]
    assert flags == [(False, False)] * 4 + [(False, True)]


def test_evaluation_counts_exactly_one_episode_per_env():
    args = make_args(M, num_envs=2, eval_episodes=3, max_episode_steps=7, share_mode="ps")
    envs, _ = M.make_envs(args, [0, 1, 2])
    actor = M.GaussianActor(9, 3, 2, args)
    result = M.evaluate(args, actor, envs)
    again = M.evaluate(
        args, copy.deepcopy(actor), envs
    )  # the same seeds every time: the same result
    assert result["num_episodes"] == 3 and result["episodic_length"] == 7 and result == again
