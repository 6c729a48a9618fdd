"""
LlamaGen: "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation"
(Sun et al., 2024), arXiv:2406.06525. Official code: FoundationVision/LlamaGen.

The GPT core that the token-based methods build on, and LlamaGen class-to-image generation with it.
A LLaMA decoder (RMSNorm, SwiGLU, 2-D RoPE, no biases) predicts the VQ tokens of an image one at a
time in raster order. The class embedding is a one-token prefix. For classifier-free guidance the
class is replaced by a learned null class 10% of the time in training; at sampling a conditional and
an unconditional sequence run side by side in one doubled batch.

The method contract. Every method module (llamagen, npp, par, rar, iar2, mar) exports the same
names, so train.py and sample.py never name a method:
  Config, Model, TokenizerConfig, Tokenizer    the generator and its tokenizer
  SIZES, TOKENIZER_SIZES                       named config overrides; a CPU size ends in 'tiny'
  CLASSROOM                                    train.py defaults per stage for the built-in data
  PAPER                                        each released model's sampling settings (--official)
  derive_config(tok, image_size, num_classes)  the Config fields that the tokenizer and data fix
  param_groups(model, weight_decay)            AdamW groups
  load_official(model, path)                   an official checkpoint, strictly
and every tokenizer and generator works the same way:
  codes = tok.encode(img)             img (B, 3, H, W) in [-1, 1] -> what is cached
  x = tok.training_input(codes)       what the generator trains on (MAR: a posterior sample)
  out, loss = model(x, labels)        out: the method's predictions; loss: a scalar
  lr_scale = model.on_step(step, total_steps)   a float sets the step's LR to --lr times it
  codes = model.generate(labels, generator=g, **knobs)   one tensor; model.nfe counts forward calls
  generate(..., trace=f)              f(codes, filled, uncond, denoising) after each of the nfe
                                      calls: the canvas so far (trace_call)
  img = tok.decode_code(codes)
Tokenizer training adds tok(img) -> (reconstruction, losses), tok.on_step, tok.calibrate(img) once
at the end, and tok.metrics() for the log.

Hooks of the core Model (overridden by the methods that change them):
  rope_table()          (prefix + T, D/2, 2) RoPE table in the method's sequence order
  attn_mask(S, device)  (S, S) bool mask in the method's order; None = plain causal (SDPA is_causal)
  backbone / decode     the layers over embeddings; one cached forward call of generate (through
                        decode_call; compile_sampling compiles it)
Train: torchrun --nproc_per_node=8 train.py --method llamagen --model GPT-B --data-path ...
Shapes: B batch, T sequence positions, C width, H heads, D head dim, h*w token grid, V codebook.
"""
import argparse
import errno
import functools
import hashlib
import http.client
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from vq import VQ_SIZES as TOKENIZER_SIZES  # noqa: F401 (re-exported: the method contract)
from vq import VQConfig as TokenizerConfig  # noqa: F401
from vq import VQModel as Tokenizer  # noqa: F401

SIZES = {  # official depth / heads / width; head dim 64 (GPT-3B: 100)
    'GPT-tiny': dict(n_layer=4, n_head=4, dim=128),  # CPU default for the built-in dataset
    'GPT-B': dict(n_layer=12, n_head=12, dim=768),  # 111M
    'GPT-L': dict(n_layer=24, n_head=16, dim=1024),  # 343M
    'GPT-XL': dict(n_layer=36, n_head=20, dim=1280),  # 775M
    'GPT-XXL': dict(n_layer=48, n_head=24, dim=1536),  # 1.4B
    'GPT-3B': dict(n_layer=24, n_head=32, dim=3200),  # 3.1B
}

CLASSROOM = {}  # train.py's shared defaults suit LlamaGen: nothing to change

