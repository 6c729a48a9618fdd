"""MAR (mar.py) and its KL tokenizer (vq.KLModel): official keys (MAR-B, kl16 through the
loader), the method contract (forward -> (z, loss), derive_config, param_groups, PAPER), the
truncated-normal mask ratio and ceil(L r) masked tokens per row, the cosine schedule of tokens
per step, reproducible generation from a torch.Generator, CFG at scale 1 = the unguided path, the
KL tokenizer's shapes, scale factor, KL term and attention placement (LDM's rule; VQ's keeps
LlamaGen's), the classroom defaults (cosine LR, embedding init) and a tiny train + sample run on
the built-in dataset."""
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
from conftest import DATA


def tiny(**kw):  # 32x32 images, stride 4: an 8x8 grid of 4-channel tokens
    cfg = dict(img_size=32, vae_stride=4, vae_embed_dim=4, num_classes=5, encoder_embed_dim=32,
               encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=2,
               decoder_num_heads=2, buffer_size=4, diffloss_d=1, diffloss_w=32,
               num_sampling_steps=5)
    torch.manual_seed(0)
    model = mar.Model(mar.Config(**{**cfg, **kw}))
    net = model.diffloss.net  # its zero init ignores z and gives eps = 0 everywhere
    layers = [net.final_layer.linear, net.final_layer.adaLN_modulation[1]]
    layers += [b.adaLN_modulation[1] for b in net.res_blocks]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.3)
    return model.eval()


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def num_params(ref):  # a manifest {key: shape} -> its parameter count (MAR and kl16: no buffers)
    return sum(math.prod(s) for s in ref.values())


def test_keys_match_official_mar_b(manifest):
    ref = manifest('mar_b')
    with torch.device('meta'):
        model = mar.Model(mar.Config(**mar.SIZES['mar_base']))
    assert list(shapes(model).items()) == list(ref.items())  # names, shapes and order
    assert sum(p.numel() for p in model.parameters()) == num_params(ref) == 207924768
    n = []
    for size in ('mar_large', 'mar_huge'):  # the note's measured sizes of L and H
        with torch.device('meta'):
            model = mar.Model(mar.Config(**mar.SIZES[size]))
        n.append(round(sum(p.numel() for p in model.parameters()) / 1e6, 1))
    assert n == [478.3, 942.4]


def test_kl16_loads_through_the_key_map(tmp_path, manifest):
    """Random tensors with the manifest's LDM names and shapes (each filled with its index) plus a
    training-loss key, in {'model': ...} as kl16.ckpt: every tensor lands where the map sends it."""
    ref = manifest('kl16_vae')
    sd = {k: torch.full(s, float(i)) for i, (k, s) in enumerate(ref.items())}
    torch.save({'model': {**sd, 'loss.logvar': torch.zeros(())}}, tmp_path / 'kl16.ckpt')
    with torch.device('meta'):
        tok = vq.KLModel(vq.KLConfig(**vq.KL_SIZES['KL-16']))
    assert sum(p.numel() for p in tok.parameters()) == num_params(ref)
    tok = mar.load_official(tok.to_empty(device='cpu'), str(tmp_path / 'kl16.ckpt'))
    ours = tok.state_dict()
    for i, (k, s) in enumerate(ref.items()):
        mine = ours[vq.ldm_key(k, 5)]
        assert list(mine.shape) == s and mine.flatten()[0] == i, k
    up = vq.ldm_key('decoder.up.4.block.2.conv1.weight', 5)
    assert up == 'decoder.conv_blocks.0.res.2.conv1.weight'
    assert tok.cfg.scale_factor == 0.2325 and tok.stride == 16
    partial = dict(list(sd.items())[:-2])  # post_quant_conv missing
    torch.save({'model': partial}, tmp_path / 'bad.ckpt')
    wrong = 'bad.ckpt: not a checkpoint of this model/size: 2 missing'
    with pytest.raises(SystemExit, match=wrong):
        mar.load_official(tok, str(tmp_path / 'bad.ckpt'))


