"""Official checkpoints, every method. Files with the official keys and shapes (from the manifests,
random values) in the wrapper formats the official code writes load strictly through the method
contract (llamagen.load_tokenizer, derive_config, SIZES, load_official) and sample, at the paper's
settings (PAPER), codes that the tokenizer decodes; `sample.py --official` writes an .npz and a
grid from them; a file that pickles any other object, or one of another family or size, is refused
with one clear line. Paper-size models at tiny grids: the files stay small because every tensor is
a view of one shared random buffer, which torch.save stores once."""
import argparse
import collections
import importlib
import inspect
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import llamagen
import sample
import vq

METHODS = ('llamagen', 'npp', 'par', 'rar', 'iar2', 'mar')
CONTRACT = ('Config', 'Model', 'TokenizerConfig', 'Tokenizer', 'SIZES', 'TOKENIZER_SIZES',
            'CLASSROOM', 'PAPER', 'derive_config', 'param_groups', 'load_official')


def random_sd(keys, offsets=(0,)):
    """Every key of a manifest ({key: shape}) as a view of one buffer: small values (0.02 * randn,
    so sampling stays finite), one storage (the file is the size of the largest tensor, not of the
    model). One state dict per offset, each with other values, all over the same storage (MAR's
    model and model_ema)."""
    size = max(math.prod(s) for s in keys.values()) + max(offsets)
    buf = torch.randn(size, generator=torch.Generator().manual_seed(0)) * 0.02
    return [{k: buf[o:o + math.prod(s)].view(s) for k, s in keys.items()} for o in offsets]


def prefixed(sd, p):  # DDP ('module.') and torch.compile ('_orig_mod.') names
    return {p + k: v for k, v in sd.items()}


NS = argparse.Namespace  # official training scripts pickle their args; the loader allow-lists it
RUNTIME = {'freqs_cis': torch.zeros(5, 32, 2),
           'layers.0.attention.kv_cache.k_cache': torch.zeros(1, 1, 1, 1)}
KL_LOSS = {'loss.logvar': torch.zeros(()),
           'loss.discriminator.main.0.weight': torch.zeros(64, 3, 4, 4)}


def llamagen_file(g, g2):  # c2i_B_256.pt: a training checkpoint
    args = NS(gpt_model='GPT-B', image_size=256, cfg_scale=[1.5], ema=False)
    return {'model': {**g, **RUNTIME}, 'optimizer': {}, 'steps': 5, 'args': args}


def par_file(g, g2):  # DDP names, a stale RoPE table
    return {'module': prefixed({**g, 'freqs_cis': torch.zeros(3)}, 'module.'),
            'args': NS(gpt_model='GPT-XL')}


def iar2_tok_file(t):  # a training checkpoint of the tokenizer
    return {'model': t, 'optimizer': {'state': {}, 'param_groups': []}, 'steps': 7,
            'args': NS(vq_model='VQ-16')}


def mar_file(g, g2):  # checkpoint-last.pth: the demo samples with model_ema
    return {'model': g2, 'model_ema': g, 'optimizer': {}, 'epoch': 3, 'args': NS(model='mar_base')}


# method: the generator's manifest and size, the tokenizer's manifest and size (None: the paper's,
# the first of TOKENIZER_SIZES), the generator file (from its state dict and a second one with
# other values), the tokenizer file, the image size, generate() knobs over the paper's. Between
# them, every wrapper the loaders accept. 32 px: 2x2 tokens at stride 16; RAR and MAR have
# position tables of 256 tokens, so 256 px.
FAMILIES = {
    'llamagen': dict(gen='llamagen_gpt_b_c2i_256', size='GPT-B', tok='llamagen_vq16',
                     tok_size=None, gen_file=llamagen_file,
                     tok_file=lambda t: {'model': t},  # vq_ds16_c2i.pt
                     image_size=32, knobs=dict(cfg_scale=2.0, top_k=100)),
    'npp': dict(gen='npp_gpt_b_c2i_256', size='GPT-B', tok='llamagen_vq16', tok_size=None,
                gen_file=lambda g, g2: {'ema': prefixed(g, '_orig_mod.')},
                tok_file=lambda t: {'state_dict': t}, image_size=32, knobs={}),
    # n = 4 regions: at least 4 tokens, a 2x2 grid (one per region)
    'par': dict(gen='par_xl_4x', size='GPT-XL', tok='llamagen_vq16', tok_size=None,
                gen_file=par_file, tok_file=lambda t: t, image_size=32, knobs=dict(cfg_scale=1.5)),
    # rar_b.bin and maskgit-vqgan-imagenet-f16-256.bin: raw state dicts. The slowest case here
    # (256 cached steps of a 261M model), so without CFG, which would double the batch
    'rar': dict(gen='rar_b', size='rar_b', tok='maskgit_vqgan', tok_size='MaskGIT-VQGAN',
                gen_file=lambda g, g2: prefixed(g, '_orig_mod.'), tok_file=lambda t: t,
                image_size=256, knobs=dict(cfg_scale=1.0)),
    'iar2': dict(gen='iar2_b', size='IAR2-B', tok='iar2_vq', tok_size=None,
                 gen_file=lambda g, g2: {'state_dict': {**g, **RUNTIME}}, tok_file=iar2_tok_file,
                 image_size=32, knobs={}),
    # kl16.ckpt keeps its loss keys
    'mar': dict(gen='mar_b', size='mar_base', tok='kl16_vae', tok_size=None, gen_file=mar_file,
                tok_file=lambda t: {'model': {**t, **KL_LOSS}}, image_size=256,
                knobs=dict(num_iter=2, num_sampling_steps=2, cfg_scale=2.0)),
}


