"""MAR (mar.py) and its KL tokenizer (vq.KLModel): official keys (MAR-B, kl16 through the loader), the
truncated-normal mask ratio and ceil(L r) masked tokens per row, the cosine schedule of tokens per
step, reproducible generation from a torch.Generator, CFG at scale 1 = the unguided path, the KL
tokenizer's shapes, scale factor and KL term, the classroom defaults (cosine LR, embedding init) and a tiny
train + sample run on the built-in dataset."""
import json
import math
import os

import numpy as np
import pytest
import torch
from scipy import stats

import mar
import sample
import train
import vq

KEYS = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'reference', 'official_keys')


def manifest(name):
    path = os.path.join(KEYS, name)
    if not os.path.exists(path):
        pytest.skip(f'{path} not found')
    return json.load(open(path))


def tiny(**kw):  # 32x32 images, stride 4: an 8x8 grid of 4-channel tokens
    cfg = dict(img_size=32, vae_stride=4, vae_embed_dim=4, num_classes=5, encoder_embed_dim=32, encoder_depth=1,
               encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, buffer_size=4,
               diffloss_d=1, diffloss_w=32, num_sampling_steps=5)
    torch.manual_seed(0)
    model = mar.Model(mar.Config(**{**cfg, **kw}))
    net = model.diffloss.net  # its zero init ignores z and gives eps = 0 everywhere
    for layer in [net.final_layer.linear, net.final_layer.adaLN_modulation[1]] + [b.adaLN_modulation[1] for b in net.res_blocks]:
        torch.nn.init.normal_(layer.weight, std=0.3)
    return model.eval()


def test_keys_match_official_mar_b():
    ref = manifest('mar_b.json')
    with torch.device('meta'):
        model = mar.Model(mar.Config(**mar.SIZES['mar_base']))
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == ref['keys']  # names, shapes and order
    assert sum(p.numel() for p in model.parameters()) == ref['num_params']
    with torch.device('meta'):  # the note's measured sizes of L and H
        n = [sum(p.numel() for p in mar.Model(mar.Config(**mar.SIZES[s])).parameters()) for s in ('mar_large', 'mar_huge')]
    assert [round(x / 1e6, 1) for x in n] == [478.3, 942.4]


def test_kl16_loads_through_the_key_map(tmp_path):
    """Random tensors with the manifest's LDM names and shapes (each filled with its index) plus a
    training-loss key, in {'model': ...} as kl16.ckpt: every tensor lands where the map sends it."""
    ref = manifest('kl16_vae.json')
    sd = {k: torch.full(s, float(i)) for i, (k, s) in enumerate(ref['keys'])}
    torch.save({'model': {**sd, 'loss.logvar': torch.zeros(())}}, tmp_path / 'kl16.ckpt')
    with torch.device('meta'):
        tok = vq.KLModel(vq.KLConfig(**vq.KL_SIZES['KL-16']))
    assert sum(p.numel() for p in tok.parameters()) == ref['num_params']
    tok = mar.load_official(tok.to_empty(device='cpu'), str(tmp_path / 'kl16.ckpt'))
    ours = tok.state_dict()
    for i, (k, s) in enumerate(ref['keys']):
        assert ours[vq.ldm_key(k, 5)].shape == tuple(s) and ours[vq.ldm_key(k, 5)].flatten()[0] == i, k
    assert vq.ldm_key('decoder.up.4.block.2.conv1.weight', 5) == 'decoder.conv_blocks.0.res.2.conv1.weight'
    assert tok.cfg.scale_factor == 0.2325 and tok.stride == 16
    torch.save({'model': {k: v for k, v in list(sd.items())[:-2]}}, tmp_path / 'bad.ckpt')  # post_quant_conv missing
    with pytest.raises(SystemExit, match='bad.ckpt: not a checkpoint of this model/size: 2 missing'):
        mar.load_official(tok, str(tmp_path / 'bad.ckpt'))


