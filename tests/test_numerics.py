"""Equations of the scripts against independent plain-loop references (shared blocks: run for every script)."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import make_args


def perturb(params, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(std * torch.randn(p.shape, generator=g))


def test_lora_linear_equals_per_agent_loop_and_merged_weights(script):
    torch.manual_seed(0)
    N, I, O, r, alpha = 3, 5, 7, 2, 4.0
    layer = script.LoRALinear(I, O, N, "lorasa", True, rank=r, alpha=alpha)
    layer.lora_on = True
    perturb(list(layer.lora_A) + list(layer.lora_B) + list(layer.lora_bias))
    x = torch.randn(N, 4, 6, I)
    y = layer(x)
    s = alpha / r
    for i in range(N):  # y_i = x W0^T + s (x A_i^T) B_i^T + b0 + beta_i, one agent at a time
        ref = x[i] @ layer.weight.T + s * (x[i] @ layer.lora_A[i].T) @ layer.lora_B[i].T + layer.bias + layer.lora_bias[i]
        torch.testing.assert_close(y[i], ref, atol=1e-5, rtol=1e-5)
    layer.merge()  # W_i = W0 + s B_i A_i precomputed, used under no_grad only
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x[[2, 0]], agents=[2, 0]), y[[2, 0]].detach(), atol=1e-5, rtol=1e-5)
        merged_w = torch.stack([layer.weight + s * layer.lora_B[i] @ layer.lora_A[i] for i in range(N)])
        torch.testing.assert_close(layer.cache[0], merged_w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x[[1]], agents=[1]), y[[1]], atol=1e-5, rtol=1e-5)


def test_nps_and_ps_layers_equal_plain_linear(script):
    torch.manual_seed(1)
    N, I, O = 4, 6, 3
    x = torch.randn(N, 5, I)
    nps = script.LoRALinear(I, O, N, "nps", False)
    perturb(list(nps.bias_i))
    y = nps(x)
    for i in range(N):
        torch.testing.assert_close(y[i], x[i] @ nps.weight_i[i].T + nps.bias_i[i], atol=1e-6, rtol=1e-6)
    ps = script.LoRALinear(I, O, N, "ps", True)  # adapt is ignored outside lorasa mode
    assert not hasattr(ps, "lora_A")
    torch.testing.assert_close(ps(x), x @ ps.weight.T + ps.bias)


@pytest.mark.parametrize("lora_init", ["reference", "standard"])
def test_adapters_start_at_zero_change_and_policy_is_continuous_at_switch(script, lora_init):
    """The policy right after the switch equals the policy right before it (merged and unmerged paths)."""
    torch.manual_seed(2)
    args = make_args(script, share_mode="lorasa", lora_init=lora_init)
    N, obs_dim, act_dim = 3, 11, 4
    actor = script.Actor(obs_dim, act_dim, N, args)
    script.start_phase(actor, "ps", args)
    perturb([p for n, p in actor.named_parameters() if "lora_" not in n])  # a "trained" shared policy
    script.merge(actor)  # as the training loop does after every update
    obs, h, masks = torch.randn(N, 10, 8, obs_dim), torch.randn(N, 8, 64), (torch.rand(10, 8) > 0.2).float()
    a = torch.rand(N, 10, 8, act_dim) * 1.8 - 0.9
    with torch.no_grad():
        before = actor(obs, h, masks)
        logp_before = script.squashed_log_prob(before[0], before[1], a)
    for x, y in zip(before, actor(obs, h, masks)):  # merged (rollout) = unmerged (training) before the switch too
        torch.testing.assert_close(y.detach(), x, atol=1e-6, rtol=0)
    script.start_phase(actor, "lora", args)
    A = [p for n, p in actor.named_parameters() if "lora_A" in n]
    B = [p for n, p in actor.named_parameters() if "lora_B" in n]
    assert len(A) == 7 * N and all((a_.abs().sum() == 0) if lora_init == "reference" else (b_.abs().sum() == 0)
                                   for a_, b_ in zip(A, B))
    with torch.no_grad():
        merged = actor(obs, h, masks)
    unmerged = actor(obs, h, masks)
    for x, y, z in zip(before, merged, unmerged):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
        torch.testing.assert_close(z.detach(), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(script.squashed_log_prob(unmerged[0], unmerged[1], a).detach(), logp_before, atol=1e-5,
                               rtol=0)


def test_nps_merged_equals_unmerged(script):
    torch.manual_seed(8)
    args = make_args(script, share_mode="nps")
    actor, critic = script.Actor(9, 3, 3, args), script.Critic(12, 3, args)
    script.start_phase(actor, "nps", args)
    perturb(list(actor.parameters()) + list(critic.parameters()), std=0.1)
    obs, state, h, masks = torch.randn(3, 4, 5, 9), torch.randn(3, 4, 5, 12), torch.randn(3, 5, 64), torch.ones(4, 5)
    unmerged = actor(obs, h, masks), critic(state, h, masks)
    script.merge(actor), script.merge(critic)
    with torch.no_grad():
        merged = actor(obs, h, masks), critic(state, h, masks)
        sub = actor(obs[[2]], h[[2]], masks, agents=[2])
    for x, y in zip(merged[0] + merged[1], unmerged[0] + unmerged[1]):
        torch.testing.assert_close(x, y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sub[0], merged[0][0][[2]], atol=1e-5, rtol=1e-5)


def test_only_adapters_get_gradients_after_switch(script):
    torch.manual_seed(3)
    args = make_args(script, share_mode="lorasa")
    actor = script.Actor(9, 3, 2, args)
    groups, optims = script.start_phase(actor, "lora", args)
    assert len(optims) == 2
    mean, std, _ = actor(torch.randn(2, 10, 4, 9), torch.zeros(2, 4, 64), torch.ones(10, 4))
    (mean.pow(2).sum() + std.sum()).backward()
    for n, p in actor.named_parameters():
        if "lora_" not in n or "lora_bias" in n:  # shared weights, LayerNorms, log_std; untrained agent biases
            assert p.grad is None and not p.requires_grad, n
        else:
            assert p.grad is not None, n
    assert all(p.grad.abs().sum() > 0 for n, p in actor.named_parameters() if "lora_A" in n or "lora_std" in n)


def test_agent_groups_by_construction_for_12_agents(script):
    """Defect 5: name matching puts `lora_A.10` into agent 1's group; groups by construction must not."""
    torch.manual_seed(4)
    args = make_args(script, share_mode="lorasa")
    actor = script.Actor(20, 2, 12, args)
    groups, optims = script.start_phase(actor, "lora", args)
    names = {id(p): n for n, p in actor.named_parameters()}
    seen = set()
    for i, g in enumerate(groups):
        assert len(g) == len(groups[0]) == 7 * 2 + 1  # A and B on 7 layers + the log-std offset
        assert all(names[id(p)].endswith(f".{i}") for p in g)
        assert not seen & {id(p) for p in g}
        seen |= {id(p) for p in g}
    perturb([p for g in groups for p in g])  # trained adapters: every one has a non-zero gradient
    mean, std, _ = actor(torch.randn(12, 10, 3, 20), torch.zeros(12, 3, 64), torch.ones(10, 3))
    (mean.pow(2).sum() + std.sum()).backward()
    before = {n: p.detach().clone() for n, p in actor.named_parameters()}
    optims[10].step()  # only agent 10's optimiser steps
    for n, p in actor.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == (n.endswith(".10") and "lora_bias" not in n), n


