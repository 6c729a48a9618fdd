"""
IAR2: "IAR2: Improving Autoregressive Visual Generation with Semantic-Detail Associated Token
Prediction" (Yi, Hu, Su, Ma, 2025), arXiv:2510.06928. Official code: sjtuplayer/IAR2.

Each grid position holds a token pair: the tokenizer snaps the latent to the nearest semantic code
(of 256), the residual to the nearest code of one global detail codebook (of 4096), and sums them:
256 x 4096 combinations for 256 + 4096 vectors. The generator predicts per position the semantic,
then the detail token, in a head transformer that also sees a compressed window of the 12 generated
neighbours. CFG ramps from a first to a last scale, more for tokens attending to the class token.
Changes vs llamagen.py / vq.py:
  - Tokenizer: detail codebook, two-step quantisation, stage 1 / 2 modes set by on_step; codes
    (B, 2*h*w): the semantic ids, then the detail ids
  - input: an aggregation MLP of the semantic and detail embeddings; RoPE rows doubled (official
    quirk)
  - head: mlp1/mlp2 compress the window of pre-norm backbone states; 5 factorized blocks run over
    [context, hidden, semantic embedding] -> output1 (semantic), output2 (detail);
    loss w1 * CE_sem + CE_det
  - generate: backbone step, semantic and detail sub-steps, progressive attention-guided CFG
Train (classroom, built-in data, CPU): python train.py --method iar2   (paper commands: README)
  (what the classroom run changes from the paper, each with the measurement behind it:
  TokenizerConfig.first_stage_frac, TOKENIZER_SIZES['IAR2-VQ-tiny'], SIZES['IAR2-tiny'] and
  CLASSROOM)
Shapes: B batch, T positions, C width, H heads, D head dim, h*w = L grid, V / V2 semantic / detail
codes.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import llamagen
import vq
# the method contract, as LlamaGen's: the same AdamW groups and loader
from llamagen import load_official, param_groups  # noqa: F401 (re-exported)


# --- tokenizer ------------------------------------------------------------------------------------
@dataclass
class TokenizerConfig(vq.VQConfig):
    codebook_size: int = 256  # semantic codebook V (official: hard-coded 256)
    codebook_size_second: int = 4096  # detail codebook V2 (official 4096)
    # share of the steps in stage 1 (semantic only), then stage 2 in the same run (0: stage 2 only,
    # 1: stage 1 only). Officially two runs, stage 2 resuming stage 1, lengths unpublished. Ours:
    # 0.25. Classroom, 400 steps (now 800: CLASSROOM): the reconstructions of 500 held-out images
    # classify at 0.986 with 0.25, 0.916 with 0.5 (purple gradients come out blue: stage 2's
    # detail codes had 200 steps)
    first_stage_frac: float = 0.25


TOKENIZER_SIZES = {
    # official, 71.8M params, stride 16
    'IAR2-VQ-16': dict(codebook_size=256, codebook_size_second=4096),
    # CPU, stride 4, with the entropy loss at 0.1 (the official code has the term, at weight 0).
    # Without it a seed's tokenizer may leave codes unused (seeds 1 / 2: 27 / 25 of the 32
    # semantic and 297 / 221 of the 512 detail codes; seed 0: 29 and 372), and the generator's
    # samples score 0.947 / 0.921 / 0.926 on seeds 0 / 1 / 2; with it every code is used and they
    # score 0.998 / 0.975 / 0.996 (1,000 each): rings close, crosses stay crosses. The cost:
    # within-class diversity 0.50 / 0.64 / 0.54 against 0.73 / 0.78 / 0.67 (the backgrounds all
    # come out near black), and 23 s more of tokenizer training (184 s)
    'IAR2-VQ-tiny': dict(codebook_size=32, codebook_size_second=512, encoder_ch_mult=(1, 1, 2),
                         decoder_ch_mult=(1, 1, 2), z_channels=64, ch=32, num_res_blocks=1,
                         entropy_loss_ratio=0.1),
}


class Quantizer(vq.VectorQuantizer):  # semantic `embedding` (V, e), used l2-normalised, as in vq.py
    def __init__(self, cfg):
        super().__init__(cfg)
        # detail codes (V2, e), a bare Parameter: unit norm at init, never re-normalised
        V2 = cfg.codebook_size_second
        init = torch.empty(V2, cfg.codebook_embed_dim).uniform_(-1 / V2, 1 / V2)
        self.embedding_second = nn.Parameter(F.normalize(init, dim=-1))
        if cfg.codebook_show_usage:
            self.register_buffer('codebook_used2', torch.zeros(65536))
        # training only: 'semantic' (stage 1), 'detail' or 'both' (stage 2); set by on_step
        self.mode = 'both'

    def forward(self, z):
        """z (B, e, h, w) -> z_q straight-through, losses (training), ids (B, 2, h, w)."""
        z = z.permute(0, 2, 3, 1)  # (B, h, w, e)
        if self.cfg.codebook_l2_norm:
            z = F.normalize(z, dim=-1)
        zf = z.reshape(-1, z.shape[-1])  # (N, e)
        e1, e2 = self.codebook(), self.embedding_second
        d1 = torch.cdist(zf, e1).pow(2)  # (N, V) squared distances
        sem = d1.argmin(1)  # step 1: the nearest semantic code (cosine, as both are unit vectors)
        d2 = torch.cdist(zf - e1[sem], e2).pow(2)  # (N, V2)
        det = d2.argmin(1)  # step 2: the nearest detail code to the residual, among all V2
        # 'detail': the semantic codebook gets no gradient, so AdamW skips it; with per-parameter
        # state that equals the official separate, paused Adam
        mode = self.mode if self.training else 'both'
        if mode == 'semantic':
            z_q = e1[sem]
        elif mode == 'detail':
            z_q = e1.detach()[sem] + e2[det]
        else:
            z_q = e1[sem] + e2[det]
        z_q = z_q.view(z.shape)
        losses = {}
        if self.training:
            losses['vq'] = (z_q - z.detach()).pow(2).mean()  # moves codes towards the encoder
            losses['commit'] = self.cfg.commit_loss_beta * (z_q.detach() - z).pow(2).mean()
            if mode == 'both':
                # the official semantic-only pass of this step: only its codebook term reaches the
                # semantic codes (straight-through; its encoder/decoder grads are discarded)
                losses['vq_first'] = (e1[sem].view(z.shape) - z.detach()).pow(2).mean()
            if self.cfg.entropy_loss_ratio > 0:
                # stage 1: the detail term is kept in the graph at weight 0
                entropy = vq.entropy_loss(-d1) + (mode != 'semantic') * vq.entropy_loss(-d2)
                losses['entropy'] = self.cfg.entropy_loss_ratio * entropy
            if self.cfg.codebook_show_usage:
                self.record_usage(sem, det)
        z_q = z + (z_q - z).detach()
        ids = torch.stack([sem, det]).view(2, *z.shape[:-1]).transpose(0, 1)  # (B, 2, h, w)
        return z_q.permute(0, 3, 1, 2), losses, ids

    def record_usage(self, sem, det):  # rolling windows of the last 65536 ids of each codebook
        n = min(sem.numel(), 65536)
        self.codebook_used.copy_(torch.cat([self.codebook_used[n:], sem[-n:].float()]))
        self.codebook_used2.copy_(torch.cat([self.codebook_used2[n:], det[-n:].float()]))

    def usage(self):  # used fraction of the detail codebook (in stage 1: of the semantic one)
        if self.mode == 'semantic':
            return torch.unique(self.codebook_used).numel() / self.cfg.codebook_size
        return torch.unique(self.codebook_used2).numel() / self.cfg.codebook_size_second


class Tokenizer(vq.VQModel):
    """Stage 1: semantic codebook only. Stage 2 cycles [detail, detail, both] (official [second x2,
    first]): the semantic codebook is frozen on 'detail' steps and learns from both passes on
    'both' steps. Exact: each codebook's gradient and the steps it moves on. Simplified: train.py
    adds MSE in both stages (stage 1 has none officially, but without LPIPS weights on CPU it is
    the only reconstruction signal), clips all gradients together and uses one AdamW (officially
    3 Adams). encode (vq.py) flattens the ids (B, 2, h, w) to codes (B, 2*h*w)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.quantize = Quantizer(cfg)

    def on_step(self, step, total):  # called by train.py before each tokenizer step
        stage1 = round(self.cfg.first_stage_frac * total)
        if step < stage1:
            self.quantize.mode = 'semantic'
        else:
            self.quantize.mode = ('detail', 'detail', 'both')[(step - stage1) % 3]

    def decode_code(self, codes):
        """codes (B, 2*h*w): the semantic ids, then the detail ids, raster order (from encode or a
        generator) -> image (B, 3, H, W), ~[-1, 1]."""
        g = math.isqrt(codes.shape[1] // 2)
        sem, det = codes.reshape(len(codes), 2, g, g).unbind(1)  # (B, h, w) each
        z_q = self.quantize.codebook()[sem] + self.quantize.embedding_second[det]  # (B, h, w, e)
        return self.decode(z_q.permute(0, 3, 1, 2))


# --- generator ------------------------------------------------------------------------------------
SIZES = {  # the official LlamaGen widths and depths + 5 head blocks
    # CPU: 4 blocks in all, as GPT-tiny, and the plain 2-D RoPE (rope_repeat off): with the quirk,
    # two horizontal neighbours share an angle and two vertical ones turn 4 columns apart, in the
    # same row or the next, alternately (see rope_table). Class accuracy of 1,000 samples, off /
    # on (tokenizers without the entropy loss): seed 1 0.921 / 0.865, seed 0 0.947 / 0.947-0.967.
    # A 4th backbone block (18% more time per step) gave 0.966, 0.919, 0.898 on seeds 0, 1, 2
    # against 0.947, 0.921, 0.926: no gain.
    'IAR2-tiny': dict(n_layer=3, n_head=4, dim=128, factorized_n_layer=1, rope_repeat=False),
    'IAR2-B': dict(n_layer=12, n_head=12, dim=768),  # 143M
    'IAR2-L': dict(n_layer=24, n_head=16, dim=1024),  # 408M
    'IAR2-XL': dict(n_layer=36, n_head=20, dim=1280),  # 884M
    'IAR2-XXL': dict(n_layer=48, n_head=24, dim=1536),  # 1.57B
}

# train.py's defaults for the classroom run, but:
# - the tokenizer trains 800 steps, not 400: its reconstructions of 500 held-out images classify
#   at 0.998 (seed 0 and 1) against 0.972 and 0.984 (crosses blurred into dots), and the generator
#   on it at 0.967 against 0.936 (seed 0; seed 1: 0.865 against 0.887, 1,000 samples each);
# - a cosine LR down to 1e-5 over the 800 generator steps (500 samples: class accuracy 0.88 with
#   it, 0.86 without, on one tokenizer).
CLASSROOM = {'tokenizer': dict(max_steps=800), 'generator': dict(lr_schedule='cosine')}

# sample.py --official: the paper's FID settings per released model (codes at 384 px)
PAPER = {
    'IAR2-B': dict(cfg_scale1=(1.75, 3.0), cfg_scale2=(1.75, 3.0), w_attn=0.05, image_size=384),
    'IAR2-L': dict(cfg_scale1=(1.75, 3.0), cfg_scale2=(1.75, 3.0), w_attn=0.05, image_size=384),
    'IAR2-XL': dict(cfg_scale1=(1.75, 3.0), cfg_scale2=(1.75, 3.0), w_attn=0.05, image_size=384),
    'IAR2-XXL': dict(cfg_scale1=(1.75, 3.0), cfg_scale2=(1.75, 3.0), w_attn=0.05, image_size=384),
}


@dataclass
class Config(llamagen.Config):
    vocab_size: int = 256  # semantic codebook V (derived from the tokenizer)
    sub_vocab_size: int = 4096  # detail codebook V2 (derived from the tokenizer)
    factorized_n_layer: int = 5  # head transformer blocks (official 5)
    w1: float = 1.0  # weight of the semantic CE (official default 1.0; README FSDP example: 2.0)
    rope_repeat: bool = True  # official quirk: each RoPE grid row twice, see rope_table


def derive_config(tok, image_size, num_classes):
    """LlamaGen's fields, plus the detail codebook V2."""
    fields = llamagen.derive_config(tok, image_size, num_classes)
    return dict(fields, sub_vocab_size=tok.cfg.codebook_size_second)


def window_index(g):
    """-> (g*g, 12) raster indices of each position's causal neighbours on a g x g grid and their
    validity mask. Official slots: row i-2 columns j-2..j+2, row i-1 the same, then (i, j-2),
    (i, j-1)."""
    pos = llamagen.grid_positions(g)  # (g*g, 2)
    dr = torch.tensor([-2] * 5 + [-1] * 5 + [0, 0])
    dc = torch.tensor([-2, -1, 0, 1, 2] * 2 + [-2, -1])
    r, c = pos[:, :1] + dr, pos[:, 1:] + dc  # (g*g, 12)
    valid = (r >= 0) & (c >= 0) & (c < g)
    return torch.where(valid, r * g + c, 0), valid


def cfg_schedule(pair, n, L, attn, w_attn):
    """-> (B, 1) CFG scale of step n of L: pair[0] at w = 0 to pair[1] at w = 1 (beyond when
    w > 1), with w = n/(L-1) + w_attn * attn and attn (B,) the step's head-mean last-layer attention
    to the class."""
    w = (n / (L - 1) if L > 1 else 0.5) + w_attn * attn
    return (pair[0] * (1 - w) + pair[1] * w)[:, None]


def scale_pair(pair, cfg_scale):
    """A (first, last) CFG pair; one left at (1, 1) takes cfg_scale at both ends (constant)."""
    pair = tuple(pair)
    if len(pair) != 2:
        raise SystemExit('iar2.py: --cfg-scale1 / --cfg-scale2 take two scales: first, last')
    if pair == (1.0, 1.0):
        return (cfg_scale, cfg_scale)
    return pair


def mlp(d_in, d_hidden, d_out, bias=True):  # official nn.Sequential: Linear, GELU (erf), Linear
    first, last = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out, bias=bias)
    return nn.Sequential(first, nn.GELU(), last)


