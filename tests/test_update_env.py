"""The MAPPO update on synthetic batches, and the real MaMuJoCo adapter (dims, dtypes, partitions, stray output)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, make_args

M = load_script("mappo_lorasa_mamujoco.py")


def minibatch(N=2, L=10, B=6, F=20, A=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(obs=torch.randn(N, L, B, F, generator=g), actor_h=torch.zeros(N, B, 64), masks=torch.ones(L, B),
                actions=torch.rand(N, L, B, A, generator=g) * 1.8 - 0.9,
                logprobs=torch.randn(N, L, B, A, generator=g) * 0.1 - 0.5)


@pytest.mark.parametrize("per_dim", [True, False])
def test_padded_action_dims_are_masked(script, per_dim):
    """Humanoid 9|8: agent 1's 9th (padded) dim must not enter its log-probs, ratios or entropy (FIX 12)."""
    act_mask = torch.tensor([[1.0] * 9, [1.0] * 8 + [0.0]])
    torch.manual_seed(0)
    actor = script.Actor(20, 9, 2, make_args(script, share_mode="ps"))
    adv = torch.randn(2, 10, 6)

    def terms(mb, mask_on=True):
        args = make_args(script, share_mode="ps", mask_padded_actions=mask_on, per_dim_ratio=per_dim)
        torch.manual_seed(1)  # the entropy estimate draws a sample
        return script.policy_terms(args, actor, mb, adv, 0.2, act_mask)

    mb = minibatch()
    other = {k: v.clone() for k, v in mb.items()}
    other["actions"][1, ..., 8] = -other["actions"][1, ..., 8]
    other["logprobs"][1, ..., 8] += 3.0
    for x, y in zip(terms(mb), terms(other)):
        torch.testing.assert_close(x, y)  # agent 1 is blind to its padded dim
    assert not torch.allclose(terms(mb, False)[0][1], terms(other, False)[0][1])  # unmasked, it would not be
    other0 = {k: v.clone() for k, v in mb.items()}
    other0["logprobs"][0, ..., 8] += 3.0  # agent 0's 9th dim is real and matters
    assert not torch.allclose(terms(mb)[0][0], terms(other0)[0][0])


def synthetic_data(T=20, N=2, E=3, F=9, S=12, A=3, H=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    data = dict(obs=r(T + 1, N, E, F), state=r(T + 1, N, E, S), actor_h=torch.zeros(T + 1, N, E, H),
                critic_h=torch.zeros(T + 1, N, E, H), masks=torch.ones(T + 1, E),
                actions=torch.rand(T, N, E, A, generator=g) * 1.8 - 0.9, logprobs=r(T, N, E, A) * 0.1 - 0.5,
                values=r(T + 1, N, E) * 0.1, returns=r(T, N, E))
    return data, r(T, N, E)


@pytest.mark.parametrize("mode", ["ps", "lorasa", "nps"])
def test_update_moves_only_what_the_phase_trains(mode):
    """Phase lora: the shared actor (Linears, LayerNorms, log-std) stays bit-identical, the adapters move;
    the critic trains in every phase."""
    torch.manual_seed(0)
    args = make_args(M, share_mode=mode, num_steps=20, num_envs=3, update_epochs=2)
    actor, critic, vn = M.Actor(9, 3, 2, args), M.Critic(12, 2, args), M.ValueNorm(2)
    phase = {"ps": "ps", "lorasa": "lora", "nps": "nps"}[mode]
    groups, optims = M.start_phase(actor, phase, args)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    data, adv = synthetic_data()
    before = {n: p.detach().clone() for n, p in actor.named_parameters()}
    critic_before = [p.detach().clone() for p in critic.parameters()]
    M.unmerge(actor)
    ctx = dict(rewards=data["returns"] * 0.1, bad_masks=torch.ones(21, 3), iteration=1)
    stats = M.update(args, actor, critic, vn, optims, groups, critic_opt, data, adv, phase, torch.ones(2, 3), ctx)
    assert all(np.isfinite(v) for v in stats.values())
    for n, p in actor.named_parameters():
        moved = not torch.equal(before[n], p)
        if mode == "lorasa":
            assert moved == (("lora_A" in n) or ("lora_B" in n) or ("lora_std" in n)), n
        else:
            assert moved or "lora_" in n, n
    assert all(not torch.equal(a, b) for a, b in zip(critic_before, critic.parameters()))
    assert vn.d.min() > 0  # every agent's normaliser saw returns


def run_env(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd(), timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_mamujoco_adapter_dims_dtypes_and_no_stray_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = """
import numpy as np, mappo_lorasa_mamujoco as m
for sc, conf, mode, expect in [("HalfCheetah", "2x3", "local_k", (2, 7 + 2, 17 + 2, 3)),
                               ("Walker2d", "3x2", "local_k", (3, None, 17 + 3, 2)),
                               ("Walker2d", "6x1", "local_k", (6, None, 17 + 6, 1)),
                               ("Humanoid", "9|8", "global", (2, 348 + 2, 348 + 2, 9))]:
    env = m.MaMuJoCoEnv(sc, conf, 1, mode)
    obs, _ = env.reset(seed=0)
    n, od, sd, ad = expect
    assert (env.n_agents, env.state_dim, env.act_dim) == (n, sd, ad), (sc, env.n_agents, env.state_dim, env.act_dim)
    assert od is None or env.obs_dim == od, env.obs_dim
    assert obs["obs"].dtype == np.float32 and obs["state"].dtype == np.float32
    assert obs["obs"].shape == (n, env.obs_dim) and obs["state"].shape == (n, env.state_dim)
    assert (obs["obs"][:, -n:] == np.eye(n)).all() and (obs["state"][:, -n:] == np.eye(n)).all()
    out = env.step(np.ones((n, env.act_dim), np.float32))
    assert out[0]["obs"].dtype == np.float32 and isinstance(out[1], float)
    if sc == "Walker2d" and conf == "3x2":
        labels = [[node.label for node in part] for part in env.env.agent_action_partitions]
        assert labels == [["foot_joint", "leg_joint"], ["thigh_joint", "foot_left_joint"],
                          ["leg_left_joint", "thigh_left_joint"]], labels
    if sc == "Humanoid":
        assert env.act_sizes == [9, 8] and env.act_mask[1].tolist() == [1] * 8 + [0]
        ctrl = env.env.single_agent_env.unwrapped.data.ctrl
        assert np.allclose(ctrl, 0.4), ctrl  # [-1, 1] mapped onto the +-0.4 joint bounds
        assert np.allclose(obs["obs"][0, :348], obs["state"][0, :348])  # global obs mode: every agent sees state()
"""
    res = run_env(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == "", (res.stdout, res.stderr)  # no Adroit banner, no MuJoCo warning
    assert not os.path.exists(tmp_path / "MUJOCO_LOG.TXT")


def test_episode_ends_with_truncation_at_the_limit():
    env = M.MaMuJoCoEnv("HalfCheetah", "2x3", 1, "local_k", max_episode_steps=5)
    env.reset(seed=0)
    flags = [env.step(np.zeros((2, 3), np.float32))[2:4] for _ in range(5)]
    assert flags == [(False, False)] * 4 + [(False, True)]
