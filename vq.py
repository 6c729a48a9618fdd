"""
The tokenizer core: LlamaGen's VQGAN (FoundationVision/LlamaGen,
tokenizer/tokenizer_image/vq_model.py), after Taming Transformers (Esser et al., arXiv:2012.09841).

A convolutional encoder maps an image in [-1, 1] to an h x w grid of low-dimensional vectors (8-d);
each is replaced by its nearest code of an l2-normalised codebook (cosine similarity), giving the
token ids the generators model. The decoder maps codes back to pixels. Training: L2 reconstruction
+ codebook and commitment losses (straight-through gradients) + a PatchGAN hinge loss after a
start step (+ LPIPS only when its weights are supplied; nothing is downloaded).

VQConfig fields keep the official names. VQ_SIZES['VQ-16'] is the official vq_ds16_c2i.pt model
(its state dict loads strictly), 'VQ-tiny' the CPU default for the built-in 32x32 data,
'MaskGIT-VQGAN' RAR's tokenizer (1d-tokenizer's maskgit_vqgan.py: the same skeleton behind
`maskgit`; its names map through ldm_key, as kl16's). KLModel is MAR's kl16 VAE on the same
encoder and decoder. PatchGAN and LPIPS are the tokenizer's training losses.
Shapes: B batch, C channels, h*w token grid, e code dimension, V codebook size.
"""
import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- config ---------------------------------------------------------------------------------------
@dataclass
class VQConfig:
    codebook_size: int = 16384  # V
    codebook_embed_dim: int = 8  # e, the dimension of a code
    codebook_l2_norm: bool = True  # match by cosine similarity
    codebook_show_usage: bool = True  # keep the last 65536 ids to report codebook usage
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0  # official default: off
    encoder_ch_mult: tuple = (1, 1, 2, 2, 4)  # one level per entry; stride 2**(levels-1)
    decoder_ch_mult: tuple = (1, 1, 2, 2, 4)
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2  # per encoder level (the decoder has one more, except MaskGIT's)
    maskgit: bool = False  # the MaskGIT-VQGAN variant (RAR's tokenizer), see the docstring


VQ_SIZES = {
    'VQ-16': {},  # official vq_ds16_c2i: 72M params, stride 16
    'VQ-8': dict(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),
    # CPU default, stride 4: 32x32 -> 8x8 tokens
    'VQ-tiny': dict(codebook_size=512, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2),
                    z_channels=64, ch=32, num_res_blocks=1),
    # maskgit-vqgan-imagenet-f16-256.bin: 54.5M params
    'MaskGIT-VQGAN': dict(codebook_size=1024, codebook_embed_dim=256, codebook_l2_norm=False,
                          codebook_show_usage=False, maskgit=True),
}


# --- encoder / decoder building blocks ------------------------------------------------------------
def Normalize(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), (B, cin, H, W) -> (B, cout, H, W), with a 1x1
    shortcut when the widths differ. MaskGIT's convs have no bias."""

    def __init__(self, cin, cout, dropout, maskgit=False):
        super().__init__()
        self.norm1 = Normalize(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=not maskgit)
        self.norm2 = Normalize(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not maskgit)
        if cin == cout:
            self.nin_shortcut = None
        elif maskgit:
            # MaskGIT quirk (from the JAX original): its shortcut maps the block's output h, not x:
            # h + nin(h), so it takes cout channels
            self.nin_shortcut = nn.Conv2d(cout, cout, 1, bias=False)
        else:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)
        self.maskgit = maskgit

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is None:
            return x + h
        if self.maskgit:
            return h + self.nin_shortcut(h)
        return h + self.nin_shortcut(x)


class AttnBlock(nn.Module):
    """Self-attention with one head over the H*W positions, (B, C, H, W) -> the same, residual."""

    def __init__(self, c):
        super().__init__()
        self.norm = Normalize(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): a sequence of H*W positions in one head
        q = self.q(h).flatten(2).transpose(1, 2)[:, None]
        k = self.k(h).flatten(2).transpose(1, 2)[:, None]
        v = self.v(h).flatten(2).transpose(1, 2)[:, None]
        y = F.scaled_dot_product_attention(q, k, v)[:, 0]  # softmax(q k^T / sqrt(C)) v: (B, HW, C)
        return x + self.proj_out(y.transpose(1, 2).reshape(B, C, H, W))


