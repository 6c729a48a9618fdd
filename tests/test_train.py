"""train.py and sample.py end to end at tiny sizes: training, resume exactness, 2-process DDP,
sampling to PNG / .npz, and clear errors on bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from conftest import DATA, GPT, VQ

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ['--stage', 'tokenizer', '--max-steps', '3', '--global-batch-size', '8', '--disc-start', '1',
       '--log-every', '1'] + VQ + DATA
GEN = GPT + ['--global-batch-size', '8', '--log-every', '1', '--sample-every', '1000',
             '--ckpt-every', '1000'] + DATA


def losses(run):
    return [json.loads(line)['loss'] for line in open(os.path.join(run, 'log.jsonl'))]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp('tok')
    train.main(TOK + ['--run-dir', str(root / 'tok'), '--results-dir', str(root)])
    return str(root / 'tok' / 'last.pt')


def test_builtin_dataset_is_deterministic_and_balanced():
    a, la = train.builtin_images(40, 32, seed=0)
    b, lb = train.builtin_images(40, 32, seed=0)
    c, _ = train.builtin_images(40, 32, seed=1)
    assert a.shape == (40, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(la).tolist() == [4] * 10 and len(train.CLASSES) == 10
    assert train.builtin_images(2, 256)[0].shape == (2, 256, 256, 3)


def test_tokenizer_stage(tok):
    ckpt = torch.load(tok, weights_only=True)
    assert ckpt['stage'] == 'tokenizer' and ckpt['step'] == 3 and 'discriminator' in ckpt
    assert len(losses(os.path.dirname(tok))) == 3
    assert os.path.exists(os.path.join(os.path.dirname(tok), 'samples', '0000003.png'))


def test_generator_trains_and_samples(tok, tmp_path):
    run = tmp_path / 'gen'
    train.main(GEN + ['--tokenizer', tok, '--max-steps', '4', '--run-dir', str(run),
                      '--results-dir', str(tmp_path), '--ema', '0.9'])
    ckpt = torch.load(run / 'last.pt', weights_only=True)  # a plain dict: the default load works
    assert ckpt['method'] == 'llamagen' and ckpt['step'] == 4 and 'ema' in ckpt
    assert ckpt['config']['block_size'] == 16
    assert os.path.exists(run / 'samples' / '0000004.png') and len(losses(run)) == 4
    out = tmp_path / 's.npz'
    sample.main(['--ckpt', str(run / 'last.pt'), '--grid', str(tmp_path / 'g.png'),
                 '--num-samples', '25', '--out', str(out), '--batch-size', '4', '--benchmark'])
    npz = np.load(out)
    assert npz['arr_0'].shape == (25, 16, 16, 3) and npz['arr_0'].dtype == np.uint8
    assert np.bincount(npz['arr_1']).tolist() == [3] * 5 + [2] * 5  # class-balanced
    grid = Image.open(tmp_path / 'g.png')
    assert grid.size == (8 * 18 + 2, 10 * 18 + 2)  # 10 classes x 8, 2-pixel gaps


def test_resume_continues_the_exact_loss_sequence(tok, tmp_path):
    args = GEN + ['--tokenizer', tok, '--results-dir', str(tmp_path), '--warmup-steps', '4']
    train.main(args + ['--max-steps', '6', '--run-dir', str(tmp_path / 'a')])  # dropout on
    train.main(args + ['--max-steps', '3', '--run-dir', str(tmp_path / 'b')])  # stop after 3 ...
    # ... and resume: the run's own directory and tokenizer
    resume = GEN + ['--results-dir', str(tmp_path), '--warmup-steps', '4', '--max-steps', '6']
    train.main(resume + ['--resume', str(tmp_path / 'b' / 'last.pt')])
    assert len(losses(tmp_path / 'a')) == 6
    assert losses(tmp_path / 'b') == losses(tmp_path / 'a')  # bit for bit
    with pytest.raises(SystemExit, match='exists; pass --resume'):  # a run is not overwritten
        train.main(args + ['--max-steps', '6', '--run-dir', str(tmp_path / 'a')])


def test_ddp_two_processes_match_one(tok, tmp_path):
    nodrop = ['--token-dropout-p', '0', '--resid-dropout-p', '0', '--ffn-dropout-p', '0',
              '--class-dropout-prob', '0', '--cfg-scale', '1', '--tokenizer', tok,
              '--max-steps', '4']
    one_run = ['--run-dir', str(tmp_path / 'one'), '--results-dir', str(tmp_path / 'r1')]
    train.main(GEN + nodrop + one_run)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'train.py')]
    two_run = ['--run-dir', str(tmp_path / 'two'), '--results-dir', str(tmp_path / 'r2')]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    subprocess.run(cmd + GEN + nodrop + two_run, check=True, env=env, capture_output=True,
                   cwd=tmp_path)
    one, two = losses(tmp_path / 'one'), losses(tmp_path / 'two')
    assert len(two) == 4  # one log line per step: rank 0 only
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5
    files = ['last.pt', 'log.jsonl', 'loss.png', 'samples', 'tokenizer.pt']
    assert sorted(os.listdir(tmp_path / 'two')) == files
    assert Image.open(tmp_path / 'two' / 'loss.png').size == (480, 240)  # redrawn at each log
    # the shards of the code extraction joined, the parts removed
    assert os.listdir(tmp_path / 'r2' / 'codes') == os.listdir(tmp_path / 'r1' / 'codes')


def folder(root, n=4, bad=False):
    for c in ('cats', 'dogs'):
        os.makedirs(root / c)
        for i in range(n):
            pixels = np.random.randint(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f'{i}.png')
    if bad:
        (root / 'dogs' / 'broken.png').write_bytes(b'not a png at all')
    return str(root)


def test_image_folder_skips_unreadable_images(tok, tmp_path, capsys):
    data = folder(tmp_path / 'data', bad=True)
    train.main(GEN + ['--tokenizer', tok, '--data-path', data, '--max-steps', '1',
                      '--global-batch-size', '4', '--run-dir', str(tmp_path / 'run'),
                      '--results-dir', str(tmp_path), '--num-workers', '0'])
    out = capsys.readouterr().out
    assert 'skipping unreadable image' in out and 'broken.png' in out
    ds = train.ImageFolder(data, 16)
    assert ds.classes == ['cats', 'dogs'] and len(ds) == 9 and ds[8][0].shape == (3, 16, 16)


@pytest.mark.parametrize('extra,message', [
    (['--data-path', 'missing-dir'], 'not a directory'),
    (['--data-path', '{empty}'], 'no images'),
    (['--image-size', '18'], 'not divisible by the tokenizer stride 4'),
    (['--resume', '{tok}'], "--dim 32 differs from the run's default"),
    (['--vocab-size', '64'], '--vocab-size is fixed by the tokenizer and the data'),
])
def test_bad_input_gives_one_clear_line(tok, tmp_path, extra, message):
    os.makedirs(tmp_path / 'empty')
    extra = [a.format(empty=tmp_path / 'empty', tok=tok) for a in extra]
    run = ['--run-dir', str(tmp_path / 'r'), '--results-dir', str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        train.main(GEN + ['--tokenizer', tok, '--max-steps', '1'] + run + extra)
    assert message in str(e.value) and '\n' not in str(e.value)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tok, tmp_path):
    run = tmp_path / 'nan'
    with pytest.raises(SystemExit) as e:
        train.main(GEN + ['--tokenizer', tok, '--lr', '1e30', '--max-steps', '20',
                          '--ckpt-every', '1', '--run-dir', str(run),
                          '--results-dir', str(tmp_path)])
    assert 'loss is nan or inf' in str(e.value)
    assert f'Last good checkpoint: {run / "last.pt"}' in str(e.value)
    ck = torch.load(run / 'last.pt', weights_only=True)
    assert ck['step'] >= 1 and all(torch.isfinite(v).all() for v in ck['model'].values())


def test_cli_errors_have_no_traceback(tok, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, 'sample.py'), '--ckpt', tok, '--grid', 'x.png']
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    line = f'{tok}: a llamagen tokenizer checkpoint, not a llamagen generator one'
    assert r.stderr.strip().splitlines() == [line]


def test_official_checkpoints_sample(tmp_path):
    """Files in the official layout (a state dict under 'model' next to a pickled
    argparse.Namespace) load strictly through sample.py --official and sample."""
    import argparse

    import llamagen
    import vq
    tok = vq.VQModel(vq.VQConfig(**vq.VQ_SIZES['VQ-tiny']))
    cfg = llamagen.Config(**llamagen.SIZES['GPT-tiny'], vocab_size=512, block_size=64,
                          num_classes=10)
    gpt = llamagen.Model(cfg)
    ns = argparse.Namespace(gpt_model='GPT-tiny', image_size=32)
    torch.save({'model': tok.state_dict(), 'optimizer': {}, 'steps': 1, 'args': ns},
               tmp_path / 'vq.pt')
    torch.save({'model': gpt.state_dict(), 'steps': 1, 'args': ns}, tmp_path / 'gpt.pt')
    files = ['--official', '--method', 'llamagen', '--gpt-ckpt', str(tmp_path / 'gpt.pt'),
             '--vq-ckpt', str(tmp_path / 'vq.pt'), '--vq-model', 'VQ-tiny', '--image-size', '32']
    sample.main(files + ['--model', 'GPT-tiny', '--num-classes', '10', '--grid',
                         str(tmp_path / 'g.png'), '--classes', '3', '7', '--per-class', '2'])
    assert Image.open(tmp_path / 'g.png').size == (2 * 34 + 2, 2 * 34 + 2)
    with pytest.raises(SystemExit, match='not a checkpoint of this model/size'):  # one line
        sample.main(files + ['--model', 'GPT-B', '--grid', 'x.png'])


def test_tokenizer_with_lpips_weights(tmp_path):
    import vq
    vgg = {f'features.{k}': v for k, v in vq.LPIPS().features.state_dict().items()}
    torch.save(vgg, tmp_path / 'vgg16.pth')
    widths = (64, 128, 256, 512, 512)
    lin = {f'lin{i}.model.1.weight': torch.rand(1, c, 1, 1) for i, c in enumerate(widths)}
    torch.save(lin, tmp_path / 'vgg.pth')
    train.main(TOK + ['--max-steps', '2', '--run-dir', str(tmp_path / 'tok'),
                      '--results-dir', str(tmp_path),
                      '--lpips', f'{tmp_path / "vgg16.pth"},{tmp_path / "vgg.pth"}'])
    assert len(losses(tmp_path / 'tok')) == 2


def test_a_moved_run_samples_from_any_working_directory(tok, tmp_path, monkeypatch):
    """A run keeps its tokenizer (RUN/tokenizer.pt): moving the whole results folder, and sampling
    from another working directory, still works."""
    monkeypatch.chdir(tmp_path)
    train.main(GEN + ['--tokenizer', tok, '--max-steps', '1'])  # ./results/000-llamagen-generator
    os.rename(tmp_path / 'results', tmp_path / 'moved')
    os.makedirs(tmp_path / 'elsewhere')
    monkeypatch.chdir(tmp_path / 'elsewhere')
    ckpt = str(tmp_path / 'moved' / '000-llamagen-generator' / 'last.pt')
    sample.main(['--ckpt', ckpt, '--grid', 'g.png', '--classes', '0', '--per-class', '2'])
    assert Image.open('g.png').size == (2 * 18 + 2, 18 + 2)
    assert torch.load(ckpt, weights_only=True)['tokenizer'] == 'tokenizer.pt'


@pytest.mark.parametrize('method, n, size, name, stride', [
    ('llamagen', 10000, 32, 'VQ-tiny', 4),  # the classroom run: 8x8 tokens
    ('llamagen', 1400, 32, 'VQ-tiny', 4),  # a small folder of the user's own
    ('llamagen', 1400, 128, 'VQ-tiny', 8),  # more levels: 16x16 tokens, not 32x32
    ('llamagen', 1281167, 256, 'VQ-16', 16),  # ImageNet: the paper's
    ('llamagen', 1281167, 64, 'VQ-tiny', 4),  # the paper's grid would be 4x4
    ('mar', 1400, 256, 'KL-tiny', 16),
    ('iar2', 100000, 256, 'IAR2-VQ-16', 16),
    ('rar', 1000, 64, 'VQ-tiny', 4),
])
def test_default_tokenizer_follows_the_data(method, n, size, name, stride):
    module = __import__(method)
    args = train.parse_args(['--method', method, '--image-size', str(size)])[0]
    chosen, levels, why = train.choose_tokenizer(module, args, n)
    args.model = chosen
    for k, v in levels.items():
        setattr(args, k, v)
    cfg = train.config_from(module.TokenizerConfig, args, module.TOKENIZER_SIZES[chosen])
    with torch.device('meta'):
        tok = module.Tokenizer(cfg)
    assert (chosen, tok.stride) == (name, stride)
    assert why.startswith(f'default tokenizer: {name}') and '\n' not in why
    assert size // stride <= 16


def test_no_flip_trains_on_the_images_as_they_are(tok, tmp_path):
    """--no-flip: the cache's unflipped codes only (half the entries), and the tokenizer stage
    sees no mirrored image."""
    codes = train.CodeCache
    run = tmp_path / 'gen'
    train.main(GEN + ['--tokenizer', tok, '--max-steps', '2', '--run-dir', str(run),
                      '--results-dir', str(tmp_path), '--no-flip'])
    folder = next(p for p in (tmp_path / 'codes').iterdir() if p.is_dir())
    both, plain = codes(folder), codes(folder, flip=False)
    assert len(both) == 2 * len(plain) == 128
    assert all(torch.equal(plain[i][0], both[2 * i][0]) for i in range(len(plain)))
    assert not torch.equal(plain[1][0], both[1][0])  # image 1, not image 0's mirror
    assert torch.load(run / 'last.pt', weights_only=False)['args']['flip'] is False
    seen = []
    real_where = torch.where

    def spy(cond, *a):  # the tokenizer's flip is the one torch.where of a (B, 1, 1, 1) mask
        seen.append(tuple(cond.shape))
        return real_where(cond, *a)
    torch.where = spy
    try:
        train.main(TOK + ['--run-dir', str(tmp_path / 'tok'), '--results-dir', str(tmp_path),
                          '--no-flip', '--max-steps', '1'])
    finally:
        torch.where = real_where
    assert (4, 1, 1, 1) not in seen and (8, 1, 1, 1) not in seen
