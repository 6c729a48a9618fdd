"""Every command of the README's Exercises runs, in order, with tiny sizes appended (later flags
win)."""
import os
import re
import shlex

import torch

import fid
import llamagen
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--num-images', '32', '--image-size', '16', '--global-batch-size', '8', '--max-steps', '2',
        '--log-every', '1', '--sample-every', '1000', '--ckpt-every', '1000']
TINY_SAMPLE = ['--num-samples', '4', '--batch-size', '4', '--per-class', '1']


def exercise_commands():
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = text.split('## Exercises')[1].split('\n## ')[0]
    blocks = re.findall(r'```bash\n(.*?)```', section, re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    return [shlex.split(line.split(' #')[0]) for line in lines if line.startswith('python ')]


def test_the_exercises_are_documented():
    cmds = exercise_commands()
    assert len(cmds) >= 20 and {c[1] for c in cmds} == {'train.py', 'sample.py', 'fid.py'}
    assert {c[c.index('--method') + 1] for c in cmds if '--method' in c} == set(train.METHODS)


def test_every_exercise_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the commands' relative paths (results/ex/..., *.npz) land here
    monkeypatch.setattr(llamagen, 'save_grid', lambda *a, **k: None)  # grids: tested elsewhere
    torch.manual_seed(0)
    clf = fid.train_classifier(n=50, steps=2)  # the --class-accuracy commands read this cache
    os.makedirs('results/table')
    torch.save(clf.state_dict(), 'results/table/classifier.pt')
    for cmd in exercise_commands():
        script, argv = cmd[1], cmd[2:]
        if script == 'train.py':
            train.main(argv + TINY)
        elif script == 'sample.py':
            ckpt = llamagen.load_file(argv[argv.index('--ckpt') + 1])
            knobs = sample.generate_knobs(__import__(ckpt['method']).Model)
            mar = ['--num-sampling-steps', '2'] if 'num_sampling_steps' in knobs else []
            sample.main(argv + TINY_SAMPLE + mar)  # MAR: 2 diffusion steps
        else:
            fid.main(argv)
    assert os.path.exists('results/ex/mar-mul2/last.pt') and os.path.exists('cfg4.npz')
