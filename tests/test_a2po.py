"""A2PO (docs/method.md §11): traces against brute-force sums and their GAE limits, the clip
schedule, the agent order, the task default of the trace, the reduction to PPO, the trace's
de-normalisation, the cached ratios against direct evaluation and plain per-step loops, the others'
product in the surrogate, and that in agent k's turn only agent k's policy changes."""

import copy

import numpy as np
import pytest
import torch
from conftest import (
    assert_only_the_current_agent_moved,
    load_script,
    make_args,
    record_actor_steps,
    run,
)

A = load_script("a2po_lorasa_mamujoco.py")
M = load_script("mappo_lorasa_mamujoco.py")
T, E = 20, 3


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
                        c = min(rho[k, e], c_bar) * (lam if lambda_squared else 1.0)
                        coef *= gamma * lam * masks[k, e] * c
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

    speedup = A.speedup_trace(*tensors(delta, ones, masks, bad), 0.99, 0.95).numpy()
    np.testing.assert_allclose(speedup, gae(0.95), atol=1e-10)
    lambda_squared = A.retrace_trace(*tensors(delta, ones, masks, bad), 0.99, 0.95, 1.0, True)
    np.testing.assert_allclose(lambda_squared.numpy(), gae(0.95**2), atol=1e-10)  # KEEP 15
    plain = A.retrace_trace(*tensors(delta, ones, masks, bad), 0.99, 0.95, 1.0, False).numpy()
    np.testing.assert_allclose(plain, gae(0.95), atol=1e-10)


def test_clip_schedule_matches_table():
    args = make_args(A)
    table = {
        2: [0.15, 0.20],
        3: [0.1333, 0.1667, 0.20],
        4: [0.125, 0.15, 0.175, 0.20],
        8: [0.1125 + 0.0125 * k for k in range(8)],
        10: [0.11 + 0.01 * k for k in range(10)],
    }
    for n, eps in table.items():
        got = [A.clip_eps(args, k, n) for k in range(1, n + 1)]
        np.testing.assert_allclose(got, eps, atol=1e-4)


def test_agent_order():
    scores = torch.tensor([0.3, 2.0, 0.1, 1.5, 0.7])
    torch.manual_seed(0)
    for _ in range(20):
        order = A.agent_order("semi_greedy", scores)
        assert sorted(order) == list(range(5)) and order[0] == 1
        rest = [i for i in [1, 3, 4, 0, 2] if i not in order[:2]]
        assert order[2] == rest[0]  # positions 1, 3, 5: the highest remaining score
    assert A.agent_order("greedy", scores) == [1, 3, 4, 0, 2]
    assert A.agent_order("cyclic", scores) == [0, 1, 2, 3, 4]  # the reference's, every iteration
    assert sorted(A.agent_order("random", scores)) == list(range(5))
    seconds = {A.agent_order("semi_greedy", scores)[1] for _ in range(50)}
    assert len(seconds) > 1  # position 2 is random