@pytest.fixture(scope='module')
def official(tmp_path_factory, manifest):
    """method -> (generator file, tokenizer file, the generator weights sampling must use, the
    tokenizer's weights); each written once."""
    root, made = tmp_path_factory.mktemp('official'), {}

    def files(method):
        if method in made:
            return made[method]
        fam = FAMILIES[method]
        g, g2 = random_sd(manifest(fam['gen']), offsets=(0, 1))
        (t,) = random_sd(manifest(fam['tok']))
        gen, tok = root / f'{method}_gpt.pt', root / f'{method}_tok.pt'
        torch.save(fam['gen_file'](g, g2), gen)
        torch.save(fam['tok_file'](t), tok)
        for path, name in ((gen, fam['gen']), (tok, fam['tok'])):  # one storage per file
            largest = max(math.prod(s) for s in manifest(name).values())
            assert os.path.getsize(path) < 4 * largest + 2e6, path
        made[method] = (str(gen), str(tok), g, t)
        return made[method]
    return files


def official_names(model, sd):
    """sd with the official names mapped to ours as llamagen.load_official maps them (None:
    a key that is not kept, e.g. kl16's losses)."""
    key = getattr(model, 'official_key', lambda k: k)
    mapped = {key(k): v for k, v in sd.items()}
    mapped.pop(None, None)
    return mapped


def same_weights(model, sd):
    ours = model.state_dict()
    return ours.keys() == sd.keys() and all(torch.equal(ours[k], v) for k, v in sd.items())


def generate_knobs(module):  # generate()'s keyword arguments, the generator excluded
    params = inspect.signature(module.Model.generate).parameters
    return {k for k, v in params.items() if k != 'generator' and v.default is not v.empty}


@pytest.mark.parametrize('method', METHODS)
def test_every_method_exports_the_contract(method):
    module = importlib.import_module(method)
    assert all(hasattr(module, name) for name in CONTRACT), method
    assert isinstance(module.CLASSROOM, dict)
    assert set(module.CLASSROOM) <= {'tokenizer', 'generator'}
    assert any(k.endswith('tiny') for k in module.SIZES)
    assert any(k.endswith('tiny') for k in module.TOKENIZER_SIZES)
    # the released models' settings: known sizes, and knobs that generate() takes (or the size
    # the model was trained at)
    assert module.PAPER and set(module.PAPER) <= set(module.SIZES)
    for settings in module.PAPER.values():
        assert set(settings) <= generate_knobs(module) | {'image_size'}, settings


@pytest.mark.parametrize('method', METHODS)
def test_official_files_load_and_sample(method, official):
    """What `sample.py --official` does, by the contract: the tokenizer, the Config that it and the
    data fix, the generator loaded strictly, generate at the paper's settings, decode_code."""
    gen, tok_path, g, t = official(method)
    fam = FAMILIES[method]
    module = importlib.import_module(method)
    tok = llamagen.load_tokenizer(module, tok_path, fam['tok_size'])
    assert same_weights(tok, official_names(tok, t))
    derived = module.derive_config(tok, fam['image_size'], 1000)
    model = module.Model(module.Config(**module.SIZES[fam['size']], **derived))
    model = module.load_official(model, gen)
    # every tensor came from the file (MAR: model_ema, not model, which holds other values)
    assert same_weights(model, g)
    knobs = {**module.PAPER.get(fam['size'], {}), **fam['knobs']}
    knobs.pop('image_size', None)  # the trained size; here the tiny grid of the test
    n = 2 if fam['image_size'] < 256 else 1
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # as sample.py: generate's codes are inference tensors
        codes = model.generate(torch.arange(n), generator=g, **knobs)
        img = tok.decode_code(codes)
    assert torch.is_tensor(codes) and len(codes) == n  # one tensor that the tokenizer decodes
    size = fam['image_size']
    assert img.shape == (n, 3, size, size) and torch.isfinite(img).all()


def argv(method, model, gpt, tok, *flags):
    return ['--official', '--method', method, '--model', model, '--gpt-ckpt', gpt, '--vq-ckpt', tok,
            *flags]


