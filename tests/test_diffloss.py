"""DiffLoss (diffloss.py): the cosine schedule and its respacing against the note's numbers,
q_sample, the posterior and the VLB term against closed forms written independently here, the
loss at zero network output, the zero-init denoiser, and that a tiny head learns and samples a
conditional distribution."""
import math

import numpy as np
import pytest
import torch

import diffloss

T = 1000


def f(s):  # the cosine schedule's continuous abar before normalising, s in [0, 1]
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def abar(k):  # abar_k = f((k + 1) / T) / f(0), exact while beta is not clipped (k < 999)
    return f((k + 1) / T) / f(0)


def test_schedule_and_respacing_match_the_note():
    b = diffloss.cosine_betas(T)
    assert b[0] == pytest.approx(4.128e-5, rel=1e-3)
    assert b[-3:] == pytest.approx([0.5556, 0.75, 0.999], abs=1e-4)
    assert np.cumprod(1 - b)[-1] == pytest.approx(2.43e-9, rel=1e-2)
    rb, kept = diffloss.respace(b, 100)
    assert len(kept) == 100
    assert kept[:3].tolist() == [0, 10, 20] and kept[-3:].tolist() == [979, 989, 999]
    assert set(np.diff(kept)) == {10, 11}
    # the same abar at the kept steps
    assert np.allclose(np.cumprod(1 - rb), np.cumprod(1 - b)[kept], rtol=1e-9)
    assert rb[0] == pytest.approx(4.128e-5, rel=1e-3)
    assert rb[-1] == pytest.approx(0.99999, abs=1e-5)
    assert diffloss.respace(b, T)[1].tolist() == list(range(T))


def test_q_sample_and_posterior_closed_forms():
    d = diffloss.Diffusion(diffloss.cosine_betas(T), np.arange(T))
    torch.manual_seed(0)
    k = torch.tensor([1, 5, 200, 600, 900, 998])
    x0 = torch.randn(6, 4)
    noise = torch.randn(6, 4)
    xk = torch.randn(6, 4)
    a = torch.tensor([abar(i) for i in k.tolist()])[:, None]
    expected = a.sqrt() * x0 + (1 - a).sqrt() * noise
    assert torch.allclose(d.q_sample(x0, k, noise), expected, atol=1e-6)
    # q(x_{k-1} | x_k, x0) ~ q(x_k | x_{k-1}) q(x_{k-1} | x0): a product of Gaussians in x_{k-1}
    a_prev = torch.tensor([abar(i - 1) for i in k.tolist()], dtype=torch.float64)[:, None]
    alpha = torch.tensor([abar(i) for i in k.tolist()], dtype=torch.float64)[:, None] / a_prev
    beta = 1 - alpha
    var = 1 / (alpha / beta + 1 / (1 - a_prev))
    mean = var * (alpha.sqrt() / beta * xk.double() + a_prev.sqrt() / (1 - a_prev) * x0.double())
    m, logvar = d.q_posterior(x0, xk, k)
    assert torch.allclose(m.double(), mean, atol=1e-5)
    assert torch.allclose(logvar.double(), var.log().expand(-1, 1), atol=1e-5)
    m0, logvar0 = d.q_posterior(x0, xk, torch.tensor([0]))  # var_0 = 0 is clipped to var_1
    assert logvar0.item() == pytest.approx(d.q_posterior(x0, xk, torch.tensor([1]))[1].item())


