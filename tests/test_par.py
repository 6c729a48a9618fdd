"""PAR (par.py): official keys, the region reordering, RoPE and mask layout, KV-cache parallel
generation against teacher forcing, the forward-call count, causality in PAR order, the mask
ablation, and a tiny train + sample run on the built-in dataset."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import llamagen
import par
import sample
import train
from conftest import DATA


def tiny(grid=8, n=4, **kw):
    cfg = dict(dim=32, n_layer=2, n_head=2, vocab_size=16, block_size=grid * grid, num_classes=5,
               ar_token_num=n, spe_token_num=n - 1)
    torch.manual_seed(0)
    model = par.Model(par.Config(**{**cfg, **kw}))
    # the official zero init makes every logit 0
    torch.nn.init.normal_(model.output.weight, std=0.5)
    torch.nn.init.normal_(model.spe_tok_embeddings['special_embeddings'].weight)
    return model.eval()


def paper_size(size):  # a paper-size PAR on the meta device: shapes only, no memory
    with torch.device('meta'):
        cfg = par.Config(**par.SIZES[size], vocab_size=16384, block_size=576, num_classes=1000)
        return par.Model(cfg)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_keys_match_official_par_xl_4x(manifest):
    ref = manifest('par_xl_4x')
    model = paper_size('GPT-XL')
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref
    assert num_params(model) == sum(math.prod(s) for s in ref.values()) == 774703360
    assert model.freqs_cis.shape == (1 + 576 + 3, 32, 2)  # official 580 rows, not in the state dict
    # PAR-3B-16x: 15 transition tokens of width 3200, 12 more than 3B-4x
    m4, m16 = paper_size('GPT-3B'), paper_size('GPT-3B-16x')
    assert num_params(m16) - num_params(m4) == 12 * 3200
    assert m16.freqs_cis.shape == (1 + 576 + 15, 50, 2)


@pytest.mark.parametrize('g,n', [(8, 4), (8, 16), (24, 4), (24, 16), (6, 9)])
def test_reorder_matches_the_formula_and_inverts(g, n):
    s, r = math.isqrt(n), g // math.isqrt(n)
    raster = torch.arange(g * g)[None]  # token id = raster index
    expected = torch.empty(g * g, dtype=torch.long)
    for a in range(s):  # region row, region column, relative row, relative column
        for b in range(s):
            for i in range(r):
                for j in range(r):  # PAR index ((i*r + j)*s + a)*s + b holds image (a*r+i, b*r+j)
                    expected[((i * r + j) * s + a) * s + b] = (a * r + i) * g + b * r + j
    assert torch.equal(par.to_par(raster, n)[0], expected)
    x = torch.randn(3, g * g, 5)  # trailing dims ride along
    assert torch.equal(par.to_raster(par.to_par(x, n), n), x)
    assert torch.equal(par.to_par(par.to_raster(x, n), n), x)
    if (g, n) == (8, 4):  # group 0: each region's top-left token, group 1: their right neighbours
        assert expected[:8].tolist() == [0, 4, 32, 36, 1, 5, 33, 37]


def test_rope_rows_and_mask_layout():
    model, g, n, P = tiny(), 8, 4, 1
    hd = model.cfg.dim // model.cfg.n_head
    order = par.to_par(torch.arange(g * g)[None], n)[0]  # raster index of each PAR position
    pos = llamagen.grid_positions(g)[order]  # original (row, col) of t_0 .. t_{L-1}
    f = model.freqs_cis
    assert f.shape == (P + g * g + n - 1, hd // 2, 2)
    zero_rows = [p for p in range(len(f)) if not f[p].any()]
    assert zero_rows == [0, 5, 6, 7]  # the class token and the 3 transition tokens
    # t_0 .. t_3 at positions 1..4, then t_p at position p + n
    assert torch.equal(f[P:P + n], llamagen.rope_2d(pos[:n], hd, 10000.0))
    assert torch.equal(f[P + 2 * n - 1:], llamagen.rope_2d(pos[n:], hd, 10000.0))
    # the note's 4x pattern: rows 0-3 causal, 4-7 see 0-7, 8-11 see 0-11
    m = model.attn_mask(12, 'cpu')
    assert torch.equal(m[:4, :4], torch.ones(4, 4, dtype=torch.bool).tril())
    assert not m[:4, 4:].any()
    assert m[4:8, :8].all() and not m[4:8, 8:].any() and m[8:, :].all()
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    assert torch.equal(tiny(group_mask=False).attn_mask(12, 'cpu'), causal)


def record_decode(model):
    """Wrap model.decode to keep every cached call's (start, logits); `del model.decode` ends it."""
    seen, decode = [], model.decode

    def recorded(x, start, mask):
        out = decode(x, start, mask)
        seen.append((start, out))
        return out
    model.decode = recorded
    return seen