# --image-size-eval: official sampling resizes to 256 for FID by default; here the images stay as
# generated
SMALL = ['--image-size', '32', '--image-size-eval', '32']


@pytest.mark.parametrize('method,model', [('llamagen', 'GPT-B'), ('iar2', 'IAR2-B')])
def test_sample_py_official_writes_npz(method, model, official, tmp_path):
    gen, tok, _, _ = official(method)
    out = tmp_path / 'samples.npz'
    sample.main(argv(method, model, gen, tok, *SMALL, '--num-samples', '3', '--batch-size', '2',
                     '--out', str(out)))
    arr = np.load(out)
    assert arr['arr_0'].shape == (3, 32, 32, 3) and arr['arr_0'].dtype == np.uint8
    assert arr['arr_1'].tolist() == [0, 1, 2]  # class-balanced labels


def test_official_grid_png(official, tmp_path):
    gen, tok, _, _ = official('llamagen')
    sample.main(argv('llamagen', 'GPT-B', gen, tok, *SMALL, '--grid', str(tmp_path / 'grid.png'),
                     '--classes', '0', '1', '--per-class', '1'))
    # one column, two rows, 2-px gaps
    assert Image.open(tmp_path / 'grid.png').size == (32 + 4, 2 * (32 + 2) + 2)


class Evil:  # any class but argparse.Namespace: unpickling it could run code
    pass


class EvilDict(collections.OrderedDict):  # looks like a state dict, but is a class of its own
    pass


def with_bad_file(official, tmp_path, which, obj):  # -> (bad path, sample.py --official argv)
    gen, tok, _, _ = official('llamagen')
    bad = str(tmp_path / 'bad.pt')
    torch.save(obj, bad)
    files = {'gpt': gen, 'vq': tok, which: bad}
    return bad, argv('llamagen', 'GPT-B', files['gpt'], files['vq'], '--image-size', '32')


@pytest.mark.parametrize('which,obj', [
    ('gpt', {'model': {'w': torch.zeros(1)}, 'args': Evil()}),
    ('gpt', EvilDict(w=torch.zeros(1))),
    ('vq', torch.nn.Linear(2, 2)),  # torch.save(model): a whole pickled module
])
def test_official_refuses_other_pickles(which, obj, official, tmp_path):
    bad, args = with_bad_file(official, tmp_path, which, obj)
    with pytest.raises(SystemExit, match='refusing') as e:
        sample.main(args)
    assert bad in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('which,obj', [('gpt', torch.zeros(3)), ('vq', [torch.zeros(3)]),
                                       ('gpt', {'model': 'not tensors'})])
def test_official_refuses_files_without_a_state_dict(which, obj, official, tmp_path):
    """weights_only=True lets tensors, lists and plain dicts through: they must still get one clear
    line, not a traceback from deep inside the loader."""
    bad, args = with_bad_file(official, tmp_path, which, obj)
    with pytest.raises(SystemExit) as e:
        sample.main(args)
    assert bad in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('gpt,tok,method,model,bad,match', [
    # GPT-B weights, GPT-L asked for
    ('llamagen', 'llamagen', 'llamagen', 'GPT-L', 'gpt', 'of another shape'),
    ('rar', 'llamagen', 'llamagen', 'GPT-B', 'gpt', 'missing'),  # RAR weights given to LlamaGen
    ('llamagen', 'llamagen', 'par', 'GPT-B', 'gpt', 'missing'),  # LlamaGen has no PAR tokens
    # IAR2's tokenizer given to LlamaGen
    ('llamagen', 'iar2', 'llamagen', 'GPT-B', 'vq', 'missing|unexpected|shape'),
])
def test_official_refuses_other_families_and_sizes(gpt, tok, method, model, bad, match, official,
                                                   tmp_path):
    files = {'gpt': official(gpt)[0], 'vq': official(tok)[1]}
    with pytest.raises(SystemExit, match=match) as e:
        sample.main(argv(method, model, files['gpt'], files['vq'], '--image-size', '32'))
    assert files[bad] in str(e.value) and '\n' not in str(e.value)


def test_maskgit_vqgan_keys_match_official(manifest):
    """RAR's tokenizer: our VQModel at VQ_SIZES['MaskGIT-VQGAN'] has the official keys (through the
    loader's name map, LDM-style as kl16's) and shapes. Not in the same order: the official decoder
    lists its levels by resolution (up.0 = finest first), ours in processing order;
    load_state_dict does not care."""
    with torch.device('meta'):
        model = vq.VQModel(vq.VQConfig(**vq.VQ_SIZES['MaskGIT-VQGAN']))
    ref = manifest('maskgit_vqgan')
    want = {model.official_key(k): s for k, s in ref.items()}
    assert len(want) == len(ref)  # the name map is one to one
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == want