class Resample(nn.Module):
    """Halve or double H and W. down: pad right and bottom by one, then a stride-2 3x3 conv without
    padding (official); up: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c, down):
        super().__init__()
        self.down = down
        if down:
            self.conv = nn.Conv2d(c, c, 3, 2, 0)
        else:
            self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


def make_level(cin, cout, n_res, n_attn, resample, dropout, maskgit=False):
    """One resolution level: n_res ResnetBlocks (each followed by an AttnBlock when n_attn), then
    resample 'down' / 'up' / None. Official key names: res.{j}, attn.{j}, downsample / upsample."""
    level = nn.Module()
    blocks = []
    for j in range(n_res):
        blocks.append(ResnetBlock(cin if j == 0 else cout, cout, dropout, maskgit))
    level.res = nn.ModuleList(blocks)
    if maskgit:  # MaskGIT has no attention inside its levels
        n_attn = 0
    level.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n_attn))
    if resample == 'down' and maskgit:  # MaskGIT downsamples by a parameter-free 2x2 average
        level.downsample = nn.AvgPool2d(2)
    elif resample == 'down':
        level.downsample = Resample(cout, down=True)
    elif resample == 'up':
        level.upsample = Resample(cout, down=False)
    return level


def run_level(level, h):  # (B, cin, H, W) -> (B, cout, H', W'), H' = H/2, 2H or H
    for j, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[j](h)
    if hasattr(level, 'downsample'):
        h = level.downsample(h)
    if hasattr(level, 'upsample'):
        h = level.upsample(h)
    return h


def mid_block(c, dropout, maskgit):
    """The middle of the encoder and decoder: ResnetBlock, AttnBlock, ResnetBlock (MaskGIT: two
    ResnetBlocks, no attention)."""
    first = ResnetBlock(c, c, dropout, maskgit)
    second = ResnetBlock(c, c, dropout, maskgit)
    if maskgit:
        return nn.ModuleList([first, second])
    # the AttnBlock is built after both ResnetBlocks, though registered between them: that keeps
    # the order in which the initialisation draws random numbers, so seeded runs reproduce
    return nn.ModuleList([first, AttnBlock(c), second])


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H/s, W/s), s = 2**(levels-1); attention only at the last
    (coarsest) level."""

    def __init__(self, cfg):
        super().__init__()
        n = len(cfg.encoder_ch_mult)
        mg = cfg.maskgit
        chans = [cfg.ch] + [cfg.ch * m for m in cfg.encoder_ch_mult]  # the width before each level
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1, bias=not mg)
        levels = []
        for i in range(n):
            last = i == n - 1
            n_attn = cfg.num_res_blocks if last else 0
            resample = None if last else 'down'
            levels.append(make_level(chans[i], chans[i + 1], cfg.num_res_blocks, n_attn, resample,
                                     cfg.dropout_p, mg))
        self.conv_blocks = nn.ModuleList(levels)
        self.mid = mid_block(chans[-1], cfg.dropout_p, mg)
        self.norm_out = Normalize(chans[-1])
        if mg:  # MaskGIT: a 1x1 output conv
            self.conv_out = nn.Conv2d(chans[-1], cfg.z_channels, 1, 1, 0)
        else:
            self.conv_out = nn.Conv2d(chans[-1], cfg.z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = run_level(level, h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, H, W); levels built coarse to fine, attention only at the
    first (coarsest) level."""

    def __init__(self, cfg):
        super().__init__()
        n = len(cfg.decoder_ch_mult)
        mg = cfg.maskgit
        chans = [cfg.ch * m for m in reversed(cfg.decoder_ch_mult)]  # the width of each level
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[0], 3, 1, 1)
        self.mid = mid_block(chans[0], cfg.dropout_p, mg)
        n_res = cfg.num_res_blocks if mg else cfg.num_res_blocks + 1  # MaskGIT: no extra block
        levels = []
        for i in range(n):
            n_attn = n_res if i == 0 else 0
            resample = 'up' if i < n - 1 else None
            levels.append(make_level(chans[max(i - 1, 0)], chans[i], n_res, n_attn, resample,
                                     cfg.dropout_p, mg))
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = Normalize(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 3, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            h = run_level(level, h)
        return self.conv_out(F.silu(self.norm_out(h)))  # no tanh: nominally in [-1, 1]


# LDM names -> ours, plain substrings (the middle block's, and MaskGIT's upsample conv)
LDM_RENAMES = (
    ('mid.block_1', 'mid.0'),
    ('mid.attn_1', 'mid.1'),
    ('mid.block_2', 'mid.2'),
    ('upsample_conv', 'upsample.conv'),
)
LDM_LEVEL = re.compile(r'(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn|downsample|upsample)(.*)')


def ldm_key(k, levels):
    """An LDM-style official key (kl16, MaskGIT-VQGAN) -> ours: {down,up}.{i}.block ->
    conv_blocks.{j}.res with j = i for down, levels-1-i for up (LDM orders the decoder by
    resolution, we by processing); mid.block_1 / attn_1 / block_2 -> mid.0 / 1 / 2."""
    for ldm, ours in LDM_RENAMES:
        k = k.replace(ldm, ours)
    m = LDM_LEVEL.match(k)
    if not m:
        return k
    part, way, i, kind, rest = m.groups()
    j = int(i) if way == 'down' else levels - 1 - int(i)
    if kind == 'block':
        kind = 'res'
    return f'{part}.conv_blocks.{j}.{kind}{rest}'


# --- quantizer ------------------------------------------------------------------------------------
class VectorQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        V = cfg.codebook_size
        self.embedding = nn.Embedding(V, cfg.codebook_embed_dim)  # (V, e)
        nn.init.uniform_(self.embedding.weight, -1.0 / V, 1.0 / V)
        if cfg.codebook_l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        if cfg.codebook_show_usage:  # a persistent buffer in the official state dict
            self.register_buffer('codebook_used', torch.zeros(65536))

    def codebook(self):  # (V, e), unit vectors when matching by cosine similarity
        w = self.embedding.weight
        if self.cfg.codebook_l2_norm:
            return F.normalize(w, dim=-1)
        return w

    def forward(self, z):
        """z (B, e, h, w) -> z_q (B, e, h, w) straight-through, a losses dict (training only),
        ids (B, h, w)."""
        z = z.permute(0, 2, 3, 1)  # (B, h, w, e)
        if self.cfg.codebook_l2_norm:
            z = F.normalize(z, dim=-1)
        e = self.codebook()  # (V, e)
        zf = z.reshape(-1, z.shape[-1])  # (B*h*w, e)
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()  # (B*h*w, V) |z-e|^2
        ids = d.argmin(1)
        z_q = e[ids].view(z.shape)
        losses = {}
        if self.training:
            losses['vq'] = (z_q - z.detach()).pow(2).mean()  # moves codes towards the encoder
            losses['commit'] = self.cfg.commit_loss_beta * (z_q.detach() - z).pow(2).mean()
            if self.cfg.entropy_loss_ratio > 0:
                losses['entropy'] = self.cfg.entropy_loss_ratio * entropy_loss(-d)
            if self.cfg.codebook_show_usage:  # rolling window of the last 65536 ids
                n = min(ids.numel(), 65536)
                self.codebook_used.copy_(torch.cat([self.codebook_used[n:], ids[-n:].float()]))
        z_q = z + (z_q - z).detach()  # straight-through estimator: the decoder's grads reach z
        return z_q.permute(0, 3, 1, 2), losses, ids.view(z.shape[:-1])

    def usage(self):  # fraction of codes among the last 65536 ids
        return torch.unique(self.codebook_used).numel() / self.cfg.codebook_size


def entropy_loss(affinity, temperature=0.01):
    """affinity (N, V) -> scalar: low per-sample entropy, high entropy of the batch average, which
    spreads usage over the codebook."""
    p = F.softmax(affinity / temperature, dim=-1)  # (N, V)
    # the batch average from its own softmax (not p.mean(0)) and this order of the ops keep the
    # gradients bit-identical to the trained checkpoints' code
    avg = F.softmax(affinity / temperature, dim=-1).mean(0)  # (V,)
    log_p = F.log_softmax(affinity / temperature, dim=-1)
    sample_entropy = -(p * log_p).sum(-1).mean()
    neg_avg_entropy = (avg * torch.log(avg + 1e-5)).sum()
    return sample_entropy + neg_avg_entropy


# --- tokenizer ------------------------------------------------------------------------------------
def projection(cin, cout, maskgit):  # the 1x1 conv around the quantizer; MaskGIT has none
    if maskgit:
        return nn.Identity()
    return nn.Conv2d(cin, cout, 1)


class VQModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = projection(cfg.z_channels, cfg.codebook_embed_dim, cfg.maskgit)
        self.post_quant_conv = projection(cfg.codebook_embed_dim, cfg.z_channels, cfg.maskgit)
        self.stride = 2 ** (len(cfg.encoder_ch_mult) - 1)

    def quantize_img(self, img):  # (B, 3, H, W) in [-1, 1] -> z_q, losses, ids (B, h, w)
        x = img
        if self.cfg.maskgit:  # MaskGIT's encoder takes [0, 1]
            x = (img + 1) / 2
        return self.quantize(self.quant_conv(self.encoder(x)))

    def encode(self, img):
        """(B, 3, H, W) in [-1, 1] -> ids (B, h*w) in raster order, int32: the compact form that
        train.py caches (IAR2: (B, 2*h*w), its semantic ids, then its detail ids)."""
        return self.quantize_img(img)[2].flatten(1).int()

    def training_input(self, codes):  # cached ids -> the generator's input, int64
        return codes.long()

    def decode(self, z_q):  # (B, e, h, w) -> (B, 3, H, W) in ~[-1, 1]
        x = self.decoder(self.post_quant_conv(z_q))
        if self.cfg.maskgit:  # MaskGIT's decoder outputs [0, 1]
            return 2 * x - 1
        return x

    def decode_code(self, ids):
        """ids (B, h*w) in raster order (from a generator, or encode) -> image (B, 3, H, W),
        ~[-1, 1]."""
        g = math.isqrt(ids[0].numel())
        z_q = self.quantize.codebook()[ids.reshape(-1, g, g)]  # (B, h, w, e)
        x = self.decode(z_q.permute(0, 3, 1, 2))
        if self.cfg.maskgit:
            # RAR saves MaskGIT images as floor(255 x); sample.py rounds 127.5 y + 128: half a
            # level lower matches it
            return x - 1 / 255
        return x

    def official_key(self, k):  # an official key -> ours (llamagen.load_official)
        if self.cfg.maskgit:  # LDM names
            return ldm_key(k, len(self.cfg.encoder_ch_mult))
        return k

    def forward(self, img):  # -> reconstruction, quantizer losses
        z_q, losses, _ = self.quantize_img(img)
        return self.decode(z_q), losses

    def on_step(self, step, total_steps):  # tokenizer training schedules (IAR2's codebook cycle)
        return None

    def calibrate(self, img):  # called once when training ends; a VQ has nothing to fit
        return None

    def metrics(self):  # for the training log (MaskGIT-VQGAN keeps no usage window)
        if not self.cfg.codebook_show_usage:
            return {}
        return {'codebook usage': round(self.quantize.usage(), 4)}


# --- KL autoencoder (MAR) -------------------------------------------------------------------------
@dataclass
class KLConfig(VQConfig):
    """LDM's AutoencoderKL (MAR's kl16 by default): VQConfig's encoder/decoder, no codebook."""
    z_channels: int = 16  # the encoder outputs 2 * z_channels: mean and log variance
    embed_dim: int = 16  # latent channels C
    kl_weight: float = 1e-6  # LDM kl-f16's weight, relative to the reconstruction loss per value
    # latents * this: std ~1 (kl16: 1/std on ImageNet; ours: set by calibrate)
    scale_factor: float = 0.2325
    # LDM's attention rule, official names (LlamaGen's, attention at the last level, agrees only
    # on 5 levels): an encoder level gets attention when its nominal resolution, `resolution`
    # halved once per level before it, is in attn_resolutions, whatever the input size
    attn_resolutions: tuple = (16,)
    resolution: int = 256