def test_parameter_counts_match_formula(script):
    """lorasa.md section 3: shared 66 obs + 38,144 + 65 n_out (+ n_out log-std); adapters 8 obs + 8,192 + 8 n_out
    (+ n_out std offset) per agent at r = 8 on all 7 layers."""
    args = make_args(script, share_mode="lorasa")
    for obs, n_out in [(9, 3), (350, 9)]:
        actor = script.Actor(obs, n_out, 2, args)
        groups, _ = script.start_phase(actor, "ps", args)
        assert script.param_count(groups[0]) == 66 * obs + 38144 + 65 * n_out + n_out
        groups, _ = script.start_phase(actor, "lora", args)
        assert script.param_count(groups[0]) == 8 * obs + 8192 + 8 * n_out + n_out
    nps = script.Actor(9, 3, 2, make_args(script, share_mode="nps"))
    assert script.param_count(nps.parameters()) == 2 * (66 * 9 + 38144 + 65 * 3 + 3)


def test_gru_matches_torch_gru_and_mask_resets(script):
    torch.manual_seed(5)
    N, B, T, I, H = 2, 3, 7, 5, 6
    gru = script.GRU(I, H, N, "ps", (), {})
    ref = nn.GRU(I, H)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(gru.gru_x.weight)
        ref.weight_hh_l0.copy_(gru.gru_h.weight)
        ref.bias_ih_l0.copy_(torch.randn(3 * H))
        ref.bias_hh_l0.copy_(torch.randn(3 * H))
        gru.gru_x.bias.copy_(ref.bias_ih_l0)
        gru.gru_h.bias.copy_(ref.bias_hh_l0)
    x, h0 = torch.randn(N, T, B, I), torch.randn(N, B, H)
    masks = torch.ones(T, B)
    masks[4, 1] = 0  # env 1's episode restarts before step 4
    out = gru(x, h0, masks)
    seq = x.permute(1, 0, 2, 3).reshape(T, N * B, I)
    exp, _ = ref(seq, h0.reshape(1, N * B, H))
    exp = exp.view(T, N, B, H).permute(1, 0, 2, 3).clone()
    e1, _ = ref(seq[4:].view(T - 4, N, B, I)[:, :, 1], torch.zeros(1, N, H))  # env 1 from step 4 on, zero h
    exp[:, 4:, 1] = e1.permute(1, 0, 2)
    torch.testing.assert_close(out, exp, atol=1e-5, rtol=1e-5)


