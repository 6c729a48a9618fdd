"""
The tokenizer core: LlamaGen's VQGAN (FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py),
after Taming Transformers (Esser et al., arXiv:2012.09841).

A convolutional encoder maps an image in [-1, 1] to an h x w grid of low-dimensional vectors (8-d);
each is replaced by its nearest code of an l2-normalised codebook (cosine similarity), giving the
token ids the generators model. The decoder maps codes back to pixels. Training: L2 reconstruction
+ codebook and commitment losses (straight-through gradients) + a PatchGAN hinge loss after a
start step (+ LPIPS only when its weights are supplied; nothing is downloaded).

VQConfig fields keep the official names; VQ_SIZES['VQ-16'] is the official vq_ds16_c2i.pt model (its state
dict loads strictly), 'VQ-tiny' the CPU default for the built-in 32x32 data, 'MaskGIT-VQGAN' RAR's tokenizer
(1d-tokenizer's maskgit_vqgan.py: the same skeleton behind `maskgit`; its names map through ldm_key, as kl16's).
Shapes: B batch, C channels, h*w token grid, V codebook size.
"""
import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQConfig:
    codebook_size: int = 16384  # V
    codebook_embed_dim: int = 8  # dimension of a code
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
    'VQ-tiny': dict(codebook_size=512, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2),
                    z_channels=64, ch=32, num_res_blocks=1),  # CPU default, stride 4: 32x32 -> 8x8 tokens
    'MaskGIT-VQGAN': dict(codebook_size=1024, codebook_embed_dim=256, codebook_l2_norm=False,
                          codebook_show_usage=False, maskgit=True),  # maskgit-vqgan-imagenet-f16-256.bin: 54.5M
}


def Normalize(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):  # x + conv(act(norm(conv(act(norm(x)))))), a 1x1 shortcut when widths differ
    def __init__(self, cin, cout, dropout, maskgit=False):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=not maskgit)
        self.norm2, self.dropout, self.conv2 = Normalize(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, 1, 1, bias=not maskgit)
        # MaskGIT quirk (from the JAX original): its shortcut maps the block's output h, not x: h + nin(h)
        self.nin_shortcut, self.maskgit = nn.Conv2d(cout if maskgit else cin, cout, 1, bias=not maskgit) if cin != cout else None, maskgit

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(h if self.maskgit else x))


class AttnBlock(nn.Module):  # one head over the h*w positions
    def __init__(self, c):
        super().__init__()
        self.norm = Normalize(c)
        self.q, self.k, self.v, self.proj_out = [nn.Conv2d(c, c, 1) for _ in range(4)]

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).flatten(2).transpose(1, 2)[:, None] for f in (self.q, self.k, self.v))  # (B, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)[:, 0]  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(y.transpose(1, 2).reshape(B, C, H, W))


class Resample(nn.Module):  # down: pad right/bottom, then a stride-2 conv without padding (official); up: nearest x2, conv
    def __init__(self, c, down):
        super().__init__()
        self.down, self.conv = down, nn.Conv2d(c, c, 3, 2 if down else 1, 0 if down else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode='nearest'))


def make_level(cin, cout, n_res, n_attn, resample, dropout, maskgit=False):
    """One resolution level: n_res ResnetBlocks (each followed by an AttnBlock when n_attn), then
    resample 'down' / 'up' / None. Official key names: res.{j}, attn.{j}, downsample / upsample."""
    level = nn.Module()
    level.res = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, dropout, maskgit) for j in range(n_res))
    level.attn = nn.ModuleList(AttnBlock(cout) for _ in range(0 if maskgit else n_attn))
    if resample:  # MaskGIT downsamples by a parameter-free 2x2 average
        setattr(level, resample + 'sample', nn.AvgPool2d(2) if maskgit and resample == 'down' else Resample(cout, resample == 'down'))
    return level


def run_level(level, h):
    for j, res in enumerate(level.res):
        h = res(h)
        h = level.attn[j](h) if len(level.attn) else h
    for name in ('downsample', 'upsample'):
        h = getattr(level, name)(h) if hasattr(level, name) else h
    return h


def mid_block(c, dropout, maskgit):  # MaskGIT: two ResnetBlocks, no attention
    blocks = [ResnetBlock(c, c, dropout, maskgit), ResnetBlock(c, c, dropout, maskgit)]
    return nn.ModuleList(blocks if maskgit else blocks[:1] + [AttnBlock(c)] + blocks[1:])