@pytest.mark.parametrize('g,n,cfg_scale,group_mask', [
    (8, 4, 1.0, True), (8, 4, 3.0, True), (8, 16, 3.0, True), (8, 4, 3.0, False),
    (8, 4, 0.5, True),  # a scale below 1 is guidance too (llamagen.guided)
])
def test_kv_cache_parallel_generation_equals_teacher_forcing(g, n, cfg_scale, group_mask):
    model, labels, L = tiny(g, n, group_mask=group_mask), torch.tensor([0, 2, 4]), g * g
    seen = record_decode(model)
    tokens = model.generate(labels, cfg_scale=cfg_scale, top_k=1)  # greedy: follows the logits
    del model.decode
    steps = 1 + (n - 1) + (L - n) // n
    assert tokens.shape == (3, L) and model.nfe == len(seen) == steps
    # where each call starts; one token per call, then a group per call
    assert [s for s, _ in seen] == list(range(n)) + list(range(n, L, n))
    assert [o.shape[1] for _, o in seen] == [1] * n + [n] * ((L - n) // n)
    cached = torch.cat([o for _, o in seen], dim=1)  # (B or 2B, L, V) in PAR order
    guided = llamagen.guided(cfg_scale)
    cond = llamagen.cfg_batch(labels, 5) if guided else labels
    assert len(cached) == len(cond)
    forced = model(tokens.repeat(len(cond) // 3, 1), cond)[0]  # one teacher-forced pass
    assert torch.allclose(cached, forced, atol=1e-5)
    mixed = llamagen.cfg_mix(forced, cfg_scale) if guided else forced
    assert torch.equal(par.to_par(tokens, n), mixed.argmax(-1))  # tokens returned in raster order
    assert all(layer.attention.kv_cache is None for layer in model.layers)


def test_forward_calls_formula():
    for n, calls in ((4, 147), (16, 51)):  # 24x24 tokens: the paper's step counts
        model = tiny(24, n, dim=8, n_layer=1, n_head=1)
        model.generate(torch.tensor([1]), cfg_scale=1.5)
        assert model.nfe == 1 + (n - 1) + (576 - n) // n == calls
    model = tiny(8, 4)
    model.generate(torch.tensor([1]))
    assert model.nfe == 19  # 8x8 tokens at n = 4 (LlamaGen: 64)


def test_generate_keeps_the_training_mode():
    model = tiny().train()
    model.generate(torch.tensor([1]), cfg_scale=2.0)
    assert model.training and all(layer.attention.kv_cache is None for layer in model.layers)


@pytest.mark.parametrize('group_mask', [True, False])
def test_causality_in_par_order(group_mask):
    model, n, L = tiny(group_mask=group_mask), 4, 64
    tokens, labels = torch.randint(0, 16, (2, L)), torch.tensor([1, 3])
    base = model(tokens, labels)[0]  # (B, L, V), position p predicts t_p in PAR order
    for k in (0, 2, 3, 4, 6, 25, 59, 61):  # PAR index of the changed token, in group m = k // n
        z = par.to_par(tokens, n)
        z[:, k] = (z[:, k] + 1) % 16
        out = model(par.to_raster(z, n), labels)[0]
        e = k + 1 if k < n else k + n  # the position where t_k is an input
        if e < n:  # the initial tokens are sequential: t_k only reaches positions >= k + 1
            assert torch.equal(out[:, :e], base[:, :e])
            assert not torch.allclose(out[:, e], base[:, e])
            continue
        first = (k // n + 1) * n  # e lies in the block that predicts group m + 1
        # groups <= m unchanged (the last group: all)
        assert torch.equal(out[:, :first], base[:, :first])
        if e < L:
            block = range(first, first + n)
            changed = [not torch.allclose(out[:, p], base[:, p]) for p in block]
            # group mask: all n predictions of group m+1 see t_k; plain causal: only those from e on
            assert changed == [group_mask or p >= e for p in block]


def test_trains_and_samples_on_the_builtin_dataset(tiny_vq, tmp_path):
    run = tmp_path / 'par'  # tiny_vq: conftest's 16-px VQ tokenizer
    train.main(['--method', 'par', '--tokenizer', tiny_vq, '--dim', '32', '--n-layer', '2',
                '--n-head', '2', '--max-steps', '3', '--global-batch-size', '8', '--log-every', '1',
                '--run-dir', str(run), '--results-dir', str(tmp_path)] + DATA)
    ckpt = torch.load(run / 'last.pt', weights_only=True)
    assert ckpt['method'] == 'par' and ckpt['config']['ar_token_num'] == 4
    assert ckpt['config']['block_size'] == 16
    assert 'spe_tok_embeddings.special_embeddings.weight' in ckpt['model']
    assert len(open(run / 'log.jsonl').readlines()) == 3
    assert os.path.exists(run / 'samples' / '0000003.png')
    sample.main(['--ckpt', str(run / 'last.pt'), '--grid', str(tmp_path / 'g.png'),
                 '--per-class', '2', '--num-samples', '6', '--out', str(tmp_path / 's.npz'),
                 '--batch-size', '3'])
    assert Image.open(tmp_path / 'g.png').size == (2 * 18 + 2, 10 * 18 + 2)
    assert np.load(tmp_path / 's.npz')['arr_0'].shape == (6, 16, 16, 3)
