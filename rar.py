"""
RAR: "Randomized Autoregressive Visual Generation" (Yu et al., 2024), arXiv:2411.00776.
Official code: bytedance/1d-tokenizer (modeling/rar.py).

Idea: a plain causal transformer trained on image tokens in a random order, sampled in raster order.
For each training image, with probability r the tokens are fed in a uniformly random permutation,
otherwise in raster order; r is annealed from 1 to 0 during training, so the model first learns
bidirectional context (every token is predicted from every kind of subset of the others) and ends as
a standard raster-order model. Since a permuted prefix does not say which position comes next, every
input also gets a "target-aware" position embedding of the token it must predict. After training the
two position tables merge into one, and sampling is ordinary raster AR with a KV cache (no extra
cost), with a guidance scale that grows from 1 to g over the sequence (pow-cosine schedule).

Changes vs llamagen.py:
  - the official ViT/DiT-style network, so official checkpoints load strictly: LayerNorm (eps 1e-6),
    biases, QK-LayerNorm, exact-GELU MLP, learned absolute positions (no RoPE), and adaLN-Zero in
    every block plus before the head, conditioned per slot on class embedding +
    timesteps_embeddings[slot]; its own Config and Model (nn.Module), none of the core's modules
  - one embedding table: codes 0..V-1, an unused token V, classes at V+1.., the null class last
  - prefix [cls_token, class token] (cls_token_num 2); attention and its KV cache write: the core's
    attend()
  - forward: per-sample random permutation (tokens, labels, pos_embed, target_aware_pos_embed)
  - on_step: anneals r linearly from 1 to 0 between anneal_start and anneal_end (fractions of
    training)
  - generate: raster order with the core's kv_caches, cfg_batch, cfg_mix and sample_logits; the CFG
    scale of token t follows a pow-cosine schedule; plain temperature, no top-k / top-p
Train (classroom, built-in data, CPU): python train.py --method rar
Paper (RAR-B, 400 epochs): torchrun --nproc_per_node=8 train.py --method rar --model rar_b \
    --data-path /path/to/imagenet/train --image-size 256 --tokenizer vq_ds16_c2i.pt --epochs 400 \
    --global-batch-size 2048 --lr 4e-4 --weight-decay 0.03 --warmup-steps 62500 --lr-schedule cosine
Shapes: B batch, T sequence positions, C width, H heads, D head dim, h*w token grid, V codebook.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import llamagen
from llamagen import Tokenizer, TokenizerConfig  # noqa: F401 (re-exported: the method contract)
from llamagen import derive_config, load_official, param_groups  # noqa: F401
from vq import VQ_SIZES

# the official rar_*.bin were trained on MaskGIT's tokenizer: it comes first
TOKENIZER_SIZES = {k: VQ_SIZES[k] for k in ('MaskGIT-VQGAN', 'VQ-tiny')}

# official widths / depths (16 heads, head dim 48 / 64 / 80 / 88); params counted by the note
SIZES = {
    'rar_tiny': dict(n_layer=4, n_head=4, dim=128),  # CPU default for the built-in dataset
    'rar_b': dict(n_layer=24, n_head=16, dim=768, intermediate_size=3072),  # 261M
    'rar_l': dict(n_layer=24, n_head=16, dim=1024, intermediate_size=4096),  # 461M
    'rar_xl': dict(n_layer=32, n_head=16, dim=1280, intermediate_size=5120),  # 955M
    'rar_xxl': dict(n_layer=40, n_head=16, dim=1408, intermediate_size=6144),  # 1.5B (not 4 x 1408)
}

CLASSROOM = {}  # train.py's shared defaults suit RAR: nothing to change

# sample.py --official: the paper's FID settings per released model (README_RAR)
PAPER = {
    'rar_b': dict(cfg_scale=16.0, guidance_scale_pow=2.75, temperature=1.0),
    'rar_l': dict(cfg_scale=15.5, guidance_scale_pow=2.5, temperature=1.02),
    'rar_xl': dict(cfg_scale=6.9, guidance_scale_pow=1.5, temperature=1.02),
    'rar_xxl': dict(cfg_scale=8.0, guidance_scale_pow=1.2, temperature=1.02),
}


@dataclass
class Config:  # the fields of llamagen.Config that RAR uses, by the same names, and RAR's own
    dim: int = 128
    n_layer: int = 4
    n_head: int = 4
    intermediate_size: int = 0  # MLP hidden size; 0 = 4 * dim (paper: 4x, except XXL 6144)
    norm_eps: float = 1e-6  # every LayerNorm (official)
    initializer_range: float = 0.02  # truncated-normal std of every weight (official)
    attn_dropout_p: float = 0.1  # official 0.1, like the proj and MLP dropouts
    resid_dropout_p: float = 0.1  # after attention's proj
    ffn_dropout_p: float = 0.1  # inside and after the MLP
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label -> null class, for classifier-free guidance
    vocab_size: int = 16384  # tokenizer codebook size V (derived from the tokenizer)
    cls_token_num: int = 2  # prefix [cls_token, class token]
    block_size: int = 256  # image tokens h*w
    # r = 1 (random orders only) until anneal_start (a fraction of training; paper 200/400 epochs),
    # then linearly down to r = 0 (raster only) at anneal_end (paper 300/400 epochs)
    anneal_start: float = 0.5
    anneal_end: float = 0.75


def modulate(x, shift, scale):  # adaLN (DiT): scale and shift a normalised x per token
    return x * (1 + scale) + shift


def sample_orders(B, L, r, device):
    """(B, L) token orders: each row is a uniformly random permutation with probability r, else
    raster 0..L-1. There are no partial shuffles (official)."""
    perm = torch.rand(B, L, device=device).argsort(-1)
    raster = torch.arange(L, device=device).expand(B, L)
    return torch.where(torch.rand(B, 1, device=device) < r, perm, raster)


def random_ratio(step, start, end):
    """r at this optimizer step: 1 before start, a linear decay to 0 between start and end, then
    0."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return 1.0 - (step - start) / (end - start)


