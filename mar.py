"""
MAR: "Autoregressive Image Generation without Vector Quantization" (Li et al., 2024),
arXiv:2406.11838. Official code: LTH14/mar.

Idea: keep autoregression, drop the codebook. Tokens are continuous vectors (the C channels of a
KL-VAE latent at one position), and each token's distribution p(x | z) is modelled by a small
diffusion MLP (DiffLoss, diffloss.py) conditioned on the transformer's output z for that position,
in place of a softmax over a vocabulary. The transformer is a bidirectional MAE-style
encoder-decoder trained by masked prediction: a random fraction (70-100%) of the tokens is hidden,
the encoder sees only the visible ones (plus 64 "buffer" positions holding the class embedding),
the decoder fills the hidden positions with a mask token, and DiffLoss is trained on the hidden
tokens. Sampling is masked autoregression in a random order: start fully masked, and over num_iter
steps reveal tokens along a cosine schedule, each step sampling all its tokens at once by reverse
diffusion.

Changes vs llamagen.py:
  - tokens are continuous latents (vq.KLModel), not codebook ids; the head is DiffLoss, not a
    Linear; forward returns (z, loss): z (B, L, Cd) is the decoder output that conditions DiffLoss
  - bidirectional attention (SDPA with no mask: flash kernels on GPU), timm-style blocks
    (LayerNorm, biases, GELU), learned absolute position embeddings instead of RoPE, no KV cache
  - the class embedding fills 64 buffer positions; CFG's null class is the learned fake_latent
  - forward: one masked-prediction step (random order, truncated-normal mask ratio),
    loss = DiffLoss on the hidden tokens
  - generate: cosine mask schedule over num_iter steps, random order, linear/constant CFG schedule
  - AdamW: no weight decay on DiffLoss (official)
Train (classroom, built-in data, CPU): python train.py --method mar
  (what the classroom size changes from the paper, each with the measurement behind it:
  SIZES['mar_tiny'] and CLASSROOM below)
Paper (MAR-B; warmup: 100 epochs of 625 steps):
    torchrun --nproc_per_node=8 train.py --method mar --model mar_base --data-path ... \
        --image-size 256 --tokenizer kl16.ckpt --epochs 800 --global-batch-size 2048 --lr 8e-4 \
        --warmup-steps 62500 --weight-decay 0.02 --grad-clip 3.0 --ema 0.9999
Shapes: B batch, T sequence positions, C width, H heads, D head dim, h*w token grid, V codebook
size; here also L = h*w tokens, Ct token channels (vae_embed_dim * patch_size^2), P buffer
positions, Ce / Cd encoder / decoder width.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import llamagen
from diffloss import DiffLoss
from vq import KL_SIZES as TOKENIZER_SIZES  # noqa: F401 (re-exported: the method contract)
from vq import KLConfig as TokenizerConfig  # noqa: F401
from vq import KLModel as Tokenizer  # noqa: F401

SIZES = {  # official encoder/decoder depth and width, DiffLoss of the released models (README)
    # The CPU size, for the built-in data (32 px, KL-tiny's stride 4: an 8x8 latent of 4 channels):
    # - 2x2 latent patches: 16 tokens of 16 channels, as kl16's 16;
    # - 4 buffer positions instead of 64;
    # - 50-100% masked (paper 70-100%): with 16 tokens the 0.7 floor never shows the encoder more
    #   than 4 of them;
    # - embeddings start at std 0.2: at 0.02 the positions are ~3% of a LayerNormed token and take
    #   1000s of steps to grow;
    # - constant CFG (paper: linear): 16 tokens revealed one per call, and the linear ramp guides
    #   the first ones, which fix colour and layout, at a scale near 1 (1,000 samples of one run at
    #   scale 4: class accuracy 0.977 constant, 0.957 linear).
    # The diffusion batch is the paper's 4: with 2 (an earlier default) the same 4000 steps gave
    # 0.893 (linear CFG 3) against 0.959, for 40% more time per step.
    'mar_tiny': dict(encoder_embed_dim=128, encoder_depth=2, encoder_num_heads=4,
                     decoder_embed_dim=128, decoder_depth=3, decoder_num_heads=4,
                     buffer_size=4, diffloss_d=3, diffloss_w=128, num_sampling_steps=50,
                     clip_denoised=10.0, patch_size=2, attn_dropout=0.0, proj_dropout=0.0,
                     mask_ratio_min=0.5, init_std=0.2, cfg_schedule='constant'),
    'mar_base': dict(diffloss_d=6, diffloss_w=1024),  # 208M
    'mar_large': dict(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                      decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
                      diffloss_d=8, diffloss_w=1280),  # 479M
    'mar_huge': dict(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                     decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16,
                     diffloss_d=12, diffloss_w=1536),  # 943M
}

# train.py's defaults for the classroom run: MAR learns far slower per step than a token model
# (a diffusion loss per token; position relations from learned embeddings, no RoPE), so 4000
# steps with a cosine LR down to 1e-5; CFG 4.0 (constant, mar_tiny) for its grids and sample.py
# (1,000 samples of one run: class accuracy 0.962 at 3.0, 0.977 at 4.0; paper: 2.9-3.2, linear)
CLASSROOM = {'generator': dict(max_steps=4000, lr_schedule='cosine', cfg_scale=4.0)}

# sample.py --official: the paper's FID settings per released model (256 steps, linear CFG)
PAPER = {
    'mar_base': dict(cfg_scale=2.9, num_iter=256),
    'mar_large': dict(cfg_scale=3.0, num_iter=256),
    'mar_huge': dict(cfg_scale=3.2, num_iter=256),
}


@dataclass
class Config:  # official names (models/mar.py); defaults: MAR-B with the constructor's DiffLoss
    img_size: int = 256  # the next three come from the data and tokenizer (derive_config)
    vae_stride: int = 16
    vae_embed_dim: int = 16  # latent channels
    patch_size: int = 1  # latent pixels per token side
    num_classes: int = 1000
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    buffer_size: int = 64  # class-embedding positions in front of the sequence (paper 64)
    mask_ratio_min: float = 0.7  # training mask ratio ~ N(1, 0.25) truncated to [0.7, 1]
    label_drop_prob: float = 0.1  # class -> fake_latent, for classifier-free guidance
    diffloss_d: int = 3  # MLP blocks (paper: 3 in ablations; 6 / 8 / 12 for the released B / L / H)
    diffloss_w: int = 1024  # MLP width (paper: 1024; 1024 / 1280 / 1536 for B / L / H)
    num_sampling_steps: int = 100  # respaced diffusion steps when sampling (paper 100)
    cfg_schedule: str = 'linear'  # CFG over the sampling calls: linear (paper) or constant
    diffusion_batch_mul: int = 4  # DiffLoss draws per token and step, reusing z (official: 4)
    init_std: float = 0.02  # learned embeddings (positions, class, mask, null class); official 0.02
    # sampling: clamp DiffLoss's x0 estimate to +-this; 0 = off (official). On for the CPU size:
    # a briefly trained head explodes at t ~ T (see DiffLoss.sample)
    clip_denoised: float = 0.0


def derive_config(tok, image_size, num_classes):
    """The Config fields that the tokenizer and the data fix, by the official names."""
    return dict(img_size=image_size, vae_stride=tok.stride, vae_embed_dim=tok.cfg.embed_dim,
                num_classes=num_classes)


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices and embeddings (>= 2-D) outside DiffLoss; none on
    norms, biases and the whole DiffLoss (official)."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and not n.startswith('diffloss.')]
    rest = [p for n, p in named if p.dim() < 2 or n.startswith('diffloss.')]
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': rest, 'weight_decay': 0.0}]


# --- helpers -----------------------------------------------------------------------------------
def patchify(x, p):
    """latents (B, C, H, W) -> tokens (B, L, C*p*p), raster order, channel-major inside a token."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum('nchpwq->nhwcpq', x).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, p, C):
    """The inverse of patchify: tokens (B, L, C*p*p) -> latents (B, C, h*p, w*p)."""
    B, L, _ = x.shape
    h = math.isqrt(L)
    x = x.reshape(B, h, h, C, p, p)
    return torch.einsum('nhwcpq->nchpwq', x).reshape(B, C, h * p, h * p)