def test_kl_tokenizer_shapes_scale_and_kl():
    cfg = vq.KLConfig(**{**vq.KL_SIZES['KL-tiny'], 'ch': 32, 'kl_weight': 0.5})
    torch.manual_seed(0)
    tok = vq.KLModel(cfg)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    moments = tok.encode(x)  # what train.py caches
    assert moments.shape == (3, 8, 8, 8) and tok.stride == 4  # (B, 2C, h, w)
    z = tok.training_input(moments)
    assert z.shape == (3, 4, 8, 8)
    assert not torch.equal(z, tok.training_input(moments))  # a fresh draw each call
    assert tok.decode_code(z).shape == (3, 3, 32, 32)
    # a sharp posterior (logvar clamped to -30): the draw is the mean, scaled for training only
    sharp = torch.cat([moments[:, :4], torch.full_like(moments[:, 4:], -40.0)], 1)
    assert torch.allclose(tok.posterior(sharp), moments[:, :4], atol=1e-5)
    assert torch.allclose(tok.training_input(sharp), moments[:, :4] * cfg.scale_factor, atol=1e-5)
    tok.train()
    recon, losses = tok(x)
    mean, logvar = moments.chunk(2, 1)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean() / (3 * 32 * 32)
    assert recon.shape == x.shape
    assert losses['kl'].item() == pytest.approx(0.5 * kl.item(), rel=1e-4)
    assert cfg.scale_factor == 0.2325  # training steps leave it alone
    tok.calibrate(x)  # once, when training ends: 1 / std of the latents (saved with the config)
    std = tok.posterior(tok.encode(x)).std().item()
    assert cfg.scale_factor != 0.2325 and 1 / cfg.scale_factor == pytest.approx(std, rel=0.1)


def official_attn_levels(ch_mult, attn_resolutions, resolution):
    """The encoder levels LTH14/mar's models/vae.py gives attention: Encoder's curr_res starts at
    resolution and halves after every level but the last; a level whose curr_res is in
    attn_resolutions gets one AttnBlock per ResnetBlock. AutoencoderKL's Decoder keeps its
    attn_resolutions=(): attention in the middle block only."""
    levels = []
    curr_res = resolution
    for i_level in range(len(ch_mult)):
        if curr_res in attn_resolutions:
            levels.append(i_level)
        if i_level != len(ch_mult) - 1:
            curr_res = curr_res // 2
    return levels


@pytest.mark.parametrize('ch_mult, attn_resolutions, resolution, want', [
    ((1, 1, 2), (16,), 256, []),  # KL-tiny: 256, 128, 64 (LlamaGen's rule: level 2)
    ((1, 2, 2, 4), (16,), 256, []),  # 256 .. 32
    ((1, 1, 2, 2, 4), (16,), 256, [4]),  # kl16: the two rules agree
    ((1, 1, 1, 2, 2, 4), (16,), 256, [4]),  # 256 .. 8: not the last level
    ((1, 1, 2), (16,), 32, [1]),
    ((1, 1, 2, 2), (64, 32), 256, [2, 3]),
])
def test_kl_attention_follows_the_official_rule(ch_mult, attn_resolutions, resolution, want):
    assert official_attn_levels(ch_mult, attn_resolutions, resolution) == want
    cfg = vq.KLConfig(**{**vq.KL_SIZES['KL-tiny'], 'encoder_ch_mult': ch_mult,
                         'decoder_ch_mult': ch_mult, 'attn_resolutions': attn_resolutions,
                         'resolution': resolution})
    torch.manual_seed(0)
    tok = vq.KLModel(cfg)
    sd = tok.state_dict()
    attn = sorted({k.split('.attn.')[0] for k in sd if '.attn.' in k})
    assert attn == [f'encoder.conv_blocks.{i}' for i in want]  # none in the decoder's levels
    for i in want:  # one block per ResnetBlock, at the level's width
        assert len(tok.encoder.conv_blocks[i].attn) == cfg.num_res_blocks
        assert sd[f'encoder.conv_blocks.{i}.attn.0.q.weight'].shape[0] == cfg.ch * ch_mult[i]
    assert 'encoder.mid.1.q.weight' in sd and 'decoder.mid.1.q.weight' in sd
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert tok(x)[0].shape == x.shape
    # the rule is in the config's repr, which keys train.py's cache of the default tokenizer
    assert f'attn_resolutions={attn_resolutions}, resolution={resolution}' in repr(cfg)