def test_loss_terms_equal_the_closed_forms():
    """training_losses with a fake net (fixed eps_hat, v): mse + KL between Gaussians in bits,
    written here with torch.distributions; at k = 0 the discretised Gaussian NLL (tanh CDF ~ the
    exact one)."""
    d = diffloss.Diffusion(diffloss.cosine_betas(T), np.arange(T))
    torch.manual_seed(1)
    N, C = 8, 4
    x0 = torch.rand(N, C) * 1.8 - 0.9
    noise = torch.randn(N, C)
    eps_v = torch.randn(N, C) * 0.5
    out = torch.cat([eps_v, torch.rand(N, C) * 2 - 1], dim=1)  # eps_hat, v in [-1, 1]
    k = torch.tensor([0, 1, 2, 10, 300, 700, 990, 999])

    def net(x, t, z):
        return out

    loss = d.training_losses(net, x0, k, None, noise)
    n = torch.distributions.Normal
    abar_last = np.prod(1 - diffloss.cosine_betas(T))  # beta_999 is clipped: abar from the betas
    var1 = (1 - abar(1) / abar(0)) * (1 - abar(0)) / (1 - abar(1))
    for i, ki in enumerate(k.tolist()):
        a = abar(ki) if ki < 999 else abar_last
        a_prev = abar(ki - 1) if ki > 0 else 1.0
        beta = 1 - a / a_prev
        xk = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i]
        eps_hat = out[i, :C]
        v = out[i, C:]
        x0_hat = (xk - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)
        var = beta * (1 - a_prev) / (1 - a) if ki > 0 else var1  # k = 0: var_1 (var_0 = 0)
        c1 = beta * math.sqrt(a_prev) / (1 - a)
        c2 = (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
        logvar = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * math.log(var)
        model = n(c1 * x0_hat + c2 * xk, (0.5 * logvar).exp())
        mse = ((noise[i] - eps_hat) ** 2).mean()
        if ki > 0:
            posterior = n(c1 * x0[i] + c2 * xk, math.sqrt(var))
            vb = torch.distributions.kl_divergence(posterior, model).mean() / math.log(2)
        else:  # P(x0 in its 2/255 bin)
            p_bin = model.cdf(x0[i] + 1 / 255) - model.cdf(x0[i] - 1 / 255)
            vb = -p_bin.log().mean() / math.log(2)
        rel = 2e-3 if ki == 0 else 1e-4
        assert loss[i].item() == pytest.approx((mse + vb).item(), rel=rel), ki


def test_zero_output_loss():
    """At zero output (the head's init) the vb term is KL(N(mu, var) || N(mu + d eps, e^lv2))
    with d = beta / sqrt(alpha (1 - abar)): a closed form in eps. Its mean over k < 999 is ~0.02
    bits, so a batch without k = 999 gives ~0.99 as the note measured; k = 999 alone adds ~720
    bits (beta clipped to 0.999), i.e. ~0.74 to the expectation over all k."""
    d = diffloss.Diffusion(diffloss.cosine_betas(T), np.arange(T))
    torch.manual_seed(2)
    N, C = 4000, 16
    x0 = torch.randn(N, C) * 0.5
    noise = torch.randn(N, C)
    k = torch.randint(1, T, (N,))

    def zero_net(x, t, z):
        return torch.zeros(len(x), 2 * C)

    loss = d.training_losses(zero_net, x0, k, None, noise)
    b = torch.from_numpy(diffloss.cosine_betas(T))[k][:, None]
    ac = torch.from_numpy(np.cumprod(1 - diffloss.cosine_betas(T)))
    a = ac[k][:, None]
    a_prev = ac[k - 1][:, None]
    lv1 = torch.log(b * (1 - a_prev) / (1 - a))
    lv2 = 0.5 * torch.log(b) + 0.5 * lv1
    dd = b / ((1 - b) * (1 - a)).sqrt()
    eps2 = noise.double() ** 2
    kl = 0.5 * (-1 + lv2 - lv1 + (lv1 - lv2).exp() + dd ** 2 * eps2 * (-lv2).exp())
    vb = kl.mean(1) / math.log(2)
    assert torch.allclose(loss.double(), eps2.mean(1) + vb, rtol=1e-4)
    early = loss[k < T - 1].mean().item()
    assert 0.97 < early < 1.06  # the note: mse ~0.98 + vb ~0.011 = 0.99
    last = d.training_losses(zero_net, x0[:1], torch.tensor([T - 1]), None, torch.ones(1, C))
    assert last.item() - 1 == pytest.approx(720.6, rel=1e-3)  # vb at k = 999 for eps^2 = 1


def test_zero_init_denoiser_and_shapes():
    dl = diffloss.DiffLoss(16, 24, depth=2, width=32)
    out = dl.net(torch.randn(5, 16), torch.randint(0, T, (5,)), torch.randn(5, 24))
    assert out.shape == (5, 32) and torch.equal(out, torch.zeros(5, 32))
    emb = dl.net.time_embed  # cos first: at t = 0 the first half is 1, the second 0
    h = emb.freq_dim // 2
    feats = torch.cat([torch.ones(1, h), torch.zeros(1, h)], -1)
    assert torch.allclose(emb(torch.zeros(1, dtype=torch.long)), emb.mlp(feats))


class GaussianDenoiser(torch.nn.Module):
    """The exact eps-predictor for data x0 ~ N(mu, s^2) per channel, from the ORIGINAL step t:
    E[x0 | x_t] = mu + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) mu),
    eps = (x_t - sqrt(a) E[x0 | x_t]) / sqrt(1 - a); v: -1 the posterior variance, +1 beta."""
    def __init__(self, mu, s, v):
        super().__init__()
        self.mu = mu
        self.s = s
        self.v = v
        self.calls = 0
        self.abar = torch.from_numpy(np.cumprod(1 - diffloss.cosine_betas(T))).float()

    def forward(self, x, t, z):
        self.calls += 1
        a = self.abar[t][:, None]
        gain = a.sqrt() * self.s ** 2 / (a * self.s ** 2 + 1 - a)
        x0 = self.mu + gain * (x - a.sqrt() * self.mu)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.full_like(x, self.v)], dim=1)


