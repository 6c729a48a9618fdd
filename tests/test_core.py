"""The GPT core (llamagen.py) and the VQ tokenizer (vq.py): official key manifests, the KV cache,
causality, RoPE numerics, sampling filters, quantisation and official checkpoint wrappers."""
import argparse
import json
import os
import pathlib

import pytest
import torch

import llamagen
import vq

KEYS = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'reference', 'official_keys')


def manifest(name):
    path = os.path.join(KEYS, name + '.json')
    if not os.path.exists(path):
        pytest.skip(f'{path} not found')
    return {k: list(s) for k, s in json.load(open(path))['keys']}


def tiny(**kw):
    cfg = llamagen.Config(**{**dict(dim=64, n_layer=2, n_head=4, vocab_size=32, block_size=16, num_classes=5), **kw})
    torch.manual_seed(0)
    model = llamagen.Model(cfg)
    torch.nn.init.normal_(model.output.weight, std=0.5)  # the official zero init would make every logit 0
    return model.eval()


@pytest.mark.parametrize('name,size,block', [('llamagen_gpt_b_c2i_256', 'GPT-B', 256),
                                             ('llamagen_gpt_xl_c2i_384', 'GPT-XL', 576),
                                             ('npp_gpt_b_c2i_256', 'GPT-B', 256)])
def test_gpt_keys_match_official(name, size, block):
    with torch.device('meta'):
        model = llamagen.Model(llamagen.Config(**llamagen.SIZES[size], vocab_size=16384, block_size=block, num_classes=1000))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest(name)
    assert model.freqs_cis.shape == (1 + block, 32, 2)  # not in the state dict, as officially