def test_vq_attention_stays_at_the_last_level():  # LlamaGen's rule, unlike KLModel's
    with torch.device('meta'):
        tok = vq.VQModel(vq.VQConfig(**vq.VQ_SIZES['VQ-tiny']))
    attn = sorted({k.split('.attn.')[0] for k in tok.state_dict() if '.attn.' in k})
    assert attn == ['decoder.conv_blocks.0', 'encoder.conv_blocks.2']


def test_the_method_contract():
    """forward -> (z, loss) with z the decoder output that conditions DiffLoss; the Config fields
    the tokenizer fixes; AdamW groups without decay on DiffLoss; PAPER names released sizes."""
    model = tiny().train()
    torch.manual_seed(0)
    z, loss = model(torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))
    assert z.shape == (2, 64, 32) and loss.dim() == 0 and z.requires_grad
    assert model.on_step(0, 10) is None
    tok = vq.KLModel(vq.KLConfig(**vq.KL_SIZES['KL-tiny']))
    derived = mar.derive_config(tok, 32, 10)
    assert derived == dict(img_size=32, vae_stride=4, vae_embed_dim=4, num_classes=10)
    assert mar.Model(mar.Config(**{**mar.SIZES['mar_tiny'], **derived})).L == 16  # 2x2 patches
    decay, rest = mar.param_groups(model, 0.02)
    assert (decay['weight_decay'], rest['weight_decay']) == (0.02, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for p in decay['params']]
    assert 'z_proj.weight' in decayed and 'class_emb.weight' in decayed
    assert not any(n.startswith('diffloss.') for n in decayed)
    assert all(p.dim() >= 2 for p in decay['params'])
    rest_names = [names[id(p)] for p in rest['params']]
    assert 'diffloss.net.input_proj.weight' in rest_names and 'z_proj.bias' in rest_names
    everything = sorted(decayed + rest_names)  # every parameter once
    assert everything == sorted(n for n, _ in model.named_parameters())
    assert set(mar.PAPER) <= set(mar.SIZES) and mar.PAPER['mar_base']['cfg_scale'] == 2.9


def test_mask_ratio_and_masked_count(monkeypatch):
    torch.manual_seed(0)
    r = np.array([mar.mask_ratio(0.7) for _ in range(3000)])
    ref = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)  # the official sampler
    assert r.min() >= 0.7 and r.max() <= 1.0
    assert abs(r.mean() - ref.mean()) < 0.004 and abs(r.std() - ref.std()) < 0.004
    assert stats.kstest(r, ref.cdf).pvalue > 0.01
    orders = torch.rand(4, 64).argsort(1)
    m = mar.random_mask(orders, 52)
    assert m.sum(1).tolist() == [52] * 4
    assert all(m[i, orders[i, :52]].all() for i in range(4))
    model = tiny(diffusion_batch_mul=3).train()
    seen = []

    def fake_loss(target, z):  # records the rows DiffLoss is given
        seen.append((len(target), len(z)))
        return target.sum() * 0

    model.diffloss.forward = fake_loss
    for ratio in (0.8, 0.7001, 1.0):  # ceil(64 r) masked tokens per row (official rounding), x3
        monkeypatch.setattr(mar, 'mask_ratio', lambda _, r=ratio: r)
        model(torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))
        assert seen[-1] == (2 * math.ceil(64 * ratio) * 3,) * 2


def schedule(num_iter, L):  # tokens predicted at each step of generate, L masked at the start
    counts = []
    n = L
    for s in range(num_iter):
        nxt = mar.next_mask_len(s, num_iter, L, n) if s < num_iter - 1 else 0
        counts.append(n - nxt)
        n = nxt
    return counts