def gae_reference(rewards, values, ends, truncs, gamma, lam, zero_truncated):
    """Plain double sum per env: A_t = sum_{k=t}^{end} (gamma lam)^{k-t} delta_k inside the episode;
    delta_k bootstraps V_{k+1} unless the episode ended at k. Reference mode zeroes a truncated step's advantage."""
    T, E = rewards.shape
    adv = np.zeros((T, E))
    for e in range(E):
        for t in range(T):
            total = 0.0
            for k in range(t, T):
                delta = rewards[k, e] + gamma * values[k + 1, e] * (not ends[k, e]) - values[k, e]
                if zero_truncated and truncs[k, e]:
                    break  # A_k = 0 at a truncated step, and the episode is over
                total += (gamma * lam) ** (k - t) * delta
                if ends[k, e]:
                    break
                if k == T - 1:
                    total += 0.0  # bootstrapped through delta_{T-1} with V_T
            adv[t, e] = total
    return adv + values[:-1]


@pytest.mark.parametrize("zero_truncated", [False, True])
def test_gae_matches_plain_loop_with_termination_and_truncation(script, zero_truncated):
    rng = np.random.default_rng(6)
    T, E, gamma, lam = 12, 3, 0.99, 0.93
    rewards, values = rng.normal(size=(T, E)), rng.normal(size=(T + 1, E))
    ends = np.zeros((T, E), bool)
    truncs = np.zeros((T, E), bool)
    ends[3, 0] = True  # termination
    ends[7, 1] = truncs[7, 1] = True  # truncation
    ends[2, 2] = ends[9, 2] = True
    truncs[9, 2] = True
    masks = np.ones((T + 1, E))
    masks[1:] = 1 - ends
    bad = np.ones((T + 1, E))
    if zero_truncated:
        bad[1:] = 1 - truncs
    got = script.gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(masks), torch.tensor(bad), gamma, lam)
    np.testing.assert_allclose(got.numpy(), gae_reference(rewards, values, ends, truncs, gamma, lam, zero_truncated),
                               atol=1e-10)


def test_truncation_bootstrap_return(script):
    """FIX 21: with the reward of the truncated step raised by gamma V(s_final), its one-step return is
    r + gamma V(s_final) (lambda = 0), while a termination gets r alone."""
    gamma, v_final = 0.99, 5.0
    rewards = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[2.0, 2.0], [3.0, 3.0]])
    masks = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # both episodes end at t = 0: env 0 truncated, env 1 terminated
    rewards[0, 0] += gamma * v_final
    ret = script.gae(rewards, values, masks, torch.ones(2, 2), gamma, 0.0)
    torch.testing.assert_close(ret, torch.tensor([[1.0 + gamma * v_final, 1.0]]))


def test_huber_is_symmetric(script):
    x = torch.linspace(-30, 30, 61)
    h = script.huber(x, 10.0)
    torch.testing.assert_close(h, script.huber(-x, 10.0))
    expect = torch.where(x.abs() <= 10, 0.5 * x**2, 10 * (x.abs() - 5))
    torch.testing.assert_close(h, expect)


