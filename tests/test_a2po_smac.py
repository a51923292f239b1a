"""A2PO on StarCraft (a2po_lorasa_smac.py): the categorical update with available-action and active masks. With one
agent it is the masked PPO update; only the current agent's policy changes in its turn, dead agents in the batch; the
trace ratios are 1 where an agent is dead and match a plain per-step loop; the advantages are standardised over the
active entries; both loops run end to end on SMAX in every share mode."""

import copy
import os

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

pytestmark = pytest.mark.skipif(not present(["a2po_lorasa_smac.py"]), reason="a2po_lorasa_smac.py is not there yet")
A = load_script("a2po_lorasa_smac.py") if present(["a2po_lorasa_smac.py"]) else None
M = load_script("mappo_lorasa_smac.py")
OBS, STATE, ACTIONS, T, E = 12, 15, 6, 20, 3


def synthetic(args, N, seed=0):
    """A rollout with episode ends and agents that die (only the no-op available, action 0). The stored log-probs at
    dead steps are wrong on purpose (-3, the true one is 0): a dead step must count as ratio 1 whatever is stored."""
    generator = torch.Generator().manual_seed(seed)
    buf = A.RolloutBuffer(args, N, OBS, STATE, ACTIONS, "cpu")
    for tensor in (buf.obs, buf.state, buf.values, buf.rewards):
        tensor.normal_(generator=generator)
    buf.values.mul_(0.5)
    buf.avail[..., 0] = 0  # alive: everything but the no-op
    buf.avail[:, :, :, 3] = (torch.rand(N, T + 1, E, generator=generator) > 0.3).float()  # sometimes unavailable
    buf.actions.random_(1, 3, generator=generator)
    buf.logprobs.uniform_(-2.0, -1.0, generator=generator)
    buf.masks[7, 1] = 0
    buf.masks[13, 2] = 0
    for agent, start, stop, env in ((1 % N, 4, 7, 1), (0, 9, 13, 2), (N - 1, 15, T + 1, 0)):  # dead until the episode ends
        buf.avail[agent, start:stop, env] = torch.eye(ACTIONS)[0]
        buf.active[agent, start:stop, env] = 0
        buf.actions[agent, start : min(stop, T), env] = 0
        buf.logprobs[agent, start : min(stop, T), env] = -3.0  # a dead agent's true log-prob is 0
    return buf, torch.randn(N, T, E, generator=generator), torch.randn(N, T, E, generator=generator)


def build(module, mode, N, seed=0, **kw):
    torch.manual_seed(seed)
    kw = dict(dict(update_epochs=2), **kw)
    args = make_args(module, map="3m", env_backend="smax", share_mode=mode, num_steps=T, num_envs=E, **kw)
    actor, critic, value_norm = (
        module.CategoricalActor(OBS, ACTIONS, N, args),
        module.Critic(STATE, N, args),
        module.ValueNorm(N),
    )
    phase = {"ps": "ps", "lorasa": "lora", "nps": "nps"}[mode]
    groups, optimizers = module.start_phase(actor, phase, args)
    critic_optim = torch.optim.Adam(critic.parameters(), lr=1e-3, eps=1e-5)
    if mode == "lorasa":  # trained adapters, so that every adapter has a gradient
        with torch.no_grad():
            for p in (p for group in groups for p in group):
                p.add_(0.1 * torch.randn_like(p))
    return args, actor, critic, value_norm, optimizers, groups, critic_optim, phase


