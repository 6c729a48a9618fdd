"""
IAR2: "IAR2: Improving Autoregressive Visual Generation with Semantic-Detail Associated Token
Prediction" (Yi, Hu, Su, Ma, 2025), arXiv:2510.06928. Official code: sjtuplayer/IAR2.

Each grid position holds a token pair: the tokenizer snaps the latent to the nearest semantic code
(of 256), the residual to the nearest code of one global detail codebook (of 4096), and sums them:
256 x 4096 combinations for 256 + 4096 vectors. The generator predicts per position the semantic,
then the detail token, in a head transformer that also sees a compressed window of the 12 generated
neighbours. CFG ramps from a first to a last scale, more for tokens attending to the class token.
Changes vs llamagen.py / vq.py:
  - Tokenizer: detail codebook, two-step quantisation, stage 1 / 2 modes set by on_step; ids (B, 2, h, w)
  - input: an aggregation MLP of the semantic and detail embeddings; RoPE rows doubled (official quirk)
  - head: mlp1/mlp2 compress the window of pre-norm backbone states; 5 factorized blocks run over
    [context, hidden, semantic embedding] -> output1 (semantic), output2 (detail); w1 * CE_sem + CE_det
  - generate: backbone step, semantic and detail sub-steps, progressive attention-guided CFG
Train (classroom, built-in data, CPU): python train.py --method iar2   (paper commands: README)
Shapes: B batch, T positions, C width, H heads, D head dim, h*w = L grid, V / V2 semantic / detail codes.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import llamagen
import vq
from llamagen import load_official  # noqa: F401 (the method contract)


# --- tokenizer -------------------------------------------------------------------------------------
@dataclass
class TokenizerConfig(vq.VQConfig):
    codebook_size: int = 256  # semantic codebook V (official: hard-coded 256)
    codebook_size_second: int = 4096  # detail codebook V2 (official 4096)
    first_stage_frac: float = 0.5  # share of the steps in stage 1 (semantic only), then stage 2 in the same
    #  run (0: stage 2 only, 1: stage 1 only). Officially two runs, stage 2 resuming stage 1. Ours: 0.5


TOKENIZER_SIZES = {
    'IAR2-VQ-16': dict(codebook_size=256, codebook_size_second=4096),  # official, 71.8M params, stride 16
    'IAR2-VQ-tiny': dict(codebook_size=32, codebook_size_second=512, encoder_ch_mult=(1, 1, 2),
                         decoder_ch_mult=(1, 1, 2), z_channels=64, ch=32, num_res_blocks=1),  # CPU, stride 4
}


class Quantizer(vq.VectorQuantizer):  # semantic `embedding` (V, e), used l2-normalised, as in vq.py
    def __init__(self, cfg):
        super().__init__(cfg)
        V2 = cfg.codebook_size_second  # detail codes (V2, e), a bare Parameter: unit norm at init, never re-normalised
        self.embedding_second = nn.Parameter(F.normalize(torch.empty(V2, cfg.codebook_embed_dim).uniform_(-1 / V2, 1 / V2), dim=-1))
        if cfg.codebook_show_usage:
            self.register_buffer('codebook_used2', torch.zeros(65536))
        self.mode = 'both'  # training only: 'semantic' (stage 1), 'detail' or 'both' (stage 2); set by on_step

    def forward(self, z):
        """z (B, e, h, w) -> z_q straight-through, losses (training), ids (B, 2, h, w)."""
        z = z.permute(0, 2, 3, 1)  # (B, h, w, e)
        z = F.normalize(z, dim=-1) if self.cfg.codebook_l2_norm else z
        zf, e1, e2 = z.reshape(-1, z.shape[-1]), self.codebook(), self.embedding_second
        d1 = torch.cdist(zf, e1).pow(2)  # (N, V) squared distances
        sem = d1.argmin(1)  # step 1: the nearest semantic code (cosine, as both are unit vectors)
        d2 = torch.cdist(zf - e1[sem], e2).pow(2)  # (N, V2)
        det = d2.argmin(1)  # step 2: the nearest detail code to the residual, among all V2
        mode = self.mode if self.training else 'both'  # 'detail': the semantic codebook gets no gradient, so
        # AdamW skips it; with per-parameter state that equals the official separate, paused Adam
        z_q = {'semantic': e1[sem], 'detail': e1.detach()[sem] + e2[det], 'both': e1[sem] + e2[det]}[mode].view(z.shape)
        losses = {}
        if self.training:
            losses['vq'] = (z_q - z.detach()).pow(2).mean()  # moves codes towards the encoder
            losses['commit'] = self.cfg.commit_loss_beta * (z_q.detach() - z).pow(2).mean()
            if mode == 'both':  # the official semantic-only pass of this step: only its codebook term reaches
                # the semantic codes (straight-through; its encoder/decoder grads are discarded officially)
                losses['vq_first'] = (e1[sem].view(z.shape) - z.detach()).pow(2).mean()
            if self.cfg.entropy_loss_ratio > 0:
                losses['entropy'] = self.cfg.entropy_loss_ratio * (vq.entropy_loss(-d1) + (mode != 'semantic') * vq.entropy_loss(-d2))
            if self.cfg.codebook_show_usage:
                n = min(sem.numel(), 65536)
                self.codebook_used.copy_(torch.cat([self.codebook_used[n:], sem[-n:].float()]))
                self.codebook_used2.copy_(torch.cat([self.codebook_used2[n:], det[-n:].float()]))
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), losses, torch.stack([sem, det]).view(2, *z.shape[:-1]).transpose(0, 1)

    def usage(self):  # used fraction of the detail codebook (in stage 1: of the semantic one)
        used = self.codebook_used if self.mode == 'semantic' else self.codebook_used2
        return torch.unique(used).numel() / (self.cfg.codebook_size if self.mode == 'semantic' else self.cfg.codebook_size_second)


class Tokenizer(vq.VQModel):
    """Stage 1: semantic codebook only. Stage 2 cycles [detail, detail, both] (official [second x2, first]):
    the semantic codebook is frozen on 'detail' steps and learns from both passes on 'both' steps. Exact:
    each codebook's gradient and the steps it moves on. Simplified: train.py adds MSE in both stages
    (stage 1 has none officially, but without LPIPS weights on CPU it is the only reconstruction
    signal), clips all gradients together and uses one AdamW (officially 3 Adams)."""
    def __init__(self, cfg):
        super().__init__(cfg)
        self.quantize = Quantizer(cfg)

    def on_step(self, step, total):  # called by train.py before each tokenizer step
        stage1 = round(self.cfg.first_stage_frac * total)
        self.quantize.mode = 'semantic' if step < stage1 else ('detail', 'detail', 'both')[(step - stage1) % 3]

    def decode_code(self, sem, det=None):  # sem, det (B, h*w) or (B, h, w); or one (B, 2, h, w) / (B, 2*h*w)
        if det is None:
            sem, det = sem.reshape(len(sem), 2, -1).unbind(1)
        g, q = int(sem[0].numel() ** 0.5), self.quantize
        z_q = q.codebook()[sem.reshape(-1, g, g)] + q.embedding_second[det.reshape(-1, g, g)]  # (B, h, w, e)
        return self.decode(z_q.permute(0, 3, 1, 2))


# --- generator -------------------------------------------------------------------------------------
SIZES = {  # the official LlamaGen widths and depths + 5 head blocks
    'IAR2-tiny': dict(n_layer=3, n_head=4, dim=128, factorized_n_layer=1),  # CPU: 4 blocks in all, as GPT-tiny
    'IAR2-B': dict(n_layer=12, n_head=12, dim=768),  # 143M
    'IAR2-L': dict(n_layer=24, n_head=16, dim=1024),  # 408M
    'IAR2-XL': dict(n_layer=36, n_head=20, dim=1280),  # 884M
    'IAR2-XXL': dict(n_layer=48, n_head=24, dim=1536),  # 1.57B
}


@dataclass
class Config(llamagen.Config):
    vocab_size: int = 256  # semantic codebook V (derived from the tokenizer)
    sub_vocab_size: int = 4096  # detail codebook V2 (derived from the tokenizer)
    factorized_n_layer: int = 5  # head transformer blocks (official 5)
    w1: float = 1.0  # loss weight of the semantic CE (official default 1.0; README FSDP example 2.0)
    rope_repeat: bool = True  # official quirk: every grid row of the RoPE table appears twice, see rope_table


def window_index(g):
    """-> (g*g, 12) raster indices of each position's causal neighbours on a g x g grid and their validity
    mask. Official slots: row i-2 columns j-2..j+2, row i-1 the same, then (i, j-2), (i, j-1)."""
    pos, dc = llamagen.grid_positions(g), torch.tensor([-2, -1, 0, 1, 2] * 2 + [-2, -1])
    r, c = pos[:, :1] + torch.tensor([-2] * 5 + [-1] * 5 + [0, 0]), pos[:, 1:] + dc  # (g*g, 12)
    valid = (r >= 0) & (c >= 0) & (c < g)
    return torch.where(valid, r * g + c, 0), valid


def cfg_schedule(pair, n, L, attn, w_attn):
    """-> (B, 1) CFG scale of step n of L: pair[0] at w = 0 to pair[1] at w = 1 (beyond when w > 1), with
    w = n/(L-1) + w_attn * attn and attn (B,) the step's head-mean last-layer attention to the class."""
    w = (n / (L - 1) if L > 1 else 0.5) + w_attn * attn
    return (pair[0] * (1 - w) + pair[1] * w)[:, None]