def test_trace_variant_default_is_literal_with_the_reference_choice_per_task(tmp_path):
    """--help shows a literal default: speedup, and retrace on HalfCheetah (a TASK_DEFAULTS entry
    merged with the "HalfCheetah 2x3" one); a bad A2PO value is one line, exit code 2."""
    assert A.Args.trace_variant == "speedup"
    assert A.task_defaults([]) == dict(trace_variant="retrace", update_epochs=5)
    assert A.task_defaults(["--agent-conf", "6x1"]) == dict(trace_variant="retrace")
    assert A.task_defaults(["--scenario", "Walker2d", "--agent-conf", "3x2"]) == {}
    for flags, default in (([], "retrace"), (["--scenario", "Ant"], "speedup")):
        res = run("a2po_lorasa_mamujoco.py", ["--help", *flags], tmp_path)
        help_text = res.stdout.split("--trace-variant")[1].split("--trace-clip")[0]
        assert f"(default: {default})" in help_text
    for key, value, accepted in (
        ("clip_tuner_weight", 1.5, "0 <= value <= 1"),
        ("others_clip_coef", 0.0, "> 0"),
        ("trace_clip", -1.0, "> 0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            make_args(A, **{key: value})
        assert exit_info.value.code == 2, accepted


def synthetic(args, N, seed=0):
    generator = torch.Generator().manual_seed(seed)
    buf = A.RolloutBuffer(args, N, 9, 12, 3, "cpu")
    for tensor in (buf.obs, buf.state, buf.values, buf.final_values, buf.actor_h, buf.critic_h):
        tensor.normal_(generator=generator)
    buf.values.mul_(0.5)
    buf.actions.uniform_(-0.9, 0.9, generator=generator)
    buf.logprobs.normal_(-0.5, 0.1, generator=generator)
    buf.rewards.normal_(generator=generator)
    buf.masks[7, 1] = 0
    buf.boot[6, 1] = 1  # a bootstrapped truncation
    T, E = args.num_steps, args.num_envs
    returns = torch.randn(N, T, E, generator=generator)
    return buf, returns, torch.randn(N, T, E, generator=generator)


def build(module, mode, N, seed=0, trained=True, **kw):
    """Agent N - 1 has a padded third action dim (FIX 12); `trained`: perturbed adapters, so that
    every adapter has a gradient."""
    torch.manual_seed(seed)
    kw = dict(dict(update_epochs=2), **kw)
    args = make_args(module, share_mode=mode, num_steps=T, num_envs=E, **kw)
    action_dims = torch.ones(N, 3)
    action_dims[N - 1, 2] = 0 if N > 1 else 1
    actor = module.GaussianActor(9, 3, N, args, action_dims)
    critic, value_norm = module.Critic(12, N, args), module.ValueNorm(N)
    phase = {"ps": "ps", "lorasa": "lora", "nps": "nps"}[mode]
    groups, optimizers = module.start_phase(actor, phase, args)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=1e-3, eps=1e-5)
    if mode == "lorasa" and trained:
        with torch.no_grad():
            for p in (p for group in groups for p in group):
                p.add_(0.1 * torch.randn_like(p))
    return args, phase, actor, critic, value_norm, (optimizers, groups, critic_optim)


def batch(buf):
    """The batch update() builds: the buffer's tensors and each (t, env)'s flat index."""
    keys = ("obs", "state", "actor_h", "critic_h", "masks", "actions", "logprobs", "values")
    data = {key: getattr(buf, key) for key in keys}
    data["step"] = torch.arange(buf.rewards.numel()).view_as(buf.rewards)
    return data


def plain_ratios(actor, buf, j):
    """r_j (T, E) from a plain loop: one policy call per (t, env) from its stored hidden state, the
    mean of the per-dim ratios over agent j's real action dims."""
    dims = actor.action_dims[j]
    out = torch.zeros(T, E)
    with torch.no_grad():
        for t in range(T):
            for e in range(E):
                h = buf.actor_h[[j], t, e].view(1, 1, -1)
                obs, masks = buf.obs[[j], t, e].view(1, 1, 1, -1), buf.masks[t, e].view(1, 1)
                mean, std, _ = actor(obs, h, masks, [j])
                log_prob = A.squashed_log_prob(mean[0, 0, 0], std[0, 0, 0], buf.actions[j, t, e])
                ratio = (log_prob - buf.logprobs[j, t, e]).exp()
                out[t, e] = (ratio * dims).sum() / dims.sum()
    return out


@pytest.mark.parametrize("loop, epochs", [("agent", 2), ("ppo", 1)])
@pytest.mark.parametrize("mode", ["ps", "lorasa"])
def test_single_agent_a2po_equals_ppo(mode, loop, epochs):
    """n = 1, two-stage off: no other agents (g = 1), eps_1 = eps, no trace (the ppo loop
    re-traces from its second epoch on, so one epoch there): exactly the MAPPO update, parameters
    and logged losses."""
    results = []
    for module in (A, M):
        kw = dict(two_stage=False, a2po_loop=loop) if module is A else {}
        models = build(module, mode, 1, update_epochs=epochs, **kw)
        args, phase, actor, critic, value_norm, optimizers = models
        buf, returns, advantages = synthetic(args, 1)
        torch.manual_seed(5)
        stats = module.update(*models, buf, returns, advantages)
        params = list(actor.parameters()) + list(critic.parameters())
        results.append(([p.detach().clone() for p in params], stats))
    (a2po_params, a2po_stats), (mappo_params, mappo_stats) = results
    for a, b in zip(a2po_params, mappo_params):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert a2po_stats["a2po/order_pos/agent_0"] == 1
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "actor_grad_norm"):
        np.testing.assert_allclose(
            a2po_stats[f"losses/{key}"], mappo_stats[f"losses/{key}"], rtol=1e-4, atol=1e-6
        )