KL_SIZES = {
    'KL-16': {},
    'KL-tiny': {**VQ_SIZES['VQ-tiny'], 'z_channels': 4, 'embed_dim': 4, 'kl_weight': 1e-4},  # 8x8x4
}


class KLModel(nn.Module):  # a diagonal Gaussian per position instead of a code (MAR's kl16)
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.stride = 2 ** (len(cfg.encoder_ch_mult) - 1)
        self.encoder = Encoder(replace(cfg, z_channels=2 * cfg.z_channels))
        # LDM's rule (KLConfig) over the encoder LlamaGen's built: only the levels where the two
        # differ are rebuilt, so kl16 (they agree) keeps its initialisation's random draws
        for i, level in enumerate(self.encoder.conv_blocks):
            nominal = cfg.resolution // 2 ** i
            n_attn = cfg.num_res_blocks if nominal in cfg.attn_resolutions else 0
            if len(level.attn) != n_attn:
                width = level.res[-1].conv2.out_channels
                level.attn = nn.ModuleList(AttnBlock(width) for _ in range(n_attn))
        self.decoder = Decoder(cfg)
        # AutoencoderKL leaves its Decoder's attn_resolutions at (): attention in the middle only
        for level in self.decoder.conv_blocks:
            level.attn = nn.ModuleList()
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, img):
        """(B, 3, H, W) in [-1, 1] -> moments (B, 2C, h, w): the posterior's mean and log variance,
        what train.py caches (MAR draws a fresh sample from them at every step, as official)."""
        return self.quant_conv(self.encoder(img))

    def posterior(self, moments):  # -> a draw (B, C, h, w) of N(mean, exp(logvar)), unscaled
        mean, logvar = moments.chunk(2, dim=1)
        return mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)

    def training_input(self, moments):  # -> the generator's latents: a posterior draw, scaled
        return self.posterior(moments) * self.cfg.scale_factor

    def decode_code(self, z):  # scaled latents (B, C, h, w) -> image (B, 3, H, W) in ~[-1, 1]
        return self.decoder(self.post_quant_conv(z / self.cfg.scale_factor))

    def official_key(self, k):  # kl16's LDM names -> ours; the keys of its training losses: None
        if k.split('.')[0] in ('encoder', 'decoder', 'quant_conv', 'post_quant_conv'):
            return ldm_key(k, len(self.cfg.encoder_ch_mult))
        return None

    def forward(self, img):  # -> reconstruction, {'kl': weight * KL(posterior || N(0, I)) / value}
        moments = self.encode(img)
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        recon = self.decoder(self.post_quant_conv(self.posterior(moments)))
        return recon, {'kl': self.cfg.kl_weight * kl / img[0].numel()}

    def on_step(self, step, total_steps):  # no schedule
        return None

    @torch.no_grad()
    def calibrate(self, img):
        """Called once when training ends: scale_factor = 1 / std of the latents of img, so the
        generator sees latents of std ~1 (kl16's 0.2325 is the same on ImageNet)."""
        self.cfg.scale_factor = 1.0 / self.posterior(self.encode(img)).float().std().item()

    def metrics(self):  # for the training log
        return {}