# sample.py --official: the paper's FID settings per released model (XL and larger: 384 px)
PAPER = {
    'GPT-B': dict(cfg_scale=2.0),
    'GPT-L': dict(cfg_scale=2.0),
    'GPT-XL': dict(cfg_scale=1.75, image_size=384),
    'GPT-XXL': dict(cfg_scale=1.75, image_size=384),
    'GPT-3B': dict(cfg_scale=1.65, image_size=384),
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


def derive_config(tok, image_size, num_classes):
    """The Config fields that the tokenizer and the data fix, by the official names."""
    return dict(vocab_size=tok.cfg.codebook_size, block_size=(image_size // tok.stride) ** 2,
                num_classes=num_classes)


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices and embeddings (>= 2-D), none on norms and biases."""
    params = list(model.parameters())
    return [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]


# --- building blocks ---------------------------------------------------------------------------
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
    real = xs[..., 0] * cos - xs[..., 1] * sin
    imag = xs[..., 1] * cos + xs[..., 0] * sin
    return torch.stack([real, imag], -1).flatten(3).type_as(x)


def attend(q, k, v, cache=None, start=0, mask=None, dropout_p=0.0):
    """q, k, v (B, H, T, D) -> (B, H, T, D). With a cache (k, v each (B, H, S, D)) the new keys and
    values are written at positions start..start+T-1 and the queries see the cache through mask
    rows (query_rows): an int start (eager) the first start+T positions, a 0-d long tensor start
    (compiled sampling) all S, the unwritten ones masked. Without a cache and mask: plain causal
    attention."""
    if cache is not None and torch.is_tensor(start):
        pos = start + torch.arange(q.shape[2], device=q.device)  # (T,) cache positions
        cache[0].index_copy_(2, pos, k)
        cache[1].index_copy_(2, pos, v)
        k, v = cache
    elif cache is not None:
        end = start + q.shape[2]
        cache[0][:, :, start:end] = k
        cache[1][:, :, start:end] = v
        k, v = cache[0][:, :, :end], cache[1][:, :, :end]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=mask is None)


def query_rows(mask, start, T):
    """The rows of the full (S, S) mask for queries at positions start..start+T-1: (T, start+T)
    for an int start, the cache sliced to the positions written (eager); (T, S) for a 0-d tensor
    start, the whole cache, whose unwritten positions weigh exactly 0 after the softmax, so that
    every step has the same shapes (compiled sampling)."""
    if torch.is_tensor(start):
        return mask.index_select(0, start + torch.arange(T, device=mask.device))
    return mask[start:start + T, :start + T]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32, cast back, then scale (official order)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


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
        self.n_head = cfg.n_head
        self.head_dim = cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # rows: [q | k | v]
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache = None  # (k, v) each (B, H, S, D) inside kv_caches(); never in the state dict

    def forward(self, x, freqs, start=0, mask=None):
        B, T, C = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # (B, T, H, D)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        p = self.attn_dropout_p if self.training else 0.0
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        y = attend(q, k, v, self.kv_cache, start, mask, p)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, C)))


class Mlp(nn.Module):
    """timm's MLP of a ViT block: fc1, exact GELU, dropout, fc2, dropout. Not LlamaGen's (SwiGLU):
    RAR's and MAR's official networks use it."""

    def __init__(self, dim, hidden, drop):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


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
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)  # last: null
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels):  # (B,) -> (B, 1, C)
        if self.training and self.dropout_prob > 0:  # drop labels to the null class, for CFG
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)[:, None]


# --- sampling pieces, shared by every method ---------------------------------------------------
def guided(*scales):
    """Whether classifier-free guidance runs: any scale but 1 (1 is the conditional alone)."""
    return any(s != 1.0 for s in scales)


def cfg_batch(labels, num_classes):
    """(B,) -> (2B,): the labels, then the null class (num_classes), for one doubled CFG batch."""
    return torch.cat([labels, torch.full_like(labels, num_classes)])


def cfg_mix(logits, scale):
    """(2B, ...) with conditional rows first -> (B, ...): CFG on raw logits, before temperature."""
    cond, uncond = logits.chunk(2)
    return uncond + (cond - uncond) * scale


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> (B, 1) sampled ids. Official order: temperature, top-k, top-p, softmax."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float('inf'))
    if top_p < 1.0:  # drop the tail past a sorted mass of top_p, keeping the token that crosses it
        sorted_logits, idx = torch.sort(logits, descending=True)
        remove = sorted_logits.softmax(-1).cumsum(-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), -float('inf'))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@contextmanager
def kv_caches(module, batch, length, dtype, device):
    """Preallocate the (k, v) cache, (batch, H, length, D) each, of every attention layer inside
    module (anything with a kv_cache attribute); removed on exit, so training never sees one."""
    layers = [m for m in module.modules() if hasattr(m, 'kv_cache')]
    for attn in layers:
        shape = (batch, attn.n_head, length, attn.head_dim)
        attn.kv_cache = (torch.zeros(shape, dtype=dtype, device=device),
                         torch.zeros(shape, dtype=dtype, device=device))
        # static addresses for torch.compile (nothing eagerly): CUDA graphs keep the in-place
        # writes rather than skip the graph for mutated inputs; guard=False: new caches do not
        # recompile
        for t in attn.kv_cache:
            torch._dynamo.mark_static_address(t, guard=False)
    try:
        yield
    finally:
        for attn in layers:
            attn.kv_cache = None


@functools.lru_cache
def positions(device):
    """arange(65536) on device, made once: positions(device)[start] is a 0-d tensor on the device
    without a copy from the host (on CUDA a stream sync per forward call)."""
    return torch.arange(65536, device=device)


def decode_call(model, x, start, *args):
    """One cached forward call of generate: model.decode(x, start, *args), counted in model.nfe.
    Compiled (model.compile_sampling set model.compiled_decode), start goes as a 0-d tensor, so
    one graph serves every position of a shape, and the output is copied: a CUDA graph's next
    replay overwrites it."""
    model.nfe += 1
    if model.compiled_decode is None:
        return model.decode(x, start, *args)
    out = model.compiled_decode(x, positions(x.device)[start], *args)
    if torch.is_tensor(out):
        return out.clone()
    return tuple(t.clone() for t in out)


@contextmanager
def eval_mode(model):
    """model.eval() for the duration of a generate call, then the mode it had."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


# --- the model ---------------------------------------------------------------------------------
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
        # a plain attribute, not a buffer: official state dicts have no RoPE table
        self.freqs_cis = self.rope_table()
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)  # official init: logits start uniform
        self.nfe = 0  # forward calls of the last generate()
        self.compiled_decode = None  # compile_sampling(): torch.compile(self.decode)

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
        x = torch.cat([self.cls_embedding(labels), self.tok_embeddings(tokens[:, :-1])], dim=1)
        logits = self.backbone(self.tok_dropout(x), self.rope(x.device)[: x.shape[1]])  # (B, L, V)
        return logits, F.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    def on_step(self, step, total_steps):
        """Called before each training step (NPP stages, RAR annealing); a float return sets that
        step's LR to --lr times it. Nothing in LlamaGen."""
        return None

    # --- generation ----------------------------------------------------------------------------
    def decode(self, x, start, mask):
        """One cached forward call: x (B, T, C) enters at positions start..start+T-1 of the
        method's sequence; mask is the full (S, S) mask. -> (B, T, V) logits. start an int, or a
        0-d long tensor when compiled (query_rows): the same code (its tokens may differ by
        rounding: the softmax sums over all S keys)."""
        pos = start + torch.arange(x.shape[1], device=x.device)  # (T,)
        freqs = self.rope(x.device).index_select(0, pos)  # (T, D/2, 2)
        return self.backbone(x, freqs, start, query_rows(mask, start, x.shape[1]))

    def compile_sampling(self, mode=None, backend='inductor'):
        """generate's cached forward calls (decode_call) through torch.compile(self.decode): each
        shape compiles once (dynamic=False: LlamaGen one, T = 1; PAR two, T = 1 and n), and
        mode='reduce-overhead' replays each as a CUDA graph."""
        self.compiled_decode = torch.compile(self.decode, mode=mode, backend=backend,
                                             dynamic=False)

    @torch.inference_mode()
    def generate(self, labels, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, cfg_interval=-1,
                 generator=None, trace=None):
        """labels (B,) -> tokens (B, h*w) in raster order, with a KV cache: 1 + (L-1) forward calls.
        cfg_interval > -1: guidance only for the first cfg_interval + 2 tokens (official). trace:
        called after every forward call with the canvas so far (trace_call)."""
        B, L, P = len(labels), self.cfg.block_size, self.cfg.cls_token_num
        S, device = P + L, labels.device
        cfg = guided(cfg_scale)
        cond = cfg_batch(labels, self.cfg.num_classes) if cfg else labels
        mask = self.attn_mask(S, device)
        mask = torch.ones(S, S, dtype=torch.bool, device=device).tril() if mask is None else mask
        tokens = torch.empty(B, L, dtype=torch.long, device=device)
        ugen = trace_generator(trace, generator, device)
        self.nfe = 0
        dtype = self.tok_embeddings.weight.dtype
        with eval_mode(self), kv_caches(self, len(cond), S, dtype, device):
            logits = decode_call(self, self.cls_embedding(cond), 0, mask)[:, -1]  # (B or 2B, V)
            for t in range(L):
                mixed = logits
                if cfg and (cfg_interval < 0 or t <= cfg_interval + 1):
                    mixed = cfg_mix(logits, cfg_scale)
                tokens[:, t] = sample_logits(mixed[:B], temperature, top_k, top_p, generator)[:, 0]
                if trace is not None:
                    pos = torch.arange(L, device=device).expand(B, L)
                    uncond = None
                    if cfg:  # the null-class rows alone: (B, 1), read at position t
                        uncond = sample_logits(logits[B:], temperature, top_k, top_p, ugen)
                    trace_call(trace, tokens, pos <= t, pos == t, uncond)
                if t < L - 1:  # both CFG halves get the same token
                    x = self.tok_embeddings(tokens[:, t:t + 1].repeat(len(cond) // B, 1))
                    logits = decode_call(self, x, P + t, mask)[:, -1]
        return tokens


# --- tracing generation (sample.py --trace), the same for every method ---------------------------
def trace_generator(trace, generator, device):
    """The torch.Generator of a trace's unconditional samples, seeded from generator's seed (0
    without one); None without a trace. Its own: drawing them from generator would change every
    guided sample after them."""
    if trace is None:
        return None
    seed = 0
    if generator is not None:
        seed = generator.initial_seed() + 1
    return torch.Generator(device).manual_seed(seed)


def trace_call(trace, ids, filled, fresh, uncond=None):
    """Report one forward call of generate: trace(codes, filled, uncond). ids (B, k*L) the ids so
    far in the layout generate returns (k = 1; IAR2: 2, the semantic ids then the detail ids),
    valid where filled (B, L) bool says (raster order); fresh (B, L) the positions this call
    sampled; uncond: ids of the unconditional branch alone, read at the fresh positions
    (broadcast against ids; None without CFG). codes: ids with 0, a neutral code, where not
    generated yet; trace's uncond: codes with the fresh positions from uncond."""
    k = ids.shape[1] // filled.shape[1]
    codes = torch.where(filled.repeat(1, k), ids, 0)
    if uncond is None:
        trace(codes, filled)
        return
    trace(codes, filled, torch.where(fresh.repeat(1, k), uncond, codes))


# --- running: DDP, files (the one place every script and method reads one), image grids ----------
def setup_ddp():
    """-> rank, world size, device. torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; plain `python`
    runs one process. NCCL on CUDA, gloo on the CPU."""
    rank = int(os.environ.get('RANK', 0))
    world = int(os.environ.get('WORLD_SIZE', 1))
    local = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local) if torch.cuda.is_available() else torch.device('cpu')
    if 'RANK' in os.environ:
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device


def to_uint8(x):
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3) on the CPU, truncating as official samplers do."""
    return (127.5 * x.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(x, path, nrow):
    """x (N, 3, H, W) in [-1, 1] -> a PNG of nrow images per row with 2-pixel gaps."""
    a = F.pad(to_uint8(x), (0, 0, 2, 0, 2, 0), value=255).numpy()  # (N, H+2, W+2, 3)
    a = np.concatenate([a, np.full((-len(a) % nrow, *a.shape[1:]), 255, np.uint8)])
    a = a.reshape(-1, nrow, *a.shape[1:]).transpose(0, 2, 1, 3, 4).reshape(-1, nrow * a.shape[2], 3)
    Image.fromarray(np.pad(a, ((0, 2), (0, 2), (0, 0)), constant_values=255)).save(path)


def save_checkpoint(obj, path):
    """Plain dicts, loadable with weights_only=True, written atomically (atomic_write): a crash,
    a full disk or a second writer of the same path never leaves a broken file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path, write):
    """write(f) into a temporary file of its own beside path, then rename it onto path: readers
    see the old file or the new one, whole. Each writer has its own temporary file (two runs or
    ranks writing the same path do not write into one file), removed on any failure. A full disk
    stops with one line; path keeps what it had."""
    try:
        write_and_replace(path, write)
    except (OSError, RuntimeError) as e:  # torch's zip writer wraps the OSError in a RuntimeError
        if not disk_full(e):
            raise
        raise SystemExit(f'{path}: disk full while writing; nothing was written') from None