def test_kl_tokenizer_shapes_scale_and_kl():
    cfg = vq.KLConfig(**{**vq.KL_SIZES['KL-tiny'], 'ch': 32, 'kl_weight': 0.5})
    torch.manual_seed(0)
    tok, x = vq.KLModel(cfg), torch.rand(3, 3, 32, 32) * 2 - 1
    moments = tok.encode(x)
    assert moments.shape == (3, 8, 8, 8) and tok.stride == 4  # (B, 2C, h, w)
    z = tok.sample(moments)
    assert z.shape == (3, 4, 8, 8) and not torch.equal(z, tok.sample(moments))  # a fresh draw each call
    assert tok.decode_code(z).shape == (3, 3, 32, 32)
    sharp = torch.cat([moments[:, :4], torch.full_like(moments[:, 4:], -40.0)], 1)  # logvar clamped to -30
    assert torch.allclose(tok.sample(sharp), moments[:, :4] * cfg.scale_factor, atol=1e-5)
    tok.train()
    recon, losses = tok(x)  # training: scale_factor becomes 1/std of the batch's latents (saved with the config)
    mean, logvar = moments.chunk(2, 1)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean() / (3 * 32 * 32)
    assert recon.shape == x.shape and losses['kl'].item() == pytest.approx(0.5 * kl.item(), rel=1e-4)
    z = tok.sample(tok.encode(x)) / cfg.scale_factor
    assert cfg.scale_factor != 0.2325 and 1 / cfg.scale_factor == pytest.approx(z.std().item(), rel=0.1)


def test_mask_ratio_and_masked_count(monkeypatch):
    torch.manual_seed(0)
    r = np.array([mar.mask_ratio(0.7) for _ in range(3000)])
    ref = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)  # the official sampler
    assert r.min() >= 0.7 and r.max() <= 1.0 and abs(r.mean() - ref.mean()) < 0.004 and abs(r.std() - ref.std()) < 0.004
    assert stats.kstest(r, ref.cdf).pvalue > 0.01
    orders = torch.rand(4, 64).argsort(1)
    m = mar.random_mask(orders, 52)
    assert m.sum(1).tolist() == [52] * 4 and all(m[i, orders[i, :52]].all() for i in range(4))
    model, seen = tiny(diffusion_batch_mul=3), []
    model.train()
    model.diffloss.forward = lambda target, z: seen.append((len(target), len(z))) or target.sum() * 0
    for ratio in (0.8, 0.7001, 1.0):  # ceil(64 r) masked tokens per row (official rounding), x3 draws each
        monkeypatch.setattr(mar, 'mask_ratio', lambda _: ratio)
        model(torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))
        assert seen[-1] == (2 * math.ceil(64 * ratio) * 3,) * 2