def mlp(d_in, d_hidden, d_out, bias=True):  # official nn.Sequential: 0 Linear, 1 GELU (erf), 2 Linear
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out, bias=bias))


class Model(llamagen.Model):
    def __init__(self, cfg):
        super().__init__(cfg)
        del self.tok_embeddings, self.output  # replaced by the pair embedding and the two heads
        C, V, V2 = cfg.dim, cfg.vocab_size, cfg.sub_vocab_size
        self.factorized_blocks = nn.ModuleList(llamagen.TransformerBlock(cfg) for _ in range(cfg.factorized_n_layer))
        self.tok_embeddings1, self.tok_embeddings2 = nn.Embedding(V, C), nn.Embedding(V2, C)
        self.aggregation_layer = mlp(2 * C, 4 * C, C)  # [E1[s], E2[d]] -> one input per position
        self.output1, self.output2 = mlp(C, 2 * C, V, bias=False), mlp(C, 2 * C, V2, bias=False)  # semantic, detail
        self.mlp1, self.mlp2 = mlp(C, C // 4, C // 12, bias=False), mlp(C // 12 * 12, 2 * C, C, bias=False)  # window
        for name, t in zip(('win_idx', 'win_mask'), window_index(self.grid)):  # not in the state dict
            self.register_buffer(name, t, persistent=False)
        self.apply(self._init_weights)  # official init: normal(0, 0.02), zero biases, zero last output layers
        [nn.init.zeros_(m.bias) for m in self.modules() if isinstance(m, nn.Linear) and m.bias is not None]
        for out in (self.output1, self.output2):  # the logits start uniform
            nn.init.zeros_(out[2].weight)

    def rope_table(self):
        """Official quirk: grid rows repeated, (P + 2L) rows, so position p >= 1 turns by grid cell (p-1)//2:
        pairs share an angle, only the top half of the grid occurs. Official checkpoints need it."""
        table, P = super().rope_table(), self.cfg.cls_token_num
        return torch.cat([table[:P], table[P:].repeat_interleave(2, 0)]) if self.cfg.rope_repeat else table

    def backbone(self, h, freqs, start=0, mask=None):  # (B, T, C) -> (B, T, C) pre-norm hidden states
        for layer in self.layers:
            h = layer(h, freqs, start, mask)
        return h

    def context(self, h, rows=slice(None)):  # h (B, L, C), h_q predicts pair q -> (B, T, C) at rows
        # the 12 window states (zeros outside the grid), each through mlp1, concatenated, through mlp2
        win = h[:, self.win_idx[rows]] * self.win_mask[rows, :, None]  # (B, T, 12, C)
        return self.mlp2(self.mlp1(win).flatten(2))

    def head(self, x, start=0, mask=None):  # (N, T, C) micro-sequence at positions start.. -> normed (N, T, C)
        freqs = self.rope(x.device)[start:start + x.shape[1]]  # rows 0..2 (official): zero (slot 0's q, k vanish), cell (0, 0) x2
        for block in self.factorized_blocks:
            x = block(x, freqs, start, mask)
        return self.norm(x)

    def forward(self, tokens, labels):
        """Teacher forcing. tokens (B, 2L): the L semantic ids, then the L detail ids (raster order);
        labels (B,) -> ((logits_sem (B, L, V), logits_det (B, L, V2)), loss)."""
        B, L, C = len(tokens), self.cfg.block_size, self.cfg.dim
        sem, det = tokens[:, :L], tokens[:, L:]
        e1 = self.tok_embeddings1(sem)  # (B, L, C)
        x = self.aggregation_layer(torch.cat([e1, self.tok_embeddings2(det)], -1))
        x = torch.cat([self.cls_embedding(labels), x[:, :-1]], 1)  # position j predicts pair j
        h = self.backbone(self.tok_dropout(x), self.rope(x.device)[:x.shape[1]])  # (B, L, C)
        # head: per position, causal over [context, h_j, E1[s_j]] (teacher-forced semantic token)
        out = self.head(torch.stack([self.context(h), h, e1], 2).flatten(0, 1)).view(B, L, 3, C)
        logits = self.output1(out[:, :, 1]).float(), self.output2(out[:, :, 2]).float()
        ce = [F.cross_entropy(lg.flatten(0, 1), t.flatten()) for lg, t in zip(logits, (sem, det))]
        return logits, self.cfg.w1 * ce[0] + ce[1]

    # --- generation -----------------------------------------------------------------------------
    def cls_attention(self, x, freqs, start, B):
        """-> (B,) last layer's head-mean attention of the newest query to the class token (key 0), for
        the first B rows (the conditional half). x, freqs, start: that layer's attention inputs."""
        attn = self.layers[-1].attention
        q = llamagen.apply_rope(attn.wqkv(x[:B, -1:])[..., :self.cfg.dim].view(B, 1, attn.n_head, -1), freqs[-1:])
        k = attn.kv_cache[0][:B, :, :start + x.shape[1]]  # (B, H, S, D): the cached keys up to this query
        return (q.transpose(1, 2) @ k.transpose(2, 3) / k.shape[-1] ** 0.5).softmax(-1)[:, :, 0, 0].mean(1)

    @torch.inference_mode()
    def generate(self, labels, cfg_scale=1.0, cfg_scale1=(1.0, 1.0), cfg_scale2=(1.0, 1.0), w_attn=0.05,
                 temperature=1.0, top_k=0, top_p=1.0, generator=None):
        """labels (B,) -> (semantic, detail) ids, (B, L) each. Per position a cached backbone call, a head
        call on [context, h] (semantic), one on E1[s] (detail). cfg_scale1 / 2: (first, last) semantic /
        detail scales (paper: (1.75, 3.0), w_attn 0.05); a pair left at (1, 1) takes cfg_scale at both
        ends (constant: w_attn has no effect). temperature, top_k, top_p: both tokens (official: lists)."""
        training, (B, L, P) = self.training, (len(labels), self.cfg.block_size, self.cfg.cls_token_num)
        if any(len(s) != 2 for s in (cfg_scale1, cfg_scale2)):
            raise SystemExit('iar2.py: --cfg-scale1 / --cfg-scale2 take two scales: first, last')
        s1, s2 = (tuple(s) if tuple(s) != (1.0, 1.0) else (cfg_scale, cfg_scale) for s in (cfg_scale1, cfg_scale2))
        guided, S, device = max(s1 + s2) > 1.0, P + L, labels.device
        self.eval()
        cond = self.cfg_labels(labels, 2.0 if guided else 1.0)  # (kB,): conditional, then null class if guided
        k, mask, x = len(cond) // B, torch.ones(S, S, dtype=torch.bool, device=device).tril(), self.cls_embedding(cond)
        self.setup_cache(len(cond), S, x.dtype, device)
        for block in self.factorized_blocks:  # the head's (k, v) caches of 3 slots, rewritten at every position
            block.attention.kv_cache = tuple(x.new_zeros(len(cond), self.cfg.n_head, 3, self.cfg.dim // self.cfg.n_head) for _ in 'kv')
        seen = []  # the last layer's attention inputs, for the attention to the class token
        hook = self.layers[-1].attention.register_forward_hook(lambda m, args, out: seen.append(args))
        ids, hs = torch.empty(2, B, L, dtype=torch.long, device=device), x.new_zeros(len(cond), L, self.cfg.dim)
        self.nfe, self.attn_record = 0, []  # backbone calls; (B,) attention to the class per position
        try:
            for n in range(L):
                h = self.decode(x, 0 if n == 0 else P + n - 1, mask)[:, -1:]  # (kB, 1, C) predicts pair n
                hs[:, n] = h[:, 0]
                self.attn_record.append(self.cls_attention(*seen.pop()[:3], B))
                e = torch.cat([self.context(hs, slice(n, n + 1)), h], 1)  # [context, h]: head slots 0, 1
                for i, (out, pair) in enumerate(((self.output1, s1), (self.output2, s2))):
                    logits = out(self.head(e, 2 * i, mask[2 * i:2 + i, :2 + i])[:, -1]).float()  # slots 0-1, then 2
                    if guided:
                        logits = llamagen.cfg_mix(logits, cfg_schedule(pair, n, L, self.attn_record[-1], w_attn))
                    ids[i, :, n] = llamagen.sample_logits(logits, temperature, top_k, top_p, generator)[:, 0]
                    e = self.tok_embeddings1(ids[0, :, n:n + 1].repeat(k, 1))  # E1[s_n]: head slot 2, then input
                x = self.aggregation_layer(torch.cat([e, self.tok_embeddings2(ids[1, :, n:n + 1].repeat(k, 1))], -1))
        finally:
            hook.remove(), self.clear_cache(), self.train(training)
            [setattr(block.attention, 'kv_cache', None) for block in self.factorized_blocks]
        return ids[0], ids[1]