def count_sampled_rows(model):
    """Wrap model.diffloss.sample: -> the list it appends len(z) to at every call."""
    seen = []
    sample_fn = model.diffloss.sample

    def counting(z, *args):
        seen.append(len(z))
        return sample_fn(z, *args)

    model.diffloss.sample = counting
    return seen


def test_tokens_per_step_follow_the_cosine_schedule():
    assert 256 - mar.next_mask_len(0, 16, 256, 256) == 2  # the note's numbers for 256 tokens
    for it in (16, 64, 256):
        counts = schedule(it, 256)
        assert sum(counts) == 256 and min(counts) >= 1
    assert schedule(16, 256)[:5] == [2, 3, 7, 8, 11]
    assert schedule(64, 256)[:3] == [1, 1, 1] and max(schedule(64, 256)) in (6, 7)
    assert schedule(256, 256) == [1] * 256
    model = tiny()
    seen = count_sampled_rows(model)
    g = torch.Generator().manual_seed(0)
    out = model.generate(torch.tensor([0, 3, 4]), num_iter=10, generator=g)
    assert out.shape == (3, 4, 8, 8) and model.nfe == 10
    per_step = [3 * c for c in schedule(10, 64)]
    assert seen == per_step and sum(seen) == 3 * 64  # every token predicted exactly once
    model.generate(torch.tensor([1]), num_iter=10, cfg_scale=2.0)
    assert seen[10:] == [2 * c // 3 for c in per_step]  # CFG: conditional and unconditional rows
    seen.clear()
    model.generate(torch.tensor([1]), num_iter=10, cfg_scale=0.5)  # below 1 is guided too
    assert seen == [2 * c // 3 for c in per_step]
    seen.clear()  # more steps than tokens: the steps that reveal nothing skip the transformer
    model.generate(torch.tensor([0]), num_iter=100, generator=torch.Generator().manual_seed(0))
    assert model.nfe == len(seen) == 64 and min(seen) >= 1 and sum(seen) == 64  # not 100 calls


def test_generation_is_reproducible_and_cfg_one_is_the_unguided_path():
    model = tiny().train()
    labels = torch.tensor([0, 2, 4, 1])

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return model.generate(labels, num_iter=6, generator=g, **kw)

    def rel(x, y):  # an untrained head: large values
        return ((x - y).abs().max() / y.abs().max()).item()

    a = run(0)
    assert model.training  # generate restores the mode it found
    assert torch.equal(a, run(0)) and rel(run(1), a) > 1e-2
    assert rel(run(0, cfg_scale=1 + 1e-6), a) < 1e-4  # the doubled batch, guidance ~0: the same
    linear = run(0, cfg_scale=3.0)
    constant = run(0, cfg_scale=3.0, cfg_schedule='constant')
    assert rel(linear, a) > 1e-2 and rel(constant, a) > 1e-2 and rel(linear, constant) > 1e-2
    model.cfg.cfg_schedule = 'constant'  # the default '' takes the config's (mar_tiny: constant)
    assert torch.equal(run(0, cfg_scale=3.0), constant)
    model.cfg.cfg_schedule = 'linear'
    with pytest.raises(SystemExit, match='cfg_schedule'):
        run(0, cfg_schedule='cosine')


def test_attention_is_bidirectional():
    model = tiny()
    x = torch.randn(1, 4, 8, 8)
    cls = model.class_emb(torch.tensor([1]))
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, 40:] = True
    z = model.decode(model.encode(mar.patchify(x, 1), mask, cls), mask)
    x2 = x.clone()
    x2[0, :, 4, 7] += 1.0  # token 39, the last visible one in raster order
    z2 = model.decode(model.encode(mar.patchify(x2, 1), mask, cls), mask)
    assert not torch.allclose(z[0, :39], z2[0, :39])  # earlier positions see it too
    assert torch.equal(mar.unpatchify(mar.patchify(x, 2), 2, 4), x)


def test_attention_is_timms_formula():  # softmax(q k^T / sqrt(D)) v over every position, no mask
    torch.manual_seed(0)
    attn = mar.Attention(32, 4, 0.0, 0.0).eval()
    x = torch.randn(2, 7, 32)
    q, k, v = attn.qkv(x).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
    y = ((q @ k.transpose(-1, -2)) / 8 ** 0.5).softmax(-1) @ v
    assert torch.allclose(attn(x), attn.proj(y.transpose(1, 2).reshape(2, 7, 32)), atol=1e-5)


def test_classroom_run_decays_the_lr_and_scales_the_embeddings():
    args, _, _ = train.parse_args(['--method', 'mar'])  # mar.CLASSROOM over the stage defaults
    assert (args.max_steps, args.lr_schedule, args.lr) == (4000, 'cosine', 1e-3)
    assert args.cfg_scale == 4.0 and train.parse_args([])[0].cfg_scale == 2.0  # grids, sample.py
    constant = train.parse_args(['--method', 'mar', '--lr-schedule', 'constant'])[0]
    assert constant.lr_schedule == 'constant'  # flags over both
    assert train.parse_args(['--method', 'llamagen'])[0].lr_schedule == 'constant'
    assert abs(train.lr_at(3999, 4000, args) - args.end_lr) < 1e-8
    assert train.lr_at(2050, 4000, args) < 0.55 * args.lr
    for std in (0.02, 0.2):  # init_std reaches the learned embeddings; DiffLoss keeps its zero init
        cfg = dict(mar.SIZES['mar_tiny'], img_size=32, vae_stride=4, vae_embed_dim=4,
                   num_classes=10, init_std=std)
        model = mar.Model(mar.Config(**cfg))
        embeddings = (model.encoder_pos_embed_learned, model.decoder_pos_embed_learned,
                      model.class_emb.weight)
        for p in embeddings:
            assert abs(p.std().item() / std - 1) < 0.15
        assert model.diffloss.net.final_layer.linear.weight.abs().max() == 0


def test_trains_and_samples_on_the_builtin_dataset(tmp_path):
    tok_run = tmp_path / 'tok'
    train.main(['--method', 'mar', '--stage', 'tokenizer', '--max-steps', '2',
                '--global-batch-size', '8', '--ch', '32', '--encoder-ch-mult', '1', '2', '2',
                '--decoder-ch-mult', '1', '2', '2', '--disc-start', '1',
                '--run-dir', str(tok_run), '--results-dir', str(tmp_path)] + DATA)
    tok = torch.load(tok_run / 'last.pt', weights_only=True)
    assert tok['kind'] == 'KLModel' and tok['config']['scale_factor'] != 0.2325  # measured
    run = tmp_path / 'mar'
    train.main(['--method', 'mar', '--tokenizer', str(tok_run / 'last.pt'),
                '--encoder-embed-dim', '32', '--decoder-embed-dim', '32', '--encoder-depth', '1',
                '--decoder-depth', '1', '--diffloss-w', '32', '--diffloss-d', '1',
                '--num-sampling-steps', '5', '--max-steps', '3', '--global-batch-size', '8',
                '--log-every', '1', '--run-dir', str(run), '--results-dir', str(tmp_path)] + DATA)
    ckpt = torch.load(run / 'last.pt', weights_only=True)
    assert ckpt['method'] == 'mar'
    assert ckpt['config']['vae_embed_dim'] == 4 and ckpt['config']['vae_stride'] == 4
    assert ckpt['config']['img_size'] == 16 and os.path.exists(run / 'samples' / '0000003.png')
    sample.main(['--ckpt', str(run / 'last.pt'), '--grid', str(tmp_path / 'g.png'),
                 '--per-class', '2', '--num-iter', '4', '--num-samples', '6',
                 '--out', str(tmp_path / 's.npz'), '--batch-size', '3', '--cfg-scale', '2.0'])
    assert np.load(tmp_path / 's.npz')['arr_0'].shape == (6, 16, 16, 3)