def write_and_replace(path, write):  # atomic_write's work, less the disk-full line
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:  # a file object: a write error keeps its errno
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut leaves no empty file
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0o600; a checkpoint is shared as usual
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C and SystemExit too: no temporary file is left behind
        os.remove(tmp)
        raise


def umask():
    mask = os.umask(0o22)  # os has no getter: set it and put it back
    os.umask(mask)
    return mask


def disk_full(e):
    """Whether e, or an exception it was raised from or during, is an OSError ENOSPC."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    return False


def load_file(path):
    """A checkpoint file as a dict, with weights_only=True. Official files pickle an argparse
    Namespace: that one class is allow-listed, nothing else runs. A file that cannot be read
    stops with one line naming it and why (load_error)."""
    if not os.path.isfile(path):
        raise SystemExit(f'{path}: no such checkpoint')
    if os.path.getsize(path) == 0:  # torch.load: an EOFError with no message
        raise SystemExit(f'{path}: empty file (0 bytes), not a checkpoint')
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(load_error(path, e)) from None
    if not isinstance(ckpt, dict):  # weights_only lets plain tensors and lists through
        raise SystemExit(f'{path}: not a checkpoint (a {type(ckpt).__name__}, not a dict)')
    return ckpt


def load_error(path, e):
    """The one line for torch.load's exception e. torch's own message runs to many lines and
    advises weights_only=False, which would run whatever the file pickles: it is never repeated.
    A refused class is named from it ('... Unsupported global: GLOBAL __main__.Evil was not an
    allowed global ...'); anything else is a file that is not a whole checkpoint."""
    text = str(e)
    refused = re.search(r'Unsupported global: GLOBAL (\S+)', text)
    if refused:
        return (f'{path}: refusing to load: it pickles {refused[1]}, which weights_only=True '
                'does not allow')
    # the weights-only unpickler's own words (e.g. 'Unsupported operand 110' for bytes that are
    # no pickle), else torch's first sentence ('PytorchStreamReader failed reading zip archive:
    # failed finding central directory. This is an internal miniz error. ...')
    unpickler = re.search(r'WeightsUnpickler error:\s*(.+)', text)
    lines = text.strip().splitlines() or ['']
    detail = unpickler[1] if unpickler else lines[0].split('. ')[0].rstrip('.')
    detail = f'{type(e).__name__}: {detail}' if detail else type(e).__name__
    return f'{path}: not a readable checkpoint ({detail.strip()})'


def check_run(ckpt, path, method, stage):
    """Stop with one line unless ckpt (from path) is our `stage` checkpoint of `method`."""
    if ckpt.get('method') != method or ckpt.get('stage') != stage:
        found = f'a {ckpt.get("method")} {ckpt.get("stage")}' if 'stage' in ckpt else 'an official'
        raise SystemExit(f'{path}: {found} checkpoint, not a {method} {stage} one')


def load_official(model, path, wrappers=('model', 'module', 'state_dict', 'ema', 'model_ema')):
    """Load an official checkpoint strictly: its state dict is under the first of `wrappers`
    present, or bare. Names map through model.official_key where the model has one."""
    ckpt = load_file(path)
    sd = next((ckpt[k] for k in wrappers if isinstance(ckpt.get(k), dict)), ckpt)
    if not all(torch.is_tensor(v) for v in sd.values()):
        raise SystemExit(f'{path}: no state dict found (not a dict of tensors)')
    key = getattr(model, 'official_key', lambda k: k)  # official names -> ours; None: not kept
    sd = {key(k.removeprefix('module.').removeprefix('_orig_mod.').removeprefix('module.')): v
          for k, v in sd.items() if not k.endswith('freqs_cis') and 'kv_cache' not in k}
    sd.pop(None, None)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [(k, tuple(sd[k].shape)) for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or unexpected or wrong:
        raise SystemExit(f'{path}: not a checkpoint of this model/size: {len(missing)} missing '
                         f'{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, '
                         f'{len(wrong)} of another shape {wrong[:2]}')
    model.load_state_dict(sd, strict=True)
    return model


def load_tokenizer(module, path, size=None):
    """The method's tokenizer from path: ours (its EMA weights if any), or an official file of
    size TOKENIZER_SIZES[size] (default: the paper's, the first)."""
    ckpt = load_file(path)
    if ckpt.get('stage') != 'tokenizer':  # an official file
        size = size or next(iter(module.TOKENIZER_SIZES))
        cfg = module.TokenizerConfig(**module.TOKENIZER_SIZES[size])
        return module.load_official(module.Tokenizer(cfg), path)
    if ckpt['kind'] != module.Tokenizer.__name__:
        raise SystemExit(f'{path}: a {ckpt["kind"]} tokenizer; --method {module.__name__} needs a '
                         f'{module.Tokenizer.__name__}')
    tok = module.Tokenizer(module.TokenizerConfig(**ckpt['config']))
    try:
        tok.load_state_dict(ckpt.get('ema') or ckpt['model'])
    except RuntimeError as e:  # e.g. a KL tokenizer saved before its attention followed kl16's rule
        detail = str(e).splitlines()[1].strip()[:160]
        raise SystemExit(f'{path}: its weights do not fit the {module.Tokenizer.__name__} of its '
                         f'config: {detail}') from None
    return tok


def tokenizer_file(tok, method):
    """A tokenizer as our plain checkpoint dict: what a generator run keeps as RUN/tokenizer.pt."""
    return dict(model=tok.state_dict(), method=method, stage='tokenizer', kind=type(tok).__name__,
                config=asdict(tok.cfg))


def tokenizer_key(tok):
    """A short hash of the tokenizer's config and weights: its cached codes are found by it."""
    h = hashlib.sha1(repr(tok.cfg).encode())
    for v in tok.state_dict().values():
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def load_generator(module, ckpt, path, ema=True):
    """Our generator run -> (model, tokenizer) on CPU: EMA weights if any (ema=False: the trained
    weights), and the tokenizer kept beside the checkpoint (RUN/tokenizer.pt), so a run can be
    moved anywhere."""
    model = module.Model(module.Config(**ckpt['config']))
    weights = ckpt['model']
    if ema and ckpt.get('ema'):
        weights = ckpt['ema']
    model.load_state_dict(weights)
    return model, load_tokenizer(module, run_tokenizer(ckpt, path))


def run_tokenizer(ckpt, path):
    """The tokenizer file of the run whose checkpoint ckpt was read from path: RUN/tokenizer.pt
    (runs before it was kept there name a file relative to the working directory)."""
    kept = os.path.join(os.path.dirname(os.path.abspath(path)), ckpt['tokenizer'])
    old = ckpt['tokenizer']
    return old if os.path.exists(old) and not os.path.exists(kept) else kept


# --- released files: --download (sample.py, fid.py); without it nothing is ever fetched ---------
HF = 'https://huggingface.co/'  # a file of a repository: HF + '<owner>/<repo>/resolve/main/<file>'
DROPBOX = 'https://www.dropbox.com/scl/fi/'  # MAR's links (LTH14/mar util/download.py), dl=1
RELEASES = {  # the README's official checkpoints: the name --download takes -> its authors' link
    'vq_ds16_c2i.pt': HF + 'FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt',
    'c2i_B_256.pt': HF + 'FoundationVision/LlamaGen/resolve/main/c2i_B_256.pt',
    'c2i_L_256.pt': HF + 'FoundationVision/LlamaGen/resolve/main/c2i_L_256.pt',
    'c2i_B_384.pt': HF + 'FoundationVision/LlamaGen/resolve/main/c2i_B_384.pt',
    'c2i_L_384.pt': HF + 'FoundationVision/LlamaGen/resolve/main/c2i_L_384.pt',
    'c2i_XL_384.pt': HF + 'FoundationVision/LlamaGen/resolve/main/c2i_XL_384.pt',
    'c2i_XXL_384.pt': HF + 'FoundationVision/LlamaGen/resolve/main/c2i_XXL_384.pt',
    'c2i_3B_384.pt': HF + 'FoundationVision/LlamaGen/resolve/main/c2i_3B_384.pt',
    # NPP's files have LlamaGen's names, MAR's one name for three models: a folder tells them apart
    'npp/c2i_B_256.pt': HF + 'pytttttt/LlamaGen-NPP/resolve/main/c2i_B_256.pt',
    'npp/c2i_L_256.pt': HF + 'pytttttt/LlamaGen-NPP/resolve/main/c2i_L_256.pt',
    'npp/c2i_XL_256.pt': HF + 'pytttttt/LlamaGen-NPP/resolve/main/c2i_XL_256.pt',
    'npp/c2i_XXL_256.pt': HF + 'pytttttt/LlamaGen-NPP/resolve/main/c2i_XXL_256.pt',
    'PAR-XL-4x.pt': HF + 'Epiphqny/PAR/resolve/main/PAR-XL-4x.pt',
    'PAR-XXL-4x.pt': HF + 'Epiphqny/PAR/resolve/main/PAR-XXL-4x.pt',
    'PAR-3B-4x.pt': HF + 'Epiphqny/PAR/resolve/main/PAR-3B-4x.pt',
    'PAR-3B-16x.pt': HF + 'Epiphqny/PAR/resolve/main/PAR-3B-16x.pt',
    'maskgit-vqgan-imagenet-f16-256.bin':
        HF + 'fun-research/TiTok/resolve/main/maskgit-vqgan-imagenet-f16-256.bin',
    'rar_b.bin': HF + 'yucornetto/RAR/resolve/main/rar_b.bin',
    'rar_l.bin': HF + 'yucornetto/RAR/resolve/main/rar_l.bin',
    'rar_xl.bin': HF + 'yucornetto/RAR/resolve/main/rar_xl.bin',
    'rar_xxl.bin': HF + 'yucornetto/RAR/resolve/main/rar_xxl.bin',
    '0485000.pt': HF + 'JTUplayer/IAR2/resolve/main/0485000.pt',
    'IAR2-B.pth': HF + 'JTUplayer/IAR2/resolve/main/IAR2-B.pth',
    'IAR2-L.pth': HF + 'JTUplayer/IAR2/resolve/main/IAR2-L.pth',
    'IAR2-XL.pt': HF + 'JTUplayer/IAR2/resolve/main/IAR2-XL.pt',
    'IAR2-XXL.pth': HF + 'JTUplayer/IAR2/resolve/main/IAR2-XXL.pth',
    'kl16.ckpt': DROPBOX + 'hhmuvaiacrarfg28qxhwz/kl16.ckpt?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=1',
    'mar_base/checkpoint-last.pth':
        DROPBOX + 'f6dpuyjb7fudzxcyhvrhk/checkpoint-last.pth?rlkey=a6i4bo71vhfo4anp33n9ukujb&dl=1',
    'mar_large/checkpoint-last.pth':
        DROPBOX + 'pxacc5b2mrt3ifw4cah6k/checkpoint-last.pth?rlkey=m48ovo6g7ivcbosrbdaz0ehqt&dl=1',
    'mar_huge/checkpoint-last.pth':
        DROPBOX + '1qmfx6fpy3k7j9vcjjs3s/checkpoint-last.pth?rlkey=4lae281yzxb406atp32vzc83o&dl=1',
}
CACHE_ENV = 'AR_MINIMAL_CACHE'  # set, the folder of the downloads
LINKED = ('X-Linked-Etag', 'X-Linked-Size')  # what Hugging Face says of a file in its redirect


def cache_dir():
    """The one folder of the downloads: $AR_MINIMAL_CACHE, else $XDG_CACHE_HOME/ar-minimal, else
    ~/.cache/ar-minimal."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    xdg = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(xdg, 'ar-minimal')


def released(name):
    """The path in the cache of the released file `name`, a key of RELEASES; any other name stops
    with one line listing them."""
    if name not in RELEASES:
        raise SystemExit(f'{name}: not a released file; --download knows {", ".join(RELEASES)}')
    return os.path.join(cache_dir(), name)


def load_released(name, load, rank=0):
    """load(path) of the released file `name` from the cache, downloaded first if it is not there
    (by rank 0: the other ranks wait for the file; no collective, so no timeout on a long
    download). A new download no checksum vouched for (MAR's) that then fails load, the strict
    load of any file, is removed: a web page or a damaged copy. One with a checksum is the
    published file: it stays, the flags do not fit it."""
    path = released(name)
    while rank != 0 and not os.path.exists(path):
        time.sleep(1)
    if os.path.exists(path):  # downloaded before: no request
        return load(path)
    checked = download(RELEASES[name], path)
    try:
        return load(path)
    except SystemExit as e:
        if checked:
            raise
        os.remove(path)
        raise SystemExit(f'{e} (downloaded from {RELEASES[name]}: removed)') from None


def download(url, path, sha256=''):
    """url -> path, with a progress bar: the bytes come into path.part (an interrupted transfer's
    .part is resumed with an HTTP Range request), then the size the server gave and the sha256
    (or its first digits) given here or by the publisher (Hugging Face's X-Linked-Etag) are
    checked, and path.part is renamed onto path. Any error stops with one line naming url,
    leaving at most the .part of an interrupted transfer, never a bad file.
    -> whether a sha256 checked the file."""
    part = path + '.part'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        size, published = fetch(url, part)
    except urllib.error.HTTPError as e:
        raise SystemExit(f'{url}: HTTP {e.code} {e.reason}{resumable(part)}') from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, cut, ...
        reason = getattr(e, 'reason', None) or e
        raise SystemExit(f'{url}: download failed ({reason}){resumable(part)}') from None
    got = os.path.getsize(part)
    if size is not None and got < size:
        raise SystemExit(f'{url}: interrupted at {got} of {size} bytes{resumable(part)}')
    if size is not None and got > size:
        os.remove(part)
        raise SystemExit(f'{url}: {got} bytes, not the {size} the server gave; removed')
    expected = sha256 or published
    digest = file_sha256(part) if expected else ''
    if not digest.startswith(expected):
        os.remove(part)
        raise SystemExit(f'{url}: checksum mismatch (sha256 {digest}, published {expected}); '
                         'removed')
    os.replace(part, path)
    return bool(expected)


def fetch(url, part):
    """Append the bytes of url to part, from its end (an HTTP Range request; a server that sends
    the whole file instead starts it again) -> (the file's size or None, the sha256 its publisher
    gives or '')."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={'User-Agent': 'ar-minimal'})
    if have:
        request.add_header('Range', f'bytes={have}-')
    redirects = Redirects()
    try:
        r = urllib.request.build_opener(redirects).open(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        os.remove(part)  # 416: the range starts at or past the end, so .part is not a beginning
        return fetch(url, part)
    with r:
        said = redirects.said  # the redirect's word first, then the last answer's
        for k in LINKED:
            said.setdefault(k, r.headers.get(k))
        if r.status != 206:
            have = 0
        size = content_size(r.headers, said['X-Linked-Size'], have)
        bar = tqdm(total=size, initial=have, unit='B', unit_scale=True, unit_divisor=1024,
                   desc=os.path.basename(part.removesuffix('.part')))
        with open(part, 'ab' if have else 'wb') as f, bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    etag = (said['X-Linked-Etag'] or '').strip('"')
    return size, etag if re.fullmatch('[0-9a-f]{64}', etag) else ''


class Redirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, keeping what the first of them says of the file: Hugging Face answers
    .../resolve/main/FILE with a redirect to its CDN that gives the file's sha256 (X-Linked-Etag,
    for a file in its large-file storage) and size (X-Linked-Size)."""

    def __init__(self):
        self.said = {}

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # the Range header goes on
        for k in LINKED:
            if headers.get(k):
                self.said.setdefault(k, headers[k])
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def content_size(headers, linked, have):
    """The whole file's size in bytes from an answer's headers (have: bytes before its first), or
    None when it gives none."""
    if linked:
        return int(linked)
    whole = re.fullmatch(r'bytes \d+-\d+/(\d+)', headers.get('Content-Range', ''))
    if whole:
        return int(whole[1])
    length = headers.get('Content-Length')
    return have + int(length) if length else None


def resumable(part):
    """What an error leaves: '' when nothing (an empty .part is removed), else a note on the .part
    the next run resumes from."""
    if os.path.exists(part) and os.path.getsize(part) == 0:
        os.remove(part)
    if not os.path.exists(part):
        return ''
    return f'; {os.path.getsize(part)} bytes kept in {part}: run again to resume'


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