class Encoder(nn.Module):  # (B, 3, H, W) -> (B, z_channels, H/s, W/s); attention only at the last level
    def __init__(self, cfg):
        super().__init__()
        mult, n, mg = cfg.encoder_ch_mult, len(cfg.encoder_ch_mult), cfg.maskgit
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1, bias=not mg)
        chans = [cfg.ch] + [cfg.ch * m for m in mult]
        self.conv_blocks = nn.ModuleList(
            make_level(chans[i], chans[i + 1], cfg.num_res_blocks, cfg.num_res_blocks if i == n - 1 else 0,
                       'down' if i < n - 1 else None, cfg.dropout_p, mg) for i in range(n))
        self.mid = mid_block(chans[-1], cfg.dropout_p, mg)
        self.norm_out, self.conv_out = Normalize(chans[-1]), nn.Conv2d(chans[-1], cfg.z_channels, 1 if mg else 3, 1, 0 if mg else 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = run_level(level, h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):  # (B, z_channels, h, w) -> (B, 3, H, W); levels built coarse to fine
    def __init__(self, cfg):
        super().__init__()
        mult, n, mg = cfg.decoder_ch_mult, len(cfg.decoder_ch_mult), cfg.maskgit
        chans = [cfg.ch * m for m in reversed(mult)]
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[0], 3, 1, 1)
        self.mid = mid_block(chans[0], cfg.dropout_p, mg)
        n_res = cfg.num_res_blocks + (0 if mg else 1)  # MaskGIT: no extra decoder block
        self.conv_blocks = nn.ModuleList(
            make_level(chans[max(i - 1, 0)], chans[i], n_res, n_res if i == 0 else 0,
                       'up' if i < n - 1 else None, cfg.dropout_p, mg) for i in range(n))
        self.norm_out, self.conv_out = Normalize(chans[-1]), nn.Conv2d(chans[-1], 3, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            h = run_level(level, h)
        return self.conv_out(F.silu(self.norm_out(h)))  # no tanh: nominally in [-1, 1]


def ldm_key(k, levels):
    """An LDM-style official key (kl16, MaskGIT-VQGAN) -> ours: {down,up}.{i}.block -> conv_blocks.{j}.res, j = i
    down, levels-1-i up (LDM orders the decoder by resolution, we by processing); mid.block_1/attn_1/block_2 -> mid.0/1/2."""
    for a, b in (('mid.block_1', 'mid.0'), ('mid.attn_1', 'mid.1'), ('mid.block_2', 'mid.2'), ('upsample_conv', 'upsample.conv')):
        k = k.replace(a, b)
    m = re.match(r'(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn|downsample|upsample)(.*)', k)
    if not m:
        return k
    part, way, i, kind, rest = m.groups()
    return f'{part}.conv_blocks.{int(i) if way == "down" else levels - 1 - int(i)}.{"res" if kind == "block" else kind}{rest}'


class VectorQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if cfg.codebook_l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        if cfg.codebook_show_usage:  # a persistent buffer in the official state dict
            self.register_buffer('codebook_used', torch.zeros(65536))

    def codebook(self):  # (V, e)
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.cfg.codebook_l2_norm else w

    def forward(self, z):
        """z (B, e, h, w) -> z_q (B, e, h, w) straight-through, losses dict (training), ids (B, h, w)."""
        z = z.permute(0, 2, 3, 1)  # (B, h, w, e)
        z = F.normalize(z, dim=-1) if self.cfg.codebook_l2_norm else z
        e, zf = self.codebook(), z.reshape(-1, z.shape[-1])
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()  # (B*h*w, V) squared distances
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
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q.permute(0, 3, 1, 2), losses, ids.view(z.shape[:-1])

    def usage(self):  # fraction of codes among the last 65536 ids
        return torch.unique(self.codebook_used).numel() / self.cfg.codebook_size


def entropy_loss(affinity, temperature=0.01):
    """Low per-sample entropy, high entropy of the batch average: spreads usage over the codebook."""
    p, avg = F.softmax(affinity / temperature, dim=-1), F.softmax(affinity / temperature, dim=-1).mean(0)
    return -(p * F.log_softmax(affinity / temperature, dim=-1)).sum(-1).mean() + (avg * torch.log(avg + 1e-5)).sum()


class VQModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        proj = (lambda a, b: nn.Identity()) if cfg.maskgit else (lambda a, b: nn.Conv2d(a, b, 1))  # MaskGIT has none
        self.quant_conv, self.post_quant_conv = proj(cfg.z_channels, cfg.codebook_embed_dim), proj(cfg.codebook_embed_dim, cfg.z_channels)
        self.stride = 2 ** (len(cfg.encoder_ch_mult) - 1)

    def quantize_img(self, img):  # (B, 3, H, W) in [-1, 1] -> z_q, losses, ids (B, h, w)
        x = (img + 1) / 2 if self.cfg.maskgit else img  # MaskGIT's encoder takes [0, 1]
        return self.quantize(self.quant_conv(self.encoder(x)))

    def encode(self, img):
        """(B, 3, H, W) in [-1, 1] -> ids (B, h*w) in raster order, int32: the compact form that
        train.py caches (IAR2: (B, 2*h*w), its semantic ids, then its detail ids)."""
        return self.quantize_img(img)[2].flatten(1).int()

    def training_input(self, codes):  # cached ids -> the generator's input, int64
        return codes.long()

    def decode(self, z_q):  # -> (B, 3, H, W) in ~[-1, 1]
        x = self.decoder(self.post_quant_conv(z_q))
        return 2 * x - 1 if self.cfg.maskgit else x

    def decode_code(self, ids):
        """ids (B, h*w) raster order (from a generator, or encode) -> image (B, 3, H, W), ~[-1, 1]."""
        g = math.isqrt(ids[0].numel())
        x = self.decode(self.quantize.codebook()[ids.reshape(-1, g, g)].permute(0, 3, 1, 2))
        # RAR saves MaskGIT images as floor(255 x); sample.py rounds 127.5 y + 128: half a level
        # lower matches it
        return x - 1 / 255 if self.cfg.maskgit else x

    def official_key(self, k):  # an official key -> ours (llamagen.load_official)
        return ldm_key(k, len(self.cfg.encoder_ch_mult)) if self.cfg.maskgit else k  # LDM names

    def forward(self, img):  # -> reconstruction, quantizer losses
        z_q, losses, _ = self.quantize_img(img)
        return self.decode(z_q), losses

    def on_step(self, step, total_steps):  # tokenizer training schedules (IAR2's codebook cycle)
        return None

    def calibrate(self, img):  # called once when training ends; a VQ has nothing to fit
        return None

    def metrics(self):  # for the training log
        return {'codebook usage': round(self.quantize.usage(), 4)}


@dataclass
class KLConfig(VQConfig):  # LDM's AutoencoderKL (MAR's kl16 by default): VQConfig's encoder/decoder, no codebook
    z_channels: int = 16  # the encoder outputs 2 * z_channels: mean and log variance
    embed_dim: int = 16  # latent channels C
    kl_weight: float = 1e-6  # LDM kl-f16's weight, relative to the reconstruction loss per pixel value
    scale_factor: float = 0.2325  # latents * this: std ~1 (kl16: 1/std on ImageNet; ours: the last training batch's)


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
        self.decoder = Decoder(cfg)
        for level in self.decoder.conv_blocks:  # kl16: attention in the middle block only
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

    def forward(self, img):  # -> reconstruction, {'kl': weight * KL(posterior || N(0, I)) per value}
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


class PatchGAN(nn.Module):
    """pix2pix NLayerDiscriminator: 4x4 convs, BatchNorm, LeakyReLU 0.2 -> a map of real/fake logits."""
    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf
        for n in range(1, n_layers + 1):
            c_out = ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        self.main = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))
        for m in self.modules():  # pix2pix init: conv weights N(0, 0.02), BatchNorm N(1, 0.02) and bias 0
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, float(isinstance(m, nn.BatchNorm2d)), 0.02)
            nn.init.zeros_(m.bias) if isinstance(m, nn.BatchNorm2d) else None

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(real, fake):
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