def guidance_scale(t, L, scale, pow):
    """CFG scale for image token t of L (pow-cosine, from MDT): 1 at t = 0, rising to about `scale`
    at the last token; pow shapes the rise (larger: later). pow = 0 gives a constant `scale`
    (0^0 = 1)."""
    return 1 + (scale - 1) * (1 - math.cos(math.pi * (t / L) ** pow)) / 2


class Attention(nn.Module):
    """Official names (qkv, q_norm, k_norm, proj) with biases and QK-LayerNorm per head, no RoPE.
    Attention itself and the KV cache write are the core's attend(); n_head, head_dim and kv_cache
    are what the core's kv_caches() needs to give this layer a cache."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.dim // cfg.n_head
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)  # rows: [q | k | v], heads contiguous
        self.q_norm = nn.LayerNorm(self.head_dim, eps=cfg.norm_eps)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.proj_drop = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache = None  # (k, v) each (B, H, S, D) inside kv_caches(); never in the state dict

    def forward(self, x, start=0, mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # (B, T, H, D)
        q, k = self.q_norm(q), self.k_norm(k)
        p = self.attn_dropout_p if self.training else 0.0
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        y = llamagen.attend(q, k, v, self.kv_cache, start, mask, p)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    """Pre-norm block with adaLN-Zero (DiT): the condition c of each slot gives a shift, scale and
    gate for each sublayer. The gates start at 0, so a fresh block is the identity."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = llamagen.Mlp(cfg.dim, cfg.intermediate_size or 4 * cfg.dim, cfg.ffn_dropout_p)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))

    def forward(self, x, c, start=0, mask=None):  # x, c (B, T, C) -> (B, T, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), start, mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class Model(nn.Module):
    """Sequence (T = L + 2 slots): [cls_token, class, z_0 .. z_{L-1}], z = the tokens in the
    sampled order. Slot j + 1 predicts z_j. Every slot's input is its embedding + pos_embed of its
    own position + target_aware_pos_embed of the position it predicts; its adaLN condition is the
    class embedding + timesteps_embeddings[slot] (the slot index plays the role of a diffusion
    timestep)."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.cls_token_num == 2, 'RAR has a 2-slot prefix: cls_token, class token'
        self.cfg = cfg
        L, C = cfg.block_size, cfg.dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))  # a learned start slot, zero at init
        # official table sizes: rows 0..L+1 are used, the others exist in the checkpoints
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1024, C))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, L + 1024, C))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, L + 100, C))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # rows: V codes, V (MaskGIT's mask token, unused), V+1+class, V+1+num_classes (null class)
        self.embeddings = nn.Embedding(cfg.vocab_size + 1 + cfg.num_classes + 1, C)
        # final layer: LayerNorm without affine, then adaLN with chunks (scale, shift): DiT reversed
        head_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.adaln_before_head = nn.ModuleDict({'adaLN_modulation': head_modulation})
        self.lm_head = nn.Linear(C, cfg.vocab_size)
        # official init: truncated normal, zero biases; LayerNorms stay (1, 0)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=cfg.initializer_range)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for p in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(p, std=cfg.initializer_range)
        for block in self.blocks:  # adaLN-Zero: every gate, shift and scale starts at 0
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        nn.init.zeros_(head_modulation[1].weight)
        nn.init.zeros_(head_modulation[1].bias)
        self.random_ratio = 0.0  # r, set by on_step; not in the state dict (official)
        self.nfe = 0  # forward calls of the last generate()
        self.compiled_decode = None  # compile_sampling(): torch.compile(self.decode)

    def class_embedding(self, labels):  # (B,) class ids, num_classes = null -> (B, 1, C)
        return self.embeddings(labels + self.cfg.vocab_size + 1)[:, None]

    def positions(self, orders):
        """orders (B, L) -> (B, L + 2, C) position terms of the slots: pos_embed of the slot's own
        token (rows 0, 1 for the prefix, 2 + position for image tokens) + target_aware_pos_embed of
        the token it predicts, i.e. the permuted ta rows shifted one slot left: the class slot gets
        ta[2 + orders[0]], slot k + 2 gets ta[2 + orders[k + 1]], and cls and the last slot (which
        predict nothing) get 0."""
        B = len(orders)
        pos = self.pos_embed[0]  # (L + 1024, C)
        ta = self.target_aware_pos_embed[0]
        zero = pos.new_zeros(B, 1, pos.shape[1])
        own = torch.cat([pos[:2].expand(B, 2, -1), pos[2 + orders]], dim=1)
        return own + torch.cat([zero, ta[2 + orders], zero], dim=1)

    def backbone(self, h, c, start=0, mask=None):
        """h (B, T, C) inputs, c (B, T, C) per-slot conditions -> (B, T, V) fp32 logits."""
        for block in self.blocks:
            h = block(h, c, start, mask)
        scale, shift = self.adaln_before_head['adaLN_modulation'](c).chunk(2, dim=-1)
        h = F.layer_norm(h, h.shape[-1:], eps=self.cfg.norm_eps)
        return self.lm_head(modulate(h, shift, scale)).float()

    def forward(self, tokens, labels, orders=None):
        """Teacher forcing in a random order. tokens (B, L) raster, labels (B,), orders (B, L)
        (default: sample_orders with r = self.random_ratio) -> logits (B, L, V) in that order, and
        the loss. The last token is not fed: it predicts nothing (the official code feeds it and
        drops its output)."""
        B, L = tokens.shape
        if self.training and self.cfg.class_dropout_prob > 0:  # label -> null class, for CFG
            drop = torch.rand(B, device=labels.device) < self.cfg.class_dropout_prob
            labels = torch.where(drop, self.cfg.num_classes, labels)
        if orders is None:
            orders = sample_orders(B, L, self.random_ratio, tokens.device)
        z = tokens.gather(1, orders)  # (B, L) the tokens, and so the targets, in the new order
        cond = self.class_embedding(labels)  # (B, 1, C)
        prefix = torch.cat([self.cls_token.expand(B, -1, -1), cond], dim=1)  # (B, 2, C)
        x = torch.cat([prefix, self.embeddings(z[:, :-1])], dim=1)  # (B, L + 1, C)
        x = x + self.positions(orders)[:, :L + 1]
        c = cond + self.timesteps_embeddings[:, :L + 1]  # (B, L + 1, C): by slot, never permuted
        logits = self.backbone(x, c)[:, 1:]  # the cls slot's output is dropped
        return logits, F.cross_entropy(logits.flatten(0, 1), z.flatten())

    def on_step(self, step, total_steps):  # anneal r; None keeps train.py's LR schedule
        start = round(self.cfg.anneal_start * total_steps)
        end = round(self.cfg.anneal_end * total_steps)
        self.random_ratio = random_ratio(step, start, end)
        return None

    # --- generation: raster order, KV cache, CFG by batch doubling -------------------------------
    def decode(self, x, start, mask, cond, table):
        """One cached forward call: x (B, T, C) embeddings entering raster slots start..start+T-1,
        mask the full (S, S) mask, cond (B, 1, C) class embeddings, table (1, L + 2, C) the slots'
        position terms in raster order (positions(), once per generate) -> (B, T, V) logits.
        start an int, or a 0-d long tensor when compiled (llamagen.query_rows)."""
        slots = start + torch.arange(x.shape[1], device=x.device)  # (T,)
        c = cond + self.timesteps_embeddings.index_select(1, slots)
        x = x + table.index_select(1, slots)
        return self.backbone(x, c, start, llamagen.query_rows(mask, start, x.shape[1]))

    def compile_sampling(self, mode=None, backend='inductor'):  # as the core's (decode_call)
        self.compiled_decode = torch.compile(self.decode, mode=mode, backend=backend,
                                             dynamic=False)

    @torch.inference_mode()
    def generate(self, labels, cfg_scale=16.0, temperature=1.0, guidance_scale_pow=2.75,
                 generator=None, trace=None):
        """labels (B,) -> tokens (B, h*w) in raster order with a KV cache: 1 + (L-1) forward calls.
        CFG (cfg_scale != 1) follows guidance_scale() with guidance_scale_pow (0: a constant
        cfg_scale). No top-k / top-p (paper). Defaults: RAR-B's (16, 2.75, 1.0); L, XL, XXL:
        (15.5, 2.5), (6.9, 1.5), (8.0, 1.2), each at temperature 1.02 (PAPER). trace: called after
        every forward call with the canvas so far (llamagen.trace_call)."""
        B, L = len(labels), self.cfg.block_size
        S = 2 + L  # [cls_token, class] + image tokens
        device = labels.device
        cfg = llamagen.guided(cfg_scale)
        rows = llamagen.cfg_batch(labels, self.cfg.num_classes) if cfg else labels  # (B or 2B,)
        mask = torch.ones(S, S, dtype=torch.bool, device=device).tril()
        tokens = torch.empty(B, L, dtype=torch.long, device=device)
        ugen = llamagen.trace_generator(trace, generator, device)
        self.nfe = 0
        dtype = self.embeddings.weight.dtype
        with llamagen.eval_mode(self), llamagen.kv_caches(self, len(rows), S, dtype, device):
            cond = self.class_embedding(rows)  # (B or 2B, 1, C): the class slot and every adaLN
            prefix = torch.cat([self.cls_token.expand(len(rows), -1, -1), cond], dim=1)
            # in raster order the two position tables merge into one: pos[j] + ta[j + 1], slot j
            table = self.positions(torch.arange(L, device=device)[None])  # (1, L + 2, C)
            logits = llamagen.decode_call(self, prefix, 0, mask, cond, table)[:, -1]  # (B or 2B, V)
            for t in range(L):
                mixed = logits
                if cfg:
                    scale = guidance_scale(t, L, cfg_scale, guidance_scale_pow)
                    mixed = llamagen.cfg_mix(logits, scale)
                ids = llamagen.sample_logits(mixed, temperature, generator=generator)  # (B, 1)
                tokens[:, t] = ids[:, 0]
                if trace is not None:
                    pos = torch.arange(L, device=device).expand(B, L)
                    uncond = None
                    if cfg:  # the null-class rows alone: (B, 1), read at position t
                        uncond = llamagen.sample_logits(logits[B:], temperature, generator=ugen)
                    llamagen.trace_call(trace, tokens, pos <= t, pos == t, uncond)
                if t < L - 1:  # both CFG halves get the same token
                    x = self.embeddings(tokens[:, t:t + 1].repeat(len(rows) // B, 1))
                    logits = llamagen.decode_call(self, x, 2 + t, mask, cond, table)[:, -1]
        return tokens
