"""Official checkpoints end to end through `sample.py --official`: for every family, files with the official
keys and shapes (from the manifests, random values) in the wrapper formats the official code writes load
strictly and sample a few tokens; a file that pickles any other object, or one of another family or size,
is refused with one clear line. Paper-size models at tiny grids: the files stay small because every
tensor is a view of one shared random buffer, which torch.save stores once."""
import argparse
import collections
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import vq

KEYS = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'reference', 'official_keys')


def manifest(name):  # -> [(key, shape)] in the official state_dict order
    path = os.path.join(KEYS, name + '.json')
    if not os.path.exists(path):
        pytest.skip(f'{path} not found')
    return [(k, tuple(s)) for k, s in json.load(open(path))['keys']]


def random_sd(name, offsets=(0,)):
    """Every key of the manifest as a view of one buffer: small values (0.02 * randn, so sampling stays
    finite), one storage (the file is the size of the largest tensor, not of the model). One state dict
    per offset, each with other values, all over the same storage (MAR's model and model_ema)."""
    keys = manifest(name)
    buf = torch.randn(max(math.prod(s) for _, s in keys) + max(offsets), generator=torch.Generator().manual_seed(0)) * 0.02
    return [{k: buf[o:o + math.prod(s)].view(s) for k, s in keys} for o in offsets]


def prefixed(sd, p):  # DDP ('module.') and torch.compile ('_orig_mod.') names
    return {p + k: v for k, v in sd.items()}


NS = argparse.Namespace  # official training scripts pickle their args; the loader allow-lists this one class
RUNTIME = {'freqs_cis': torch.zeros(5, 32, 2), 'layers.0.attention.kv_cache.k_cache': torch.zeros(1, 1, 1, 1)}
KL_LOSS = {'loss.logvar': torch.zeros(()), 'loss.discriminator.main.0.weight': torch.zeros(64, 3, 4, 4)}
# --image-size-eval: official sampling resizes to 256 for FID by default; here the images stay as generated
SMALL = ['--image-size', '32', '--image-size-eval', '32', '--num-samples', '2', '--batch-size', '2']  # 2x2 tokens at stride 16
FULL = ['--image-size', '256', '--image-size-eval', '256', '--num-samples', '1', '--batch-size', '1']  # fixed position tables