def mask_ratio(mask_ratio_min):
    """One draw of N(1, 0.25^2) truncated to [mask_ratio_min, 1] (official: scipy truncnorm, one
    per batch), by the inverse CDF so that torch's RNG drives it. Mean 0.867 at 0.7."""
    lo = torch.special.ndtr(torch.tensor((mask_ratio_min - 1.0) / 0.25, dtype=torch.float64))
    u = lo + (0.5 - lo) * torch.rand((), dtype=torch.float64)  # uniform between the CDF's bounds
    return 1.0 + 0.25 * torch.special.ndtri(u).item()


def random_mask(orders, n_masked):
    """orders (B, L) permutations -> (B, L) bool, True = masked: the first n_masked of each."""
    return torch.zeros_like(orders, dtype=torch.bool).scatter_(1, orders[:, :n_masked], True)


def next_mask_len(step, num_iter, L, n_masked):
    """Tokens still masked after `step`: floor(L cos(pi/2 (step + 1) / num_iter)), kept in
    [1, n_masked - 1] so that each step predicts at least one token (the last step predicts all)."""
    n = math.floor(L * math.cos(math.pi / 2 * (step + 1) / num_iter))
    return max(1, min(n_masked - 1, n))


# --- model -------------------------------------------------------------------------------------
class Attention(nn.Module):  # timm's: fused qkv with bias, no RoPE, bidirectional
    def __init__(self, dim, n_head, attn_drop, proj_drop):
        super().__init__()
        self.n_head = n_head
        self.attn_dropout_p = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        p = self.attn_dropout_p if self.training else 0.0
        # no mask at all: a broadcast all-True mask fails in CUDA's fp32 kernels (its last dim
        # must be contiguous)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):  # pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x)); LayerNorm eps 1e-6
    def __init__(self, dim, n_head, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, n_head, cfg.attn_dropout, cfg.proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = llamagen.Mlp(dim, int(dim * cfg.mlp_ratio), cfg.proj_dropout)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.img_size // cfg.vae_stride // cfg.patch_size  # h = w
        self.L = self.grid ** 2
        self.token_dim = cfg.vae_embed_dim * cfg.patch_size ** 2  # Ct
        P = cfg.buffer_size
        Ce = cfg.encoder_embed_dim
        Cd = cfg.decoder_embed_dim
        self.fake_latent = nn.Parameter(torch.zeros(1, Ce))  # the null class
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, P + self.L, Ce))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Cd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, P + self.L, Cd))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.L, Cd))
        self.class_emb = nn.Embedding(cfg.num_classes, Ce)
        self.z_proj = nn.Linear(self.token_dim, Ce)
        self.z_proj_ln = nn.LayerNorm(Ce, eps=1e-6)
        self.encoder_blocks = nn.ModuleList(
            Block(Ce, cfg.encoder_num_heads, cfg) for _ in range(cfg.encoder_depth))
        self.encoder_norm = nn.LayerNorm(Ce, eps=1e-6)
        self.decoder_embed = nn.Linear(Ce, Cd)
        self.decoder_blocks = nn.ModuleList(
            Block(Cd, cfg.decoder_num_heads, cfg) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Cd, eps=1e-6)
        embeddings = (self.fake_latent, self.encoder_pos_embed_learned, self.mask_token,
                      self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned,
                      self.class_emb.weight)
        for p in embeddings:
            nn.init.normal_(p, std=cfg.init_std)
        for m in self.modules():  # before DiffLoss exists: it keeps its own init
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.diffloss = DiffLoss(self.token_dim, Cd, cfg.diffloss_d, cfg.diffloss_w,
                                 cfg.num_sampling_steps, cfg.clip_denoised)
        self.nfe = 0  # transformer forward calls of the last generate()

    def encode(self, x, mask, cls):
        """MAE encoder on the visible tokens only. x (B, L, Ct), mask (B, L) bool, cls (B, Ce)
        -> (B, P + visible, Ce). Every row has the same number of masked tokens, so the gather
        reshapes back to a batch."""
        B, P = len(x), self.cfg.buffer_size
        if self.training and self.cfg.label_drop_prob > 0:  # class -> fake_latent, for CFG
            drop = torch.rand(B, 1, device=x.device) < self.cfg.label_drop_prob
            cls = torch.where(drop, self.fake_latent.to(cls.dtype), cls)
        # (B, P + L, Ce): the class in every buffer position, then the tokens
        x = torch.cat([cls[:, None].expand(B, P, -1), self.z_proj(x)], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)  # official: position, then LN
        keep = torch.cat([torch.ones(B, P, dtype=torch.bool, device=x.device), ~mask], dim=1)
        x = x[keep].view(B, -1, x.shape[-1])  # the buffer, then the visible tokens in raster order
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def decode(self, x, mask):
        """MAE decoder: visible outputs back in place, mask_token elsewhere. -> z (B, L, Cd),
        DiffLoss's condition for every position (the buffer dropped)."""
        B, P = len(x), self.cfg.buffer_size
        x = self.decoder_embed(x)
        keep = torch.cat([torch.ones(B, P, dtype=torch.bool, device=x.device), ~mask], dim=1)
        full = self.mask_token.to(x.dtype).repeat(B, P + self.L, 1)
        full[keep] = x.flatten(0, 1)
        x = full + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)[:, P:] + self.diffusion_pos_embed_learned

    def forward(self, latents, labels):
        """One masked-prediction step. latents (B, C, h, w) scaled VAE samples, labels (B,)
        -> z (B, L, Cd), loss. Each row hides ceil(L r) tokens (one r per batch) in its own
        random order; DiffLoss scores only the hidden tokens (selected before the MLP: the same
        mean as the official masked mean, less compute), each repeated diffusion_batch_mul times
        with fresh (t, noise)."""
        x = patchify(latents, self.cfg.patch_size)  # (B, L, Ct)
        orders = torch.rand(len(x), self.L, device=x.device).argsort(dim=1)  # a permutation per row
        n_masked = math.ceil(self.L * mask_ratio(self.cfg.mask_ratio_min))
        mask = random_mask(orders, n_masked)
        z = self.decode(self.encode(x, mask, self.class_emb(labels)), mask)  # (B, L, Cd)
        mul = self.cfg.diffusion_batch_mul
        return z, self.diffloss(x[mask].repeat(mul, 1), z[mask].repeat(mul, 1))

    def on_step(self, step, total_steps):  # train.py's hook; MAR has no schedule of its own
        return None

    def compile_sampling(self, mode=None, backend='inductor'):
        """DiffLoss's reverse steps through torch.compile (DiffLoss.compile_sampling): num_iter x
        100 small MLP calls, the launch-bound part of sampling. The transformer stays eager: the
        encoder's visible tokens change in number at every call."""
        self.diffloss.compile_sampling(mode, backend)

    @torch.inference_mode()
    def generate(self, labels, cfg_scale=1.0, temperature=1.0, num_iter=64, cfg_schedule='',
                 num_sampling_steps=0, generator=None, trace=None):
        """labels (B,) -> latents (B, C, h, w) for Tokenizer.decode_code; at most num_iter
        transformer calls. Paper: num_iter 256 for FID (64: the demo), linear CFG, temperature 1.0
        (0.95 without CFG); cfg_schedule '' and num_sampling_steps 0 = the config's (paper: linear,
        100). All randomness comes from `generator`. trace: called after every transformer call
        with the canvas so far (trace_call)."""
        cfg_schedule = cfg_schedule or self.cfg.cfg_schedule
        if cfg_schedule not in ('linear', 'constant'):
            raise SystemExit(f'mar.py: cfg_schedule {cfg_schedule!r}: use linear or constant')
        B, L, device = len(labels), self.L, labels.device
        cfg = llamagen.guided(cfg_scale)
        reps = 2 if cfg else 1  # CFG: one doubled batch, conditional rows first
        tokens = torch.zeros(B, L, self.token_dim, device=device)
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        orders = torch.rand(B, L, generator=generator, device=device).argsort(dim=1)
        cls = self.class_emb(labels)
        if cfg:  # the unconditional rows get the null class
            cls = torch.cat([cls, self.fake_latent.expand(B, -1)])
        ugen = llamagen.trace_generator(trace, generator, device)
        self.nfe = 0
        n_masked = L
        with llamagen.eval_mode(self):
            for step in range(num_iter):
                last = step == num_iter - 1
                n_next = next_mask_len(step, num_iter, L, n_masked)
                if n_next == n_masked and not last:
                    # nothing to reveal (num_iter > L): the official code still runs the
                    # transformer and predicts no token; the output is the same
                    continue
                masks = mask.repeat(reps, 1)  # (reps B, L)
                z = self.decode(self.encode(tokens.repeat(reps, 1, 1), masks, cls), masks)
                self.nfe += 1
                # predict the tokens that stay masked no longer: order positions [n_next, n_masked)
                mask_next = torch.zeros_like(mask) if last else random_mask(orders, n_next)
                to_pred = mask & ~mask_next  # (B, L), the same count in every row
                s = cfg_scale
                if cfg_schedule == 'linear':  # ramps up with the tokens revealed
                    s = 1 + (cfg_scale - 1) * (L - n_next) / L
                z = z[to_pred.repeat(reps, 1)]  # (reps N, Cd): the rows of the tokens predicted
                report = None
                if trace is not None:
                    steps = []  # DiffLoss's x after each of its steps, (N, Ct) each
                    report = steps.append
                x = self.diffloss.sample(z, temperature, s, num_sampling_steps, generator, report)
                tokens[to_pred] = x.to(tokens.dtype)  # final: predicted tokens are never re-masked
                if trace is not None:
                    uncond = None
                    if cfg:  # the same tokens from the null-class rows alone, (N, Ct)
                        uncond = self.diffloss.sample(z[len(z) // 2:], temperature, 1.0,
                                                      num_sampling_steps, ugen)
                    self.trace_call(trace, tokens, ~mask_next, to_pred, uncond, steps)
                mask = mask_next
                n_masked = n_next
        return unpatchify(tokens, self.cfg.patch_size, self.cfg.vae_embed_dim)

    def trace_call(self, trace, tokens, filled, fresh, uncond, steps):
        """Report one transformer call of generate: trace(codes, filled, uncond, denoising), codes
        and uncond latents (B, C, h, w) as generate returns, zero where not generated yet, and
        denoising a list of them. tokens (B, L, Ct) after the call, filled (B, L) bool the tokens
        generated so far, fresh (B, L) those of this call; uncond (N, Ct) this call's tokens from
        the unconditional branch alone (None without CFG); steps: DiffLoss's x (N, Ct) after each
        of its steps, shown at the fresh positions."""
        def latents(x):  # tokens with the fresh ones replaced by x (N, Ct) -> (B, C, h, w)
            canvas = tokens.clone()
            canvas[fresh] = x.to(tokens.dtype)
            return unpatchify(canvas, self.cfg.patch_size, self.cfg.vae_embed_dim)
        if uncond is not None:
            uncond = latents(uncond)
        denoising = [latents(x) for x in steps]
        # a copy: unpatchify may return a view of tokens, which the next calls fill
        codes = unpatchify(tokens.clone(), self.cfg.patch_size, self.cfg.vae_embed_dim)
        trace(codes, filled, uncond, denoising)


# --- official checkpoints ----------------------------------------------------------------------
def load_official(model, path):
    """MAR: the EMA weights (model_ema) first, as the official demo, strictly. The KL-16 VAE
    (kl16.ckpt): its 'model', LDM names mapped by KLModel.official_key (the keys of its training
    losses dropped)."""
    return llamagen.load_official(model, path, wrappers=('model_ema', 'model', 'state_dict'))
