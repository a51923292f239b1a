"""Equations of the scripts against independent plain-loop references, run for every MaMuJoCo script."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import make_args


def perturb(params, std=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(std * torch.randn(p.shape, generator=generator))


def test_lora_linear_equals_per_agent_loop_and_merged_weights(script):
    torch.manual_seed(0)
    N, n_in, n_out, rank, alpha = 3, 5, 7, 2, 4.0
    layer = script.LoRALinear(n_in, n_out, N, 1.0, rank, alpha, "reference", None)
    layer.lora_on = True
    perturb(list(layer.lora_A) + list(layer.lora_B) + list(layer.lora_bias))
    x = torch.randn(N, 4, 6, n_in)
    y = layer(x)
    s = alpha / rank
    for i in range(N):  # y_i = x W0^T + s (x A_i^T) B_i^T + b0 + beta_i, one agent at a time
        low_rank = s * (x[i] @ layer.lora_A[i].T) @ layer.lora_B[i].T
        ref = x[i] @ layer.weight.T + low_rank + layer.bias + layer.lora_bias[i]
        torch.testing.assert_close(y[i], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x[[2, 0]], agents=[2, 0]), y[[2, 0]], atol=1e-5, rtol=1e-5)
    with torch.inference_mode(), script.merged_weights(layer):  # W_i = W0 + s B_i A_i on entry
        torch.testing.assert_close(layer(x), y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x[[1]], agents=[1]), y[[1]].detach(), atol=1e-5, rtol=1e-5)
        merged = torch.stack(
            [layer.weight + s * layer.lora_B[i] @ layer.lora_A[i] for i in range(N)]
        )
        torch.testing.assert_close(layer.merged[0], merged, atol=1e-6, rtol=1e-6)
    assert layer.merged is None  # outside the block the weights are computed per call
    with torch.no_grad():
        layer.lora_B[1].add_(1.0)
    assert not torch.allclose(layer(x)[1], y[1])
    with pytest.raises(RuntimeError, match="stale"):  # a change inside the block cannot go unseen
        with script.merged_weights(layer), torch.no_grad():
            layer.lora_A[0].add_(1.0)
    assert layer.merged is None


def test_nps_and_ps_layers_equal_plain_linear(script):
    torch.manual_seed(1)
    x = torch.randn(4, 5, 6)
    nps = script.AgentLinear(6, 3, 4, 1.0)
    perturb(list(nps.bias))
    y = nps(x)
    for i in range(4):
        torch.testing.assert_close(y[i], x[i] @ nps.weight[i].T + nps.bias[i], atol=1e-6, rtol=1e-6)
    ps = script.LoRALinear(6, 3, 4, 1.0, 0, 1.0, "reference", None)  # rank 0: never adapted
    assert len(ps.lora_A) == 0 and not ps.lora_on
    torch.testing.assert_close(ps(x), x @ ps.weight.T + ps.bias)
    norm = script.AgentLayerNorm(6, 4)
    perturb(list(norm.weight) + list(norm.bias))
    for i, out in enumerate(norm(x)):
        ref = nn.functional.layer_norm(x[i], (6,), norm.weight[i], norm.bias[i])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora_init", ["reference", "standard"])
def test_adapters_start_at_zero_change_and_policy_is_continuous_at_switch(script, lora_init):
    """The policy right after the switch equals the policy right before it (merged and unmerged paths)."""
    torch.manual_seed(2)
    args = make_args(script, share_mode="lorasa", lora_init=lora_init)
    N, obs_dim, act_dim = 3, 11, 4
    actor = script.GaussianActor(obs_dim, act_dim, N, args)
    script.start_phase(actor, "ps", args)
    perturb(
        [p for n, p in actor.named_parameters() if "lora_" not in n]
    )  # a "trained" shared policy
    obs, h, masks = (
        torch.randn(N, 10, 8, obs_dim),
        torch.randn(N, 8, 64),
        (torch.rand(10, 8) > 0.2).float(),
    )
    # two envs too: with so few rows per agent the batched matmul and F.linear round differently
    few = (obs[:, :, :2], h[:, :2], masks[:, :2])
    with torch.inference_mode(), script.merged_weights(actor):  # as rollouts do
        before = actor(obs, h, masks)
        before_few = actor(*few)
    for x, y in zip(
        before, actor(obs, h, masks)
    ):  # merged (rollout) = unmerged (training) before the switch too
        torch.testing.assert_close(y.detach(), x, atol=1e-6, rtol=0)
    script.start_phase(actor, "lora", args)
    zero, random = ("lora_A", "lora_B") if lora_init == "reference" else ("lora_B", "lora_A")
    assert all(p.abs().sum() == 0 for n, p in actor.named_parameters() if zero in n)
    assert all(p.abs().sum() > 0 for n, p in actor.named_parameters() if random in n)
    assert len([n for n, _ in actor.named_parameters() if "lora_A" in n]) == 7 * N
    with torch.inference_mode(), script.merged_weights(actor):
        merged = actor(obs, h, masks)
        merged_few = actor(*few)
    unmerged = actor(obs, h, masks)
    for x, z in zip(before, unmerged):
        torch.testing.assert_close(z.detach(), x, atol=1e-6, rtol=0)
    # rollouts and evaluations at the switch act exactly as before it (through the shared layers)
    for x, y in zip(before + before_few, merged + merged_few):
        assert torch.equal(y, x)
    perturb([p for n, p in actor.named_parameters() if "lora_" in n and p.requires_grad])
    with torch.inference_mode(), script.merged_weights(actor):  # trained adapters: used
        assert not torch.equal(actor(obs, h, masks)[0], before[0])


def test_adapters_come_from_their_own_seeded_generator(script):
    """Paired seeds (FIX 29): building a lorasa actor draws exactly what a ps actor draws from the global RNG, and its
    adapters depend on --seed only."""
    states = []
    for mode in ("ps", "lorasa"):
        torch.manual_seed(5)
        script.GaussianActor(9, 3, 2, make_args(script, share_mode=mode))
        states.append(torch.get_rng_state())
    assert torch.equal(*states)
    adapters = {}
    for seed, global_seed in ((1, 0), (1, 7), (2, 0)):
        torch.manual_seed(global_seed)
        actor = script.GaussianActor(9, 3, 2, make_args(script, seed=seed))
        adapters[seed, global_seed] = actor.fcs["fc1"].lora_B[1].detach()
    assert torch.equal(adapters[1, 0], adapters[1, 7]) and not torch.equal(
        adapters[1, 0], adapters[2, 0]
    )


def test_nps_merged_equals_unmerged(script):
    torch.manual_seed(8)
    args = make_args(script, share_mode="nps")
    actor, critic = script.GaussianActor(9, 3, 3, args), script.Critic(12, 3, args)
    script.start_phase(actor, "nps", args)
    perturb(list(actor.parameters()) + list(critic.parameters()), std=0.1)
    obs, state, h, masks = (
        torch.randn(3, 4, 5, 9),
        torch.randn(3, 4, 5, 12),
        torch.randn(3, 5, 64),
        torch.ones(4, 5),
    )
    unmerged = actor(obs, h, masks) + critic(state, h, masks)
    subset = actor(obs[[2]], h[[2]], masks, agents=[2])
    with torch.inference_mode(), script.merged_weights(actor, critic):
        merged = actor(obs, h, masks) + critic(state, h, masks)
    for x, y in zip(merged, unmerged):
        torch.testing.assert_close(x, y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(subset[0], unmerged[0][[2]], atol=1e-5, rtol=1e-5)
    groups, _ = script.start_phase(actor, "nps", args)  # every nps parameter trains, per agent
    assert sum(len(group) for group in groups) == len(list(actor.parameters()))
    actor.extra = torch.nn.Linear(2, 2)  # a layer a modifier adds but agent_parameters misses
    with pytest.raises(RuntimeError, match="never train"):
        script.start_phase(actor, "nps", args)


def test_only_adapters_get_gradients_after_switch(script):
    torch.manual_seed(3)
    args = make_args(script, share_mode="lorasa")
    actor = script.GaussianActor(9, 3, 2, args)
    groups, optimizers = script.start_phase(actor, "lora", args)
    assert len(optimizers) == 2
    mean, std, _ = actor(torch.randn(2, 10, 4, 9), torch.zeros(2, 4, 64), torch.ones(10, 4))
    (mean.pow(2).sum() + std.sum()).backward()
    for n, p in actor.named_parameters():
        if (
            "lora_" not in n or "lora_bias" in n
        ):  # shared weights, LayerNorms, log_std; untrained agent biases
            assert p.grad is None and not p.requires_grad, n
        else:
            assert p.grad is not None, n
    assert all(
        p.grad.abs().sum() > 0
        for n, p in actor.named_parameters()
        if "lora_A" in n or "lora_std" in n
    )


def test_agent_groups_by_construction_for_12_agents(script):
    """FIX 5: name matching puts `lora_A.10` into agent 1's group; groups by construction must not."""
    torch.manual_seed(4)
    args = make_args(script, share_mode="lorasa")
    actor = script.GaussianActor(20, 2, 12, args)
    groups, optimizers = script.start_phase(actor, "lora", args)
    names = {id(p): n for n, p in actor.named_parameters()}
    seen = set()
    for i, group in enumerate(groups):
        assert len(group) == 7 * 2 + 1  # A and B on 7 layers + the log-std offset
        assert all(names[id(p)].endswith(f".{i}") for p in group)
        assert not seen & {id(p) for p in group}
        seen |= {id(p) for p in group}
    perturb(
        [p for group in groups for p in group]
    )  # trained adapters: every one has a non-zero gradient
    mean, std, _ = actor(torch.randn(12, 10, 3, 20), torch.zeros(12, 3, 64), torch.ones(10, 3))
    (mean.pow(2).sum() + std.sum()).backward()
    before = {n: p.detach().clone() for n, p in actor.named_parameters()}
    optimizers[10].step()  # only agent 10's optimiser steps
    for n, p in actor.named_parameters():
        assert (not torch.equal(before[n], p)) == (n.endswith(".10") and "lora_bias" not in n), n


