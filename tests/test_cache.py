"""The code cache on disk: built by N ranks as by 1, resumed after a kill, never reused when it is
of other codes, and read through memory maps (a rank's memory does not grow with the dataset)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

import train
from conftest import DATA, GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = GPT + ['--global-batch-size', '8', '--log-every', '1', '--sample-every', '1000',
             '--ckpt-every', '1000', '--max-steps', '1']


def cache_of(results):
    (name,) = [c for c in os.listdir(results / 'codes') if not c.endswith('.lock')]
    folder = results / 'codes' / name
    with open(folder / 'manifest.json') as f:
        manifest = json.load(f)
    return folder, manifest


def arrays(folder):
    return {k: np.load(folder / f'{k}.npy') for k in ('codes', 'labels', 'done')}


def test_two_ranks_build_the_cache_one_rank_builds(tiny_vq, tmp_path):
    train.main(GEN + DATA + ['--tokenizer', tiny_vq, '--results-dir', str(tmp_path / 'one')])
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'train.py')] + GEN + DATA + [
        '--tokenizer', tiny_vq, '--results-dir', str(tmp_path / 'two')]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path,
                   env={**os.environ, 'OMP_NUM_THREADS': '1'})
    (one, m1), (two, m2) = cache_of(tmp_path / 'one'), cache_of(tmp_path / 'two')
    assert m1 == m2 and m1['complete'] and m1['dtype'] == 'int32' and m1['shape'] == [16]
    a, b = arrays(one), arrays(two)
    assert all(np.array_equal(a[k], b[k]) for k in a) and a['done'].all()
    assert a['codes'].shape == (64, 2, 16)  # each image and its flip


def test_an_interrupted_build_resumes_to_the_same_cache(tiny_vq, tmp_path):
    data = ['--num-images', '3000', '--image-size', '16']
    train.main(GEN + data + ['--tokenizer', tiny_vq, '--results-dir', str(tmp_path / 'clean')])
    cmd = [sys.executable, os.path.join(ROOT, 'train.py')] + GEN + data + [
        '--tokenizer', tiny_vq, '--results-dir', str(tmp_path / 'killed')]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = None
    t0 = time.time()
    while time.time() - t0 < 120:  # kill -9 once part of the images are encoded
        files = list((tmp_path / 'killed').glob('codes/*/done.npy'))
        if files and 0 < np.load(files[0]).sum() < 2000:
            done = np.load(files[0]).sum()
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done is not None, 'the extraction was not caught midway'
    folder, manifest = cache_of(tmp_path / 'killed')
    assert not manifest['complete']  # a half-built cache is marked as such
    train.main(GEN + data + ['--tokenizer', tiny_vq, '--results-dir', str(tmp_path / 'killed')])
    clean, resumed = arrays(cache_of(tmp_path / 'clean')[0]), arrays(folder)
    assert all(np.array_equal(clean[k], resumed[k]) for k in clean)
    assert cache_of(tmp_path / 'killed')[1]['complete']


def test_a_cache_of_other_codes_is_rebuilt(tiny_vq, tmp_path, capsys):
    args = GEN + DATA + ['--tokenizer', tiny_vq, '--results-dir', str(tmp_path)]
    train.main(args)
    folder, manifest = cache_of(tmp_path)
    with open(folder / 'manifest.json', 'w') as f:  # as if its images had been others
        json.dump({**manifest, 'count': 7}, f)
    train.main(args)
    assert 'is of other codes; rebuilding it' in capsys.readouterr().out
    assert cache_of(tmp_path)[1] == manifest


def test_mar_moments_are_cached_in_16_bits(tmp_path):
    import mar
    tok = mar.Tokenizer(mar.TokenizerConfig(**mar.TOKENIZER_SIZES['KL-tiny']))
    data = train.builtin_dataset(8, 16, 0)
    x = data[0][0][None].float() / 127.5 - 1
    manifest = train.cache_manifest(tok, data, 16, tok.encode(x))
    assert manifest['dtype'] == 'float16' and manifest['shape'] == [8, 4, 4]


READER = '''
import resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, torch, train
cache = train.CodeCache(sys.argv[2])
it = train.batches(cache, 64, 0, 0, 1, 0, 0, torch.device('cpu'))
for _ in range(200):
    next(it)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
'''


def synthetic_cache(folder, n):  # n images of 256 int32 ids each, and their flips
    os.makedirs(folder)
    codes = np.lib.format.open_memmap(folder / 'codes.npy', 'w+', np.int32, (n, 2, 256))
    codes[:] = 7
    codes.flush()
    np.save(folder / 'labels.npy', np.arange(n) % 10)


def test_memory_does_not_grow_with_the_cache(tmp_path):
    synthetic_cache(tmp_path / 'small', 10_000)  # 20 MB
    synthetic_cache(tmp_path / 'large', 100_000)  # 200 MB
    rss = {}
    for name in ('small', 'large'):
        out = subprocess.run([sys.executable, '-c', READER, ROOT, str(tmp_path / name)],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, 'OMP_NUM_THREADS': '1'})
        rss[name] = int(out.stdout.split()[-1]) / 1024  # MB (Linux: ru_maxrss in KB)
    assert rss['large'] - rss['small'] < 15, rss  # 180 MB more cache, at most a few MB more


def test_cached_entries_are_each_image_then_its_flip(tiny_vq, tmp_path):
    train.main(GEN + DATA + ['--tokenizer', tiny_vq, '--results-dir', str(tmp_path)])
    cache = train.CodeCache(str(cache_of(tmp_path)[0]))
    tok = train.llamagen.load_tokenizer(train.llamagen, tiny_vq).eval()
    img, label = train.builtin_dataset(64, 16, 0)[5]
    x = img[None].float() / 127.5 - 1
    with torch.no_grad():
        assert torch.equal(cache[10][0], tok.encode(x)[0]) and cache[10][1] == label
        assert torch.equal(cache[11][0], tok.encode(x.flip(-1))[0])
    assert len(cache) == 128