# method: generator manifest, tokenizer manifest, generator file (from its state dict and a second one
# with other values), tokenizer file, sample.py flags. Between them, every wrapper the loaders accept.
FAMILIES = {
    'llamagen': ('llamagen_gpt_b_c2i_256', 'llamagen_vq16',
                 lambda g, g2: {'model': {**g, **RUNTIME}, 'optimizer': {}, 'steps': 5,
                                'args': NS(gpt_model='GPT-B', image_size=256, cfg_scale=[1.5], ema=False)},
                 lambda t: {'model': t},  # vq_ds16_c2i.pt
                 ['--model', 'GPT-B', '--cfg-scale', '2.0', '--top-k', '100', *SMALL]),
    'npp': ('npp_gpt_b_c2i_256', 'llamagen_vq16',
            lambda g, g2: {'ema': prefixed(g, '_orig_mod.')},
            lambda t: {'state_dict': t},
            ['--model', 'GPT-B', *SMALL]),
    'par': ('par_xl_4x', 'llamagen_vq16',  # n = 4 regions: at least 4 tokens, a 2x2 grid (one per region)
            lambda g, g2: {'module': prefixed({**g, 'freqs_cis': torch.zeros(3)}, 'module.'), 'args': NS(gpt_model='GPT-XL')},
            lambda t: t,
            ['--model', 'GPT-XL', '--cfg-scale', '1.5', *SMALL]),
    # rar_b.bin and maskgit-vqgan-imagenet-f16-256.bin: raw state dicts. The position tables fix 256 tokens: the
    # slowest case here (256 cached steps of a 261M model), so without CFG, which would double the batch
    'rar': ('rar_b', 'maskgit_vqgan',
            lambda g, g2: prefixed(g, '_orig_mod.'),
            lambda t: t,
            ['--model', 'rar_b', '--vq-model', 'MaskGIT-VQGAN', '--cfg-scale', '1.0', *FULL]),
    'iar2': ('iar2_b', 'iar2_vq',
             lambda g, g2: {'state_dict': {**g, **RUNTIME}},
             lambda t: {'model': t, 'optimizer': {'state': {}, 'param_groups': []}, 'steps': 7, 'args': NS(vq_model='VQ-16')},
             ['--model', 'IAR2-B', *SMALL]),
    'mar': ('mar_b', 'kl16_vae',  # checkpoint-last.pth: the demo samples with model_ema; kl16.ckpt keeps loss keys
            lambda g, g2: {'model': g2, 'model_ema': g, 'optimizer': {}, 'epoch': 3, 'args': NS(model='mar_base')},
            lambda t: {'model': {**t, **KL_LOSS}},
            ['--model', 'mar_base', '--num-iter', '2', '--num-sampling-steps', '2', '--cfg-scale', '2.0', *FULL]),
}


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    """method -> (generator file, tokenizer file, the generator weights sampling must use); each written once."""
    root, made = tmp_path_factory.mktemp('official'), {}

    def files(method):
        if method not in made:
            gen, tok, wrap_gen, wrap_tok, _ = FAMILIES[method]
            g, g2 = random_sd(gen, offsets=(0, 1))
            paths = root / f'{method}_gpt.pt', root / f'{method}_tok.pt'
            torch.save(wrap_gen(g, g2), paths[0])
            torch.save(wrap_tok(*random_sd(tok)), paths[1])
            for path, name in zip(paths, (gen, tok)):  # one storage per file, not one per tensor
                assert os.path.getsize(path) < 4 * max(math.prod(s) for _, s in manifest(name)) + 2e6, path
            made[method] = (*map(str, paths), g)
        return made[method]
    return files


def argv(method, model, gpt, tok, *flags):
    return ['--official', '--method', method, '--model', model, '--gpt-ckpt', gpt, '--vq-ckpt', tok, *flags]


def run(monkeypatch, argv):
    """sample.main in-process -> (loaded model, sampled float images); both recorded on their way."""
    loaded, images = [], []
    load_generator, sample_fn = sample.load_generator, sample.sample
    monkeypatch.setattr(sample, 'load_generator', lambda args: loaded.append(load_generator(args)) or loaded[-1])
    monkeypatch.setattr(sample, 'sample', lambda *a: images.append(sample_fn(*a)) or images[-1])
    sample.main(argv)
    return loaded[0][0], images


@pytest.mark.parametrize('method', list(FAMILIES))
def test_official_files_load_and_sample(method, official, tmp_path, monkeypatch):
    gen, tok, g = official(method)
    flags, out = FAMILIES[method][4], tmp_path / 'samples.npz'
    model, images = run(monkeypatch, ['--official', '--method', method, '--gpt-ckpt', gen, '--vq-ckpt', tok, *flags, '--out', str(out)])
    # every tensor came from the file (MAR: model_ema, not model, which holds other values)
    ours = model.state_dict()
    assert ours.keys() == g.keys() and all(torch.equal(ours[k], v) for k, v in g.items())
    assert images and all(torch.isfinite(x).all() for x in images)
    size, n = int(flags[flags.index('--image-size') + 1]), int(flags[flags.index('--num-samples') + 1])
    arr = np.load(out)
    assert arr['arr_0'].shape == (n, size, size, 3) and arr['arr_0'].dtype == np.uint8 and len(arr['arr_1']) == n


