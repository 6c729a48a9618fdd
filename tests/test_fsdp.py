"""train.py's scale flags on the CPU at tiny sizes: --fsdp over 2 processes (gloo) against one
process (which DDP matches: test_train.py), its checkpoint resumed without it and sampled, a plain
run resumed with it, older checkpoints resumed; --grad-checkpoint and --compile against eager;
--benchmark."""
import argparse
import copy
import importlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields, replace

import pytest
import torch
from PIL import Image

import sample
import train
from conftest import DATA, GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = GPT + ['--global-batch-size', '8', '--log-every', '1', '--sample-every', '1000',
             '--ckpt-every', '1000'] + DATA
# dropout off: 1 process and 2 draw different masks (test_train.py's DDP test does the same)
NODROP = ['--token-dropout-p', '0', '--resid-dropout-p', '0', '--ffn-dropout-p', '0',
          '--class-dropout-prob', '0', '--cfg-scale', '1']
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
            os.path.join(ROOT, 'train.py')]


def losses(run):
    return [json.loads(line)['loss'] for line in open(os.path.join(run, 'log.jsonl'))]


def torchrun(args, cwd):  # train.py on 2 processes; its output shown if it fails
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run(TORCHRUN + args, env=env, capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def max_diff(a, b):  # over the tensors of two nested state dicts with the same keys
    if isinstance(a, torch.Tensor):
        return (a.float() - b.float()).abs().max().item()
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        return max([max_diff(a[k], b[k]) for k in a], default=0.0)
    assert a == b
    return 0.0


@pytest.fixture(scope='module')
def runs(tiny_vq, tmp_path_factory):
    """One process, no dropout: 'six' trains 6 steps (the reference losses), 'four' the first 4
    (its checkpoint: the state the other runs start from or must reach). With an EMA."""
    root = tmp_path_factory.mktemp('fsdp')
    args = GEN + NODROP + ['--tokenizer', tiny_vq, '--ema', '0.9',
                           '--results-dir', str(root / 'results')]
    train.main(args + ['--max-steps', '6', '--run-dir', str(root / 'six')])
    train.main(args + ['--max-steps', '4', '--run-dir', str(root / 'four')])
    return root, args


def test_fsdp_matches_one_process_and_its_checkpoint_is_plain(runs, tmp_path):
    root, args = runs
    # 2 processes, --fsdp, the same global batch; a grid at step 2 (every rank gathers)
    torchrun(args + ['--max-steps', '4', '--fsdp', '--sample-every', '2',
                     '--run-dir', str(tmp_path / 'fsdp')], tmp_path)
    one, two = losses(root / 'six'), losses(tmp_path / 'fsdp')
    assert len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) < 1e-5
    assert sorted(os.listdir(tmp_path / 'fsdp' / 'samples')) == ['0000002.png', '0000004.png']
    # one file, the plain format: full tensors under the parameter names, as without --fsdp
    ckpt = torch.load(tmp_path / 'fsdp' / 'last.pt', weights_only=True)
    plain = torch.load(root / 'four' / 'last.pt', weights_only=True)
    assert ckpt['kind'] == 'Model' and ckpt['args']['fsdp'] and ckpt['step'] == 4
    for name in ('model', 'ema', 'optimizer'):
        assert max_diff(ckpt[name], plain[name]) < 1e-5, name
    # sample.py on one process, from the --fsdp checkpoint
    sample.main(['--ckpt', str(tmp_path / 'fsdp' / 'last.pt'), '--grid', str(tmp_path / 'g.png'),
                 '--classes', '0', '1', '--per-class', '2'])
    assert Image.open(tmp_path / 'g.png').size == (2 * 18 + 2, 2 * 18 + 2)
    # resumed on one process without --fsdp: the losses of the uninterrupted run
    train.main(['--resume', str(tmp_path / 'fsdp' / 'last.pt'), '--max-steps', '6'])
    assert max(abs(a - b) for a, b in zip(one, losses(tmp_path / 'fsdp'))) < 1e-5
    assert not torch.load(tmp_path / 'fsdp' / 'last.pt', weights_only=True)['args']['fsdp']


def test_a_plain_run_resumes_with_fsdp(runs, tmp_path):
    root, _ = runs
    shutil.copytree(root / 'four', tmp_path / 'run')
    torchrun(['--resume', str(tmp_path / 'run' / 'last.pt'), '--max-steps', '6', '--fsdp'],
             tmp_path)
    one, resumed = losses(root / 'six'), losses(tmp_path / 'run')
    assert len(resumed) == 6 and max(abs(a - b) for a, b in zip(one, resumed)) < 1e-5


