"""A2PO (a2po.md section 10): traces against brute-force sums and their GAE limits, the clip schedule, the agent
order, the reduction to PPO, and that during agent k's turn only agent k's policy parameters change."""
import numpy as np
import pytest
import torch

from conftest import load_script, make_args

A = load_script("a2po_lorasa_mamujoco.py")
M = load_script("mappo_lorasa_mamujoco.py")


def episode_data(T=15, E=3, seed=0):
    rng = np.random.default_rng(seed)
    ends = np.zeros((T, E), bool)
    truncs = np.zeros((T, E), bool)
    ends[4, 0] = True
    ends[9, 1] = truncs[9, 1] = True
    ends[2, 2] = ends[11, 2] = True
    truncs[11, 2] = True
    masks, bad = np.ones((T + 1, E)), np.ones((T + 1, E))
    masks[1:] = 1 - ends
    bad[1:] = 1 - truncs
    return rng.normal(size=(T, E)), rng.uniform(0.3, 1.8, size=(T, E)), masks, bad


def brute_force(delta, rho, masks, bad, gamma, lam, kind, c_bar=1.0, lambda_squared=True):
    """Plain double sums of a2po.md section 5, one (t, env) at a time."""
    T, E = delta.shape
    adv = np.zeros((T, E))
    for e in range(E):
        for t in range(T):
            total, C, coef = 0.0, 1.0, 1.0
            for k in range(t, T):
                if k > t:
                    if kind == "speedup":
                        C = min(1.0, rho[k, e] * C)
                        coef *= gamma * lam * masks[k, e]
                    else:
                        c = min(rho[k, e], c_bar) * (lam if lambda_squared else 1.0)
                        coef *= gamma * lam * masks[k, e] * c
                b = np.prod([bad[j + 1, e] for j in range(t, k + 1)])
                total += coef * (C if kind == "speedup" else 1.0) * b * delta[k, e]
            adv[t, e] = total
    return adv


def tt(*xs):
    return [torch.tensor(x) for x in xs]


@pytest.mark.parametrize("kind", ["speedup", "retrace", "retrace-plain"])
def test_traces_match_brute_force_with_boundaries(kind):
    delta, rho, masks, bad = episode_data()
    gamma, lam = 0.99, 0.93
    if kind == "speedup":
        got = A.speedup_trace(*tt(delta, rho, masks, bad), gamma, lam)
        exp = brute_force(delta, rho, masks, bad, gamma, lam, "speedup")
    else:
        sq = kind == "retrace"
        got = A.retrace_trace(*tt(delta, rho, masks, bad), gamma, lam, 1.0, sq)
        exp = brute_force(delta, rho, masks, bad, gamma, lam, "retrace", 1.0, sq)
    np.testing.assert_allclose(got.numpy(), exp, atol=1e-10)


def test_traces_with_unit_ratios_are_gae():
    delta, _, masks, bad = episode_data(seed=1)
    rng = np.random.default_rng(2)
    T, E = delta.shape
    values, rewards = rng.normal(size=(T + 1, E)), rng.normal(size=(T, E))
    delta = rewards + 0.99 * values[1:] * masks[1:] - values[:-1]
    ones = np.ones_like(delta)
    gae = lambda lam: M.gae(*tt(rewards, values, masks, bad), 0.99, lam).numpy() - values[:-1]
    np.testing.assert_allclose(A.speedup_trace(*tt(delta, ones, masks, bad), 0.99, 0.95).numpy(), gae(0.95), atol=1e-10)
    np.testing.assert_allclose(A.retrace_trace(*tt(delta, ones, masks, bad), 0.99, 0.95, 1.0, True).numpy(),
                               gae(0.95**2), atol=1e-10)  # KEEP 15: GAE(lambda^2) = GAE(0.9025)
    np.testing.assert_allclose(A.retrace_trace(*tt(delta, ones, masks, bad), 0.99, 0.95, 1.0, False).numpy(), gae(0.95),
                               atol=1e-10)


def test_clip_schedule_matches_table():
    args = make_args(A)
    table = {2: [0.15, 0.20], 3: [0.1333, 0.1667, 0.20], 4: [0.125, 0.15, 0.175, 0.20],
             8: [0.1125 + 0.0125 * k for k in range(8)], 10: [0.11 + 0.01 * k for k in range(10)]}
    for n, eps in table.items():
        np.testing.assert_allclose([A.clip_eps(args, k, n) for k in range(1, n + 1)], eps, atol=1e-4)


def test_agent_order():
    scores = torch.tensor([0.3, 2.0, 0.1, 1.5, 0.7])
    torch.manual_seed(0)
    for _ in range(20):
        order = A.agent_order("semi_greedy", scores, 0)
        assert sorted(order) == list(range(5)) and order[0] == 1
        rest = [i for i in [1, 3, 4, 0, 2] if i not in order[:2]]
        assert order[2] == rest[0]  # positions 1, 3, 5: the highest remaining score
    assert A.agent_order("greedy", scores, 0) == [1, 3, 4, 0, 2]
    assert A.agent_order("cyclic", scores, 7) == [2, 3, 4, 0, 1]
    assert sorted(A.agent_order("random", scores, 0)) == list(range(5))
    seen = {tuple(A.agent_order("semi_greedy", scores, 0)[1:2]) for _ in range(50)}
    assert len(seen) > 1  # position 2 is drawn at random


