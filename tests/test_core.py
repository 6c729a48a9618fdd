"""The GPT core (llamagen.py) and the VQ tokenizer (vq.py): official key manifests, the KV cache and
its lifetime, guidance and its interval, causality, RoPE numerics, sampling filters, quantisation,
the tokenizer contract, and official checkpoint wrappers."""
import argparse
import pathlib

import pytest
import torch

import llamagen
import vq
from conftest import tiny_gpt


def tiny(**kw):
    return tiny_gpt(llamagen, **kw)


def caches(model):  # the kv_cache of every attention layer
    return [layer.attention.kv_cache for layer in model.layers]


@pytest.mark.parametrize('name,size,block', [('llamagen_gpt_b_c2i_256', 'GPT-B', 256),
                                             ('llamagen_gpt_xl_c2i_384', 'GPT-XL', 576),
                                             ('npp_gpt_b_c2i_256', 'GPT-B', 256)])
def test_gpt_keys_match_official(name, size, block, manifest):
    with torch.device('meta'):
        cfg = llamagen.Config(**llamagen.SIZES[size], vocab_size=16384, block_size=block,
                              num_classes=1000)
        model = llamagen.Model(cfg)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest(name)
    assert model.freqs_cis.shape == (1 + block, 32, 2)  # not in the state dict, as officially


def test_vq16_keys_match_official(manifest):
    with torch.device('meta'):
        model = vq.VQModel(vq.VQConfig(**vq.VQ_SIZES['VQ-16']))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest('llamagen_vq16')


