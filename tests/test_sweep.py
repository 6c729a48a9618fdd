"""fid.py --sweep (a run at several cfg scales, EMA and raw weights, sampled by sample.py) and
train.py --eval-every (a score of the samples in log.jsonl and loss.png), at tiny sizes. The FID
Inception is a stand-in of the same interface (fixed random projections of the pixels): the real
network is tested in test_fid.py, and takes 8 images/s on a CPU."""
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fid  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from conftest import DATA, GPT  # noqa: E402

GEN = GPT + DATA + ['--global-batch-size', '8', '--sample-every', '1000', '--ckpt-every', '1000']


class StubInception(torch.nn.Module):
    """fid.py's network interface at no cost: pool3 (N, 2048), spatial (N, 2023) and logits
    (N, 1008) as fixed random projections of the 8x8-pooled input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 8 * 8, 2048 + 2023)
        self.fc = torch.nn.Linear(2048, 1008)
        self.weights_id = 'stub'

    def forward(self, x):
        f = self.proj(F.adaptive_avg_pool2d(x, 8).flatten(1))
        return f[:, :2048], f[:, 2048:], f[:, :2048] @ self.fc.weight.T


def stub_weights(monkeypatch):
    monkeypatch.setattr(fid, 'find_weights', lambda path=None: 'stub.pth')
    monkeypatch.setattr(fid, 'load_inception', lambda path, device='cpu': StubInception())


def no_weights(monkeypatch):
    def find_weights(path=None):
        raise FileNotFoundError('FID Inception weights not found: download them')
    monkeypatch.setattr(fid, 'find_weights', find_weights)


def small_classifier(path):  # the class-accuracy classifier's cache, trained in a second
    fid.train_classifier(n=200, steps=20, cache=str(path))


def records(run):
    with open(os.path.join(run, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def runs(tiny_vq, tmp_path_factory):
    """{'ema': a run with EMA weights far from its raw ones (decay 0.5, lr 1e-2), 'raw': one
    without EMA}."""
    root = tmp_path_factory.mktemp('runs')
    fast = ['--tokenizer', tiny_vq, '--results-dir', str(root), '--lr', '1e-2', '--warmup-steps',
            '0', '--log-every', '4']
    train.main(GEN + fast + ['--max-steps', '8', '--ema', '0.5', '--run-dir', str(root / 'ema')])
    train.main(GEN + fast + ['--max-steps', '2', '--run-dir', str(root / 'raw')])
    return {k: str(root / k / 'last.pt') for k in ('ema', 'raw')}


def table(out):
    """The rows of the markdown table printed by the sweep: [{column: cell}]."""
    lines = [line for line in out.splitlines() if line.startswith('| ')]
    head = [c.strip() for c in lines[0].strip('|').split('|')]
    return [dict(zip(head, (c.strip() for c in line.strip('|').split('|')))) for line in lines[1:]]


def test_sweep_rows_reference_once_ema_and_raw_plot(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'out'
    small_classifier(out / 'classifier.pt')
    stub_weights(monkeypatch)
    computed = []  # the desc of every compute_features call: REF's spec or a samples .npz
    compute = fid.compute_features

    def counting(net, batches, n, mode='adm', desc=None):
        computed.append(desc)
        return compute(net, batches, n, mode, desc)
    monkeypatch.setattr(fid, 'compute_features', counting)
    plot = tmp_path / 'sweep.png'
    fid.main(['--sweep', runs['ema'], '--cfg-scales', '1', '3', '--num-samples', '20', '--out',
              str(out), '--plot', str(plot), '--cache-dir', '', '--device', 'cpu'])
    printed = capsys.readouterr().out
    rows = table(printed)
    assert [(r['weights'], r['cfg scale']) for r in rows] == [
        ('ema', '1'), ('ema', '3'), ('raw', '1'), ('raw', '3')]  # one row per setting
    assert all(r[k] != 'n/a' for r in rows for k in fid.SWEEP_METRICS)
    assert computed.count('builtin:20:16') == 1 and len(computed) == 5  # REF once, 4 settings
    for scale in ('1', '3'):  # the two weight choices sample differently
        ema, raw = (np.load(out / f'sweep-ema-{w}-cfg{scale}.npz')['arr_0'] for w in ('ema', 'raw'))
        assert not np.array_equal(ema, raw)
    fids = {(r['weights'], r['cfg scale']): r['FID'] for r in rows}
    assert fids['ema', '1'] != fids['raw', '1']
    accs = [float(r['class acc']) for r in rows]
    best = rows[int(np.argmax(accs))]
    setting = f"{best['weights']} weights at cfg scale {best['cfg scale']}"
    assert f'best (class acc): {setting}, class acc {best["class acc"]}' in printed
    assert Image.open(plot).size == (6 * fid.PANEL[0], fid.PANEL[1])  # a panel per metric


def test_sweep_without_inception_weights_gives_class_accuracy(runs, tmp_path, monkeypatch,
                                                              capsys):
    out = tmp_path / 'out'
    small_classifier(out / 'classifier.pt')
    no_weights(monkeypatch)
    fid.main(['--sweep', runs['raw'], '--cfg-scales', '1', '2', '--num-samples', '10', '--out',
              str(out)])
    captured = capsys.readouterr()
    rows = table(captured.out)
    assert [(r['weights'], r['cfg scale']) for r in rows] == [('raw', '1'), ('raw', '2')]
    assert all(r['FID'] == 'n/a' and r['recall'] == 'n/a' and r['class acc'] != 'n/a'
               and r['diversity'] != 'n/a' for r in rows)
    assert 'note: FID Inception weights not found' in captured.err
    # class accuracy and diversity alone
    assert Image.open(out / 'sweep-raw.png').size == (2 * fid.PANEL[0], fid.PANEL[1])


def test_best_setting_is_the_argmax_of_class_accuracy_else_the_lowest_fid():
    def row(w, s, acc, fid_value):
        return {'weights': w, 'cfg scale': s, 'FID': fid_value, 'class acc': acc}
    rows = [row('ema', 1, 0.80, 30.0), row('ema', 2, 0.95, 20.0), row('ema', 4, 0.90, 10.0),
            row('raw', 2, 0.95, 15.0)]
    assert fid.best_setting(rows) == (rows[1], 'class acc')  # the first of equals
    for r in rows:
        r['class acc'] = None  # not the built-in data: FID decides
    assert fid.best_setting(rows) == (rows[2], 'FID')


@pytest.mark.parametrize('extra, message', [
    (['--sweep', 'missing.pt'], '--sweep missing.pt: no such checkpoint'),
    (['--sweep', '{tok}'], 'not a generator run of train.py'),
    (['--sweep', '{ema}', '--cfg-scales', '1', '-0.5'], '--cfg-scales: -0.5 is negative'),
    (['--sweep', '{ema}', '--cfg-scales', '2', '2'], 'given twice'),
    (['--sweep', '{ema}', '--sample-args=--cfg-scale 3'], '--cfg-scale is set by the sweep'),
    (['--sweep', '{ema}', '--plot', 'p.jpg'], '--plot p.jpg: not a .png'),
    (['--sweep', '{ema}', '--num-samples', '0'], '--num-samples 0: must be at least 1'),
])
def test_sweep_refuses_bad_input_before_sampling(runs, tiny_vq, tmp_path, monkeypatch, extra,
                                                 message):
    monkeypatch.chdir(tmp_path)
    stub_weights(monkeypatch)

    def run_sample(cmd):
        raise AssertionError('sampled before the refusal')
    monkeypatch.setattr(fid, 'run_sample', run_sample)
    argv = [a.format(tok=tiny_vq, **runs) for a in extra]
    with pytest.raises(SystemExit) as e:
        fid.main(argv + ['--out', str(tmp_path / 'out')])
    assert str(e.value.code).startswith('error: ') and message in str(e.value.code)
    assert '\n' not in str(e.value.code)


def test_sample_flag_refused_by_sample_py_in_one_line(runs, tmp_path, monkeypatch):
    stub_weights(monkeypatch)
    small_classifier(tmp_path / 'classifier.pt')
    with pytest.raises(SystemExit) as e:
        fid.main(['--sweep', runs['raw'], '--sample-args=--no-such-flag 1', '--out',
                  str(tmp_path), '--num-samples', '4', '--cache-dir', ''])
    line = str(e.value.code)
    assert line.endswith('unrecognized arguments: --no-such-flag 1') and '\n' not in line
    assert not [f for f in os.listdir(tmp_path) if f.startswith('sweep-')]  # nothing sampled


def test_sample_py_weights_flag(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(['--ckpt', runs['raw'], '--weights', 'ema', '--grid', str(tmp_path / 'g.png')])
    assert 'has no EMA weights' in capsys.readouterr().err
    for w in ('ema', 'raw'):
        sample.main(['--ckpt', runs['ema'], '--weights', w, '--grid', str(tmp_path / f'{w}.png'),
                     '--classes', '0', '1'])
    ema, raw = (np.asarray(Image.open(tmp_path / f'{w}.png')) for w in ('ema', 'raw'))
    assert not np.array_equal(ema, raw)


# --- train.py --eval-every -----------------------------------------------------------------------
def test_eval_every_logs_class_accuracy_at_its_steps(tiny_vq, tmp_path):
    small_classifier(tmp_path / 'classifier.pt')  # RESULTS_DIR/classifier.pt
    run = tmp_path / 'run'
    train.main(GEN + ['--tokenizer', tiny_vq, '--results-dir', str(tmp_path), '--run-dir',
                      str(run), '--max-steps', '7', '--log-every', '2', '--eval-every', '3',
                      '--eval-samples', '20'])
    log = records(run)
    assert [r['step'] for r in log if 'class_acc' in r] == [3, 6, 7]  # every 3 and at the end
    assert [r['step'] for r in log if 'loss' in r] == [2, 4, 6, 7]
    assert all(0 <= r['class_acc'] <= 1 for r in log if 'class_acc' in r)
    assert Image.open(run / 'loss.png').size == (480, 480)  # the loss, then the score


def test_resume_with_eval_every_is_exact(tiny_vq, tmp_path):
    """Evaluations sample from a generator of their own: a resumed run that evaluates at other
    steps (--eval-every may change on --resume) has the loss sequence and the scores of an
    uninterrupted one."""
    small_classifier(tmp_path / 'classifier.pt')
    args = GEN + ['--tokenizer', tiny_vq, '--results-dir', str(tmp_path), '--warmup-steps', '4',
                  '--log-every', '1', '--ema', '0.9', '--eval-samples', '10']
    train.main(args + ['--max-steps', '6', '--eval-every', '2', '--run-dir', str(tmp_path / 'a')])
    train.main(args + ['--max-steps', '3', '--eval-every', '2', '--run-dir', str(tmp_path / 'b')])
    train.main(GEN + ['--results-dir', str(tmp_path), '--warmup-steps', '4', '--log-every', '1',
                      '--max-steps', '6', '--eval-every', '1', '--resume',
                      str(tmp_path / 'b' / 'last.pt')])
    a, b = records(tmp_path / 'a'), records(tmp_path / 'b')
    assert [r['loss'] for r in a] == [r['loss'] for r in b]  # bit for bit
    assert [r['step'] for r in b if 'class_acc' in r] == [2, 3, 4, 5, 6]
    scores_b = {r['step']: r['class_acc'] for r in b if 'class_acc' in r}
    assert {r['step']: r['class_acc'] for r in a if 'class_acc' in r} == {
        s: scores_b[s] for s in (2, 4, 6)}


def image_folder(root):
    for c in ('cats', 'dogs'):
        os.makedirs(root / c)
        for i in range(4):
            pixels = np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f'{i}.png')
    return str(root)


def test_eval_every_on_an_image_folder_gives_fid_or_one_note(tiny_vq, tmp_path, monkeypatch,
                                                             capsys):
    data = image_folder(tmp_path / 'data')
    args = GEN + ['--tokenizer', tiny_vq, '--data-path', data, '--global-batch-size', '4',
                  '--results-dir', str(tmp_path), '--num-workers', '0', '--max-steps', '2',
                  '--log-every', '1', '--eval-every', '2', '--eval-samples', '4']
    stub_weights(monkeypatch)
    train.main(args + ['--run-dir', str(tmp_path / 'fid')])
    assert [r['step'] for r in records(tmp_path / 'fid') if 'fid' in r] == [2]
    no_weights(monkeypatch)
    capsys.readouterr()
    train.main(args + ['--run-dir', str(tmp_path / 'none')])
    out = capsys.readouterr().out
    assert out.count('--eval-every: FID Inception weights not found') == 1
    assert not any('fid' in r for r in records(tmp_path / 'none'))