# --- training losses ------------------------------------------------------------------------------
class PatchGAN(nn.Module):
    """pix2pix NLayerDiscriminator: 4x4 convs, BatchNorm, LeakyReLU 0.2, (B, 3, H, W) -> a map
    (B, 1, h', w') of real/fake logits, one per overlapping patch."""

    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ndf
        for n in range(1, n_layers + 1):
            c_out = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution
            layers.append(nn.Conv2d(c, c_out, 4, stride, 1, bias=False))
            layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, True))
            c = c_out
        self.main = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))
        # pix2pix init: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02), biases 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(real, fake):  # discriminator logits on real and reconstructed images -> scalar
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


class LPIPS(nn.Module):
    """Perceptual distance (Zhang et al., arXiv:1801.03924) on VGG16 features, the official
    tokenizer's perceptual loss. Nothing is downloaded: LPIPS.load takes the state dicts of
    torchvision's vgg16 (features.*) and of the LPIPS linear heads (lin0..lin4.model.1.weight, the
    `vgg.pth` of the LPIPS package)."""
    VGG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
    TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision numbering)

    def __init__(self):
        super().__init__()
        layers = []
        c = 3
        for v in self.VGG:
            if v == 'M':
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.Conv2d(c, v, 3, padding=1))
                layers.append(nn.ReLU())
                c = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in (64, 128, 256, 512, 512))
        # the LPIPS input normalisation
        self.register_buffer('shift', torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1))
        self.register_buffer('scale', torch.tensor([.458, .448, .450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    @classmethod
    def load(cls, vgg, lin):
        """vgg: torchvision's vgg16 state dict (its classifier is ignored); lin: the LPIPS heads'
        state dict. train.py reads both files with llamagen.load_file."""
        m = cls()
        features = {k[len('features.'):]: v for k, v in vgg.items() if k.startswith('features.')}
        m.features.load_state_dict(features)
        m.lins.load_state_dict({f'{i}.weight': lin[f'lin{i}.model.1.weight'] for i in range(5)})
        return m

    def forward(self, x, y):  # images (B, 3, H, W) in [-1, 1] -> (B,) distances
        h = (torch.cat([x, y]) - self.shift) / self.scale  # (2B, 3, H, W): both in one pass
        d = 0.0
        for i, layer in enumerate(self.features[:self.TAPS[-1] + 1]):
            h = layer(h)
            if i in self.TAPS:
                # unit-normalise the channels, squared difference, weighted by the head, averaged
                unit = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                a, b = unit.chunk(2)
                d = d + self.lins[self.TAPS.index(i)]((a - b) ** 2).mean((2, 3))  # (B, 1)
        return d.flatten()