def test_tokens_per_step_follow_the_cosine_schedule():
    assert [256 - mar.next_mask_len(0, 16, 256, 256)] == [2]  # the note's numbers for 256 tokens
    counts, n = [], 256
    for it in (16, 64, 256):
        counts, n = [], 256
        for s in range(it):
            nxt = mar.next_mask_len(s, it, 256, n) if s < it - 1 else 0
            counts.append(n - nxt)
            n = nxt
        assert sum(counts) == 256 and min(counts) >= 1
        if it == 16:
            assert counts[:5] == [2, 3, 7, 8, 11]
        if it == 64:
            assert counts[:3] == [1, 1, 1] and max(counts) in (6, 7)
        if it == 256:
            assert counts == [1] * 256
    model, seen = tiny(), []
    sample_fn = model.diffloss.sample
    model.diffloss.sample = lambda z, *a: seen.append(len(z)) or sample_fn(z, *a)
    out = model.generate(torch.tensor([0, 3, 4]), num_iter=10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 4, 8, 8) and model.nfe == 10
    per_step, n = [], 64
    for s in range(10):
        nxt = mar.next_mask_len(s, 10, 64, n) if s < 9 else 0
        per_step.append(3 * (n - nxt))
        n = nxt
    assert seen == per_step and sum(seen) == 3 * 64  # every token predicted exactly once
    model.generate(torch.tensor([1]), num_iter=10, cfg_scale=2.0)
    assert seen[10:] == [2 * c // 3 for c in per_step]  # CFG: conditional and unconditional rows
    seen.clear()  # more steps than tokens: the steps that reveal nothing skip the transformer call
    model.generate(torch.tensor([0]), num_iter=100, generator=torch.Generator().manual_seed(0))
    assert model.nfe == len(seen) == 64 and min(seen) >= 1 and sum(seen) == 64  # not 100 calls


def test_generation_is_reproducible_and_cfg_one_is_the_unguided_path():
    model, labels = tiny(), torch.tensor([0, 2, 4, 1])
    run = lambda seed, **kw: model.generate(labels, num_iter=6, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    rel = lambda x, y: ((x - y).abs().max() / y.abs().max()).item()  # noqa: E731 (an untrained head: large values)
    a = run(0)
    assert torch.equal(a, run(0)) and rel(run(1), a) > 1e-2
    assert rel(run(0, cfg_scale=1 + 1e-6), a) < 1e-4  # the doubled batch with guidance ~0: the same samples
    linear, constant = run(0, cfg_scale=3.0), run(0, cfg_scale=3.0, cfg_schedule='constant')
    assert rel(linear, a) > 1e-2 and rel(constant, a) > 1e-2 and rel(linear, constant) > 1e-2


def test_attention_is_bidirectional():
    model, x = tiny(), torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, 40:] = True
    z = model.decode(model.encode(mar.patchify(x, 1), mask, model.class_emb(torch.tensor([1]))), mask)
    x2 = x.clone()
    x2[0, :, 4, 7] += 1.0  # token 39, the last visible one in raster order
    z2 = model.decode(model.encode(mar.patchify(x2, 1), mask, model.class_emb(torch.tensor([1]))), mask)
    assert not torch.allclose(z[0, :39], z2[0, :39])  # earlier positions see it too
    assert torch.equal(mar.unpatchify(mar.patchify(x, 2), 2, 4), x)


def test_attention_is_timms_formula():  # softmax(q k^T / sqrt(D)) v over every position, no mask
    torch.manual_seed(0)
    attn, x = mar.Attention(32, 4, 0.0, 0.0).eval(), torch.randn(2, 7, 32)
    q, k, v = attn.qkv(x).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
    y = ((q @ k.transpose(-1, -2)) / 8 ** 0.5).softmax(-1) @ v
    assert torch.allclose(attn(x), attn.proj(y.transpose(1, 2).reshape(2, 7, 32)), atol=1e-5)


DATA = ['--num-images', '64', '--image-size', '16']


def test_classroom_run_decays_the_lr_and_scales_the_embeddings():
    args, _ = train.parse_args(['--method', 'mar'])  # mar.CLASSROOM over STAGE_DEFAULTS; flags over both
    assert (args.max_steps, args.lr_schedule, args.lr) == (4000, 'cosine', 1e-3)
    assert train.parse_args(['--method', 'mar', '--lr-schedule', 'constant'])[0].lr_schedule == 'constant'
    assert train.parse_args(['--method', 'llamagen'])[0].lr_schedule == 'constant'
    assert abs(train.lr_at(3999, 4000, args) - args.end_lr) < 1e-8 and train.lr_at(2050, 4000, args) < 0.55 * args.lr
    for std in (0.02, 0.2):  # init_std reaches the learned embeddings; DiffLoss keeps its zero-initialised output
        model = mar.Model(mar.Config(**{**mar.SIZES['mar_tiny'], 'img_size': 32, 'vae_stride': 4, 'vae_embed_dim': 4,
                                        'num_classes': 10, 'init_std': std}))
        for p in (model.encoder_pos_embed_learned, model.decoder_pos_embed_learned, model.class_emb.weight):
            assert abs(p.std().item() / std - 1) < 0.15
        assert model.diffloss.net.final_layer.linear.weight.abs().max() == 0


def test_trains_and_samples_on_the_builtin_dataset(tmp_path):
    train.main(['--method', 'mar', '--stage', 'tokenizer', '--max-steps', '2', '--global-batch-size', '8', '--ch', '32',
                '--encoder-ch-mult', '1', '2', '2', '--decoder-ch-mult', '1', '2', '2', '--disc-start', '1',
                '--run-dir', str(tmp_path / 'tok'), '--results-dir', str(tmp_path)] + DATA)
    tok = torch.load(tmp_path / 'tok' / 'last.pt', weights_only=True)
    assert tok['kind'] == 'KLModel' and tok['config']['scale_factor'] != 0.2325  # measured
    run = tmp_path / 'mar'
    train.main(['--method', 'mar', '--tokenizer', str(tmp_path / 'tok' / 'last.pt'), '--encoder-embed-dim', '32',
                '--decoder-embed-dim', '32', '--encoder-depth', '1', '--decoder-depth', '1', '--diffloss-w', '32',
                '--diffloss-d', '1', '--num-sampling-steps', '5', '--max-steps', '3', '--global-batch-size', '8',
                '--log-every', '1', '--run-dir', str(run), '--results-dir', str(tmp_path)] + DATA)
    ckpt = torch.load(run / 'last.pt', weights_only=True)
    assert ckpt['method'] == 'mar' and ckpt['config']['vae_embed_dim'] == 4 and ckpt['config']['vae_stride'] == 4
    assert ckpt['config']['img_size'] == 16 and os.path.exists(run / 'samples' / '0000003.png')
    sample.main(['--ckpt', str(run / 'last.pt'), '--grid', str(tmp_path / 'g.png'), '--per-class', '2', '--num-iter', '4',
                 '--num-samples', '6', '--out', str(tmp_path / 's.npz'), '--batch-size', '3', '--cfg-scale', '2.0'])
    assert np.load(tmp_path / 's.npz')['arr_0'].shape == (6, 16, 16, 3)
