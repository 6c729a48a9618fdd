"""
LlamaGen: "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation"
(Sun et al., 2024), arXiv:2406.06525. Official code: FoundationVision/LlamaGen.

The GPT core that every token-based method here subclasses, and LlamaGen class-to-image generation
with it. A LLaMA decoder (RMSNorm, SwiGLU, 2-D RoPE, no biases) predicts the VQ tokens of an image
one at a time in raster order. The class embedding is a one-token prefix. For classifier-free
guidance the class is replaced by a learned null class 10% of the time in training; at sampling a
conditional and an unconditional sequence run side by side in one doubled batch.

Hooks for the methods (override the smallest one and call super() where it helps):
  rope_table()          (prefix + T, D/2, 2) RoPE table in the method's sequence order
  attn_mask(S, device)  (S, S) bool mask in the method's order; None = plain causal (SDPA is_causal)
  forward / generate    built from embed pieces, backbone(), decode() and sample_logits()
  guidance(t, scale)    the CFG scale of image token t (constant; RAR: a schedule)
Train: torchrun --nproc_per_node=8 train.py --method llamagen --model GPT-B --data-path ...
Shapes: B batch, T sequence positions, C width, H heads, D head dim, h*w token grid, V codebook size.
"""
import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vq import VQConfig as TokenizerConfig, VQModel as Tokenizer  # noqa: F401 (the method contract)

SIZES = {  # official depth / heads / width; head dim 64 (GPT-3B: 100)
    'GPT-tiny': dict(n_layer=4, n_head=4, dim=128),  # CPU default for the built-in dataset
    'GPT-B': dict(n_layer=12, n_head=12, dim=768),  # 111M
    'GPT-L': dict(n_layer=24, n_head=16, dim=1024),  # 343M
    'GPT-XL': dict(n_layer=36, n_head=20, dim=1280),  # 775M
    'GPT-XXL': dict(n_layer=48, n_head=24, dim=1536),  # 1.4B
    'GPT-3B': dict(n_layer=24, n_head=32, dim=3200),  # 3.1B
}


@dataclass
class Config:
    dim: int = 128
    n_layer: int = 4
    n_head: int = 4
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1  # on the input sequence (class prefix included)
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1  # after attention's wo
    ffn_dropout_p: float = 0.1  # after the FFN's w2
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label -> null class, for classifier-free guidance
    vocab_size: int = 16384  # tokenizer codebook size V
    cls_token_num: int = 1  # class prefix length (1 for class-to-image)
    block_size: int = 256  # image tokens h*w; the grid is square


def find_multiple(n, k):
    return n if n % k == 0 else n + k - n % k


def rope_2d(pos, head_dim, base):
    """pos (T, 2) integer (row, col) -> (T, D/2, 2) [cos, sin]. The first D/4 rotary pairs turn by
    the row, the last D/4 by the column (official layout)."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].float() / half)  # (D/4,)
    angles = torch.cat([pos[:, :1] * freqs, pos[:, 1:] * freqs], dim=-1)  # (T, D/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def grid_positions(g):
    """(g*g, 2) (row, col) of a g x g grid in raster order."""
    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing='ij')
    return torch.stack([r.flatten(), c.flatten()], dim=1)


def apply_rope(x, freqs):
    """x (B, T, H, D), freqs (T, D/2, 2): rotate interleaved pairs (x[2i], x[2i+1]) in fp32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    cos, sin = freqs[None, :, None, :, 0], freqs[None, :, None, :, 1]  # (1, T, 1, D/2)
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], -1)
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32, cast back, then scale (official order)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):  # SwiGLU: w2(silu(w1 x) * w3 x)
    def __init__(self, cfg):
        super().__init__()
        hidden = find_multiple(int(2 * 4 * cfg.dim / 3), cfg.multiple_of)  # 2048 for GPT-B
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # rows: [q | k | v]
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache = None  # (k, v) each (B, H, S, D) while generating; never in the state dict

    def forward(self, x, freqs, start=0, mask=None):
        B, T, C = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # (B, T, H, D)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        y = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), start, mask)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, C)))

    def attend(self, q, k, v, start, mask):
        """q, k, v (B, H, T, D) -> (B, H, T, D). With a cache, the new keys/values are written at
        positions start..start+T-1 and the queries see the first start+T cached ones through mask
        (T, start+T). Without a cache and mask, plain causal attention."""
        if self.kv_cache is not None:
            end = start + q.shape[2]
            self.kv_cache[0][:, :, start:end] = k
            self.kv_cache[1][:, :, start:end] = v
            k, v = self.kv_cache[0][:, :, :end], self.kv_cache[1][:, :, :end]
        p = self.attn_dropout_p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)


