"""A2PO (docs/method.md §11): traces against brute-force sums and their GAE limits, the clip schedule, the agent
order, the reduction to PPO, the trace's de-normalisation, and that in agent k's turn only agent k's policy changes."""

import numpy as np
import pytest
import torch
from conftest import assert_only_the_current_agent_moved, load_script, make_args, record_actor_steps

A = load_script("a2po_lorasa_mamujoco.py")
M = load_script("mappo_lorasa_mamujoco.py")


def episode_data(T=15, E=3, seed=0):
    rng = np.random.default_rng(seed)
    ends = np.zeros((T, E), bool)
    truncs = np.zeros((T, E), bool)
    ends[4, 0] = True
    ends[9, 1] = truncs[9, 1] = True
    ends[2, 2] = ends[11, 2] = truncs[11, 2] = True
    masks, bad = np.ones((T + 1, E)), np.ones((T + 1, E))
    masks[1:] = 1 - ends
    bad[1:] = 1 - truncs
    return rng.normal(size=(T, E)), rng.uniform(0.3, 1.8, size=(T, E)), masks, bad


def brute_force(delta, rho, masks, bad, gamma, lam, kind, c_bar=1.0, lambda_squared=True):
    """The plain double sums of docs/method.md §11, one (t, env) at a time."""
    T, E = delta.shape
    advantages = np.zeros((T, E))
    for e in range(E):
        for t in range(T):
            total, trace, coef = 0.0, 1.0, 1.0
            for k in range(t, T):
                if k > t:
                    if kind == "speedup":
                        trace = min(1.0, rho[k, e] * trace)
                        coef *= gamma * lam * masks[k, e]
                    else:
                        coef *= gamma * lam * masks[k, e] * min(rho[k, e], c_bar) * (lam if lambda_squared else 1.0)
                boot = np.prod([bad[j + 1, e] for j in range(t, k + 1)])
                total += coef * (trace if kind == "speedup" else 1.0) * boot * delta[k, e]
            advantages[t, e] = total
    return advantages


def tensors(*xs):
    return [torch.tensor(x) for x in xs]


@pytest.mark.parametrize("kind", ["speedup", "retrace", "retrace-plain"])
def test_traces_match_brute_force_with_boundaries(kind):
    delta, rho, masks, bad = episode_data()
    if kind == "speedup":
        got = A.speedup_trace(*tensors(delta, rho, masks, bad), 0.99, 0.93)
        expected = brute_force(delta, rho, masks, bad, 0.99, 0.93, "speedup")
    else:
        squared = kind == "retrace"
        got = A.retrace_trace(*tensors(delta, rho, masks, bad), 0.99, 0.93, 1.0, squared)
        expected = brute_force(delta, rho, masks, bad, 0.99, 0.93, "retrace", 1.0, squared)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)


def test_traces_with_unit_ratios_are_gae():
    _, _, masks, bad = episode_data(seed=1)
    rng = np.random.default_rng(2)
    T, E = masks.shape[0] - 1, masks.shape[1]
    values, rewards = rng.normal(size=(T + 1, E)), rng.normal(size=(T, E))
    delta = rewards + 0.99 * values[1:] * masks[1:] - values[:-1]
    ones = np.ones_like(delta)

    def gae(lam):
        return M.gae(*tensors(rewards, values, masks, bad), 0.99, lam).numpy() - values[:-1]

    np.testing.assert_allclose(A.speedup_trace(*tensors(delta, ones, masks, bad), 0.99, 0.95).numpy(), gae(0.95), atol=1e-10)
    lambda_squared = A.retrace_trace(*tensors(delta, ones, masks, bad), 0.99, 0.95, 1.0, True).numpy()
    np.testing.assert_allclose(lambda_squared, gae(0.95**2), atol=1e-10)  # KEEP 15: GAE(lambda^2)
    plain = A.retrace_trace(*tensors(delta, ones, masks, bad), 0.99, 0.95, 1.0, False).numpy()
    np.testing.assert_allclose(plain, gae(0.95), atol=1e-10)


def test_clip_schedule_matches_table():
    args = make_args(A)
    table = {2: [0.15, 0.20], 3: [0.1333, 0.1667, 0.20], 4: [0.125, 0.15, 0.175, 0.20],
             8: [0.1125 + 0.0125 * k for k in range(8)], 10: [0.11 + 0.01 * k for k in range(10)]}  # fmt: skip
    for n, eps in table.items():
        np.testing.assert_allclose([A.clip_eps(args, k, n) for k in range(1, n + 1)], eps, atol=1e-4)