def test_parameter_counts_match_formula(script):
    """docs/method.md §3: shared 66 obs + 38,144 + 65 n_out (+ n_out log-std); adapters 8 obs + 8,192 + 8 n_out
    (+ n_out std offset) per agent at r = 8 on all 7 layers."""
    args = make_args(script, share_mode="lorasa")
    for obs, n_out in [(9, 3), (350, 9)]:
        actor = script.GaussianActor(obs, n_out, 2, args)
        groups, _ = script.start_phase(actor, "ps", args)
        assert sum(p.numel() for p in groups[0]) == 66 * obs + 38144 + 65 * n_out + n_out
        groups, _ = script.start_phase(actor, "lora", args)
        assert sum(p.numel() for p in groups[0]) == 8 * obs + 8192 + 8 * n_out + n_out
    nps = script.GaussianActor(9, 3, 2, make_args(script, share_mode="nps"))
    assert sum(p.numel() for p in nps.parameters()) == 2 * (66 * 9 + 38144 + 65 * 3 + 3)


def test_gru_matches_torch_gru_and_mask_resets(script):
    torch.manual_seed(5)
    N, B, T, H = 2, 3, 7, 64
    network = script.RecurrentNetwork(5, 1, N, make_args(script), 1.0, nps=False, adapted=())
    reference = nn.GRU(H, H)
    with torch.no_grad():
        reference.weight_ih_l0.copy_(network.gru_x.weight)
        reference.weight_hh_l0.copy_(network.gru_h.weight)
        reference.bias_ih_l0.copy_(torch.randn(3 * H))
        reference.bias_hh_l0.copy_(torch.randn(3 * H))
        network.gru_x.bias.copy_(reference.bias_ih_l0)
        network.gru_h.bias.copy_(reference.bias_hh_l0)
    x, h0 = torch.randn(N, T, B, H), torch.randn(N, B, H)
    masks = torch.ones(T, B)
    masks[4, 1] = 0  # env 1's episode restarts before step 4
    out = network.gru(x, h0, masks)
    sequence = x.permute(1, 0, 2, 3).reshape(T, N * B, H)
    expected, _ = reference(sequence, h0.reshape(1, N * B, H))
    expected = expected.view(T, N, B, H).permute(1, 0, 2, 3).clone()
    restarted, _ = reference(
        sequence[4:].view(T - 4, N, B, H)[:, :, 1], torch.zeros(1, N, H)
    )  # env 1 from step 4
    expected[:, 4:, 1] = restarted.permute(1, 0, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def gae_reference(rewards, values, ends, truncs, gamma, lam, zero_truncated):
    """Plain double sum per env: A_t = sum_{k=t}^{end} (gamma lam)^{k-t} delta_k inside the episode; delta_k bootstraps
    V_{k+1} unless the episode ended at k. The reference's mode zeroes a truncated step's advantage."""
    T, E = rewards.shape
    advantages = np.zeros((T, E))
    for e in range(E):
        for t in range(T):
            total = 0.0
            for k in range(t, T):
                if zero_truncated and truncs[k, e]:
                    break  # A_k = 0 at a truncated step, and the episode is over
                delta = rewards[k, e] + gamma * values[k + 1, e] * (not ends[k, e]) - values[k, e]
                total += (gamma * lam) ** (k - t) * delta
                if ends[k, e]:
                    break
            advantages[t, e] = total
    return advantages + values[:-1]


@pytest.mark.parametrize("zero_truncated", [False, True])
def test_gae_matches_plain_loop_with_termination_and_truncation(script, zero_truncated):
    rng = np.random.default_rng(6)
    T, E, gamma, lam = 12, 3, 0.99, 0.93
    rewards, values = rng.normal(size=(T, E)), rng.normal(size=(T + 1, E))
    ends = np.zeros((T, E), bool)
    truncs = np.zeros((T, E), bool)
    ends[3, 0] = True  # termination
    ends[7, 1] = truncs[7, 1] = True  # truncation
    ends[2, 2] = ends[9, 2] = truncs[9, 2] = True
    masks = np.ones((T + 1, E))
    masks[1:] = 1 - ends
    bad = np.ones((T + 1, E))
    if zero_truncated:
        bad[1:] = 1 - truncs
    got = script.gae(
        torch.tensor(rewards),
        torch.tensor(values),
        torch.tensor(masks),
        torch.tensor(bad),
        gamma,
        lam,
    )
    expected = gae_reference(rewards, values, ends, truncs, gamma, lam, zero_truncated)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    per_agent = script.gae(torch.tensor(rewards), torch.tensor(np.stack([values, 2 * values])), torch.tensor(masks),
                           torch.tensor(bad), gamma, lam)  # fmt: skip
    np.testing.assert_allclose(
        per_agent[0].numpy(), expected, atol=1e-10
    )  # a leading agent axis broadcasts


def test_huber_is_symmetric(script):
    x = torch.linspace(-30, 30, 61)
    torch.testing.assert_close(script.huber(x, 10.0), script.huber(-x, 10.0))
    torch.testing.assert_close(
        script.huber(x, 10.0), torch.where(x.abs() <= 10, 0.5 * x**2, 10 * (x.abs() - 5))
    )


def test_value_norm_matches_formulas(script):
    value_norm = script.ValueNorm(2)
    x = torch.tensor([[1.0, 2.0, 3.0]]).repeat(2, 1)
    torch.testing.assert_close(value_norm.normalize(x), x / 0.1)  # fresh: mean 0, std 0.1
    rng = np.random.default_rng(7)
    m, q, d, b = np.zeros(2), np.zeros(2), np.zeros(2), 0.99999
    for _ in range(5):
        batch = rng.normal(3.0, 2.0, size=(2, 16))
        value_norm.update(torch.tensor(batch, dtype=torch.float32))
        m, q, d = (
            b * m + (1 - b) * batch.mean(1),
            b * q + (1 - b) * (batch**2).mean(1),
            b * d + (1 - b),
        )
    value_norm.update(torch.tensor([[7.0]]), agents=[1])  # only agent 1's normaliser moves
    m[1], q[1], d[1] = b * m[1] + (1 - b) * 7.0, b * q[1] + (1 - b) * 49.0, b * d[1] + (1 - b)
    mu = m / np.maximum(d, 1e-5)
    std = np.sqrt(np.maximum(q / np.maximum(d, 1e-5) - mu**2, 1e-2))
    y = torch.tensor([[0.5], [-1.5]])
    np.testing.assert_allclose(
        value_norm.normalize(y).numpy()[:, 0], (y.numpy()[:, 0] - mu) / std, rtol=1e-4
    )
    np.testing.assert_allclose(
        value_norm.denormalize(value_norm.normalize(y)).numpy(), y.numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(
        value_norm.denormalize(torch.zeros(1, 3), agents=[1]).numpy()[0], [mu[1]] * 3, rtol=1e-5
    )


def test_chunk_minibatches_layout(script):
    """Every (env, chunk) appears once; steps inside a chunk are consecutive; hidden = the stored state at chunk start."""
    T, N, E, L = 20, 2, 3, 5

    def code(t, n, e):
        return t * 1000 + n * 100 + e

    obs = torch.tensor(
        [[[[code(t, n, e)] for e in range(E)] for t in range(T + 1)] for n in range(N)],
        dtype=torch.float64,
    )
    masks = torch.tensor(
        [[code(t, 0, e) for e in range(E)] for t in range(T + 1)], dtype=torch.float64
    )
    data = dict(obs=obs, actor_h=obs.clone(), masks=masks, returns=obs[:, :T, :, 0].clone())
    starts = []
    for mb in script.chunk_minibatches(data, T, L, 2):
        assert (
            mb["obs"].shape[:2] == (N, L)
            and mb["actor_h"].shape[0] == N
            and mb["masks"].shape[0] == L
        )
        for b in range(mb["masks"].shape[1]):
            t0, e = int(mb["actor_h"][0, b, 0]) // 1000, int(mb["actor_h"][0, b, 0]) % 100
            starts.append((t0, e))
            for n in range(N):
                assert mb["actor_h"][n, b, 0] == code(t0, n, e)
                for step in range(L):
                    assert (
                        mb["obs"][n, step, b, 0]
                        == code(t0 + step, n, e)
                        == mb["returns"][n, step, b]
                    )
                    assert mb["masks"][step, b] == code(t0 + step, 0, e)
    assert sorted(starts) == sorted((t, e) for t in range(0, T, L) for e in range(E))


def test_non_finite_gradients_and_weights_stop_training(script, tmp_path):
    """A diverged update raises before any optimiser step, and a checkpoint with non-finite weights is never written."""
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(layer.parameters())
    before = [p.detach().clone() for p in layer.parameters()]
    (layer(torch.tensor([[float("nan"), 0.0, 0.0]])).sum()).backward()
    with pytest.raises(FloatingPointError):
        script.clip_and_step([optimizer], [list(layer.parameters())], 10.0)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    args = make_args(script, share_mode="ps")
    actor, critic, value_norm = (
        script.GaussianActor(9, 3, 2, args),
        script.Critic(12, 2, args),
        script.ValueNorm(2),
    )
    groups, actor_optims = script.start_phase(actor, "ps", args)
    models = (
        actor,
        critic,
        value_norm,
        (actor_optims, groups, torch.optim.Adam(critic.parameters())),
    )
    progress = dict(phase="ps", global_step=0, iteration=0)
    script.save_checkpoint(str(tmp_path / "checkpoint.pt"), args, progress, *models)
    with torch.no_grad():
        actor.head.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError):
        script.save_checkpoint(str(tmp_path / "checkpoint.pt"), args, progress, *models)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert torch.isfinite(saved["actor"]["head.weight"]).all() and sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["checkpoint.pt"]