class TransformerBlock(nn.Module):  # pre-norm: x + attn(norm(x)), then h + ffn(norm(h))
    def __init__(self, cfg):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, freqs, start=0, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs, start, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)  # last row: null class
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels):  # (B,) -> (B, 1, C)
        if self.training and self.dropout_prob > 0:  # drop labels to the null class, for CFG
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)[:, None]


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> (B, 1) sampled ids. Official order: temperature, top-k, top-p, softmax."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float('inf'))
    if top_p < 1.0:  # drop the tail once the sorted mass passes top_p, keeping the first token above it
        sorted_logits, idx = torch.sort(logits, descending=True)
        remove = sorted_logits.softmax(-1).cumsum(-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), -float('inf'))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def cfg_mix(logits, scale):
    """(2B, ...) with conditional rows first -> (B, ...): CFG on raw logits, before temperature."""
    cond, uncond = logits.chunk(2)
    return uncond + (cond - uncond) * scale


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.grid = math.isqrt(cfg.block_size)  # h = w
        assert self.grid ** 2 == cfg.block_size, f'block_size {cfg.block_size} is not a square grid'
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # not tied to tok_embeddings
        self.freqs_cis = self.rope_table()  # a plain attribute, not a buffer: official state dicts have no RoPE table
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)  # official init: logits start uniform
        self.nfe = 0  # forward calls of the last generate()

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.initializer_range)

    def rope_table(self):
        """(cls + h*w, D/2, 2): zero rows for the class prefix (official quirk: cos = sin = 0 turns
        the prefix's q and k into zero vectors, so its attention logit is 0 for every query), then
        the 2-D grid in raster order."""
        hd = self.cfg.dim // self.cfg.n_head
        zeros = torch.zeros(self.cfg.cls_token_num, hd // 2, 2)
        return torch.cat([zeros, rope_2d(grid_positions(self.grid), hd, self.cfg.rope_base)])

    def attn_mask(self, S, device):
        return None  # plain causal

    def rope(self, device):  # the table follows the model's device lazily, since it is not a buffer
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    def backbone(self, h, freqs, start=0, mask=None):
        """h (B, T, C) input embeddings -> (B, T, V) fp32 logits."""
        for layer in self.layers:
            h = layer(h, freqs, start, mask)
        return self.output(self.norm(h)).float()

    def forward(self, tokens, labels):
        """Teacher forcing. tokens (B, L) raster order, labels (B,) -> logits (B, L, V), loss.
        Position j sees the class and tokens < j and predicts token j."""
        x = torch.cat([self.cls_embedding(labels), self.tok_embeddings(tokens[:, :-1])], dim=1)  # (B, L, C)
        logits = self.backbone(self.tok_dropout(x), self.rope(x.device)[: x.shape[1]])
        return logits, F.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    def on_step(self, step, total_steps):  # training schedules (NPP stages, RAR annealing): called before
        return None  # each step; a float return sets that step's LR to --lr times it. Nothing in LlamaGen.

    # --- generation -----------------------------------------------------------------------------
    def setup_cache(self, batch, S, dtype, device):  # preallocated once per generate
        shape = (batch, self.cfg.n_head, S, self.cfg.dim // self.cfg.n_head)
        for attn in (m for m in self.modules() if isinstance(m, Attention)):  # any block layout (RAR's too)
            attn.kv_cache = (torch.zeros(shape, dtype=dtype, device=device),
                             torch.zeros(shape, dtype=dtype, device=device))

    def clear_cache(self):
        for attn in (m for m in self.modules() if isinstance(m, Attention)):
            attn.kv_cache = None

    def decode(self, x, start, mask):
        """One cached forward call: x (B, T, C) enters at positions start..start+T-1 of the
        method's sequence; mask is the full (S, S) mask. -> (B, T, V) logits."""
        self.nfe += 1
        end = start + x.shape[1]
        return self.backbone(x, self.rope(x.device)[start:end], start, mask[start:end, :end])

    def guidance(self, t, cfg_scale):  # the CFG scale for image token t: constant here, a schedule in RAR
        return cfg_scale

    def cfg_labels(self, labels, cfg_scale):  # conditional first, then the null class
        if cfg_scale > 1.0:
            return torch.cat([labels, torch.full_like(labels, self.cfg.num_classes)])
        return labels

    @torch.inference_mode()
    def generate(self, labels, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, cfg_interval=-1,
                 generator=None):
        """labels (B,) -> tokens (B, h*w) in raster order, with a KV cache: 1 + (L-1) forward calls.
        cfg_interval > -1: guidance only for the first cfg_interval + 2 tokens (official meaning)."""
        training, (B, L, P) = self.training, (len(labels), self.cfg.block_size, self.cfg.cls_token_num)
        self.eval()
        cond = self.cfg_labels(labels, cfg_scale)
        S, device = P + L, labels.device
        mask = self.attn_mask(S, device)
        mask = torch.ones(S, S, dtype=torch.bool, device=device).tril() if mask is None else mask
        self.setup_cache(len(cond), S, self.tok_embeddings.weight.dtype, device)
        self.nfe, tokens = 0, torch.empty(B, L, dtype=torch.long, device=device)
        try:
            logits = self.decode(self.cls_embedding(cond), 0, mask)[:, -1]  # (B or 2B, V)
            for t in range(L):
                if cfg_scale > 1.0:
                    use = cfg_interval < 0 or t <= cfg_interval + 1
                    logits = cfg_mix(logits, self.guidance(t, cfg_scale)) if use else logits[:B]
                tokens[:, t] = sample_logits(logits, temperature, top_k, top_p, generator)[:, 0]
                if t < L - 1:  # both CFG halves get the same token
                    x = self.tok_embeddings(tokens[:, t:t + 1].repeat(len(cond) // B, 1))
                    logits = self.decode(x, P + t, mask)[:, -1]
        finally:
            self.clear_cache()
            self.train(training)
        return tokens


# --- official checkpoints -------------------------------------------------------------------------
def load_official(model, path, wrappers=('model', 'module', 'state_dict', 'ema', 'model_ema')):
    """Load an official checkpoint strictly, its state dict found under the first of `wrappers` present (or
    bare). Official files pickle an argparse.Namespace: weights_only=True with that one class allow-listed."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # an UnpicklingError names the refused global
        raise SystemExit(f'{path}: refusing to load (weights_only=True): {str(e).splitlines()[0]}')
    sd = next((ckpt[k] for k in wrappers if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict)), ckpt)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):  # weights_only lets lists through
        raise SystemExit(f'{path}: no state dict found (a {type(sd).__name__}, not a dict of tensors)')
    key = getattr(model, 'official_key', lambda k: k)  # official names -> ours, None: not kept (vq.py tokenizers)
    sd = {key(k.removeprefix('module.').removeprefix('_orig_mod.').removeprefix('module.')): v for k, v in sd.items()
          if not k.endswith('freqs_cis') and 'kv_cache' not in k}  # runtime-only keys dropped
    sd.pop(None, None)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [k for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or unexpected or wrong:
        raise SystemExit(f'{path}: not a checkpoint of this model/size: {len(missing)} missing '
                         f'{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, '
                         f'{len(wrong)} of another shape {[(k, tuple(sd[k].shape)) for k in wrong[:2]]}')
    model.load_state_dict(sd, strict=True)
    return model
