"""train.py as a demanding user runs it: resume with the README's command, caches that know when
they are stale or incomplete, runs started together, and bad flags refused before any work."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import DATA, GPT, VQ

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = GPT + ['--global-batch-size', '8', '--log-every', '1', '--sample-every', '1000',
             '--ckpt-every', '1000'] + DATA


def log(run):
    with open(os.path.join(run, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def weights(path, key):
    return torch.load(path, weights_only=True)[key]


def test_resume_with_the_readme_command_restores_the_whole_run(tiny_vq, tmp_path):
    """`--resume RUN/last.pt --max-steps N` alone: the run's own data, batch, LR, EMA and seed,
    the same losses, weights and EMA as an uninterrupted run, and no repeated log lines."""
    args = GEN + ['--tokenizer', tiny_vq, '--results-dir', str(tmp_path), '--ema', '0.9',
                  '--lr', '3e-3', '--warmup-steps', '2', '--num-images', '48', '--seed', '3']
    train.main(args + ['--max-steps', '6', '--run-dir', str(tmp_path / 'a')])
    train.main(args + ['--max-steps', '2', '--run-dir', str(tmp_path / 'b')])
    ckpt = str(tmp_path / 'b' / 'last.pt')
    saved = tmp_path / 'step2.pt'
    saved.write_bytes(open(ckpt, 'rb').read())
    train.main(['--resume', ckpt, '--max-steps', '4'])
    # a crash after step 4 was logged but before it was saved: the checkpoint of step 2 again
    os.replace(saved, ckpt)
    train.main(['--resume', ckpt, '--max-steps', '6'])
    a, b = log(tmp_path / 'a'), log(tmp_path / 'b')
    assert [r['step'] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r['loss'] for r in b] == [r['loss'] for r in a]
    for key in ('model', 'ema'):
        wa, wb = weights(tmp_path / 'a' / 'last.pt', key), weights(ckpt, key)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(os.listdir(tmp_path)) == ['a', 'b', 'codes']  # no new run folder


@pytest.mark.parametrize('extra,message', [
    (['--lr', '0.5'], "--lr 0.5 differs from the run's 0.001"),
    (['--ema', '0.9'], "--ema 0.9 differs from the run's 0.0"),
    (['--num-images', '200'], "--num-images 200 differs from the run's 64"),
    (['--stage', 'tokenizer'], "--stage tokenizer differs from the run's generator"),
])
def test_resume_refuses_to_change_the_run(tiny_vq, tmp_path, extra, message):
    run = tmp_path / 'run'
    train.main(GEN + ['--tokenizer', tiny_vq, '--max-steps', '1', '--run-dir', str(run),
                      '--results-dir', str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        train.main(['--resume', str(run / 'last.pt'), '--max-steps', '2'] + extra)
    assert message in str(e.value) and '\n' not in str(e.value)


def test_resume_from_inside_the_run_and_with_a_double_slash(tiny_vq, tmp_path, monkeypatch,
                                                            capsys):
    run = tmp_path / 'results' / 'run'
    train.main(GEN + ['--tokenizer', tiny_vq, '--max-steps', '1', '--run-dir', str(run),
                      '--results-dir', str(tmp_path / 'results')])
    monkeypatch.chdir(run)
    train.main(['--resume', 'last.pt', '--max-steps', '2', '--log-every', '2'])
    assert '--resume: log_every 1 -> 2' in capsys.readouterr().out  # each override is printed
    train.main(['--resume', str(tmp_path / 'results') + '//run/last.pt', '--max-steps', '3'])
    assert [r['step'] for r in log(run)] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path / 'results')) == ['codes', 'run']


def folder(root, classes=('cats', 'dogs'), n=3):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            pixels = np.random.randint(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f'{i}.png')
    return root


def test_image_folder_key_follows_its_files(tmp_path):
    root = folder(tmp_path / 'data')
    key = train.ImageFolder(str(root), 16).key
    assert train.ImageFolder(str(root), 16).key == key
    folder(root, ('cats',), n=4)  # one more image (3.png)
    assert train.ImageFolder(str(root), 16).key != key
    key = train.ImageFolder(str(root), 16).key
    os.utime(root / 'cats' / '0.png', ns=(1, 1))  # touched
    assert train.ImageFolder(str(root), 16).key != key
    key = train.ImageFolder(str(root), 16).key
    folder(root, ('eels',))  # a new class
    assert train.ImageFolder(str(root), 16).key != key


def test_image_folder_classes(tmp_path):
    root = folder(tmp_path / 'data')
    os.makedirs(root / '.ipynb_checkpoints')  # hidden: not a class, indices unchanged
    (root / 'cats' / '.hidden.png').write_bytes(b'')
    folder(root / 'dogs', ('puppies',), n=2)  # nested images belong to their class
    ds = train.ImageFolder(str(root), 16)
    assert ds.classes == ['cats', 'dogs'] and len(ds) == 3 + 5
    assert [label for _, label in ds.samples] == [0] * 3 + [1] * 5
    os.makedirs(root / 'empty')
    with pytest.raises(SystemExit, match='class folder empty has no images'):
        train.ImageFolder(str(root), 16)


def test_unreadable_images_are_reported_once_and_replaced_within_their_class(tmp_path,
                                                                              capsys):
    root = folder(tmp_path / 'data')
    (root / 'cats' / '1.png').write_bytes(b'not a png')
    ds = train.ImageFolder(str(root), 16)
    for _ in range(3):  # three epochs
        labels = [ds[i][1] for i in range(len(ds))]
        assert labels == [0, 0, 0, 1, 1, 1]
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and '1.png' in out[0] and '1 so far' in out[0]


def test_changed_folder_gets_new_codes(tiny_vq, tmp_path):
    root = folder(tmp_path / 'data', n=4)
    args = GEN + ['--tokenizer', tiny_vq, '--data-path', str(root), '--max-steps', '1',
                  '--global-batch-size', '4', '--results-dir', str(tmp_path / 'r'),
                  '--num-workers', '0']
    train.main(args)
    folder(root, ('eels',), n=4)
    train.main(args)
    assert len(os.listdir(tmp_path / 'r' / 'codes')) == 4  # two caches and their lock files
    last = sorted(d for d in os.listdir(tmp_path / 'r') if d.endswith('generator'))[-1]
    ckpt = torch.load(tmp_path / 'r' / last / 'last.pt', weights_only=True)
    assert ckpt['config']['num_classes'] == 3


def test_interrupted_default_tokenizer_is_resumed(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(train.STAGE_DEFAULTS, 'tokenizer', {
        **train.STAGE_DEFAULTS['tokenizer'], 'max_steps': 4, 'global_batch_size': 8})
    args = GEN + VQ + ['--max-steps', '1', '--results-dir', str(tmp_path)]
    train.main(args)
    (tok_dir,) = [d for d in os.listdir(tmp_path / 'tokenizers') if not d.endswith('.lock')]
    path = tmp_path / 'tokenizers' / tok_dir / 'last.pt'
    assert torch.load(path, weights_only=True)['step'] == 4
    ckpt = torch.load(path, weights_only=True)
    ckpt['step'] = 2  # as if killed at step 2 of 4
    torch.save(ckpt, path)
    train.main(args)
    assert 'stopped at step 2 of 4: resuming it' in capsys.readouterr().out
    assert torch.load(path, weights_only=True)['step'] == 4


def test_two_runs_started_together(tiny_vq, tmp_path):
    """Two real processes in one results folder: two run folders, the codes extracted once (the
    second waits for the first, then reuses them), each log its own."""
    cmd = [sys.executable, os.path.join(ROOT, 'train.py')] + GEN + [
        '--tokenizer', tiny_vq, '--max-steps', '3', '--results-dir', str(tmp_path)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = sorted(d for d in os.listdir(tmp_path) if d.endswith('-llamagen-generator'))
    assert len(runs) == 2
    for run in runs:
        assert [r['step'] for r in log(tmp_path / run)] == [1, 2, 3]
    (cache,) = [c for c in os.listdir(tmp_path / 'codes') if not c.endswith('.lock')]
    with open(tmp_path / 'codes' / cache / 'manifest.json') as f:
        assert json.load(f)['complete']


def test_runs_claiming_a_folder_at_once_get_one_each(tmp_path):
    """Four processes that look for the next free run number at the same instant."""
    script = ('import sys, time; sys.path.insert(0, sys.argv[1]); import train\n'
              'time.sleep(max(0, float(sys.argv[3]) - time.time()))\n'
              'print(train.claim_run_dir(sys.argv[2], "llamagen-generator"))\n')
    start = str(time.time() + 3)  # after every process has imported train
    cmd = [sys.executable, '-c', script, ROOT, str(tmp_path), start]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    claimed = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert len(set(claimed)) == 4 and len(os.listdir(tmp_path)) == 4


def test_a_lock_is_released_when_its_holder_dies(tmp_path):
    script = ('import sys, time; sys.path.insert(0, sys.argv[1]); import train\n'
              'with train.cache_lock(sys.argv[2], 0):\n'
              '    print("locked", flush=True); time.sleep(60)\n')
    path = str(tmp_path / 'cache')
    holder = subprocess.Popen([sys.executable, '-c', script, ROOT, path], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == 'locked'
    holder.kill()
    holder.wait()
    t0 = time.time()
    with train.cache_lock(path, 0):
        assert time.time() - t0 < 5


@pytest.mark.parametrize('extra,message', [
    (['--model', 'GPT-huge'], '--model GPT-huge: not a size of llamagen (generator)'),
    (['--log-every', '0'], '--log-every 0: must be positive'),
    (['--num-images', '-5'], '--num-images -5: must be positive'),
    (['--lr', '-1'], '--lr -1.0: must not be negative'),
    (['--tokenizer', 'missing.pt'], '--tokenizer missing.pt: no such file'),
    (['--image-size', '300'], 'the built-in dataset renders 16 to 256 pixels'),
    (['--image-size', '18'], "not divisible by the default tokenizer's stride 4"),
])
def test_bad_flags_fail_before_any_work(tmp_path, extra, message):
    with pytest.raises(SystemExit) as e:
        train.main(GEN + ['--results-dir', str(tmp_path / 'r')] + extra)
    assert message in str(e.value) and '\n' not in str(e.value)
    assert not os.path.exists(tmp_path / 'r')  # nothing trained, nothing written


def test_global_batch_must_split_over_the_processes(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '3')
    with pytest.raises(SystemExit, match='--global-batch-size 8 is not divisible by the 3'):
        train.parse_args(GEN)
