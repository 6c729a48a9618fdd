"""Files and flags (issue 18): checkpoints that survive concurrent writers and a full disk
(llamagen.save_checkpoint), one clear line for an empty, truncated or foreign checkpoint
(llamagen.load_file), and sample.py refusing bad flags and output paths before it samples
anything, writing its .npz (and the per-rank parts) atomically."""
import errno
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

import llamagen
import sample
import train
from conftest import DATA, GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}

# a writer process: waits for PATH.go, then saves the same checkpoint N times (exit status 1 if any
# save failed); every tensor value is VALUE, so a reader can tell a whole file of this writer from
# a mix of two
WRITER = """
import os, sys, time
import torch
import llamagen
path, value, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
obj = {'w': torch.full((1 << 16,), value), 'b': torch.full((1 << 12,), value), 'value': value}
print('ready', flush=True)
while not os.path.exists(path + '.go'):
    time.sleep(0.01)
failed = 0
for _ in range(n):  # on an error, go on writing: the reader goes on reading
    try:
        llamagen.save_checkpoint(obj, path)
    except Exception as e:
        failed += 1
        print(repr(e), file=sys.stderr)
sys.exit(failed > 0)
"""


def test_concurrent_writers_never_leave_a_broken_checkpoint(tmp_path):
    path = str(tmp_path / 'last.pt')
    llamagen.save_checkpoint({'w': torch.zeros(1 << 16), 'b': torch.zeros(1 << 12),
                              'value': 0.0}, path)
    writers = [subprocess.Popen([sys.executable, '-c', WRITER, path, str(v), '150'], cwd=ROOT,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for v in (1.0, 2.0)]
    for w in writers:  # both have imported torch: they start writing together
        assert w.stdout.readline().strip() == 'ready', w.stderr.read()
    open(path + '.go', 'w').close()
    reads, bad = 0, []
    while any(w.poll() is None for w in writers):
        try:
            ckpt = llamagen.load_file(path)
        except SystemExit as e:
            bad.append(str(e))
            continue
        reads += 1
        whole = all(bool((ckpt[k] == ckpt['value']).all()) for k in ('w', 'b'))
        if not whole or ckpt['value'] not in (0.0, 1.0, 2.0):
            bad.append(f'a mixed checkpoint: value {ckpt["value"]}')
    errors = [w.stderr.read() for w in writers]
    assert reads >= 10 and not bad, (reads, bad[:3])
    assert [w.returncode for w in writers] == [0, 0], errors
    assert llamagen.load_file(path)['value'] in (1.0, 2.0)
    assert sorted(os.listdir(tmp_path)) == ['last.pt', 'last.pt.go']  # no temporary file left


def test_a_checkpoint_keeps_the_usual_file_mode(tmp_path):
    umask = os.umask(0o22)  # os has no getter: set and restore
    os.umask(umask)
    path = str(tmp_path / 'last.pt')
    llamagen.save_checkpoint({'step': 1}, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    assert llamagen.load_file(path) == {'step': 1}


def half_written(f):
    """Write part of a file to f, a file object (the fix) or a path (the old code passed one)."""
    out = open(f, 'wb') if isinstance(f, str) else f
    out.write(b'PK\x03\x04 part of a zip')
    out.flush()


def disk_full(obj, f):
    """torch.save on a full disk: part of the file, then an OSError."""
    half_written(f)
    raise OSError(errno.ENOSPC, 'No space left on device')


def zip_writer_error():
    raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')


def disk_full_in_torch(obj, f):
    """torch.save of a file object on a real full disk (torch 2.x): its zip writer turns the
    OSError into a RuntimeError, the OSError only its __context__."""
    try:
        disk_full(obj, f)
    except OSError:
        zip_writer_error()


def interrupted(f, *args, **kwargs):  # np.save, np.savez (file first): Ctrl-C halfway
    half_written(f)
    raise KeyboardInterrupt


@pytest.mark.parametrize('save', [disk_full, disk_full_in_torch])
def test_a_full_disk_gives_one_line_and_leaves_no_temporary_file(save, tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pt')
    llamagen.save_checkpoint({'step': 1}, path)
    monkeypatch.setattr(torch, 'save', save)
    with pytest.raises(SystemExit) as e:
        llamagen.save_checkpoint({'step': 2}, path)
    assert str(e.value) == f'{path}: disk full while writing; nothing was written'
    assert os.listdir(tmp_path) == ['last.pt']
    monkeypatch.undo()
    assert llamagen.load_file(path) == {'step': 1}  # the last checkpoint is untouched


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pt')
    monkeypatch.setattr(torch, 'save', lambda obj, f: interrupted(f))
    with pytest.raises(KeyboardInterrupt):
        llamagen.save_checkpoint({'step': 2}, path)
    assert os.listdir(tmp_path) == []


def good_bytes(tmp_path, **kw):
    torch.save({'w': torch.randn(1000), 'step': 3}, tmp_path / 'good.pt', **kw)
    return (tmp_path / 'good.pt').read_bytes()


def test_an_empty_file_is_named_as_one(tmp_path):
    path = tmp_path / 'empty.pt'
    path.write_bytes(b'')
    with pytest.raises(SystemExit) as e:
        llamagen.load_file(str(path))
    assert str(e.value) == f'{path}: empty file (0 bytes), not a checkpoint'


@pytest.mark.parametrize('cut', ['half', 'head', 'legacy', 'junk'])
def test_a_truncated_or_corrupt_file_gives_one_line(cut, tmp_path):
    data = {'half': lambda: good_bytes(tmp_path)[:-700],  # the zip's central directory lost
            'head': lambda: good_bytes(tmp_path)[:10],
            'legacy': lambda: good_bytes(tmp_path, _use_new_zipfile_serialization=False)[:-500],
            'junk': lambda: b'not a checkpoint'}[cut]()
    path = tmp_path / 'bad.pt'
    path.write_bytes(data)
    with pytest.raises(SystemExit) as e:
        llamagen.load_file(str(path))
    msg = str(e.value)
    assert msg.startswith(f'{path}: not a readable checkpoint (') and msg.endswith(')'), msg
    assert '\n' not in msg and 'weights_only=False' not in msg


# a checkpoint that pickles a class of its own, written by another program
EVIL = """
import sys
import torch
class Evil:
    pass
torch.save({'model': {'w': torch.zeros(2)}, 'args': Evil()}, sys.argv[1])
"""


def test_a_pickled_class_is_named_and_weights_only_false_is_never_suggested(tmp_path):
    path = str(tmp_path / 'evil.pt')
    subprocess.run([sys.executable, '-c', EVIL, path], check=True, env=ENV)
    with pytest.raises(SystemExit) as e:
        llamagen.load_file(path)
    assert str(e.value) == (f'{path}: refusing to load: it pickles __main__.Evil, which '
                            'weights_only=True does not allow')
    torch.save(torch.nn.Linear(2, 2), tmp_path / 'module.pt')  # torch.save(model)
    with pytest.raises(SystemExit) as e:
        llamagen.load_file(str(tmp_path / 'module.pt'))
    assert 'it pickles torch.nn.modules.linear.Linear, which' in str(e.value)
    assert 'weights_only=False' not in str(e.value)


@pytest.mark.parametrize('content,line', [
    (b'', '{p}: empty file (0 bytes), not a checkpoint'),
    (None, '{p}: refusing to load: it pickles __main__.Evil, which weights_only=True does not '
           'allow'),
])
def test_sample_cli_says_one_line_for_a_bad_checkpoint(content, line, tmp_path):
    path = str(tmp_path / 'bad.pt')
    if content is None:
        subprocess.run([sys.executable, '-c', EVIL, path], check=True, env=ENV)
    else:
        open(path, 'wb').write(content)
    cmd = [sys.executable, os.path.join(ROOT, 'sample.py'), '--ckpt', path, '--grid', 'x.png']
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [line.format(p=path)]


@pytest.fixture(scope='module')
def run(tiny_vq, tmp_path_factory):
    """A generator run of 1 step on DATA (10 classes, 16 px): RUN/last.pt."""
    root = tmp_path_factory.mktemp('gen')
    train.main(GPT + DATA + ['--tokenizer', tiny_vq, '--max-steps', '1', '--global-batch-size',
                             '8', '--log-every', '1', '--sample-every', '1000', '--ckpt-every',
                             '1000', '--run-dir', str(root / 'gen'), '--results-dir', str(root)])
    return str(root / 'gen' / 'last.pt')


@pytest.fixture
def no_sampling(monkeypatch):
    """Any sample() call fails the test: a bad flag must stop sample.py before the work."""
    def fail(*a, **k):
        raise AssertionError('sampled before refusing the flags')
    monkeypatch.setattr(sample, 'sample', fail)


@pytest.mark.parametrize('flags,line', [
    (['--batch-size', '0', '--num-samples', '4'], '--batch-size must be positive, not 0'),
    (['--batch-size', '-2', '--benchmark'], '--batch-size must be positive, not -2'),
    (['--num-samples', '-1'], '--num-samples must be 0 or more, not -1'),
    (['--grid', 'g.png', '--per-class', '0'], '--per-class must be positive, not 0'),
    (['--grid', 'g.png', '--image-size-eval', '0'], '--image-size-eval must be positive, not 0'),
    (['--num-samples', '4', '--image-size-eval', '-16'],
     '--image-size-eval must be positive, not -16'),
])
def test_bad_flags_stop_before_sampling(flags, line, run, tmp_path, capsys, no_sampling,
                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main(['--ckpt', run] + flags)
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(line)


@pytest.mark.parametrize('classes', [['10'], ['3', '-1']])
def test_classes_out_of_range_stop_before_sampling(classes, run, tmp_path, no_sampling):
    with pytest.raises(SystemExit) as e:
        sample.main(['--ckpt', run, '--grid', str(tmp_path / 'g.png'), '--classes', *classes])
    bad = [c for c in classes if c in ('10', '-1')][0]
    assert str(e.value) == f'--classes {bad}: out of range, the model has classes 0 to 9'


@pytest.mark.parametrize('flag', ['--out', '--grid'])
@pytest.mark.parametrize('problem', ['missing', 'read-only', 'a file', 'a directory'])
def test_unwritable_outputs_stop_before_sampling(flag, problem, run, tmp_path, no_sampling,
                                                 monkeypatch):
    folder = tmp_path / 'out'
    name = {'--out': 's.npz', '--grid': 'g.png'}[flag]
    target = folder / name
    if problem == 'read-only':
        folder.mkdir()
        folder.chmod(0o555)  # pytest's clean-up of tmp_path makes it writable again
        real = os.access
        if os.geteuid() == 0:  # root may write anywhere: let os.access see it as a user would

            def user_access(p, mode, **kw):
                return real(p, mode, **kw) and not (os.fspath(p) == str(folder) and mode & os.W_OK)

            monkeypatch.setattr(os, 'access', user_access)
    elif problem == 'a file':
        folder.write_text('')
    elif problem == 'a directory':
        target.mkdir(parents=True)
    argv = ['--ckpt', run, flag, str(target)] + ['--num-samples', '2'] * (flag == '--out')
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    msg = {'missing': f'{flag} {target}: the directory {folder} does not exist',
           'read-only': f'{flag} {target}: the directory {folder} is not writable',
           'a file': f'{flag} {target}: {folder} is not a directory',
           'a directory': f'{flag} {target}: is a directory'}[problem]
    assert str(e.value) == msg


def test_a_grid_of_an_unknown_image_format_stops_before_sampling(run, tmp_path, no_sampling):
    with pytest.raises(SystemExit) as e:
        sample.main(['--ckpt', run, '--grid', str(tmp_path / 'grid.pgx')])
    assert str(e.value).startswith(f"--grid {tmp_path / 'grid.pgx'}: unknown image format '.pgx'")


def test_an_unused_out_is_not_checked(run, tmp_path):
    sample.main(['--ckpt', run, '--grid', str(tmp_path / 'g.png'), '--classes', '1',
                 '--per-class', '1', '--out', str(tmp_path / 'missing' / 's.npz')])
    assert os.listdir(tmp_path) == ['g.png']


def npz(run, out, *extra):
    sample.main(['--ckpt', run, '--num-samples', '3', '--batch-size', '2', '--out', str(out),
                 *extra])


@pytest.mark.parametrize('step', ['savez', 'save'])
def test_an_interrupted_npz_leaves_the_last_one_whole(step, run, tmp_path, monkeypatch):
    out = tmp_path / 's.npz'
    npz(run, out)
    before = np.load(out)['arr_0']
    monkeypatch.setattr(np, step, interrupted)  # the joined .npz, or rank 0's part
    with pytest.raises(KeyboardInterrupt):
        npz(run, out, '--seed', '1')
    monkeypatch.undo()
    assert np.array_equal(np.load(out)['arr_0'], before)
    parts = {'savez': ['s.npz', 's.npz.part0.npy'], 'save': ['s.npz']}[step]
    assert sorted(os.listdir(tmp_path)) == parts  # no temporary file; a part only when whole
    npz(run, out, '--seed', '1')  # a rerun writes over what was left
    assert sorted(os.listdir(tmp_path)) == ['s.npz']
    assert not np.array_equal(np.load(out)['arr_0'], before)


def test_a_full_disk_while_writing_the_npz_gives_one_line(run, tmp_path, monkeypatch):
    out = tmp_path / 's.npz'

    monkeypatch.setattr(np, 'savez', lambda f, **arrays: disk_full(arrays, f))
    with pytest.raises(SystemExit) as e:
        npz(run, out)
    assert str(e.value) == f'{out}: disk full while writing; nothing was written'
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


def test_out_without_npz_extension_still_gets_one(run, tmp_path):
    npz(run, tmp_path / 'samples')  # np.savez appends .npz to a name: the old behaviour, kept
    assert sorted(os.listdir(tmp_path)) == ['samples.npz']
    assert np.load(tmp_path / 'samples.npz')['arr_0'].shape == (3, 16, 16, 3)


def test_the_progress_bar_counts_the_images_of_every_rank(run, tmp_path, capsys):
    """--num-samples: rank 0's bar counts all ranks' images (each batch times the world size);
    the other ranks show none. Two ranks in turn: rank 1 writes its part, rank 0 joins them."""
    out = tmp_path / 's.npz'
    args, ckpt = sample.parse_args(['--ckpt', run, '--num-samples', '5', '--batch-size', '2',
                                    '--out', str(out), '--precision', 'fp32'])
    model, tok = sample.load(args, ckpt)
    model.eval()
    tok.eval()
    errs = []
    for rank in (1, 0):  # 2 ranks x 2 batches of 2: 8 images, the first 5 kept
        generator = torch.Generator().manual_seed(rank)
        sample.write_npz(model, tok, args, generator, rank, 2, torch.device('cpu'))
        errs.append(capsys.readouterr().err)
    assert errs[0] == ''
    last = errs[1].split('\r')[-1]  # the bar's final state
    assert re.match(r'sampling: 100%\|.*\| 8/8 \[\d\d:\d\d<00:00, +[\d.]+(img/s|s/img)\]', last)
    assert np.load(out)['arr_0'].shape == (5, 16, 16, 3)
