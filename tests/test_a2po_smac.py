"""A2PO on StarCraft (a2po_lorasa_smac.py): the categorical update with available-action and active
masks. With one agent it is the masked PPO update; only the current agent's policy changes in its
turn, dead agents in the batch; the cached ratios are 1 where an agent is dead and match a plain
per-step loop; the advantages are standardised over the active entries; the others' product is the
other agents' ratio on the same chunks; both loops run end to end on SMAX in every share mode."""

import copy
import os

import numpy as np
import pytest
import torch
from conftest import (
    assert_only_the_current_agent_moved,
    load_script,
    make_args,
    only_run,
    present,
    record_actor_steps,
    run,
    scalars,
)

pytestmark = pytest.mark.skipif(
    not present(["a2po_lorasa_smac.py"]), reason="a2po_lorasa_smac.py is not there yet"
)
A = load_script("a2po_lorasa_smac.py") if present(["a2po_lorasa_smac.py"]) else None
M = load_script("mappo_lorasa_smac.py")
OBS, STATE, ACTIONS, T, E = 12, 15, 6, 20, 3


def synthetic(args, N, seed=0):
    """A rollout with episode ends, a bootstrapped timeout, stored hidden states and agents that
    die (only the no-op available, action 0). The stored log-probs at dead steps are wrong on
    purpose (-3, the true one is 0): a dead step must count as ratio 1 whatever is stored."""
    generator = torch.Generator().manual_seed(seed)
    buf = A.RolloutBuffer(args, N, OBS, STATE, ACTIONS, "cpu")
    for tensor in (buf.obs, buf.state, buf.values, buf.final_values, buf.actor_h, buf.critic_h):
        tensor.normal_(generator=generator)
    buf.rewards.normal_(generator=generator)
    buf.values.mul_(0.5)
    buf.avail[..., 0] = 0  # alive: everything but the no-op
    sometimes = torch.rand(N, T + 1, E, generator=generator) > 0.3
    buf.avail[:, :, :, 3] = sometimes.float()  # action 3 sometimes unavailable
    buf.actions.random_(1, 3, generator=generator)
    buf.logprobs.uniform_(-2.0, -1.0, generator=generator)
    buf.masks[7, 1] = 0
    buf.masks[13, 2] = 0
    buf.boot[6, 1] = 1  # a bootstrapped timeout (--bootstrap-timeouts)
    # dead until the episode ends
    for agent, start, stop, env in ((1 % N, 4, 7, 1), (0, 9, 13, 2), (N - 1, 15, T + 1, 0)):
        buf.avail[agent, start:stop, env] = torch.eye(ACTIONS)[0]
        buf.active[agent, start:stop, env] = 0
        buf.actions[agent, start : min(stop, T), env] = 0
        buf.logprobs[agent, start : min(stop, T), env] = -3.0  # a dead agent's true log-prob is 0
    returns = torch.randn(N, T, E, generator=generator)
    return buf, returns, torch.randn(N, T, E, generator=generator)


def build(module, mode, N, seed=0, trained=True, **kw):
    """`trained`: perturbed adapters, so that every adapter has a gradient."""
    torch.manual_seed(seed)
    kw = dict(dict(update_epochs=2), **kw)
    args = make_args(
        module, map="3m", env_backend="smax", share_mode=mode, num_steps=T, num_envs=E, **kw
    )
    actor = module.CategoricalActor(OBS, ACTIONS, N, args)
    critic, value_norm = module.Critic(STATE, N, args), module.ValueNorm(N)
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
    data = {key: getattr(buf, key) for key in keys + ("avail", "active")}
    data["step"] = torch.arange(buf.rewards.numel()).view_as(buf.rewards)
    return data


def plain_ratios(actor, buf, j):
    """r_j (T, E) from a plain loop: one policy call per (t, env) from its stored hidden state, 1
    where agent j is dead (without a look at the stored log-prob)."""
    out = torch.ones(T, E)
    with torch.no_grad():
        for t in range(T):
            for e in range(E):
                if buf.active[j, t, e] == 0:
                    continue
                obs = buf.obs[[j], t, e].view(1, 1, 1, -1)
                avail = buf.avail[[j], t, e].view(1, 1, 1, -1)
                h, masks = buf.actor_h[[j], t, e].view(1, 1, -1), buf.masks[t, e].view(1, 1)
                logits, _ = actor(obs, h, masks, avail, [j])
                log_prob = logits.log_softmax(-1)[0, 0, 0, buf.actions[j, t, e]]
                out[t, e] = (log_prob - buf.logprobs[j, t, e]).exp()
    return out


