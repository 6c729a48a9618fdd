"""
NPP: "Next Patch Prediction for Autoregressive Visual Generation" (Pang et al., 2024),
arXiv:2412.15321. Official code: PKU-YuanGroup/Next-Patch-Prediction (a fork of LlamaGen).

Idea: a training curriculum for LlamaGen, not a new model. Early in training the image tokens are
grouped into p x p patches: the input at each position is the mean embedding of one patch (so the
sequence is p^2 times shorter and a step is much cheaper), and each position is trained to put
probability on every token of the next patch (p^2 targets, averaged). Training then moves to
smaller patches and ends with plain next-token prediction (p = 1), the same objective as LlamaGen,
so the final model has the same parameters, checkpoints and sampler. With 2x2 patches for the first
half of 300 epochs it costs about 0.6x the compute of LlamaGen and improves FID (GPT-B 4.47 vs
5.46).

Changes vs llamagen.py:
  - Config: the stage plan (patch_level, epoch_rate) and its per-stage LR schedule.
  - forward: inputs are patch-mean embeddings on the coarse grid (RoPE in patch units), the last
    patch dropped; the loss scores each position against all p^2 tokens of the next patch.
  - on_step: picks the stage (patch side p) and returns the LR multiplier of the step.
  - No new parameters; generate is LlamaGen's, unchanged (token by token).
Train: torchrun --nproc_per_node=8 train.py --method npp --model GPT-B --data-path ... \
         --image-size 256 --tokenizer vq_ds16_c2i.pt --epochs 300 --global-batch-size 256 \
         --lr 1e-4 --warmup-steps 0 --patch-level 2 --epoch-rate 0.5
       (classroom: python train.py --method npp; on_step owns the LR schedule, train.py's warmup
       is skipped)
Shapes: B batch, T sequence positions, C width, H heads, D head dim, h*w token grid, V codebook.
"""
import math
from dataclasses import dataclass

import torch

import llamagen
# the method contract, as LlamaGen's: sizes, tokenizer, Config fields, AdamW groups and loader
from llamagen import SIZES, TOKENIZER_SIZES, Tokenizer, TokenizerConfig  # noqa: F401 (re-exported)
from llamagen import derive_config, load_official, param_groups  # noqa: F401 (re-exported)

CLASSROOM = {}  # train.py's shared defaults suit NPP: nothing to change

# sample.py --official: the paper's FID settings per released model (256 px)
PAPER = {
    'GPT-B': dict(cfg_scale=2.0),
    'GPT-L': dict(cfg_scale=1.75),
    'GPT-XL': dict(cfg_scale=1.7),
    'GPT-XXL': dict(cfg_scale=1.65),
}


@dataclass
class Config(llamagen.Config):
    patch_level: int = 2  # stages: 2 = 2x2 patches, then tokens; 3 starts with 4x4 (paper 2)
    epoch_rate: float = 0.5  # stage i from the end ends at epoch_rate^i of training (paper 0.5)
    # LR warmup at every stage start, as a fraction of all steps (paper 5 of 300 epochs; the
    # official code's default is 1 epoch)
    warmup_ratio: float = 5 / 300
    decay_ratio: float = 0.2  # linear LR decay over the last 20% of each stage (paper 0.2)
    end_lr_ratio: float = 0.1  # ... down to 0.1 x --lr: the paper's end LR 1e-5 at LR 1e-4


def stage_ends(level, rate, total):
    """Where each stage ends, first stage first, in the unit of total (epochs or steps):
    [int(total * rate^i) for i < level] reversed; level 2, rate 0.5, 300 -> [150, 300]. Stage i
    trains on p x p patches with p = 2^(level - 1 - i), so the last stage is always next-token
    (p = 1)."""
    return [int(total * rate ** i) for i in range(level)][::-1]


def lr_scale(step, start, end, warmup, decay_ratio, end_ratio):
    """LR multiplier at step of the stage [start, end): a linear warmup over warmup steps that
    restarts with every stage, constant, then a linear decay over the last decay_ratio of the stage
    towards end_ratio (reached at the stage end)."""
    decay = decay_ratio * (end - start)
    if step - start < warmup:
        # as train.py's warmup; the official one starts at 0, wasting a step
        return (step - start + 1) / warmup
    if step >= end - decay:
        return end_ratio + (1 - end_ratio) * (end - step) / decay
    return 1.0