@pytest.mark.parametrize('steps', [25, 100, 1000])
def test_respaced_ancestral_sampling_recovers_a_gaussian(steps):
    """With the exact denoiser the sampler returns N(mu, s^2): exactly in the limit of many steps;
    with few, the small (v = -1) and large (v = +1) variances bracket s."""
    dl = diffloss.DiffLoss(2, 3, depth=1, width=8)
    mu = torch.tensor([0.5, -0.3])
    std = {}
    for v in (-1.0, 1.0):
        dl.net = GaussianDenoiser(mu, 0.2, v)
        g = torch.Generator().manual_seed(0)
        x = dl.sample(torch.zeros(4000, 3), num_steps=steps, generator=g)
        assert dl.net.calls == steps and torch.allclose(x.mean(0), mu, atol=0.02)
        std[v] = x.std(0)
    tol = 0.05 if steps == 1000 else 0.25
    assert (std[-1.0] < 0.2 * (1 + tol)).all() and (std[1.0] > 0.2 * (1 - tol)).all()
    assert (std[-1.0] < std[1.0]).all()
    if steps == 1000:
        assert torch.allclose(std[-1.0], torch.tensor([0.2, 0.2]), rtol=tol)
    cold = dl.sample(torch.zeros(4000, 3), temperature=0.0, num_steps=steps)  # no noise after x_T
    assert cold.std(0).max() < 0.05 and torch.allclose(cold.mean(0), mu, atol=0.02)


def test_clip_denoised_bounds_x0_hat_only():
    """clip_denoised clamps the x0 estimate when sampling (the last step returns it): inactive
    when the estimate stays inside (the exact denoiser: E[x0 | x_t] is near mu), binding when it
    does not."""
    mu = torch.tensor([0.5, -0.3])
    out = {}
    for clip in (0.0, 10.0, 0.25):
        dl = diffloss.DiffLoss(2, 3, depth=1, width=8, clip_denoised=clip)
        dl.net = GaussianDenoiser(mu, 0.2, 0.0)
        g = torch.Generator().manual_seed(0)
        out[clip] = dl.sample(torch.zeros(500, 3), num_steps=20, generator=g)
    assert torch.equal(out[0.0], out[10.0])
    assert out[0.25].abs().max() <= 0.25 and out[0.0].abs().max() > 0.5


def test_a_tiny_head_learns_a_conditional_distribution():
    """Two conditions, each a tight 2-D cluster: after a short training, samples (1000 steps: a
    short training leaves eps at t ~ T too rough for the 25-step jump from T) land on the right
    one."""
    torch.manual_seed(0)
    dl = diffloss.DiffLoss(2, 2, depth=2, width=64, num_sampling_steps=25)
    centers = torch.tensor([[0.8, -0.6], [-0.7, 0.5]])
    opt = torch.optim.AdamW(dl.parameters(), lr=3e-3)
    for _ in range(300):
        c = torch.randint(0, 2, (128,))
        z = torch.eye(2)[c]
        loss = dl(centers[c] + 0.05 * torch.randn(128, 2), z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = torch.eye(2)[torch.arange(100) % 2]
    x = dl.sample(z, num_steps=1000, generator=torch.Generator().manual_seed(0))  # see above
    for c in range(2):
        assert (x[c::2] - centers[c]).norm(dim=1).median() < 0.15
    plain = dl.sample(z[:20], num_steps=50, generator=torch.Generator().manual_seed(1))
    both = torch.cat([z[:20], z[:20].flip(1)])  # conditional rows, then the "unconditional" ones
    g = torch.Generator().manual_seed(1)
    near1 = dl.sample(both, cfg=1 + 1e-6, num_steps=50, generator=g)
    assert torch.allclose(near1, plain, atol=1e-3)  # the CFG path at scale ~1 is the plain one
    g = torch.Generator().manual_seed(1)
    below1 = dl.sample(both, cfg=0.5, num_steps=50, generator=g)  # below 1: guided as well
    assert below1.shape == plain.shape and not torch.allclose(below1, plain, atol=1e-3)