def test_defaults_are_the_reference_smac_a2po():
    """SMAC's A2PO defaults (the reference's): the ppo loop, the retrace trace, no two-stage
    critic; a bad A2PO value is one line, exit code 2."""
    args = make_args(A)
    assert (args.a2po_loop, args.trace_variant, args.two_stage) == ("ppo", "retrace", False)
    for key, value in (("clip_tuner_weight", 1.5), ("others_clip_coef", 0.0), ("trace_clip", -1)):
        with pytest.raises(SystemExit) as exit_info:
            make_args(A, **{key: value})
        assert exit_info.value.code == 2


@pytest.mark.parametrize("loop, epochs", [("agent", 2), ("ppo", 1)])
@pytest.mark.parametrize("mode", ["ps", "lorasa"])
def test_single_agent_a2po_is_the_masked_ppo_update(mode, loop, epochs):
    """n = 1, two-stage off, dead steps in the batch: no other agents (g = 1), eps_1 = eps, no
    trace (the ppo loop re-traces from the second epoch on, so one epoch there): exactly
    mappo_lorasa_smac.py's update, parameters and logged losses."""
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
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert a2po_stats["a2po/order_pos/agent_0"] == 1
    keys = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "actor_grad_norm")
    for key in keys + ("critic_grad_norm", "explained_variance"):
        np.testing.assert_allclose(
            a2po_stats[f"losses/{key}"], mappo_stats[f"losses/{key}"], rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("loop", ["agent", "ppo"])
@pytest.mark.parametrize("mode", ["lorasa", "nps", "ps"])
def test_only_the_current_agent_changes_during_its_turn_with_dead_agents(mode, loop):
    """Snapshot the actor around every optimiser step, dead agents in the batch: lorasa - only
    agent k's adapters move; nps - only agent k's network; ps - the shared network, its optimiser
    stepping once per agent turn."""
    N = 3
    models = build(A, mode, N, a2po_loop=loop)
    args, phase, actor, critic, value_norm, (optimizers, groups, _) = models
    buf, returns, advantages = synthetic(args, N)
    steps = record_actor_steps(actor, optimizers)
    stats = A.update(*models, buf, returns, advantages)
    epochs = args.update_epochs
    assert_only_the_current_agent_moved(steps, actor, groups, stats, mode, loop, N, epochs)


@pytest.mark.parametrize("mode", ["lorasa", "nps", "ps"])
def test_cached_ratios_equal_direct_evaluation_with_dead_agents(mode):
    """policy_ratios: stepwise (the traces) equal a plain per-step loop, 1 at the dead steps
    whatever log-prob is stored; on the chunks (the others' product) equal a fresh evaluation, 1
    at the dead steps too; after an optimiser step exactly the agents whose policy it changed are
    evaluated again (ps: all, lorasa and nps: that agent), and no stale ratio is returned."""
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
    dead = buf.active[:, :T] == 0
    for j in range(N):  # stepwise from the stored hidden states; the chunks differ from it
        plain = plain_ratios(actor, buf, j)
        torch.testing.assert_close(cache[True, j][1].view(T, E), plain, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(cache[False, j][1].view(T, E), plain, atol=1e-3)
        for stepwise in (True, False):  # with the stored -3, a dead step would be e^3
            assert (cache[stepwise, j][1].view(T, E)[dead[j]] == 1).all()
    before = {key: ratio for key, (_, ratio) in cache.items()}
    k = 0 if mode == "ps" else 1  # one optimiser step: the shared network, or agent 1's own
    logits, _ = actor(buf.obs[[k], :T], buf.actor_h[[k], 0], buf.masks[:T], buf.avail[[k], :T], [k])
    logits.log_softmax(-1)[..., 1].sum().backward()
    optimizers[k].step()
    for stepwise in (True, False):
        again = A.policy_ratios(args, actor, data, [0, 1, 2], cache, stepwise)
        direct = A.policy_ratios(args, actor, data, [0, 1, 2], {}, stepwise)
        torch.testing.assert_close(again, direct, atol=1e-6, rtol=1e-6)
        evaluated = {j for j in range(N) if cache[stepwise, j][1] is not before[stepwise, j]}
        assert evaluated == ({0, 1, 2} if mode == "ps" else {1})
        for j in evaluated:
            assert not torch.allclose(cache[stepwise, j][1], before[stepwise, j])


def test_traces_use_unit_ratios_for_dead_agents_and_standardise_over_active_entries(monkeypatch):
    """Agent loop, cyclic order, phase lora: before agent 1's turn its trace gets rho_t = r_0 r_1
    from a plain per-step loop over (t, env) with the stored hidden states, 1 where an agent is
    dead (the stored log-probs there are wrong on purpose), and agent 1's turn sees (R_tr - V)
    standardised over the active entries of all agents, R_tr of the others still the GAE
    returns."""
    N = 3
    kw = dict(a2po_loop="agent", a2po_order="cyclic", two_stage=False, trace_variant="retrace")
    models = build(A, "lorasa", N, **kw)
    args, phase, actor, critic, value_norm, optimizers = models
    buf, returns, advantages = synthetic(args, N)
    calls, deltas_out, turn_advantages = [], [], []
    real_trace, real_deltas, real_chunks = A.retrace_trace, A.trace_deltas, A.chunk_minibatches

    def trace(deltas, rho, *a):
        denormalised = value_norm.denormalize(buf.values[:, :T])  # with the statistics now
        plain = plain_ratios(actor, buf, 0) * plain_ratios(actor, buf, 1) if not calls else None
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
    # with the stored log-probs, a dead step would give e^3 instead of 1
    torch.testing.assert_close(rho, expected_rho)
    assert (rho[buf.active[1, :T] == 0] != torch.e**3).all() and (rho != 1).any()
    _, value = deltas_out[0]
    traced_returns = returns.clone()
    traced_returns[1] = traced + value[:-1]
    gaps = traced_returns - denormalised
    active = gaps[buf.active[:, :T] > 0]
    expected = (gaps[1] - active.mean()) / (active.std(correction=0) + 1e-5)
    assert len(turn_advantages) == N * args.update_epochs
    # agent 1's turn follows agent 0's epochs
    torch.testing.assert_close(turn_advantages[args.update_epochs], expected)
    everywhere = (gaps[1] - gaps.mean()) / (gaps.std(correction=0) + 1e-5)
    assert not torch.allclose(expected, everywhere)  # the dead entries make a difference
    assert not torch.allclose(expected, advantages[1])  # the trace made a difference


@pytest.mark.parametrize("mode", ["lorasa", "ps", "nps"])
def test_agent_loop_runs_on_smax(mode, tmp_path):
    """The MaMuJoCo loop on SMAX, with the two-stage critic; lorasa switches inside the run."""
    tiny = ["--map", "3m", "--num-envs", "2", "--num-steps", "40", "--eval-episodes", "2"]
    flags = ["--total-timesteps", "160", "--share-mode", mode, "--a2po-loop", "agent"]
    run("a2po_lorasa_smac.py", tiny + flags + ["--two-stage", "--lora-start", "80"], tmp_path)
    run_dir = only_run(tmp_path)
    s = scalars(run_dir)
    assert [v for _, v in s["charts/phase"]] == {"lorasa": [0, 1], "ps": [0, 0], "nps": [2, 2]}[
        mode
    ]
    assert {"a2po/order_pos/agent_2", "a2po/trace_rho_mean", "eval/win_rate"} <= set(s)
    assert "checkpoint.pt" in os.listdir(run_dir)


def test_others_product_is_the_other_agents_ratio_on_the_same_chunks(monkeypatch):
    """The others' ratios are cached over the whole buffer and looked up per minibatch: agent 0's
    first actor gradient equals that of the masked surrogate with g = clip(r_1, 1 +- eps_o), r_1
    evaluated directly on the same chunks (1 where agent 1 is dead)."""
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
    keys = ("obs", "actor_h", "avail", "actions", "logprobs", "active")
    torch.set_rng_state(rng)
    other_data = dict({key: getattr(buf, key)[[1]] for key in keys}, masks=buf.masks)
    other = next(real_chunks(other_data, T, args.data_chunk_length, 1))
    with torch.no_grad():
        logits, _ = initial(other["obs"], other["actor_h"], other["masks"], other["avail"], [1])
        log_prob = logits.log_softmax(-1).gather(-1, other["actions"][..., None])[..., 0]
        r_1 = torch.where(other["active"] > 0, (log_prob - other["logprobs"]).exp(), 1.0)
        eps_o = args.others_clip_coef
        g = r_1.clamp(1 - eps_o, 1 + eps_o)
    assert (g != 1).any() and (other["active"] == 0).any()
    logits, _ = initial(mb["obs"], mb["actor_h"], mb["masks"], mb["avail"], [0])
    log_probs = logits.log_softmax(-1)
    ratio = (log_probs.gather(-1, mb["actions"][..., None])[..., 0] - mb["logprobs"]).exp() * g
    eps = A.clip_eps(args, 1, N)
    advantage = mb["advantages"]
    surrogate = torch.min(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    active = mb["active"]
    count = active.sum()
    loss = -(surrogate * active).sum() / count - args.ent_coef * (entropy * active).sum() / count
    expected = torch.autograd.grad(loss, A.agent_parameters(initial, 0, args))
    for got, want in zip(grads[0], expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