def synthetic(T=20, N=2, E=3, F=9, S=12, Ad=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    data = dict(obs=r(T + 1, N, E, F), state=r(T + 1, N, E, S), actor_h=torch.zeros(T + 1, N, E, 64),
                critic_h=torch.zeros(T + 1, N, E, 64), masks=torch.ones(T + 1, E),
                actions=torch.rand(T, N, E, Ad, generator=g) * 1.8 - 0.9, logprobs=r(T, N, E, Ad) * 0.1 - 0.5,
                values=r(T + 1, N, E) * 0.5, returns=r(T, N, E))
    data["masks"][7, 1] = 0
    ctx = dict(rewards=r(T, N, E), bad_masks=torch.ones(T + 1, E), iteration=3)
    return data, r(T, N, E), ctx


def build(mod, mode, N, seed=0, **kw):
    torch.manual_seed(seed)
    args = make_args(mod, share_mode=mode, num_steps=20, num_envs=3, update_epochs=2, **kw)
    actor, critic, vn = mod.Actor(9, 3, N, args), mod.Critic(12, N, args), mod.ValueNorm(N)
    phase = {"ps": "ps", "lorasa": "lora", "nps": "nps"}[mode]
    groups, optims = mod.start_phase(actor, phase, args)
    mod.unmerge(actor)
    return args, actor, critic, vn, groups, optims, torch.optim.Adam(critic.parameters(), lr=1e-3, eps=1e-5), phase


def test_single_agent_a2po_equals_ppo():
    """n = 1, two-stage off: no predecessors (g = 1), eps_1 = eps, no trace: the MAPPO update exactly."""
    data, adv, ctx = synthetic(N=1)
    results = []
    for mod in (A, M):
        args, actor, critic, vn, groups, optims, copt, phase = build(mod, "ps", 1, two_stage=False) if mod is A else \
            build(mod, "ps", 1)
        torch.manual_seed(5)
        mod.update(args, actor, critic, vn, optims, groups, copt, data, adv, phase, torch.ones(1, 3), ctx)
        results.append([p.detach().clone() for p in list(actor.parameters()) + list(critic.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unit_others_ratio_is_the_plain_clipped_objective():
    args = make_args(A, share_mode="ps")
    torch.manual_seed(0)
    actor = A.Actor(9, 3, 2, args)
    g = torch.Generator().manual_seed(1)
    mb = dict(obs=torch.randn(2, 10, 4, 9, generator=g), actor_h=torch.zeros(2, 4, 64), masks=torch.ones(10, 4),
              actions=torch.rand(2, 10, 4, 3, generator=g) * 1.8 - 0.9, logprobs=torch.randn(2, 10, 4, 3, generator=g))
    adv = torch.randn(2, 10, 4, generator=g)
    torch.manual_seed(2)
    plain = A.policy_terms(args, actor, mb, adv, 0.15, torch.ones(2, 3))
    torch.manual_seed(2)
    ones = A.policy_terms(args, actor, mb, adv, 0.15, torch.ones(2, 3), others=torch.ones(2, 10, 4))
    for x, y in zip(plain, ones):
        torch.testing.assert_close(x, y)
    torch.manual_seed(2)
    moved = A.policy_terms(args, actor, mb, adv, 0.15, torch.ones(2, 3), others=torch.full((2, 10, 4), 1.1))
    assert not torch.allclose(moved[0], plain[0])


@pytest.mark.parametrize("loop", ["agent", "ppo"])
@pytest.mark.parametrize("mode", ["lorasa", "nps", "ps"])
def test_only_the_current_agent_changes_during_its_turn(mode, loop):
    """Snapshot the actor around every optimiser step: lorasa - only agent k's adapters move; nps - only agent k's
    network; ps - the shared network, its optimiser stepping once per agent turn (n E or 2 n E steps)."""
    N = 3
    args, actor, critic, vn, groups, optims, copt, phase = build(A, mode, N, a2po_loop=loop)
    data, adv, ctx = synthetic(N=N)
    if mode == "lorasa":  # trained adapters, so that every adapter has a gradient
        with torch.no_grad():
            for p in (p for g in groups for p in g):
                p.add_(0.1 * torch.randn_like(p))
    steps = []
    for k, opt in enumerate(optims):
        orig = opt.step

        def step(*a, _orig=orig, _k=k, **kw):
            before = {n: p.detach().clone() for n, p in actor.named_parameters()}
            out = _orig(*a, **kw)
            moved = {n for n, p in actor.named_parameters() if not torch.equal(before[n], p)}
            steps.append((_k, moved))
            return out
        opt.step = step
    stats = A.update(args, actor, critic, vn, optims, groups, copt, data, adv, phase, torch.ones(N, 3), ctx)
    names = {id(p): n for n, p in actor.named_parameters()}
    assert len(steps) == N * args.update_epochs
    for k, moved in steps:
        assert moved, k
        if mode == "ps":
            assert k == 0 and all("lora_" not in n for n in moved)
        else:
            allowed = {names[id(p)] for p in groups[k]}
            assert moved <= allowed, (k, moved - allowed)
    if mode != "ps" and loop == "agent":  # each agent's turn is contiguous and follows the logged order
        order = sorted(range(N), key=lambda i: stats[f"a2po/order_pos/agent_{i}"])
        assert [k for k, _ in steps] == [i for i in order for _ in range(args.update_epochs)]
    assert {"a2po/others_ratio_mean", "a2po/trace_rho_mean", "a2po/clip_eps/pos_3"} <= set(stats)