class LPIPS(nn.Module):
    """Perceptual distance (Zhang et al., arXiv:1801.03924) on VGG16 features, the official tokenizer's
    perceptual loss. Nothing is downloaded: LPIPS.load takes torchvision's vgg16 weights (features.*)
    and the LPIPS linear heads (lin0..lin4.model.1.weight, the `vgg.pth` of the LPIPS package)."""
    VGG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
    TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's numbering

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in self.VGG:
            layers += [nn.MaxPool2d(2, 2)] if v == 'M' else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = c if v == 'M' else v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        self.register_buffer('shift', torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1))
        self.register_buffer('scale', torch.tensor([.458, .448, .450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    @classmethod
    def load(cls, vgg_path, lin_path):
        m, vgg, lin = cls(), torch.load(vgg_path, weights_only=True), torch.load(lin_path, weights_only=True)
        m.features.load_state_dict({k[9:]: v for k, v in vgg.items() if k.startswith('features.')})
        m.lins.load_state_dict({f'{i}.weight': lin[f'lin{i}.model.1.weight'] for i in range(5)})
        return m

    def forward(self, x, y):  # images in [-1, 1] -> (B,) distances
        h, d = (torch.cat([x, y]) - self.shift) / self.scale, 0.0
        for i, layer in enumerate(self.features[:self.TAPS[-1] + 1]):
            h = layer(h)
            if i in self.TAPS:  # unit-normalise channels, squared difference, weighted by the head, averaged
                a, b = (h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)).chunk(2)
                d = d + self.lins[self.TAPS.index(i)]((a - b) ** 2).mean((2, 3))
        return d.flatten()