def test_value_norm_matches_formulas(script):
    vn = script.ValueNorm(2)
    x = torch.tensor([[1.0, 2.0, 3.0]]).repeat(2, 1)
    torch.testing.assert_close(vn.normalize(x), x / 0.1)  # fresh: mean 0, std 0.1
    rng = np.random.default_rng(7)
    m, q, d, b = np.zeros(2), np.zeros(2), np.zeros(2), 0.99999
    for _ in range(5):
        batch = rng.normal(3.0, 2.0, size=(2, 16))
        vn.update(torch.tensor(batch, dtype=torch.float32))
        m, q, d = b * m + (1 - b) * batch.mean(1), b * q + (1 - b) * (batch**2).mean(1), b * d + (1 - b)
    vn.update(torch.tensor([[7.0]]), agents=[1])  # only agent 1's normaliser moves
    m[1], q[1], d[1] = b * m[1] + (1 - b) * 7.0, b * q[1] + (1 - b) * 49.0, b * d[1] + (1 - b)
    mu = m / np.maximum(d, 1e-5)
    std = np.sqrt(np.maximum(q / np.maximum(d, 1e-5) - mu**2, 1e-2))
    y = torch.tensor([[0.5], [-1.5]])
    np.testing.assert_allclose(vn.normalize(y).numpy()[:, 0], (y.numpy()[:, 0] - mu) / std, rtol=1e-4)
    np.testing.assert_allclose(vn.denormalize(vn.normalize(y)).numpy(), y.numpy(), rtol=1e-5)
    col = torch.zeros(4, 2, 3)  # agent axis in position 1 (time-major buffers)
    np.testing.assert_allclose(vn.denormalize(col, dim=1).numpy()[0, :, 0], mu, rtol=1e-5)


def test_chunk_minibatches_layout(script):
    """Every (env, chunk) appears once; steps inside a chunk are consecutive; hidden = stored state at chunk start."""
    T, N, E, L = 20, 2, 3, 5
    code = lambda t, n, e: t * 1000 + n * 100 + e
    obs = torch.tensor([[[[code(t, n, e)] for e in range(E)] for n in range(N)] for t in range(T + 1)], dtype=torch.float64)
    masks = torch.tensor([[code(t, 0, e) for e in range(E)] for t in range(T + 1)], dtype=torch.float64)
    data = dict(obs=obs, actor_h=obs.clone(), masks=masks, returns=obs[:T, :, :, 0].clone())
    starts = []
    for mb in script.chunk_minibatches(data, T, L, 2):
        assert mb["obs"].shape[:2] == (N, L) and mb["actor_h"].shape[0] == N and mb["masks"].shape[0] == L
        for b in range(mb["masks"].shape[1]):
            t0, e = int(mb["actor_h"][0, b, 0]) // 1000, int(mb["actor_h"][0, b, 0]) % 100
            starts.append((t0, e))
            for n in range(N):
                assert mb["actor_h"][n, b, 0] == code(t0, n, e)
                for l in range(L):
                    assert mb["obs"][n, l, b, 0] == code(t0 + l, n, e) == mb["returns"][n, l, b]
                    assert mb["masks"][l, b] == code(t0 + l, 0, e)
    assert sorted(starts) == sorted((t, e) for t in range(0, T, L) for e in range(E))


def test_load_actor_across_share_modes(script):
    """A --share-mode ps actor loads into a lorasa actor (adapters keep their dW = 0 init) and a lorasa actor's
    shared weights load into a ps actor (its adapters are dropped); other mismatches are refused."""
    torch.manual_seed(9)
    ps = script.Actor(9, 3, 2, make_args(script, share_mode="ps"))
    perturb(ps.parameters())
    lorasa = script.Actor(9, 3, 2, make_args(script, share_mode="lorasa"))
    init_A = lorasa.trunk.fcs["fc1"].lora_A[1].detach().clone()
    script.load_actor(lorasa, ps.state_dict())
    for k, v in ps.state_dict().items():
        assert torch.equal(lorasa.state_dict()[k], v), k
    assert torch.equal(lorasa.trunk.fcs["fc1"].lora_A[1], init_A)
    script.set_lora(lorasa, True)
    obs, h, m = torch.randn(2, 3, 4, 9), torch.zeros(2, 4, 64), torch.ones(3, 4)
    torch.testing.assert_close(lorasa(obs, h, m)[0], ps(obs, h, m)[0])  # the fine-tuning starts at the ps policy
    back = script.Actor(9, 3, 2, make_args(script, share_mode="ps"))
    script.load_actor(back, lorasa.state_dict())
    torch.testing.assert_close(back(obs, h, m)[0], ps(obs, h, m)[0])
    with pytest.raises(SystemExit):
        script.load_actor(script.Actor(9, 3, 2, make_args(script, share_mode="nps")), ps.state_dict())
    with pytest.raises(SystemExit):
        script.load_actor(script.Actor(10, 3, 2, make_args(script, share_mode="ps")), ps.state_dict())
