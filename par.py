"""
PAR: "Parallelized Autoregressive Visual Generation" (Wang et al., 2024), arXiv:2412.15119.
Official code: YuqingWang1029/PAR.

Neighbouring tokens depend strongly on each other, distant ones weakly. PAR cuts the h x w token
grid into n regions (n = 4: a 2x2 arrangement, n = 16: 4x4) and reorders the sequence so that group
m holds the token at relative position m (raster inside a region) of every region. The n tokens of
the first group are generated one at a time and fix the global layout; every later group is sampled
in one forward call, its n tokens independently, because they are far apart in the image. n-1
learned transition tokens bridge the switch from one token per step to n per step, and a group-wise
attention mask lets the n inputs fed together see each other. Steps: n + (L-n)/n, e.g. 147 instead
of 576 for 24x24 tokens at n = 4 (51 at n = 16), with the same network and parameters as LlamaGen.

Changes vs llamagen.py:
  - to_par / to_raster: the region reordering and its inverse (view + permute, no loops)
  - spe_tok_embeddings: n-1 transition tokens, inserted once, right after the n initial tokens
  - rope_table: every image token keeps the RoPE of its original (row, col); zero rows for the
    transition tokens (as for the class token)
  - attn_mask: causal over the first n positions, then full inside each block of n, causal across
  - forward: teacher forcing in PAR order; generate: n single steps, then one group per step
Train (classroom, built-in data, CPU): python train.py --method par
Paper (GPT-XL, 24x24 tokens, n = 4): torchrun --nproc_per_node=8 train.py --method par \
    --model GPT-XL --data-path /path/to/imagenet/train --image-size 384 --tokenizer vq_ds16_c2i.pt \
    --epochs 300 --global-batch-size 256 --lr 1e-4 --warmup-steps 0 --ar-token-num 4 \
    --spe-token-num 3
Shapes: B batch, T sequence positions, C width, H heads, D head dim, h*w token grid, V codebook.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import llamagen
# the method contract, as LlamaGen's: the same tokenizer, Config fields, AdamW groups and loader
from llamagen import TOKENIZER_SIZES, Tokenizer, TokenizerConfig  # noqa: F401 (re-exported)
from llamagen import derive_config, load_official, param_groups  # noqa: F401 (re-exported)

# the LlamaGen sizes at n = 4 (paper: GPT-L, XL, XXL, 3B), and n = 16: XXL in the paper only,
# 3B released as PAR-3B-16x.pt
SIZES = {
    **llamagen.SIZES,
    'GPT-XXL-16x': dict(n_layer=48, n_head=24, dim=1536, ar_token_num=16, spe_token_num=15),
    'GPT-3B-16x': dict(n_layer=24, n_head=32, dim=3200, ar_token_num=16, spe_token_num=15),
}

CLASSROOM = {}  # train.py's shared defaults suit PAR: nothing to change

# sample.py --official: the paper's FID settings per released model (all at 384 px)
PAPER = {
    'GPT-L': dict(cfg_scale=1.6, image_size=384),
    'GPT-XL': dict(cfg_scale=1.5, image_size=384),
    'GPT-XXL': dict(cfg_scale=1.435, image_size=384),
    'GPT-3B': dict(cfg_scale=1.345, image_size=384),
    'GPT-3B-16x': dict(cfg_scale=1.5, image_size=384),
}


@dataclass
class Config(llamagen.Config):
    spe_token_num: int = 3  # n-1 learned transition tokens (paper: 3 for 4x, 15 for 16x)
    ar_token_num: int = 4  # n regions = tokens per parallel step, a square (paper: 4 or 16)
    group_mask: bool = True  # full attention inside a group (paper); False: plain causal (Table 4c)


def to_par(x, n):
    """(B, h*w, ...) raster order -> PAR order. With s = sqrt(n) regions per side of r = h/s
    tokens, region (a, b) and relative position (i, j): raster (a*r+i)*h + b*r+j goes to
    ((i*r+j)*s+a)*s+b."""
    B, L, rest = x.shape[0], x.shape[1], x.shape[2:]
    s = math.isqrt(n)
    r = math.isqrt(L) // s
    x = x.reshape(B, s, r, s, r, *rest)  # axes (a, i, b, j)
    return x.permute(0, 2, 4, 1, 3, *range(5, x.dim())).reshape(B, L, *rest)  # (i, j, a, b)


def to_raster(x, n):
    """(B, h*w, ...) PAR order -> raster order, the inverse of to_par."""
    B, L, rest = x.shape[0], x.shape[1], x.shape[2:]
    s = math.isqrt(n)
    r = math.isqrt(L) // s
    x = x.reshape(B, r, r, s, s, *rest)  # axes (i, j, a, b)
    return x.permute(0, 3, 1, 4, 2, *range(5, x.dim())).reshape(B, L, *rest)  # (a, i, b, j)


class Model(llamagen.Model):
    """Sequence (PAR order, L positions):
        [cls, t_0 .. t_{n-1}, spe_1 .. spe_{n-1}, t_n .. t_{L-n-1}].
    The output at position p predicts t_p: positions < n are next-token prediction, t_{n-1} and the
    transition tokens predict group 1, and from position 2n on t_{p-n} predicts t_p, the next
    relative position in the same region."""

    def __init__(self, cfg):
        n, s = cfg.ar_token_num, math.isqrt(cfg.ar_token_num)
        assert s * s == n, f'ar_token_num {n} must be a square'
        assert cfg.spe_token_num == n - 1, f'spe_token_num must be ar_token_num - 1 = {n - 1}'
        grid = math.isqrt(cfg.block_size)
        assert grid % s == 0, f'a {cfg.block_size}-token grid does not split into {n} regions'
        super().__init__(cfg)
        # official key: spe_tok_embeddings.special_embeddings.weight, (n-1, C)
        spe = nn.Embedding(cfg.spe_token_num, cfg.dim)
        self.spe_tok_embeddings = nn.ModuleDict({'special_embeddings': spe})
        self._init_weights(spe)

    def rope_table(self):
        """(cls + L + n-1, D/2, 2): the core's table with the image rows in PAR order (each input
        turns by its own original (row, col)), and zero rows for the n-1 transition tokens after the
        first n tokens: cos = sin = 0 makes their q and k zero vectors, like the class token's
        (official)."""
        P, n = self.cfg.cls_token_num, self.cfg.ar_token_num
        table = super().rope_table()
        img = to_par(table[None, P:], n)[0]  # (L, D/2, 2)
        return torch.cat([table[:P], img[:n], torch.zeros(n - 1, *img.shape[1:]), img[n:]])

    def attn_mask(self, S, device):
        """(S, S) bool, True = may attend. Position p sees every position up to the last one of its
        block: p itself for p < n (causal), else the end of its block of n (full inside a group)."""
        n = self.cfg.ar_token_num
        p = torch.arange(S, device=device)
        last = p  # the ablation: plain causal
        if self.cfg.group_mask:
            last = torch.where(p < n, p, p + n - 1 - (p - n) % n)
        return p[None, :] <= last[:, None]

    def spe(self, batch):  # (batch, n-1, C) transition token embeddings
        return self.spe_tok_embeddings['special_embeddings'].weight[None].expand(batch, -1, -1)

    def forward(self, tokens, labels):
        """Teacher forcing. tokens (B, L) raster order, labels (B,) -> logits (B, L, V) in PAR
        order, loss. The official code feeds L+n-1 positions and keeps the first L logits; the last
        n-1 inputs only predict past the end, so feeding exactly L positions gives the same
        logits."""
        n = self.cfg.ar_token_num
        z = to_par(tokens, n)  # (B, L)
        L = z.shape[1]
        x = torch.cat([self.cls_embedding(labels), self.tok_embeddings(z[:, :n]), self.spe(len(z)),
                       self.tok_embeddings(z[:, n:L - n])], dim=1)  # (B, L, C)
        mask = self.attn_mask(L, x.device)
        logits = self.backbone(self.tok_dropout(x), self.rope(x.device)[:L], 0, mask)
        return logits, F.cross_entropy(logits.flatten(0, 1), z.flatten())

    # --- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, labels, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None,
                 trace=None):
        """labels (B,) -> tokens (B, h*w) in raster order, with a KV cache. The n initial tokens one
        at a time, then one group of n per call: 1 + (n-1) + (L-n)/n forward calls. CFG on every
        step; the n tokens of a group are sampled independently (one row each). trace: called
        after every forward call with the canvas so far (llamagen.trace_call)."""
        B, L, n = len(labels), self.cfg.block_size, self.cfg.ar_token_num
        device = labels.device
        cfg = llamagen.guided(cfg_scale)
        cond = llamagen.cfg_batch(labels, self.cfg.num_classes) if cfg else labels  # (B or 2B,)
        mask = self.attn_mask(L, device)  # the last group is never fed back: L positions
        seq = torch.empty(B, L, dtype=torch.long, device=device)  # PAR order
        ugen = llamagen.trace_generator(trace, generator, device)
        self.nfe = 0
        dtype = self.tok_embeddings.weight.dtype
        with llamagen.eval_mode(self), llamagen.kv_caches(self, len(cond), L, dtype, device):
            x = self.cls_embedding(cond)  # the input at positions start .. start+T-1
            start = 0
            while True:
                # (B or 2B, T, V): t_start .. t_{start+T-1}
                logits = llamagen.decode_call(self, x, start, mask)
                T = logits.shape[1]
                mixed = llamagen.cfg_mix(logits, cfg_scale) if cfg else logits  # (B, T, V)
                ids = llamagen.sample_logits(mixed.flatten(0, 1), temperature, top_k, top_p,
                                             generator)  # (B*T, 1): a group's tokens independently
                seq[:, start:start + T] = ids.view(B, T)
                if trace is not None:
                    uncond = None
                    if cfg:  # the null-class rows alone: (B*T, 1), this group's tokens
                        uncond = llamagen.sample_logits(logits[B:].flatten(0, 1), temperature,
                                                        top_k, top_p, ugen)
                    self.trace_group(trace, seq, start, T, uncond)
                start += T
                if start == L:
                    break
                # the tokens just sampled go to both CFG halves
                x = self.tok_embeddings(seq[:, start - T:start].repeat(len(cond) // B, 1))
                if start == n:  # after the n initial tokens: [t_{n-1}, spe_1 .. spe_{n-1}]
                    x = torch.cat([x, self.spe(len(cond))], dim=1)
        return to_raster(seq, n)

    def trace_group(self, trace, seq, start, T, uncond):
        """Report the call that sampled PAR positions start..start+T-1 of seq (B, L), with uncond
        (B*T, 1) its tokens from the unconditional branch alone (None without CFG), in raster order
        (llamagen.trace_call)."""
        B, L, n = len(seq), self.cfg.block_size, self.cfg.ar_token_num
        p = torch.arange(L, device=seq.device).expand(B, L)  # PAR-order positions
        filled = p < start + T
        fresh = filled & (p >= start)
        if uncond is not None:  # (B, L), the group's tokens at start..start+T-1
            uncond = to_raster(F.pad(uncond.view(B, T), (start, L - start - T)), n)
        llamagen.trace_call(trace, to_raster(seq, n), to_raster(filled, n), to_raster(fresh, n),
                            uncond)