def test_agent_order():
    scores = torch.tensor([0.3, 2.0, 0.1, 1.5, 0.7])
    torch.manual_seed(0)
    for _ in range(20):
        order = A.agent_order("semi_greedy", scores)
        assert sorted(order) == list(range(5)) and order[0] == 1
        rest = [i for i in [1, 3, 4, 0, 2] if i not in order[:2]]
        assert order[2] == rest[0]  # positions 1, 3, 5: the highest remaining score
    assert A.agent_order("greedy", scores) == [1, 3, 4, 0, 2]
    assert A.agent_order("cyclic", scores) == [0, 1, 2, 3, 4]  # the reference's fixed order, every iteration
    assert sorted(A.agent_order("random", scores)) == list(range(5))
    assert len({tuple(A.agent_order("semi_greedy", scores)[1:2]) for _ in range(50)}) > 1  # position 2 is random


def synthetic(args, N, seed=0):
    generator = torch.Generator().manual_seed(seed)
    buf = A.RolloutBuffer(args, N, 9, 12, 3, "cpu")
    for tensor in (buf.obs, buf.state, buf.values, buf.final_values):
        tensor.normal_(generator=generator)
    buf.values.mul_(0.5)
    buf.actions.uniform_(-0.9, 0.9, generator=generator)
    buf.logprobs.normal_(-0.5, 0.1, generator=generator)
    buf.rewards.normal_(generator=generator)
    buf.masks[7, 1] = 0
    buf.boot[6, 1] = 1  # a bootstrapped truncation
    T, E = args.num_steps, args.num_envs
    return buf, torch.randn(N, T, E, generator=generator), torch.randn(N, T, E, generator=generator)


def build(module, mode, N, seed=0, **kw):
    torch.manual_seed(seed)
    args = make_args(module, share_mode=mode, num_steps=20, num_envs=3, update_epochs=2, **kw)
    actor, critic, value_norm = module.GaussianActor(9, 3, N, args), module.Critic(12, N, args), module.ValueNorm(N)
    phase = {"ps": "ps", "lorasa": "lora", "nps": "nps"}[mode]
    groups, optimizers = module.start_phase(actor, phase, args)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=1e-3, eps=1e-5)
    return args, actor, critic, value_norm, optimizers, groups, critic_optim, phase


def test_single_agent_a2po_equals_ppo():
    """n = 1, two-stage off: no predecessors (g = 1), eps_1 = eps, no trace: exactly the MAPPO update."""
    results = []
    for module in (A, M):
        kw = dict(two_stage=False) if module is A else {}
        args, actor, critic, value_norm, optimizers, groups, critic_optim, phase = build(module, "ps", 1, **kw)
        buf, returns, advantages = synthetic(args, 1)
        torch.manual_seed(5)
        module.update(args, actor, critic, value_norm, optimizers, groups, critic_optim, buf, returns, advantages, phase)
        results.append([p.detach().clone() for p in list(actor.parameters()) + list(critic.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_trace_denormalises_with_the_current_statistics():
    """The truncation bootstrap gamma V(s_final) enters agent i's trace de-normalised with VN_i's statistics at the time
    of the trace (as V_t is), not with those of the start of the iteration."""
    args = make_args(A, num_steps=20, num_envs=3)
    buf, _, _ = synthetic(args, 2)
    value_norm = A.ValueNorm(2)
    last_value = torch.randn(1, 1, 3)
    for _ in range(2):
        value_norm.update(torch.randn(2, 40) * 4 + 2)
        deltas, value = A.trace_deltas(args, buf, value_norm, 1, last_value)
        mean, std = value_norm.mean_std(torch.zeros(1), [1])
        V = torch.cat([buf.values[1, :-1], last_value[0]]) * std + mean
        final = buf.final_values[1] * std + mean
        expected = buf.rewards + args.gamma * buf.boot * final + args.gamma * V[1:] * buf.masks[1:] - V[:-1]
        torch.testing.assert_close(deltas, expected)
        torch.testing.assert_close(value, V)
    assert deltas[6, 1] != (buf.rewards + args.gamma * V[1:] * buf.masks[1:] - V[:-1])[6, 1]  # the bootstrap is there


@pytest.mark.parametrize("loop", ["agent", "ppo"])
@pytest.mark.parametrize("mode", ["lorasa", "nps", "ps"])
def test_only_the_current_agent_changes_during_its_turn(mode, loop):
    """Snapshot the actor around every optimiser step: lorasa - only agent k's adapters move; nps - only agent k's
    network; ps - the shared network, its optimiser stepping once per agent turn."""
    N = 3
    args, actor, critic, value_norm, optimizers, groups, critic_optim, phase = build(A, mode, N, a2po_loop=loop)
    buf, returns, advantages = synthetic(args, N)
    if mode == "lorasa":  # trained adapters, so that every adapter has a gradient
        with torch.no_grad():
            for p in (p for group in groups for p in group):
                p.add_(0.1 * torch.randn_like(p))
    steps = record_actor_steps(actor, optimizers)
    stats = A.update(args, actor, critic, value_norm, optimizers, groups, critic_optim, buf, returns, advantages, phase)
    assert_only_the_current_agent_moved(steps, actor, groups, stats, mode, loop, N, args.update_epochs)