def patchify(x, p):
    """(B, h*w, ...) in raster order -> (B, h*w/p^2, p^2, ...): the p x p patches in raster order
    over the coarse (h/p x w/p) grid, the tokens of a patch row-major. Pure reshapes, so it works on
    token ids as well as embeddings. (The official code gathers the target ids with F.unfold, which
    has no int64 kernel: 'im2col not implemented for Long'. The released training script fails on
    it.)"""
    B, L, g = x.shape[0], x.shape[1], math.isqrt(x.shape[1])
    # (B, row, row in patch, col, col in patch, ...)
    x = x.reshape(B, g // p, p, g // p, p, *x.shape[2:])
    return x.transpose(2, 3).reshape(B, L // (p * p), p * p, *x.shape[5:])


class Model(llamagen.Model):
    def __init__(self, cfg):
        super().__init__(cfg)
        n = 2 ** (cfg.patch_level - 1)  # the largest patch side
        assert self.grid % n == 0, (f'a {self.grid}x{self.grid} token grid has no {n}x{n} patches '
                                    f'(patch_level {cfg.patch_level})')
        # patch side p of the next forward(); on_step sets it, generate never reads it
        self.patch = 1

    def rope_table(self, p=1):
        """(cls + h*w/p^2, D/2, 2): the core's table on the coarse grid. Patch (i, j) turns by
        (i, j) in patch units (official), not by its token coordinates; p = 1 is LlamaGen's
        table."""
        hd = self.cfg.dim // self.cfg.n_head
        zeros = torch.zeros(self.cfg.cls_token_num, hd // 2, 2)
        coarse = llamagen.grid_positions(self.grid // p)
        return torch.cat([zeros, llamagen.rope_2d(coarse, hd, self.cfg.rope_base)])

    def forward(self, tokens, labels):
        """Teacher forcing on p x p patches. tokens (B, h*w) raster order, labels (B,) -> logits
        (B, T, V) with T = h*w/p^2, and the loss. Position j sees the class and patches < j and
        predicts every token of patch j. With p = 1 this is LlamaGen's forward."""
        p = self.patch
        patches = patchify(self.tok_embeddings(tokens), p).mean(2)  # (B, T, C): mean per patch
        # the last patch is never an input
        x = torch.cat([self.cls_embedding(labels), patches[:, :-1]], dim=1)
        # (1 + T, D/2, 2): the model's own table at p = 1, a coarse one built per call otherwise
        freqs = self.rope(x.device) if p == 1 else self.rope_table(p).to(x.device)
        logits = self.backbone(self.tok_dropout(x), freqs[: x.shape[1]])
        # cross-entropy of each position against every token of the patch it predicts, averaged:
        # one log-softmax per position and a gather (the official code copies the logits p^2 times)
        logp = logits.log_softmax(-1).gather(-1, patchify(tokens, p))  # (B, T, p^2)
        return logits, -logp.mean()

    def on_step(self, step, total_steps):
        """Coarse to fine: set this step's patch side and return its LR multiplier. The stages are
        fractions of total_steps; the official code counts whole epochs, which gives the same
        boundaries wherever epochs * rate^i is whole (300 epochs, rate 0.5: 75, 150)."""
        cfg = self.cfg
        ends = stage_ends(cfg.patch_level, cfg.epoch_rate, total_steps)
        i = next(i for i, end in enumerate(ends) if step < end)  # the current stage
        self.patch = 2 ** (len(ends) - 1 - i)
        start = ends[i - 1] if i else 0
        warmup = round(cfg.warmup_ratio * total_steps)
        return lr_scale(step, start, ends[i], warmup, cfg.decay_ratio, cfg.end_lr_ratio)

    # generate(): LlamaGen's, unchanged. NPP trains on patches but samples token by token, so NPP
    # checkpoints (ours and official) are LlamaGen checkpoints.
