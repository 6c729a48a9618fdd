"""
DiffLoss: the per-token diffusion head of MAR ("Autoregressive Image Generation without Vector
Quantization", Li et al., 2024, arXiv:2406.11838). Official code: LTH14/mar (models/diffloss.py
and the ADM diffusion code it vendors).

A token is a continuous vector x0 (C channels of the VAE latent), so it cannot be scored with a
softmax. Instead a small MLP, conditioned on the transformer's output z for that position, learns
to denoise it: the loss is a DDPM loss on x0 given z, and sampling runs the reverse diffusion from
noise. Only the one path MAR uses is written here (ADM's GaussianDiffusion has many more): cosine
schedule with T = 1000 steps, the net predicts the noise eps and a variance interpolation v
(learned range), loss = MSE(eps) + the variational bound term in bits, and ancestral sampling on a
respaced subset of the steps, with a temperature on the noise and classifier-free guidance on eps
only.
Shapes: N rows (one per token), C latent channels, Cz condition channels, W MLP width.
"""
import math

import numpy as np
import torch
import torch.nn as nn

import llamagen


# --- the denoiser: SimpleMLPAdaLN --------------------------------------------------------------
def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """t (N,) integer steps in [0, T) -> (N, W): sinusoids of 256 frequencies (cos first), then
    an MLP."""
    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.freq_dim // 2
        i = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000) * i / half)  # (128,)
        args = t[:, None].float() * freqs[None]  # (N, 128)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), with (shift, scale, gate) from y."""
    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """(x_t (N, C), t (N,), z (N, Cz)) -> (N, 2C): eps, then v. The condition y = emb(t) + proj(z)
    modulates every block (AdaLN). Zero-initialised modulations and output: it starts at exactly
    0."""
    def __init__(self, in_channels, width, out_channels, z_channels, depth):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, out_channels)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.res_blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, z):
        x = self.input_proj(x)  # (N, W)
        y = self.time_embed(t) + self.cond_embed(z)  # (N, W)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


# --- the diffusion: one path of ADM's GaussianDiffusion, in float64 like the original -----------
def cosine_abar(s):  # abar(s) = cos^2((s + 0.008) / 1.008 * pi/2), s in [0, 1]
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(T=1000, max_beta=0.999):
    """beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999), i = 0..T-1."""
    betas = [min(1 - cosine_abar((i + 1) / T) / cosine_abar(i / T), max_beta) for i in range(T)]
    return np.array(betas, dtype=np.float64)


def respace(betas, n):
    """Keep n of the T steps, evenly spaced and rounded: t_k = round(k (T-1)/(n-1)) (1000 -> 100
    gives 0, 10, 20, ..., 979, 989, 999). The new betas keep the same abar at the kept steps:
    beta'_k = 1 - abar[t_k] / abar[t_{k-1}]. -> (betas (n,), timestep_map (n,))."""
    T = len(betas)
    stride = (T - 1) / (n - 1) if n > 1 else 1
    kept = sorted({round(k * stride) for k in range(n)})
    abar = np.cumprod(1.0 - betas)[kept]
    return 1.0 - abar / np.concatenate([[1.0], abar[:-1]]), np.array(kept)