def test_rope_matches_complex_rotation():
    hd, g = 16, 4
    model = tiny(dim=64, n_head=4, block_size=g * g)
    freqs = model.freqs_cis
    assert torch.all(freqs[0] == 0)  # the class prefix: cos = sin = 0
    base = 1.0 / 10000 ** (torch.arange(0, hd // 2, 2)[: hd // 4].float() / (hd // 2))
    for k in range(g * g):  # token k sits at (k // g, k % g): row angles first, then column angles
        angles = torch.cat([(k // g) * base, (k % g) * base])
        assert torch.allclose(freqs[1 + k, :, 0], angles.cos())
        assert torch.allclose(freqs[1 + k, :, 1], angles.sin())
    x = torch.randn(2, g * g, 3, hd)
    turn = torch.polar(torch.ones(g * g, hd // 2), torch.atan2(freqs[1:, :, 1], freqs[1:, :, 0]))
    ref = torch.view_as_complex(x.reshape(2, g * g, 3, hd // 2, 2)) * turn[None, :, None]
    assert torch.allclose(llamagen.apply_rope(x, freqs[1:]), torch.view_as_real(ref).flatten(3),
                          atol=1e-6)


def test_causality():
    model = tiny()
    tokens, labels = torch.randint(0, 32, (2, 16)), torch.tensor([1, 3])
    base, _ = model(tokens, labels)
    for k in (0, 7, 14):
        changed = tokens.clone()
        changed[:, k] = (changed[:, k] + 1) % 32
        out, _ = model(changed, labels)
        assert torch.equal(out[:, :k + 1], base[:, :k + 1])  # positions <= k never see token k
        assert not torch.allclose(out[:, k + 1:], base[:, k + 1:])


def record_decode(model):
    """Wrap model.decode to keep the last position's logits (B or 2B, V) of every cached call;
    `del model.decode` ends it."""
    seen, decode = [], model.decode

    def recorded(x, start, mask):
        out = decode(x, start, mask)
        seen.append(out[:, -1])
        return out
    model.decode = recorded
    return seen


@pytest.mark.parametrize('cfg_scale,top_k,top_p', [(1.0, 0, 1.0), (3.0, 8, 0.9), (0.5, 0, 1.0)])
def test_kv_cache_equals_no_cache(cfg_scale, top_k, top_p):
    model, labels = tiny(), torch.tensor([0, 2, 4])
    seen = record_decode(model)
    tokens = model.generate(labels, cfg_scale=cfg_scale, temperature=0.9, top_k=top_k,
                            top_p=top_p, generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (3, 16) and model.nfe == 16  # 1 prefill + 15 decode steps
    del model.decode
    # no cache: a full forward over the sequence so far at every step, the same sampler and seed
    g, seq = torch.Generator().manual_seed(1), torch.zeros(3, 0, dtype=torch.long)
    null = torch.full_like(labels, 5)
    for t in range(16):
        padded = torch.cat([seq, torch.zeros(3, 1, dtype=torch.long)], 1)  # last token never read
        logits = model(padded, labels)[0][:, t]
        if llamagen.guided(cfg_scale):  # a scale below 1 guides too
            uncond = model(padded, null)[0][:, t]
            assert torch.allclose(seen[t], torch.cat([logits, uncond]), atol=1e-5)
            logits = llamagen.cfg_mix(torch.cat([logits, uncond]), cfg_scale)
        else:
            assert torch.allclose(seen[t], logits, atol=1e-5)
        seq = torch.cat([seq, llamagen.sample_logits(logits, 0.9, top_k, top_p, g)], 1)
    assert torch.equal(seq, tokens)
    assert all(c is None for c in caches(model))  # caches are released


@pytest.mark.parametrize('interval', [0, 5])
def test_cfg_interval_uses_conditional_logits_after_the_interval(interval):
    """cfg_interval = k guides tokens 0 .. k+1 (official) and samples the conditional logits after.
    Two checks that fail if guidance went on past the interval: the tokens equal a re-sampling of
    generate's own logits by that rule, and they differ, after the interval, from a run with
    guidance everywhere (with the interval ignored, the two runs would be the same run)."""
    model, labels, scale, B = tiny(), torch.tensor([0, 1, 2, 3]), 4.0, 4
    seen = record_decode(model)  # (2B, V) per step: the conditional rows, then the unconditional
    tokens = model.generate(labels, cfg_scale=scale, cfg_interval=interval,
                            generator=torch.Generator().manual_seed(0))
    del model.decode
    g, ref = torch.Generator().manual_seed(0), []
    for t, logits in enumerate(seen):
        use = llamagen.cfg_mix(logits, scale) if t <= interval + 1 else logits[:B]
        ref.append(llamagen.sample_logits(use, generator=g))
    assert len(seen) == 16 and torch.equal(tokens, torch.cat(ref, 1))
    everywhere = model.generate(labels, cfg_scale=scale, cfg_interval=-1,
                                generator=torch.Generator().manual_seed(0))
    past_end = model.generate(labels, cfg_scale=scale, cfg_interval=100,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(everywhere, past_end)  # an interval beyond the last token: guidance always
    first = interval + 2  # tokens guided in both runs
    assert torch.equal(tokens[:, :first], everywhere[:, :first])
    assert not torch.equal(tokens[:, first:], everywhere[:, first:])


def test_guided_and_cfg_batch():
    assert not llamagen.guided(1.0) and not llamagen.guided(1) and not llamagen.guided(1.0, 1.0)
    assert not llamagen.guided()
    assert llamagen.guided(1.5) and llamagen.guided(0.5) and llamagen.guided(0.0)
    assert llamagen.guided(1.0, 3.0)  # any of several scales
    labels = torch.tensor([3, 0, 2])
    assert llamagen.cfg_batch(labels, 7).tolist() == [3, 0, 2, 7, 7, 7]  # then the null class
    # generate doubles the batch exactly when guided, a scale below 1 included
    model = tiny()
    for scale, rows in ((1.0, 3), (2.0, 6), (0.5, 6)):
        seen = record_decode(model)
        model.generate(labels, cfg_scale=scale)
        del model.decode
        assert {len(s) for s in seen} == {rows}


def test_kv_caches_live_only_inside_the_block():
    model = tiny()
    keys = list(model.state_dict())
    with llamagen.kv_caches(model, 3, 17, torch.float64, torch.device('cpu')):
        for k, v in caches(model):
            assert k.shape == v.shape == (3, 4, 17, 16)  # (batch, H, length, D)
            assert k.dtype == v.dtype == torch.float64 and not k.any() and not v.any()
            assert k.data_ptr() != v.data_ptr()  # two buffers, not one
        assert list(model.state_dict()) == keys  # never in the state dict
    assert all(c is None for c in caches(model))
    with pytest.raises(RuntimeError, match='inside'):
        with llamagen.kv_caches(model, 1, 4, torch.float32, torch.device('cpu')):
            assert all(c is not None for c in caches(model))
            raise RuntimeError('inside')
    assert all(c is None for c in caches(model))  # released after an exception too


def test_generate_releases_caches_and_mode_when_it_fails():
    model = tiny().train()
    calls = []

    def failing(x, start, mask):  # the third cached call fails
        calls.append(start)
        if len(calls) == 3:
            raise RuntimeError('decode failed')
        return llamagen.Model.decode(model, x, start, mask)
    model.decode = failing
    with pytest.raises(RuntimeError, match='decode failed'):
        model.generate(torch.tensor([1, 2]), cfg_scale=2.0)
    assert len(calls) == 3 and all(c is None for c in caches(model))
    assert model.training  # eval_mode gave the training mode back


def test_sample_logits_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    g = torch.Generator().manual_seed(0)

    def drawn(n, **kw):  # the set of ids n draws give
        return {llamagen.sample_logits(logits, generator=g, **kw).item() for _ in range(n)}
    assert drawn(20, top_k=1) == {1}
    assert drawn(20, top_p=0.5) == {1}  # p(1) = 0.67
    assert drawn(200, top_k=2) == {1, 2}
    # probs 0.644, 0.237, 0.087, 0.032 (sorted): the token that crosses top_p is kept, the rest
    # dropped
    assert drawn(300, top_p=0.85) == {1, 2}
    assert drawn(300, top_p=0.9) == {0, 1, 2}


def test_label_dropout_uses_the_null_class():
    model = tiny(class_dropout_prob=0.5).train()
    torch.manual_seed(0)
    emb = model.cls_embedding(torch.zeros(1000, dtype=torch.long))[:, 0]
    null = (emb == model.cls_embedding.embedding_table.weight[5]).all(-1).float().mean()
    assert model.cls_embedding.embedding_table.num_embeddings == 6 and 0.45 < null < 0.55


def test_official_wrappers_load(tmp_path):
    model = tiny()
    sd = model.state_dict()
    runtime = {'freqs_cis': torch.zeros(3), 'layers.0.attention.kv_cache.k_cache': torch.zeros(1)}
    files = {
        'ddp': {'model': sd, 'optimizer': {}, 'steps': 5,
                'args': argparse.Namespace(gpt_model='GPT-B')},
        'ema': {'ema': sd},
        'bare_module': {'module.' + k: v for k, v in sd.items()},
        'state_dict': {'state_dict': {'_orig_mod.' + k: v for k, v in sd.items()}},
        'stale_rope': {**sd, **runtime},
    }
    for name, obj in files.items():
        path = str(tmp_path / f'{name}.pt')
        torch.save(obj, path)
        other = tiny()
        torch.nn.init.zeros_(other.tok_embeddings.weight)
        llamagen.load_official(other, path)
        loaded = other.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in sd.items()), name


def test_official_loader_refuses_other_pickles_and_sizes(tmp_path):
    evil = str(tmp_path / 'evil.pt')
    torch.save({'model': tiny().state_dict(), 'args': pathlib.PurePosixPath('x')}, evil)
    with pytest.raises(SystemExit, match='refusing to load'):
        llamagen.load_official(tiny(), evil)
    small = str(tmp_path / 'small.pt')
    torch.save({'model': tiny(dim=32, n_head=2).state_dict()}, small)
    with pytest.raises(SystemExit, match='not a checkpoint of this model/size') as e:
        llamagen.load_official(tiny(), small)
    assert '\n' not in str(e.value)


def small_vq():  # a 16-px VQ with random weights (conftest's tiny_vq is a trained file)
    torch.manual_seed(0)
    cfg = vq.VQConfig(codebook_size=64, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                      z_channels=32, ch=32, num_res_blocks=1)
    return vq.VQModel(cfg)


def test_vq_nearest_code_and_the_codes_contract():
    model, x = small_vq().eval(), torch.rand(2, 3, 16, 16) * 2 - 1
    z = model.quant_conv(model.encoder(x))  # (B, e, h, w)
    z_q, _, ids = model.quantize(z)
    zn = torch.nn.functional.normalize(z.permute(0, 2, 3, 1), dim=-1).reshape(-1, 8)
    codebook = model.quantize.codebook()
    brute = torch.stack([((codebook - v) ** 2).sum(1).argmin() for v in zn])  # one by one
    assert ids.shape == (2, 8, 8) and torch.equal(ids.flatten(), brute)
    # what train.py caches: (B, h*w) ids in raster order, int32; the generator trains on int64
    codes = model.encode(x)
    assert codes.shape == (2, 64) and codes.dtype == torch.int32
    assert torch.equal(codes, ids.flatten(1).int())
    tokens = model.training_input(codes)
    assert tokens.dtype == torch.long and torch.equal(tokens, ids.flatten(1))
    # decode_code takes (B, h*w), int32 from encode or int64 from a generator
    assert torch.allclose(model.decode_code(codes), model.decode(z_q), atol=1e-5)
    assert torch.allclose(model.decode_code(tokens), model.decode(z_q), atol=1e-5)


def test_vq_training_losses_usage_and_the_tokenizer_hooks():
    model = small_vq().train()
    img = torch.rand(4, 3, 16, 16) * 2 - 1
    recon, losses = model(img)
    assert recon.shape == (4, 3, 16, 16) and set(losses) == {'vq', 'commit'}
    assert torch.isclose(losses['commit'], 0.25 * losses['vq'])  # same distance, beta 0.25
    assert 0 < model.quantize.usage() <= 1
    assert model.metrics() == {'codebook usage': round(model.quantize.usage(), 4)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.calibrate(img) is None and model.on_step(0, 10) is None  # nothing to fit
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    sum(losses.values()).backward()
    assert model.encoder.conv_in.weight.grad is not None  # straight-through reaches the encoder


def test_patchgan_and_hinge():
    d = vq.PatchGAN(ndf=8)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert vq.hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    assert vq.hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1


def test_lpips_loads_user_weights_and_measures(tmp_path):
    ref = vq.LPIPS()
    # torchvision layout; its classifier is ignored
    vgg = {f'features.{k}': v.abs() for k, v in ref.features.state_dict().items()}
    vgg['classifier.0.weight'] = torch.zeros(2, 2)
    widths = (64, 128, 256, 512, 512)
    lin = {f'lin{i}.model.1.weight': torch.rand(1, c, 1, 1) for i, c in enumerate(widths)}
    torch.save(vgg, tmp_path / 'vgg16.pth')
    torch.save(lin, tmp_path / 'vgg.pth')
    # the state dicts as train.py reads them
    m = vq.LPIPS.load(llamagen.load_file(str(tmp_path / 'vgg16.pth')),
                      llamagen.load_file(str(tmp_path / 'vgg.pth')))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(m(x, x), torch.zeros(2)) and (m(x, y) > 0).all()
    # the definition, written out for the first tap (relu1_2): unit-normalised channels, weighted
    # squared difference
    h = m.features[:4]((torch.cat([x, y]) - m.shift) / m.scale)
    a, b = (h / (h.norm(dim=1, keepdim=True) + 1e-10)).chunk(2)
    first = ((a - b) ** 2 * lin['lin0.model.1.weight']).sum(1).mean((1, 2))
    assert (m(x, y) > first).all()
    assert torch.allclose(m.lins[0]((a - b) ** 2).mean((2, 3)).flatten(), first, atol=1e-6)