def test_vq16_keys_match_official():
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
        assert torch.allclose(freqs[1 + k, :, 0], angles.cos()) and torch.allclose(freqs[1 + k, :, 1], angles.sin())
    x = torch.randn(2, g * g, 3, hd)
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, g * g, 3, hd // 2, 2))
                             * torch.polar(torch.ones(g * g, hd // 2), torch.atan2(freqs[1:, :, 1], freqs[1:, :, 0]))[None, :, None])
    assert torch.allclose(llamagen.apply_rope(x, freqs[1:]), ref.flatten(3), atol=1e-6)


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
    seen, decode = [], model.decode
    model.decode = lambda x, start, mask: seen.append(decode(x, start, mask)[:, -1]) or seen[-1][:, None]
    return seen


@pytest.mark.parametrize('cfg_scale,top_k,top_p', [(1.0, 0, 1.0), (3.0, 8, 0.9)])
def test_kv_cache_equals_no_cache(cfg_scale, top_k, top_p):
    model, labels = tiny(), torch.tensor([0, 2, 4])
    seen = record_decode(model)
    tokens = model.generate(labels, cfg_scale=cfg_scale, temperature=0.9, top_k=top_k, top_p=top_p,
                            generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (3, 16) and model.nfe == 16  # 1 prefill + 15 decode steps
    del model.decode
    # no cache: a full forward over the sequence so far at every step, the same sampler and seed
    g, seq = torch.Generator().manual_seed(1), torch.zeros(3, 0, dtype=torch.long)
    null = torch.full_like(labels, 5)
    for t in range(16):
        padded = torch.cat([seq, torch.zeros(3, 1, dtype=torch.long)], 1)  # the last token is never read
        logits = model(padded, labels)[0][:, t]
        if cfg_scale > 1:
            uncond = model(padded, null)[0][:, t]
            assert torch.allclose(seen[t], torch.cat([logits, uncond]), atol=1e-5)
            logits = llamagen.cfg_mix(torch.cat([logits, uncond]), cfg_scale)
        else:
            assert torch.allclose(seen[t], logits, atol=1e-5)
        seq = torch.cat([seq, llamagen.sample_logits(logits, 0.9, top_k, top_p, g)], 1)
    assert torch.equal(seq, tokens)
    assert all(layer.attention.kv_cache is None for layer in model.layers)  # caches are released


def test_cfg_interval_uses_conditional_logits_after_the_interval():
    model, labels = tiny(), torch.tensor([0, 1])
    a = model.generate(labels, cfg_scale=4.0, cfg_interval=-1, generator=torch.Generator().manual_seed(0))
    b = model.generate(labels, cfg_scale=4.0, cfg_interval=100, generator=torch.Generator().manual_seed(0))
    c = model.generate(labels, cfg_scale=4.0, cfg_interval=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a[:, :2].equal(c[:, :2])  # guidance on tokens 0 and 1 only


def test_sample_logits_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert all(llamagen.sample_logits(logits, top_k=1, generator=g).item() == 1 for _ in range(20))
    assert all(llamagen.sample_logits(logits, top_p=0.5, generator=g).item() == 1 for _ in range(20))  # p(1) = 0.67
    drawn = {llamagen.sample_logits(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert drawn == {1, 2}
    # probs 0.644, 0.237, 0.087, 0.032 (sorted): the token that crosses top_p is kept, the rest dropped
    assert {llamagen.sample_logits(logits, top_p=0.85, generator=g).item() for _ in range(300)} == {1, 2}
    assert {llamagen.sample_logits(logits, top_p=0.9, generator=g).item() for _ in range(300)} == {0, 1, 2}


def test_label_dropout_uses_the_null_class():
    model = tiny(class_dropout_prob=0.5).train()
    torch.manual_seed(0)
    emb = model.cls_embedding(torch.zeros(1000, dtype=torch.long))[:, 0]
    null = (emb == model.cls_embedding.embedding_table.weight[5]).all(-1).float().mean()
    assert model.cls_embedding.embedding_table.num_embeddings == 6 and 0.45 < null < 0.55


def test_official_wrappers_load(tmp_path):
    model = tiny()
    sd = model.state_dict()
    files = {'ddp': {'model': sd, 'optimizer': {}, 'steps': 5, 'args': argparse.Namespace(gpt_model='GPT-B')},
             'ema': {'ema': sd}, 'bare_module': {'module.' + k: v for k, v in sd.items()},
             'state_dict': {'state_dict': {'_orig_mod.' + k: v for k, v in sd.items()}},
             'stale_rope': {**sd, 'freqs_cis': torch.zeros(3), 'layers.0.attention.kv_cache.k_cache': torch.zeros(1)}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / f'{name}.pt')
        other = tiny()
        torch.nn.init.zeros_(other.tok_embeddings.weight)
        llamagen.load_official(other, tmp_path / f'{name}.pt')
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), sd.values())), name


def test_official_loader_refuses_other_pickles_and_sizes(tmp_path):
    torch.save({'model': tiny().state_dict(), 'args': pathlib.PurePosixPath('x')}, tmp_path / 'evil.pt')
    with pytest.raises(SystemExit, match='refusing to load'):
        llamagen.load_official(tiny(), tmp_path / 'evil.pt')
    torch.save({'model': tiny(dim=32, n_head=2).state_dict()}, tmp_path / 'small.pt')
    with pytest.raises(SystemExit, match='not a checkpoint of this model/size') as e:
        llamagen.load_official(tiny(), tmp_path / 'small.pt')
    assert '\n' not in str(e.value)


def tiny_vq():
    torch.manual_seed(0)
    return vq.VQModel(vq.VQConfig(codebook_size=64, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=32,
                                  ch=32, num_res_blocks=1))


def test_vq_nearest_code_and_decode_code():
    model, x = tiny_vq().eval(), torch.rand(2, 3, 16, 16) * 2 - 1
    z = model.quant_conv(model.encoder(x))  # (B, e, h, w)
    z_q, _, ids = model.quantize(z)
    zn = torch.nn.functional.normalize(z.permute(0, 2, 3, 1), dim=-1).reshape(-1, 8)
    brute = torch.stack([((model.quantize.codebook() - v) ** 2).sum(1).argmin() for v in zn])  # nearest, one by one
    assert ids.shape == (2, 8, 8) and torch.equal(ids.flatten(), brute)
    assert torch.equal(model.encode(x), ids)
    assert torch.allclose(model.decode_code(ids), model.decode(z_q), atol=1e-5)
    assert torch.allclose(model.decode_code(ids.flatten(1)), model.decode(z_q), atol=1e-5)  # raster (B, h*w) ids


def test_vq_training_losses_and_usage():
    model = tiny_vq().train()
    recon, losses = model(torch.rand(4, 3, 16, 16) * 2 - 1)
    assert recon.shape == (4, 3, 16, 16) and set(losses) == {'vq', 'commit'}
    assert torch.isclose(losses['commit'], 0.25 * losses['vq'])  # same distance, beta 0.25
    assert 0 < model.quantize.usage() <= 1
    sum(losses.values()).backward()
    assert model.encoder.conv_in.weight.grad is not None  # straight-through reaches the encoder


def test_patchgan_and_hinge():
    d = vq.PatchGAN(ndf=8)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert vq.hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    assert vq.hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1


def test_lpips_loads_user_weights_and_measures(tmp_path):
    ref = vq.LPIPS()
    vgg = {f'features.{k}': v.abs() for k, v in ref.features.state_dict().items()}  # torchvision layout
    vgg['classifier.0.weight'] = torch.zeros(2, 2)  # torchvision's classifier is ignored
    lin = {f'lin{i}.model.1.weight': torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, tmp_path / 'vgg16.pth')
    torch.save(lin, tmp_path / 'vgg.pth')
    m = vq.LPIPS.load(tmp_path / 'vgg16.pth', tmp_path / 'vgg.pth')
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(m(x, x), torch.zeros(2)) and (m(x, y) > 0).all()
    # the definition, written out for the first tap (relu1_2): unit-normalised channels, weighted squared difference
    h = m.features[:4]((torch.cat([x, y]) - m.shift) / m.scale)
    a, b = (h / (h.norm(dim=1, keepdim=True) + 1e-10)).chunk(2)
    first = ((a - b) ** 2 * lin['lin0.model.1.weight']).sum(1).mean((1, 2))
    assert (m(x, y) > first).all() and torch.allclose(m.lins[0]((a - b) ** 2).mean((2, 3)).flatten(), first, atol=1e-6)