def normal_kl(m1, logv1, m2, logv2):
    """KL(N(m1, e^logv1) || N(m2, e^logv2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logv2 - logv1 + torch.exp(logv1 - logv2)
                  + (m1 - m2) ** 2 * torch.exp(-logv2))


def approx_normal_cdf(u):  # the standard normal CDF by the tanh approximation, as the original
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))


def discretized_gaussian_nll(x, mean, logvar):
    """-log P(x in [x - 1/255, x + 1/255]) under N(mean, e^logvar), the edge bins open-ended (the
    ADM decoder term for t = 0, made for [-1, 1] pixels and applied to latents as is)."""
    inv_std = torch.exp(-0.5 * logvar)
    cdf_plus = approx_normal_cdf(inv_std * (x - mean + 1 / 255))
    cdf_min = approx_normal_cdf(inv_std * (x - mean - 1 / 255))
    log_below = cdf_plus.clamp(min=1e-12).log()  # the bin (-inf, x + 1/255]
    log_above = (1 - cdf_min).clamp(min=1e-12).log()  # the bin [x - 1/255, inf)
    log_bin = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    log_p = torch.where(x < -0.999, log_below, torch.where(x > 0.999, log_above, log_bin))
    return -log_p


class Diffusion:
    """Schedules for the steps k = 0..n-1 (all T, or a respaced subset). The network is always
    called with the ORIGINAL step timestep_map[k]. Plain tensors on one device, not buffers: no
    state-dict entries (DiffLoss.schedule keeps one per device)."""
    def __init__(self, betas, timestep_map, device='cpu'):
        alpha = 1.0 - betas  # numpy float64, as the original
        ac = np.cumprod(alpha)  # abar_k
        ac_prev = np.append(1.0, ac[:-1])
        # the posterior q(x_{k-1} | x_k, x0) = N(c1 x0 + c2 x_k, var)
        var = betas * (1 - ac_prev) / (1 - ac)
        arrays = dict(
            sqrt_ac=np.sqrt(ac),
            sqrt_1m_ac=np.sqrt(1 - ac),
            sqrt_recip_ac=np.sqrt(1 / ac),
            sqrt_recipm1_ac=np.sqrt(1 / ac - 1),
            log_betas=np.log(betas),
            post_logvar=np.log(np.append(var[1], var[1:])),  # var_0 = 0: its log uses var_1
            post_c1=betas * np.sqrt(ac_prev) / (1 - ac),
            post_c2=(1 - ac_prev) * np.sqrt(alpha) / (1 - ac),
        )
        for name, a in arrays.items():  # float32 as used, cast on the CPU (MPS has no float64)
            setattr(self, name, torch.from_numpy(a).float().to(device))
        self.num_timesteps = len(betas)
        self.timestep_map = torch.from_numpy(timestep_map).long().to(device)

    def at(self, a, k, x):
        """a[k] (N, 1) for steps k (N,), on the device: no copy and no host sync per step (the
        original indexes a float64 table and casts; the same numbers)."""
        return a[k][:, None]

    def q_sample(self, x0, k, noise):  # x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps
        return self.at(self.sqrt_ac, k, x0) * x0 + self.at(self.sqrt_1m_ac, k, x0) * noise

    def q_posterior(self, x0, xk, k):
        """-> mean, clipped log variance of q(x_{k-1} | x_k, x0)."""
        mean = self.at(self.post_c1, k, xk) * x0 + self.at(self.post_c2, k, xk) * xk
        return mean, self.at(self.post_logvar, k, xk)

    def p_mean_logvar(self, out, xk, k, clip=0.0):
        """Net output (eps, v) -> mean and log variance of p(x_{k-1} | x_k).
        x0_hat = sqrt(1/abar) x_k - sqrt(1/abar - 1) eps, clamped to +-clip if clip > 0 (official:
        not clipped); the log variance interpolates between the posterior's and beta's:
        f log(beta) + (1 - f) log(var~), f = (v + 1) / 2."""
        eps, v = out.chunk(2, dim=1)
        f = (v + 1) / 2
        logvar = f * self.at(self.log_betas, k, xk) + (1 - f) * self.at(self.post_logvar, k, xk)
        c_x = self.at(self.sqrt_recip_ac, k, xk)
        c_eps = self.at(self.sqrt_recipm1_ac, k, xk)
        x0_hat = c_x * xk - c_eps * eps
        if clip > 0:
            x0_hat = x0_hat.clamp(-clip, clip)
        mean, _ = self.q_posterior(x0_hat, xk, k)
        return mean, logvar

    def training_losses(self, net, x0, k, z, noise):
        """-> (N,) loss = mean_c (eps - eps_hat)^2 + vb. vb = KL(q(x_{k-1} | x_k, x0) || p) in bits
        per channel (the decoder NLL at k = 0), computed with eps_hat detached: it trains only v."""
        xk = self.q_sample(x0, k, noise)
        out = net(xk, self.timestep_map.to(x0.device)[k], z)  # (N, 2C)
        eps, v = out.chunk(2, dim=1)
        mse = ((noise - eps) ** 2).mean(1)
        mean, logvar = self.p_mean_logvar(torch.cat([eps.detach(), v], dim=1), xk, k)
        true_mean, true_logvar = self.q_posterior(x0, xk, k)
        kl = normal_kl(true_mean, true_logvar, mean, logvar).mean(1) / math.log(2.0)
        nll = discretized_gaussian_nll(x0, mean, logvar).mean(1) / math.log(2.0)
        return mse + torch.where(k == 0, nll, kl)


# --- DiffLoss ----------------------------------------------------------------------------------
class DiffLoss(nn.Module):
    """loss(target (N, C), z (N, Cz)) and sample(z) for the rows of the tokens being predicted."""
    def __init__(self, target_channels, z_channels, depth, width, num_sampling_steps=100,
                 clip_denoised=0.0, T=1000):
        super().__init__()
        self.in_channels = target_channels
        self.num_sampling_steps = num_sampling_steps
        self.clip = clip_denoised
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth)
        self.betas = cosine_betas(T)
        self.schedules = {}  # (steps, device) -> Diffusion, built on first use
        self.compiled_step = None  # compile_sampling(): torch.compile(self.p_sample)

    def schedule(self, n, device):
        """The Diffusion of n respaced steps on device; n = T: the training one, unrespaced."""
        key = (n, str(device))
        if key not in self.schedules:
            T = len(self.betas)
            betas, kept = (self.betas, np.arange(T)) if n == T else respace(self.betas, n)
            self.schedules[key] = Diffusion(betas, kept, device)
        return self.schedules[key]

    def forward(self, target, z):
        """-> scalar, the mean over rows of a random step each."""
        d = self.schedule(len(self.betas), target.device)
        k = torch.randint(0, d.num_timesteps, (len(target),), device=target.device)
        noise = torch.randn_like(target)
        return d.training_losses(self.net, target, k, z, noise).mean()

    @torch.no_grad()
    def sample(self, z, temperature=1.0, cfg=1.0, num_steps=0, generator=None, trace=None):
        """z (N, Cz), or (2N, Cz) = [cond; uncond] when guided -> x0 (N, C). Ancestral sampling
        over num_steps respaced steps (0: the default), each one p_sample call (compiled after
        compile_sampling), its noise drawn here from generator.
        trace: called after every step with x_{k-1} (N, C) (after the last: x0, the sample).
        Why clip_denoised: at k = T-1, abar = 2.4e-9 and x0_hat = (x_k - eps_hat) / 4.9e-5, so an
        eps error of 1e-3 is a jump of ~20 in x0_hat: a trained head copes, a briefly trained one
        explodes."""
        d = self.schedule(num_steps or self.num_sampling_steps, z.device)
        N = len(z) // 2 if llamagen.guided(cfg) else len(z)
        cfg = torch.tensor(cfg, device=z.device)  # a tensor: a new scale does not recompile
        step = self.compiled_step or self.p_sample
        # x_T ~ N(0, I), fp32 throughout
        x = torch.randn(N, self.in_channels, device=z.device, generator=generator)
        for k in reversed(range(d.num_timesteps)):
            noise = torch.randn(x.shape, device=x.device, generator=generator) * temperature
            kk = torch.full((N,), k, dtype=torch.long, device=z.device)
            x = step(d, x, kk, z, cfg, noise, k > 0)
            if step is self.compiled_step:  # a copy: a CUDA graph's next replay overwrites it
                x = x.clone()
            if trace is not None:
                trace(x)
        return x

    def p_sample(self, d, x, k, z, cfg, noise, nonzero):
        """One reverse step of schedule d: x_k (N, C) at steps k (N,) -> x_{k-1} =
        mean + [k > 0] exp(logvar / 2) noise. Guided (z has 2N rows), official: eps = eps_u +
        cfg (eps_c - eps_u), the variance the conditional one."""
        t = d.timestep_map[k]  # (N,) the original steps, the network's input
        if len(z) > len(x):  # both halves from the same x, the unconditional half only guides eps
            out = self.net(torch.cat([x, x]), torch.cat([t, t]), z)
            eps_c, v = out[:len(x)].chunk(2, dim=1)
            eps_u, _ = out[len(x):].chunk(2, dim=1)
            out = torch.cat([eps_u + cfg * (eps_c - eps_u), v], dim=1)
        else:
            out = self.net(x, t, z)
        mean, logvar = d.p_mean_logvar(out.float(), x, k, self.clip)
        return mean + nonzero * torch.exp(0.5 * logvar) * noise

    def compile_sampling(self, mode=None, backend='inductor'):
        """sample's steps through torch.compile(self.p_sample): for k > 0 and for k = 0 a graph of
        the first row count, then one of any (dynamic shapes: MAR predicts a varying number of
        tokens per call), 4 in all; mode='reduce-overhead' records a CUDA graph per row count."""
        self.compiled_step = torch.compile(self.p_sample, mode=mode, backend=backend)