@pytest.mark.parametrize("loop, epochs", [("agent", 2), ("ppo", 1)])
def test_single_agent_a2po_is_the_masked_ppo_update(loop, epochs):
    """n = 1, two-stage off, dead steps in the batch: no other agents (g = 1), eps_1 = eps, no trace (the ppo loop
    re-traces from the second epoch on, so one epoch there): exactly mappo_lorasa_smac.py's update."""
    results = []
    for module in (A, M):
        kw = dict(two_stage=False, a2po_loop=loop) if module is A else {}
        args, actor, critic, value_norm, optimizers, groups, critic_optim, phase = build(
            module, "ps", 1, update_epochs=epochs, **kw
        )
        buf, returns, advantages = synthetic(args, 1)
        torch.manual_seed(5)
        module.update(args, actor, critic, value_norm, optimizers, groups, critic_optim, buf, returns, advantages, phase)
        results.append([p.detach().clone() for p in list(actor.parameters()) + list(critic.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loop", ["agent", "ppo"])
@pytest.mark.parametrize("mode", ["lorasa", "nps", "ps"])
def test_only_the_current_agent_changes_during_its_turn_with_dead_agents(mode, loop):
    """Snapshot the actor around every optimiser step, dead agents in the batch: lorasa - only agent k's adapters move;
    nps - only agent k's network; ps - the shared network, its optimiser stepping once per agent turn."""
    N = 3
    args, actor, critic, value_norm, optimizers, groups, critic_optim, phase = build(A, mode, N, a2po_loop=loop)
    buf, returns, advantages = synthetic(args, N)
    steps = record_actor_steps(actor, optimizers)
    stats = A.update(args, actor, critic, value_norm, optimizers, groups, critic_optim, buf, returns, advantages, phase)
    assert_only_the_current_agent_moved(steps, actor, groups, stats, mode, loop, N, args.update_epochs)


def test_traces_use_unit_ratios_for_dead_agents_and_standardise_over_active_entries(monkeypatch):
    """Agent loop, cyclic order, phase lora: before agent 1's turn its trace gets rho_t = r_0 r_1 from a plain per-step
    loop over (t, env) with the stored hidden states, 1 where an agent is dead (the stored log-probs there are wrong on
    purpose), and agent 1's turn sees (R_tr - V) standardised over the active entries of all agents."""
    N = 3
    args, actor, critic, value_norm, optimizers, groups, critic_optim, phase = build(
        A, "lorasa", N, a2po_loop="agent", a2po_order="cyclic", two_stage=False
    )
    buf, returns, advantages = synthetic(args, N)
    calls, deltas_out, turn_advantages = [], [], []
    real_trace, real_deltas, real_chunks = A.retrace_trace, A.trace_deltas, A.chunk_minibatches

    def plain_rho(agents):
        rho = torch.ones(T, E)
        with torch.no_grad():
            for t in range(T):
                for e in range(E):
                    for j in agents:
                        if buf.active[j, t, e] == 0:
                            continue
                        obs, avail = buf.obs[[j], t, e].view(1, 1, 1, -1), buf.avail[[j], t, e].view(1, 1, 1, -1)
                        logits, _ = actor(obs, buf.actor_h[[j], t, e].view(1, 1, -1), buf.masks[t, e].view(1, 1), avail, [j])
                        log_prob = logits.log_softmax(-1)[0, 0, 0, buf.actions[j, t, e]]
                        rho[t, e] *= (log_prob - buf.logprobs[j, t, e]).exp()
        return rho

    def trace(deltas, rho, *a):
        denormalised = value_norm.denormalize(buf.values[:, :T])  # V of every agent, with the statistics of the moment
        out = real_trace(deltas, rho, *a)
        calls.append((rho.clone(), plain_rho([0, 1] if not calls else range(N)), out.clone(), denormalised))
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
    A.update(args, actor, critic, value_norm, optimizers, groups, critic_optim, buf, returns, advantages, phase)
    rho, expected_rho, traced, denormalised = calls[0]
    torch.testing.assert_close(rho, expected_rho)  # with the stored log-probs, a dead step would give e^3 instead of 1
    assert (rho[buf.active[1, :T] == 0] != torch.e**3).all() and (rho != 1).any()
    _, value = deltas_out[0]
    traced_returns = returns.clone()
    traced_returns[1] = traced + value[:-1]
    gaps = traced_returns - denormalised
    active = gaps[buf.active[:, :T] > 0]
    expected = (gaps[1] - active.mean()) / (active.std(correction=0) + 1e-5)
    assert len(turn_advantages) == N * args.update_epochs
    torch.testing.assert_close(turn_advantages[args.update_epochs], expected)  # agent 1's turn follows agent 0's epochs
    everywhere = (gaps[1] - gaps.mean()) / (gaps.std(correction=0) + 1e-5)
    assert not torch.allclose(expected, everywhere)  # the dead entries make a difference


@pytest.mark.parametrize("mode", ["lorasa", "ps", "nps"])
def test_agent_loop_runs_on_smax(mode, tmp_path):
    """The MaMuJoCo loop on SMAX, with the two-stage critic; lorasa switches inside the run."""
    tiny = ["--map", "3m", "--num-envs", "2", "--num-steps", "40", "--eval-episodes", "2", "--total-timesteps", "160"]
    run(
        "a2po_lorasa_smac.py",
        tiny + ["--share-mode", mode, "--a2po-loop", "agent", "--two-stage", "--lora-start", "80"],
        tmp_path,
    )
    run_dir = only_run(tmp_path)
    s = scalars(run_dir)
    assert [v for _, v in s["charts/phase"]] == {"lorasa": [0, 1], "ps": [0, 0], "nps": [2, 2]}[mode]
    assert {"a2po/order_pos/agent_2", "a2po/trace_rho_mean", "eval/win_rate"} <= set(s)
    assert "checkpoint.pt" in os.listdir(run_dir)


def test_others_product_is_the_other_agents_ratio_on_the_same_chunks(monkeypatch):
    """The others' ratios are cached over the whole buffer and looked up per minibatch: agent 0's first actor gradient
    equals that of the surrogate with g = clip(r_1, 1 +- eps_o), r_1 evaluated directly on the same chunks."""
    N = 2
    args, actor, critic, value_norm, optimizers, groups, critic_optim, phase = build(
        A, "lorasa", N, a2po_loop="ppo", a2po_order="cyclic", update_epochs=1
    )
    buf, returns, advantages = synthetic(args, N)
    initial = copy.deepcopy(actor)
    captured, grads = [], []
    real_chunks, real_step = A.chunk_minibatches, A.clip_and_step

    def chunks(data, *a):
        if "advantages" in data and not captured:  # agent 0's turn: remember the permutation's RNG state
            captured.append((torch.get_rng_state(), data))
        return real_chunks(data, *a)

    def clip_and_step(optimizers_, groups_, max_norm):
        grads.append([p.grad.clone() for p in groups_[0]])
        return real_step(optimizers_, groups_, max_norm)

    monkeypatch.setattr(A, "chunk_minibatches", chunks)
    monkeypatch.setattr(A, "clip_and_step", clip_and_step)
    A.update(args, actor, critic, value_norm, optimizers, groups, critic_optim, buf, returns, advantages, phase)
    rng, turn_data = captured[0]
    keys = ("obs", "actor_h", "avail", "actions", "logprobs", "active")
    torch.set_rng_state(rng)
    mb = next(real_chunks(turn_data, T, args.data_chunk_length, 1))  # agent 0's minibatch
    torch.set_rng_state(rng)
    other = next(real_chunks(dict({k: getattr(buf, k)[[1]] for k in keys}, masks=buf.masks), T, args.data_chunk_length, 1))
    with torch.no_grad():
        logits, _ = initial(other["obs"], other["actor_h"], other["masks"], other["avail"], [1])
        log_ratio = logits.log_softmax(-1).gather(-1, other["actions"][..., None])[..., 0] - other["logprobs"]
        g = torch.where(other["active"] > 0, log_ratio.exp(), 1.0).clamp(1 - args.others_clip_coef, 1 + args.others_clip_coef)
    assert (g != 1).any()
    logits, _ = initial(mb["obs"], mb["actor_h"], mb["masks"], mb["avail"], [0])
    log_probs = logits.log_softmax(-1)
    ratio = (log_probs.gather(-1, mb["actions"][..., None])[..., 0] - mb["logprobs"]).exp() * g
    eps = A.clip_eps(args, 1, N)
    surrogate = torch.min(ratio * mb["advantages"], ratio.clamp(1 - eps, 1 + eps) * mb["advantages"])
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    count = mb["active"].sum()
    loss = -(surrogate * mb["active"]).sum() / count - args.ent_coef * (entropy * mb["active"]).sum() / count
    initial_groups, _ = A.start_phase(initial, "lora", args)
    expected = torch.autograd.grad(loss, initial_groups[0])
    for got, want in zip(grads[0], expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