class Model(llamagen.Model):
    def __init__(self, cfg):
        super().__init__(cfg)
        del self.tok_embeddings, self.output  # replaced by the pair embedding and the two heads
        C, V, V2 = cfg.dim, cfg.vocab_size, cfg.sub_vocab_size
        blocks = (llamagen.TransformerBlock(cfg) for _ in range(cfg.factorized_n_layer))
        self.factorized_blocks = nn.ModuleList(blocks)
        self.tok_embeddings1 = nn.Embedding(V, C)
        self.tok_embeddings2 = nn.Embedding(V2, C)
        self.aggregation_layer = mlp(2 * C, 4 * C, C)  # [E1[s], E2[d]] -> one input per position
        self.output1 = mlp(C, 2 * C, V, bias=False)  # semantic logits
        self.output2 = mlp(C, 2 * C, V2, bias=False)  # detail logits
        # the window: each of the 12 states to C/12, concatenated, back to C
        self.mlp1 = mlp(C, C // 4, C // 12, bias=False)
        self.mlp2 = mlp(C // 12 * 12, 2 * C, C, bias=False)
        win_idx, win_mask = window_index(self.grid)  # not in the state dict
        self.register_buffer('win_idx', win_idx, persistent=False)
        self.register_buffer('win_mask', win_mask, persistent=False)
        # official init: normal(0, 0.02), zero biases, zero last output layers
        self.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for out in (self.output1, self.output2):  # the logits start uniform
            nn.init.zeros_(out[2].weight)

    def rope_table(self):
        """Official quirk: grid rows repeated, (P + 2L) rows, so position p >= 1 turns by grid cell
        (p-1)//2: pairs share an angle, only the top half of the grid occurs. Official checkpoints
        need it."""
        table, P = super().rope_table(), self.cfg.cls_token_num
        if not self.cfg.rope_repeat:
            return table
        return torch.cat([table[:P], table[P:].repeat_interleave(2, 0)])

    def backbone(self, h, freqs, start=0, mask=None):  # (B, T, C) -> (B, T, C) pre-norm states
        for layer in self.layers:
            h = layer(h, freqs, start, mask)
        return h

    def context(self, h, rows=slice(None)):  # h (B, L, C), h_q predicts pair q -> (B, T, C) at rows
        # the 12 window states (zeros outside the grid), each through mlp1, concatenated, mlp2
        win = h[:, self.win_idx[rows]] * self.win_mask[rows, :, None]  # (B, T, 12, C)
        return self.mlp2(self.mlp1(win).flatten(2))

    def head(self, x, start=0, mask=None):
        """(N, T, C) micro-sequence at head slots start.. -> normed (N, T, C). RoPE rows 0..2
        (official): zero (slot 0's q, k vanish), then cell (0, 0) twice."""
        freqs = self.rope(x.device)[start:start + x.shape[1]]
        for block in self.factorized_blocks:
            x = block(x, freqs, start, mask)
        return self.norm(x)

    def forward(self, tokens, labels):
        """Teacher forcing. tokens (B, 2L): the L semantic ids, then the L detail ids (raster
        order); labels (B,) -> ((logits_sem (B, L, V), logits_det (B, L, V2)), loss)."""
        B, L, C = len(tokens), self.cfg.block_size, self.cfg.dim
        sem, det = tokens[:, :L], tokens[:, L:]
        e1 = self.tok_embeddings1(sem)  # (B, L, C)
        x = self.aggregation_layer(torch.cat([e1, self.tok_embeddings2(det)], -1))
        x = torch.cat([self.cls_embedding(labels), x[:, :-1]], 1)  # position j predicts pair j
        h = self.backbone(self.tok_dropout(x), self.rope(x.device)[:x.shape[1]])  # (B, L, C)
        # head: per position, causal over [context, h_j, E1[s_j]] (teacher-forced semantic token)
        e = torch.stack([self.context(h), h, e1], 2)  # (B, L, 3, C)
        out = self.head(e.flatten(0, 1)).view(B, L, 3, C)
        logits_sem = self.output1(out[:, :, 1]).float()
        logits_det = self.output2(out[:, :, 2]).float()
        ce_sem = F.cross_entropy(logits_sem.flatten(0, 1), sem.flatten())
        ce_det = F.cross_entropy(logits_det.flatten(0, 1), det.flatten())
        return (logits_sem, logits_det), self.cfg.w1 * ce_sem + ce_det

    # --- generation -----------------------------------------------------------------------------
    def decode(self, x, start, mask, B):
        """One cached backbone call: x (kB, T, C) at positions start..start+T-1, mask the full
        (S, S) mask -> pre-norm states (kB, T, C), and the head-mean attention (B,) of the last
        layer's newest query to the class token (key 0), for the first B rows (the conditional
        half). start an int, or a 0-d long tensor when compiled (llamagen.query_rows)."""
        pos = start + torch.arange(x.shape[1], device=x.device)  # (T,)
        freqs = self.rope(x.device).index_select(0, pos)
        rows = llamagen.query_rows(mask, start, x.shape[1])
        for layer in self.layers[:-1]:
            x = layer(x, freqs, start, rows)
        last = self.layers[-1]
        normed = last.attention_norm(x)  # the last attention's input, for its class attention
        h = last(x, freqs, start, rows)  # writes the keys that cls_attention reads
        return h, self.cls_attention(normed[:B, -1:], freqs[-1:], rows[-1:])

    def cls_attention(self, x, freqs, visible):
        """x (B, 1, C) the last layer's normed input of one query, freqs (1, D/2, 2) its RoPE row,
        visible (1, S') its mask row over the first S' cached keys -> (B,) head-mean attention to
        the class token (key 0)."""
        attn, B = self.layers[-1].attention, len(x)
        q = attn.wqkv(x)[..., :self.cfg.dim].view(B, 1, attn.n_head, attn.head_dim)
        q = llamagen.apply_rope(q, freqs).transpose(1, 2)  # (B, H, 1, D)
        k = attn.kv_cache[0][:B, :, :visible.shape[1]]  # (B, H, S', D)
        scores = q @ k.transpose(2, 3) / attn.head_dim ** 0.5  # (B, H, 1, S')
        probs = scores.masked_fill(~visible, -float('inf')).softmax(-1)
        return probs[:, :, 0, 0].mean(1)

    @torch.inference_mode()
    def generate(self, labels, cfg_scale=1.0, cfg_scale1=(1.0, 1.0), cfg_scale2=(1.0, 1.0),
                 w_attn=0.05, temperature=1.0, top_k=0, top_p=1.0, generator=None, trace=None):
        """labels (B,) -> codes (B, 2L): the L semantic ids, then the L detail ids, as encode and
        forward take them. Per position a cached backbone call, a head call on [context, h]
        (semantic), one on E1[s] (detail). cfg_scale1 / 2: (first, last) semantic / detail scales
        (paper: (1.75, 3.0), w_attn 0.05); a pair left at (1, 1) takes cfg_scale at both ends
        (constant: w_attn has no effect). temperature, top_k, top_p: both tokens (official:
        lists). trace: called after every backbone call with the canvas so far
        (llamagen.trace_call)."""
        B, L, P, C = len(labels), self.cfg.block_size, self.cfg.cls_token_num, self.cfg.dim
        s1, s2 = scale_pair(cfg_scale1, cfg_scale), scale_pair(cfg_scale2, cfg_scale)
        S, device = P + L, labels.device
        cfg = llamagen.guided(*s1, *s2)
        cond = llamagen.cfg_batch(labels, self.cfg.num_classes) if cfg else labels  # (kB,)
        kB = len(cond)
        k = kB // B  # 2 with CFG: the conditional rows, then the null-class rows
        mask = torch.ones(S, S, dtype=torch.bool, device=device).tril()  # backbone and head slots
        sem = torch.empty(B, L, dtype=torch.long, device=device)
        det = torch.empty(B, L, dtype=torch.long, device=device)
        dtype = self.tok_embeddings1.weight.dtype
        hs = torch.zeros(kB, L, C, dtype=dtype, device=device)  # backbone states, for the window
        ugen = llamagen.trace_generator(trace, generator, device)
        self.nfe = 0
        with llamagen.eval_mode(self), llamagen.kv_caches(self.layers, kB, S, dtype, device):
            # the head's (k, v) caches hold 3 slots, rewritten at every position
            with llamagen.kv_caches(self.factorized_blocks, kB, 3, dtype, device):
                x = self.cls_embedding(cond)  # (kB, P, C)
                for n in range(L):
                    h, attn = llamagen.decode_call(self, x, 0 if n == 0 else P + n - 1, mask, B)
                    h = h[:, -1:]  # (kB, 1, C) predicts pair n
                    hs[:, n] = h[:, 0]
                    # semantic sub-step: head slots 0, 1 = [context, h]
                    e = torch.cat([self.context(hs, slice(n, n + 1)), h], 1)
                    logits_sem = self.output1(self.head(e, 0, mask[:2, :2])[:, -1]).float()
                    mixed = logits_sem
                    if cfg:
                        scale = cfg_schedule(s1, n, L, attn, w_attn)
                        mixed = llamagen.cfg_mix(logits_sem, scale)
                    s = llamagen.sample_logits(mixed, temperature, top_k, top_p, generator)
                    sem[:, n] = s[:, 0]
                    # detail sub-step: head slot 2 = E1[s_n], the same token in both CFG halves
                    e1 = self.tok_embeddings1(sem[:, n:n + 1].repeat(k, 1))  # (kB, 1, C)
                    logits_det = self.output2(self.head(e1, 2, mask[2:3, :3])[:, -1]).float()
                    if cfg:
                        scale = cfg_schedule(s2, n, L, attn, w_attn)
                        logits_det = llamagen.cfg_mix(logits_det, scale)
                    d = llamagen.sample_logits(logits_det, temperature, top_k, top_p, generator)
                    det[:, n] = d[:, 0]
                    if trace is not None:
                        pos = torch.arange(L, device=device).expand(B, L)
                        uncond = None
                        if cfg:  # (B, 2L): the pair from the null-class rows alone, read at n
                            pair = self.uncond_pair(logits_sem[B:], mask, k, ugen, temperature,
                                                    top_k, top_p)
                            uncond = pair.repeat_interleave(L, 1)
                        codes = torch.cat([sem, det], 1)
                        llamagen.trace_call(trace, codes, pos <= n, pos == n, uncond)
                    e2 = self.tok_embeddings2(det[:, n:n + 1].repeat(k, 1))
                    x = self.aggregation_layer(torch.cat([e1, e2], -1))  # the input of pair n
        return torch.cat([sem, det], 1)

    def uncond_pair(self, logits, mask, k, generator, *filters):
        """A trace's pair from the unconditional branch alone at one position: logits (B, V) the
        null-class rows' semantic logits -> (B, 2) ids: a semantic token sampled from them, then a
        detail token from the head fed that token. The extra head call rewrites head slot 2, which
        the next position writes again before reading it: the guided samples do not change.
        generator: the trace's own; filters: temperature, top_k, top_p."""
        B = len(logits)
        s = llamagen.sample_logits(logits, *filters, generator)  # (B, 1)
        e1 = self.tok_embeddings1(s.repeat(k, 1))  # (kB, 1, C): the head's cache has kB rows
        logits_det = self.output2(self.head(e1, 2, mask[2:3, :3])[B:, -1]).float()
        return torch.cat([s, llamagen.sample_logits(logits_det, *filters, generator)], 1)
