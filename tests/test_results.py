"""The sample-quality number of the results table (a small classifier of the built-in classes), and
the table itself with train.py and sample.py stubbed: fid.py --class-accuracy / --results-table."""
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fid  # noqa: E402
import train  # noqa: E402


@pytest.fixture(scope='module')
def clf():
    return fid.train_classifier(n=2000, steps=150)


def test_class_accuracy_is_high_on_real_images_and_chance_on_noise_or_wrong_labels(clf):
    # seed 7: neither the classifier's seed nor the generators'
    imgs, labels = train.builtin_images(500, 32, seed=7)
    rng = np.random.default_rng(0)
    assert fid.class_accuracy(clf, imgs, labels) > 0.9
    small = train.builtin_images(200, 16, seed=7)[0]
    assert fid.class_accuracy(clf, small, labels[:200]) > 0.85  # resized to 32
    noise = rng.integers(0, 256, (500, 32, 32, 3), dtype=np.uint8)
    assert abs(fid.class_accuracy(clf, noise, rng.integers(0, 10, 500)) - 0.1) < 0.05
    assert abs(fid.class_accuracy(clf, imgs, rng.permutation(labels)) - 0.1) < 0.05
    assert fid.class_accuracy(clf, imgs, (labels + 1) % 10) < 0.1  # the wrong class: at most chance


def test_classifier_cache_is_read_back(tmp_path):
    cache = str(tmp_path / 'table' / 'classifier.pt')
    first = fid.train_classifier(n=100, steps=3, cache=cache)
    again = fid.train_classifier(n=100, steps=3, seed=1, cache=cache)  # read, not retrained
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 again.state_dict().values()))


def test_class_accuracy_cli(tmp_path, clf, capsys):
    out = tmp_path / 'table'
    os.makedirs(out)
    torch.save(clf.state_dict(), out / 'classifier.pt')  # the cache the command reads
    imgs, labels = train.builtin_images(40, 32, seed=7)
    npz = str(tmp_path / 'samples.npz')
    np.savez(npz, arr_0=imgs, arr_1=labels)
    fid.main(['--class-accuracy', npz, '--out', str(out)])
    acc = fid.class_accuracy(clf, imgs, labels)
    div = fid.diversity(clf, imgs, labels, *fid.real_images(40, 32))
    assert capsys.readouterr().out == (f'{npz}: class accuracy {acc:.3f}, diversity {div:.2f} '
                                       '(40 samples)\n')


def test_diversity_is_one_for_real_images_and_zero_for_a_repeated_one(clf):
    imgs, labels = train.builtin_images(300, 32, seed=7)
    real = fid.real_images(300, 32)
    assert abs(fid.diversity(clf, imgs, labels, *real) - 1) < 0.1
    repeated = imgs[labels.argsort(kind='stable')[::30].repeat(30, 0)]  # one image per class
    assert fid.diversity(clf, repeated, np.sort(labels), *real) < 1e-6
    # every class's images placed alike (the first image's position, size and hue): less spread
    centred = imgs.copy()
    centred[labels == 0] = imgs[0]  # class 0 collapsed, the others real: about 9 / 10
    assert abs(fid.diversity(clf, centred, labels, *real) - 0.9) < 0.1


def fake_scripts(calls):
    """run_script stand-in: train.py writes a log and last.pt, sample.py a benchmark or an npz."""
    def run(cmd):
        calls.append(cmd)
        if cmd[0] == 'train.py':
            run_dir = cmd[cmd.index('--run-dir') + 1]
            os.makedirs(run_dir)
            with open(os.path.join(run_dir, 'log.jsonl'), 'w') as f:
                f.write(json.dumps({'loss': 9.0, 'elapsed': 1.0}) + '\n')
                f.write(json.dumps({'loss': 1.25, 'tokens/s': 5000.0, 'elapsed': 100.0}) + '\n')
            open(os.path.join(run_dir, 'last.pt'), 'w').close()
            return ''
        if '--benchmark' in cmd:
            return ('benchmark: 59.4 images/s at batch 50 on cpu (fp32), '
                    '64 forward calls per image\n')
        n = int(cmd[cmd.index('--num-samples') + 1])
        imgs, labels = train.builtin_images(n, 16, seed=7)
        np.savez(cmd[cmd.index('--out') + 1], arr_0=imgs, arr_1=labels)
        return ''
    return run


def test_results_table(tmp_path, clf, monkeypatch, capsys):
    out = str(tmp_path / 'table')
    os.makedirs(out)
    torch.save(clf.state_dict(), os.path.join(out, 'classifier.pt'))
    calls = []
    monkeypatch.setattr(fid, 'run_script', fake_scripts(calls))

    def no_weights(path=None):
        raise FileNotFoundError('no weights')
    monkeypatch.setattr(fid, 'find_weights', no_weights)  # FID: n/a
    tokenizers = os.path.join(out, 'tokenizers')  # the default VQ's run, and its lock file
    os.makedirs(os.path.join(tokenizers, 'VQModel-builtin-32px-0123'))
    with open(os.path.join(tokenizers, 'VQModel-builtin-32px-0123', 'log.jsonl'), 'w') as f:
        f.write(json.dumps({'loss': 0.1, 'elapsed': 42.0}) + '\n')
    open(os.path.join(tokenizers, 'VQModel-builtin-32px-0123.lock'), 'w').close()
    fid.main(['--results-table', '--methods', 'llamagen', 'mar', '--max-steps', '3',
              '--num-samples', '20', '--out', out])
    ckpt = os.path.join(out, 'llamagen-generator', 'last.pt')
    assert calls[:3] == [
        ['train.py', '--method', 'llamagen', '--results-dir', out,
         '--run-dir', os.path.join(out, 'llamagen-generator'), '--max-steps', '3'],
        ['sample.py', '--ckpt', ckpt, '--benchmark', '--batch-size', '50'],
        ['sample.py', '--ckpt', ckpt, '--num-samples', '20', '--out',
         os.path.join(out, 'llamagen-samples.npz'), '--batch-size', '50']]
    assert len(calls) == 6 and calls[3][:3] == ['train.py', '--method', 'mar']
    lines = capsys.readouterr().out.splitlines()
    acc = fid.class_accuracy(clf, *train.builtin_images(20, 16, seed=7))
    div = fid.diversity(clf, *train.builtin_images(20, 16, seed=7), *fid.real_images(20, 16))
    assert lines[2].startswith('| method | final loss | train tokens/s | tokenizer s | generator s')
    assert lines[3].startswith('|---|')
    row = lines[4].split(' | ')
    assert row[:3] == ['| llamagen', '1.250', '5000'] and row[3:5] == ['42', '100']
    assert row[6:11] == ['59.4', '64', f'{acc:.3f}', f'{div:.2f}', 'n/a']
    assert lines[5].startswith('| mar | 1.250 |')
    # a finished run is not trained again
    calls.clear()
    fid.main(['--results-table', '--methods', 'llamagen', '--num-samples', '20', '--out', out])
    assert [c[0] for c in calls] == ['sample.py', 'sample.py']