def test_a_checkpoint_of_torchs_optimizer_format_resumes(runs, tmp_path):
    """Checkpoints written before --fsdp keep torch's own optimizer state dict (keyed 0, 1, ...):
    they resume, bit for bit."""
    root, _ = runs
    shutil.copytree(root / 'four', tmp_path / 'run')
    path = tmp_path / 'run' / 'last.pt'
    ckpt = torch.load(path, weights_only=True)
    model = train.llamagen.Model(train.llamagen.Config(**ckpt['config']))
    opt = torch.optim.AdamW(train.llamagen.param_groups(model, 0.05))
    train.restore({'model': model, 'optimizer': opt}, ckpt)
    ckpt['optimizer'] = opt.state_dict()
    assert list(ckpt['optimizer']['state'])[0] == 0
    for name in train.RUNTIME + ('benchmark',):  # the flags came with --fsdp
        del ckpt['args'][name]
    torch.save(ckpt, path)
    train.main(['--resume', str(path), '--max-steps', '6'])
    assert losses(tmp_path / 'run') == losses(root / 'six')


def tiny_model(name, image_size=64):
    """A tiny module.Model on the benchmark's stand-in tokenizer (4x4 tokens), dropout on, every
    weight moved off its init (zero-initialised heads would leave the blocks no gradient), and a
    random input batch of 2."""
    module = importlib.import_module(name)
    tok = train.stand_in_tokenizer(module)
    derived = module.derive_config(tok, image_size, 10)
    cfg = module.Config(**{**module.SIZES[train.tiny_size(module.SIZES)], **derived})
    dropouts = {f.name: 0.1 for f in fields(cfg) if 'dropout' in f.name}
    torch.manual_seed(0)
    model = module.Model(replace(cfg, **dropouts))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    with torch.device('meta'):
        like = tok.training_input(tok.encode(torch.empty(2, 3, image_size, image_size)))
    x = torch.randn(like.shape)
    if not like.is_floating_point():
        x = torch.randint(0, tok.cfg.codebook_size, like.shape)
    return module, model, x, torch.tensor([3, 7])


@pytest.mark.parametrize('name', train.METHODS)
def test_grad_checkpoint_gives_the_same_loss_and_gradients(name):
    module, model, x, labels = tiny_model(name)
    results = []
    for on in (False, True):
        args = argparse.Namespace(ema=0.0, grad_checkpoint=on, compile=False, fsdp=False,
                                  weight_decay=0.05, lr=1e-3)
        state, forward = train.prepare_generator(copy.deepcopy(model), module, args,
                                                 torch.device('cpu'))
        torch.manual_seed(1)  # the same dropout masks and random orders, recomputed or not
        _, loss = forward(x, labels)
        loss.backward()
        results.append((loss.item(), gradients(state['model'])))
    (loss0, grads0), (loss1, grads1) = results
    assert abs(loss0 - loss1) <= 1e-6
    assert max((grads0[k] - grads1[k]).abs().max().item() for k in grads0) <= 1e-6
    blocks = train.blocks(model)
    inside = tuple(f'{n}.' for n, m in model.named_modules() if m in blocks)
    in_blocks = [k for k in grads1 if k.startswith(inside)]
    assert in_blocks and all(grads1[k].abs().sum() > 0 for k in in_blocks)  # a real test


def gradients(model):  # {name: gradient}; zeros for a parameter the step left out
    return {n: torch.zeros_like(p) if p.grad is None else p.grad
            for n, p in model.named_parameters()}


def test_compiled_training_matches_eager(tiny_vq, tmp_path):
    """--compile (inductor: the machine's C compiler, about 20 s here) against eager: 3 steps of
    a tiny LlamaGen, no EMA, so the step-3 grid samples from the compiled model, run eagerly."""
    args = GEN + NODROP + ['--tokenizer', tiny_vq, '--max-steps', '3',
                           '--results-dir', str(tmp_path)]
    train.main(args + ['--run-dir', str(tmp_path / 'eager')])
    train.main(args + ['--run-dir', str(tmp_path / 'compiled'), '--compile'])
    eager, compiled = losses(tmp_path / 'eager'), losses(tmp_path / 'compiled')
    assert len(compiled) == 3 and max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-5
    assert os.path.exists(tmp_path / 'compiled' / 'samples' / '0000003.png')
    ckpt = torch.load(tmp_path / 'compiled' / 'last.pt', weights_only=True)
    assert not any('_orig_mod' in k for k in ckpt['model'])  # the names of an eager run


def test_benchmark_runs_on_the_cpu(capsys):
    train.main(['--benchmark', '--model', 'GPT-tiny', '--image-size', '32',
                '--global-batch-size', '4'])
    out = capsys.readouterr().out
    for field in ('5.4M params', '4 tokens per image', 'train step', 'images/s', 'tokens/s',
                  'TFLOP/s (estimate: 6 x params x tokens)', 'MFU unknown', 'peak memory n/a'):
        assert field in out, field


@pytest.mark.parametrize('extra,message', [
    (['--fsdp'], '--fsdp shards over the processes of torchrun'),
    (['--stage', 'tokenizer', '--grad-checkpoint'], 'the tokenizer stage trains with DDP'),
    (['--stage', 'tokenizer', '--benchmark'], '--benchmark is for the generator stage'),
])
def test_scale_flags_refuse_what_they_cannot_do(tmp_path, extra, message):
    with pytest.raises(SystemExit) as e:
        train.main(GEN + ['--run-dir', str(tmp_path / 'r'), '--results-dir', str(tmp_path)]
                   + extra)
    assert message in str(e.value) and '\n' not in str(e.value)