def test_trace_denormalises_with_the_current_statistics():
    """The truncation bootstrap gamma V(s_final) enters agent i's trace de-normalised with VN_i's
    statistics at the time of the trace (as V_t is), not with those of the start of the
    iteration."""
    args = make_args(A, num_steps=T, num_envs=E)
    buf, _, _ = synthetic(args, 2)
    value_norm = A.ValueNorm(2)
    last_value = torch.randn(1, 1, 3)
    for _ in range(2):
        value_norm.update(torch.randn(2, 40) * 4 + 2)
        deltas, value = A.trace_deltas(args, buf, value_norm, 1, last_value)
        mean, std = value_norm.mean_std(torch.zeros(1), [1])
        V = torch.cat([buf.values[1, :-1], last_value[0]]) * std + mean
        final = buf.final_values[1] * std + mean
        bootstrap = args.gamma * buf.boot * final
        expected = buf.rewards + bootstrap + args.gamma * V[1:] * buf.masks[1:] - V[:-1]
        torch.testing.assert_close(deltas, expected)
        torch.testing.assert_close(value, V)
    without = (buf.rewards + args.gamma * V[1:] * buf.masks[1:] - V[:-1])[6, 1]
    assert deltas[6, 1] != without  # the bootstrap is there


@pytest.mark.parametrize("mode", ["lorasa", "nps", "ps"])
def test_cached_ratios_equal_direct_evaluation(mode):
    """policy_ratios: the whole-buffer ratios, stepwise (the traces) equal a plain per-step loop and
    on the chunks (the others' product) equal a fresh evaluation; after an optimiser step exactly
    the agents whose policy it changed are evaluated again (ps: all, lorasa and nps: that agent),
    the others' cached ratios are reused, and no stale ratio is returned."""
    N = 3
    args, phase, actor, critic, value_norm, (optimizers, groups, _) = build(A, mode, N)
    buf, _, _ = synthetic(args, N)
    data = batch(buf)
    cache = {}
    for stepwise in (True, False):
        cached = A.policy_ratios(args, actor, data, [2, 0, 1], cache, stepwise)
        assert cached.shape == (3, T * E)
        direct = A.policy_ratios(args, actor, data, [0, 1, 2], {}, stepwise)
        torch.testing.assert_close(cached[[1, 2, 0]], direct, atol=1e-6, rtol=1e-6)
    for j in range(N):  # stepwise from the stored hidden states; the chunks differ from it
        plain = plain_ratios(actor, buf, j)
        torch.testing.assert_close(cache[True, j][1].view(T, E), plain, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(cache[False, j][1].view(T, E), plain, atol=1e-3)
    before = {key: ratio for key, (_, ratio) in cache.items()}
    k = 0 if mode == "ps" else 1  # one optimiser step: the shared network, or agent 1's own
    mean, std, _ = actor(buf.obs[[k], :T], buf.actor_h[[k], 0], buf.masks[:T], [k])
    (mean.pow(2).sum() + std.sum()).backward()
    optimizers[k].step()
    for stepwise in (True, False):
        again = A.policy_ratios(args, actor, data, [0, 1, 2], cache, stepwise)
        direct = A.policy_ratios(args, actor, data, [0, 1, 2], {}, stepwise)
        torch.testing.assert_close(again, direct, atol=1e-6, rtol=1e-6)
        evaluated = {j for j in range(N) if cache[stepwise, j][1] is not before[stepwise, j]}
        assert evaluated == ({0, 1, 2} if mode == "ps" else {1})
        for j in evaluated:
            assert not torch.allclose(cache[stepwise, j][1], before[stepwise, j])


def test_trace_uses_plain_per_step_ratios_and_standardises_over_all_entries(monkeypatch):
    """Agent loop, cyclic order, phase lora: before agent 1's turn its trace gets rho_t = r_0 r_1
    from a plain per-step loop with the stored hidden states (agent 0 updated, agent 1 not yet),
    and agent 1's turn sees (R_tr - V) standardised over all agents' entries, R_tr of the others
    still the GAE returns."""
    N = 3
    models = build(A, "lorasa", N, a2po_order="cyclic", two_stage=False, trace_variant="retrace")
    args, phase, actor, critic, value_norm, optimizers = models
    buf, returns, advantages = synthetic(args, N)
    calls, deltas_out, turn_advantages = [], [], []
    real_trace, real_deltas, real_chunks = A.retrace_trace, A.trace_deltas, A.chunk_minibatches

    def trace(deltas, rho, *a):
        denormalised = value_norm.denormalize(buf.values[:, :T])  # with the statistics now
        plain = plain_ratios(actor, buf, 0) * plain_ratios(actor, buf, 1)
        out = real_trace(deltas, rho, *a)
        calls.append((rho.clone(), plain, out.clone(), denormalised))
        return out

    def trace_deltas(*a):
        out = real_deltas(*a)
        deltas_out.append(out)
        return out

    def chunks(data, *a):
        if "advantages" in data:  # a turn's data (the others' ratios are chunked without)
            turn_advantages.append(data["advantages"][0].clone())
        return real_chunks(data, *a)

    monkeypatch.setattr(A, "retrace_trace", trace)
    monkeypatch.setattr(A, "trace_deltas", trace_deltas)
    monkeypatch.setattr(A, "chunk_minibatches", chunks)
    A.update(*models, buf, returns, advantages)
    rho, expected_rho, traced, denormalised = calls[0]
    torch.testing.assert_close(rho, expected_rho, atol=1e-5, rtol=1e-5)
    assert (rho != 1).any()
    _, value = deltas_out[0]
    traced_returns = returns.clone()
    traced_returns[1] = traced + value[:-1]
    gaps = traced_returns - denormalised
    expected = (gaps[1] - gaps.mean()) / (gaps.std(correction=0) + 1e-5)
    assert len(turn_advantages) == N * args.update_epochs
    torch.testing.assert_close(turn_advantages[args.update_epochs], expected)  # after agent 0's
    assert not torch.allclose(expected, advantages[1])  # the trace made a difference


def test_others_product_is_the_other_agents_ratio_on_the_same_chunks(monkeypatch):
    """The others' ratios are cached over the whole buffer and looked up per minibatch: agent 0's
    first actor gradient equals that of the surrogate with g = clip(r_1, 1 +- eps_o), r_1 (the
    mean of its per-dim ratios) evaluated directly on the same chunks."""
    N = 2
    kw = dict(a2po_loop="ppo", a2po_order="cyclic", update_epochs=1, two_stage=False)
    models = build(A, "lorasa", N, **kw)
    args, phase, actor, critic, value_norm, (optimizers, groups, _) = models
    buf, returns, advantages = synthetic(args, N)
    initial = copy.deepcopy(actor)
    captured, grads = [], []
    real_chunks, real_step = A.chunk_minibatches, A.clip_and_step

    def chunks(data, *a):
        if "advantages" in data and not captured:  # agent 0's turn: the permutation's RNG state
            captured.append((torch.get_rng_state(), data))
        return real_chunks(data, *a)

    def clip_and_step(optimizers_, groups_, max_norm):
        grads.append([p.grad.clone() for p in groups_[0]])
        return real_step(optimizers_, groups_, max_norm)

    monkeypatch.setattr(A, "chunk_minibatches", chunks)
    monkeypatch.setattr(A, "clip_and_step", clip_and_step)
    A.update(*models, buf, returns, advantages)
    rng, turn_data = captured[0]
    torch.set_rng_state(rng)
    mb = next(real_chunks(turn_data, T, args.data_chunk_length, 1))  # agent 0's minibatch
    keys = ("obs", "actor_h", "actions", "logprobs")
    torch.set_rng_state(rng)
    other_data = dict({key: getattr(buf, key)[[1]] for key in keys}, masks=buf.masks)
    other = next(real_chunks(other_data, T, args.data_chunk_length, 1))
    dims = initial.action_dims[:, None, None]
    with torch.no_grad():
        mean, std, _ = initial(other["obs"], other["actor_h"], other["masks"], [1])
        log_prob = A.squashed_log_prob(mean, std, other["actions"])
        per_dim = ((log_prob - other["logprobs"]).exp() * dims[[1]]).sum(-1) / dims[1].sum()
        eps_o = args.others_clip_coef
        g = per_dim.clamp(1 - eps_o, 1 + eps_o)
    assert (g != 1).any() and dims[1].sum() == 2  # agent 1 has a padded dim
    mean, std, _ = initial(mb["obs"], mb["actor_h"], mb["masks"], [0])
    log_prob = A.squashed_log_prob(mean, std, mb["actions"])
    ratio = (log_prob - mb["logprobs"]).exp() * g[..., None]  # a ratio per dim (KEEP 19)
    eps = A.clip_eps(args, 1, N)
    advantage = mb["advantages"][..., None]
    surrogate = torch.min(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)
    loss = -surrogate.sum(-1).mean()  # agent 0 has 3 real dims; ent_coef = 0
    expected = torch.autograd.grad(loss, A.agent_parameters(initial, 0, args))
    for got, want in zip(grads[0], expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loop", ["agent", "ppo"])
@pytest.mark.parametrize("mode", ["lorasa", "nps", "ps"])
def test_only_the_current_agent_changes_during_its_turn(mode, loop):
    """Snapshot the actor around every optimiser step: lorasa - only agent k's adapters move;
    nps - only agent k's network; ps - the shared network, its optimiser stepping once per agent
    turn."""
    N = 3
    models = build(A, mode, N, a2po_loop=loop)
    args, phase, actor, critic, value_norm, (optimizers, groups, _) = models
    buf, returns, advantages = synthetic(args, N)
    steps = record_actor_steps(actor, optimizers)
    stats = A.update(*models, buf, returns, advantages)
    epochs = args.update_epochs
    assert_only_the_current_agent_moved(steps, actor, groups, stats, mode, loop, N, epochs)