def test_official_grid_png(official, tmp_path):
    gen, tok, _ = official('llamagen')
    sample.main(argv('llamagen', 'GPT-B', gen, tok, '--image-size', '32', '--image-size-eval', '32',
                     '--grid', str(tmp_path / 'grid.png'), '--classes', '0', '1', '--per-class', '1'))
    assert Image.open(tmp_path / 'grid.png').size == (32 + 4, 2 * (32 + 2) + 2)  # one column, two rows, 2-px gaps


class Evil:  # any class but argparse.Namespace: unpickling it could run code
    pass


class EvilDict(collections.OrderedDict):  # looks like a state dict, but is a class of its own
    pass


@pytest.mark.parametrize('which,obj', [
    ('gpt', {'model': {'w': torch.zeros(1)}, 'args': Evil()}),
    ('gpt', EvilDict(w=torch.zeros(1))),
    ('vq', torch.nn.Linear(2, 2)),  # torch.save(model): a whole pickled module
])
def test_official_refuses_other_pickles(which, obj, official, tmp_path):
    gen, tok, _ = official('llamagen')
    bad = str(tmp_path / 'bad.pt')
    torch.save(obj, bad)
    files = {'gpt': bad, 'vq': tok} if which == 'gpt' else {'gpt': gen, 'vq': bad}
    with pytest.raises(SystemExit, match='refusing') as e:
        sample.main(argv('llamagen', 'GPT-B', files['gpt'], files['vq'], '--image-size', '32'))
    assert bad in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('which,obj', [('gpt', torch.zeros(3)), ('vq', [torch.zeros(3)]), ('gpt', {'model': 'not tensors'})])
def test_official_refuses_files_without_a_state_dict(which, obj, official, tmp_path):
    """weights_only=True lets tensors, lists and plain dicts through: they must still get one clear line, not a
    traceback from deep inside the loader."""
    gen, tok, _ = official('llamagen')
    bad = str(tmp_path / 'bad.pt')
    torch.save(obj, bad)
    files = {'gpt': bad, 'vq': tok} if which == 'gpt' else {'gpt': gen, 'vq': bad}
    with pytest.raises(SystemExit) as e:
        sample.main(argv('llamagen', 'GPT-B', files['gpt'], files['vq'], '--image-size', '32'))
    assert bad in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('gpt,tok,method,model,bad,match', [
    ('llamagen', 'llamagen', 'llamagen', 'GPT-L', 'gpt', 'of another shape'),  # GPT-B weights, GPT-L asked for
    ('rar', 'llamagen', 'llamagen', 'GPT-B', 'gpt', 'missing'),  # RAR weights given to LlamaGen
    ('llamagen', 'llamagen', 'par', 'GPT-B', 'gpt', 'missing'),  # LlamaGen has no PAR transition tokens
    ('llamagen', 'iar2', 'llamagen', 'GPT-B', 'vq', 'missing|unexpected|shape'),  # IAR2's tokenizer given to LlamaGen
])
def test_official_refuses_other_families_and_sizes(gpt, tok, method, model, bad, match, official, tmp_path):
    files = {'gpt': official(gpt)[0], 'vq': official(tok)[1]}
    with pytest.raises(SystemExit, match=match) as e:
        sample.main(argv(method, model, files['gpt'], files['vq'], '--image-size', '32'))
    assert files[bad] in str(e.value) and '\n' not in str(e.value)


def test_maskgit_vqgan_keys_match_official():
    """RAR's tokenizer: our VQModel at VQ_SIZES['MaskGIT-VQGAN'] has the official keys (through the loader's
    name map, LDM-style as kl16's) and shapes. Not in the same order: the official decoder lists its levels
    by resolution (up.0 = finest first), ours in processing order; load_state_dict does not care."""
    with torch.device('meta'):
        model = vq.VQModel(vq.VQConfig(**vq.VQ_SIZES['MaskGIT-VQGAN']))
    want = {model.official_key(k): s for k, s in manifest('maskgit_vqgan')}
    assert len(want) == len(manifest('maskgit_vqgan'))  # the name map is one to one
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
