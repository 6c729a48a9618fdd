"""RAR (rar.py): official keys and sizes, the permuted forward against an explicit reference (naive
attention, both position tables permuted by hand), causality in the permuted order, order sampling
and annealing, the guidance schedule, KV-cache generation against the no-cache forward, the
MaskGIT-VQGAN tokenizer read directly from its own official names (its keys: test_official.py),
and a tiny train + sample run on the built-in dataset."""
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import llamagen
import rar
import sample
import train
import vq
from conftest import DATA

V, L, K = 16, 16, 5  # codebook, tokens (4x4), classes


def tiny(adaln_std=0.3, **kw):
    """A tiny RAR with the adaLN weights moved away from their zero init: otherwise every gate is 0,
    every block is the identity, and a comparison would never reach attention or the MLP."""
    torch.manual_seed(0)
    fields = dict(dim=32, n_layer=2, n_head=2, vocab_size=V, block_size=L, num_classes=K)
    model = rar.Model(rar.Config(**{**fields, **kw}))
    for name, p in model.named_parameters():
        if 'adaLN_modulation' in name or 'norm' in name or 'cls_token' in name:
            mean = float('norm' in name and name.endswith('weight'))  # norm weights around 1
            torch.nn.init.normal_(p, mean=mean, std=adaln_std)
    return model.eval()


def test_keys_match_official_rar_b_and_sizes(manifest):
    want = manifest('rar_b')  # {key: shape}, in the official state dict's order (441 keys)
    # the note's counts (XXL: MLP 6144, not 4 x 1408)
    counts = dict(rar_b=260_923_648, rar_xxl=1_498_520_704)
    assert sum(math.prod(shape) for shape in want.values()) == counts['rar_b']
    for size, n in counts.items():
        cfg = rar.Config(**rar.SIZES[size], vocab_size=1024, block_size=256, num_classes=1000)
        with torch.device('meta'):
            model = rar.Model(cfg)
        assert sum(p.numel() for p in model.parameters()) == n, size
        if size == 'rar_b':  # same keys, shapes and order as the official state dict
            ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
            assert ours == list(want.items())
    small = rar.Model(rar.Config(vocab_size=V, block_size=L, num_classes=K))
    assert small.embeddings.num_embeddings == V + 1 + K + 1  # codes, mask token, classes, null


def layer_norm(h, m):  # the official LayerNorm: eps 1e-6, with the module's affine parameters
    return F.layer_norm(h, h.shape[-1:], m.weight, m.bias, 1e-6)


def naive_block(blk, x, c):
    """The block's math written out: adaLN chunks (shift, scale, gate) x 2, LayerNorm eps 1e-6,
    per-head QK LayerNorm, softmax attention with an explicit causal mask, exact GELU."""
    T, C, H = x.shape[1], x.shape[2], blk.attn.n_head
    chunks = F.linear(F.silu(c), *blk.adaLN_modulation[1].parameters()).chunk(6, -1)
    s1, a1, g1, s2, a2, g2 = chunks
    qkv = F.linear(layer_norm(x, blk.norm1) * (1 + a1) + s1, *blk.attn.qkv.parameters())
    q, k, v = qkv.view(1, T, 3, H, C // H).unbind(2)
    q = layer_norm(q, blk.attn.q_norm).transpose(1, 2)  # (1, H, T, D)
    k = layer_norm(k, blk.attn.k_norm).transpose(1, 2)
    future = torch.ones(T, T).triu(1).bool()
    att = (q @ k.transpose(-1, -2) / math.sqrt(C // H)).masked_fill(future, -math.inf)
    y = (att.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(1, T, C)
    x = x + g1 * F.linear(y, *blk.attn.proj.parameters())
    h = F.linear(layer_norm(x, blk.norm2) * (1 + a2) + s2, *blk.mlp.fc1.parameters())
    gelu = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + g2 * F.linear(gelu, *blk.mlp.fc2.parameters())


def reference(model, tokens, labels, orders):
    """The official sequence built slot by slot (all L + 2 slots, as the official forward):
    [cls + pos0, class + pos1 + ta[2+o0], z_k + pos[2+o_k] + ta[2+o_{k+1}] ..,
    z_last + pos[2+o_last]]."""
    emb, pos, ta = model.embeddings.weight, model.pos_embed[0], model.target_aware_pos_embed[0]
    head = model.adaln_before_head['adaLN_modulation'][1]
    out = []
    for b in range(len(tokens)):
        o, cond = orders[b].tolist(), emb[V + 1 + labels[b]]
        xs = [model.cls_token[0, 0] + pos[0], cond + pos[1] + ta[2 + o[0]]]
        for k in range(L):
            target = ta[2 + o[k + 1]] if k + 1 < L else 0  # the last slot predicts nothing
            xs.append(emb[tokens[b, o[k]]] + pos[2 + o[k]] + target)
        x = torch.stack(xs)[None]
        c = cond + model.timesteps_embeddings[:, :L + 2]  # c is not permuted
        for blk in model.blocks:
            x = naive_block(blk, x, c)
        scale, shift = F.linear(F.silu(c), *head.parameters()).chunk(2, -1)
        h = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift
        out.append(model.lm_head(h)[0, 1:L + 1])
    return torch.stack(out)  # (B, L, V): drop the cls slot and the last slot's output


@torch.no_grad()
def test_forward_equals_explicit_reference():
    model, tokens = tiny(), torch.randint(0, V, (3, L))
    labels = torch.tensor([0, 2, K])  # K: the null class
    raster = torch.arange(L).expand(3, L)
    model.random_ratio = 0.0  # r = 0: the sampled orders are raster
    logits, loss = model(tokens, labels)
    assert torch.allclose(logits, reference(model, tokens, labels, raster), atol=1e-5)
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), tokens.flatten()))
    orders = torch.stack([torch.randperm(L) for _ in range(3)])  # a given permutation per sample
    logits, loss = model(tokens, labels, orders)
    assert torch.allclose(logits, reference(model, tokens, labels, orders), atol=1e-5)
    targets = tokens.gather(1, orders)  # the labels are permuted too
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    # the position terms slot by slot: own pos row, plus the ta row of the next target (shifted)
    pos, ta, o = model.pos_embed[0], model.target_aware_pos_embed[0], orders[0]
    p = model.positions(orders)[0]  # (L + 2, C)
    assert torch.equal(p[0], pos[0])
    assert torch.equal(p[1], pos[1] + ta[2 + o[0]])
    assert torch.equal(p[-1], pos[2 + o[-1]])
    assert all(torch.equal(p[k + 2], pos[2 + o[k]] + ta[2 + o[k + 1]]) for k in range(L - 1))
    # raster: one absolute table [pos0, pos1 + ta2, .., pos_{L+1}]
    merged = model.positions(raster[:1])[0]
    assert torch.equal(merged[1:-1], pos[1:L + 1] + ta[2:L + 2])
    # adaLN-Zero init: the blocks are the identity, logits = head(LN(inputs))
    fresh = rar.Model(model.cfg).eval()
    prefix = [fresh.cls_token, fresh.class_embedding(labels[:1])]
    x = torch.cat(prefix + [fresh.embeddings(tokens[:1, :-1])], 1)
    x = x + fresh.positions(raster[:1])[:, :L + 1]
    want = fresh.lm_head(F.layer_norm(x, (32,), eps=1e-6))[:, 1:]
    assert torch.allclose(fresh(tokens[:1], labels[:1])[0], want, atol=1e-6)


@torch.no_grad()
def test_causality_in_the_permuted_order():
    model, tokens, labels = tiny(), torch.randint(0, V, (2, L)), torch.tensor([1, 3])
    orders = torch.stack([torch.randperm(L) for _ in range(2)])
    base = model(tokens, labels, orders)[0]  # position j predicts z_j and sees z_<j
    for k in (0, 5, L - 2, L - 1):  # change z_k, the token at permuted index k
        t = tokens.clone()
        at_k = orders[:, k:k + 1]
        t.scatter_(1, at_k, (tokens.gather(1, at_k) + 1) % V)
        out = model(t, labels, orders)[0]
        assert torch.equal(out[:, :k + 1], base[:, :k + 1])  # z_0 .. z_k's never see z_k
        assert all(not torch.allclose(out[:, j], base[:, j]) for j in range(k + 1, L))
    other = model(tokens, torch.tensor([2, 4]), orders)[0]
    assert not torch.allclose(other[:, 0], base[:, 0])  # the class reaches every position


def test_orders_and_annealing():
    torch.manual_seed(0)
    raster = torch.arange(L).expand(400, L)
    assert torch.equal(rar.sample_orders(400, L, 0.0, 'cpu'), raster)
    o = rar.sample_orders(400, L, 1.0, 'cpu')
    assert torch.equal(o.sort(-1).values, raster)
    assert (o != raster).any(-1).all()  # all full permutations
    permuted = (rar.sample_orders(400, L, 0.5, 'cpu') != raster).any(-1)
    assert 150 < permuted.sum() < 250  # raster or permuted per sample
    model = tiny()  # paper: r = 1 for epochs 0-200, linear to 0 at 300, raster until 400
    schedule = {0: 1.0, 199: 1.0, 200: 1.0, 250: 0.5, 275: 0.25, 300: 0.0, 399: 0.0}
    for step, r in schedule.items():
        assert model.on_step(step, 400) is None  # the LR stays train.py's
        assert model.random_ratio == pytest.approx(r)
    assert rar.random_ratio(0, 0, 0) == 0.0  # start = end: a switch
    assert rar.random_ratio(5, 10, 10) == 1.0


def test_guidance_schedule_matches_the_note():
    # the note's scales at tokens 0, 64, 128, 192, 255 of 256, at each released model's PAPER
    want = {'rar_b': (1.0, 1.018, 1.80, 7.40, 16.00), 'rar_l': (1.0, 1.035, 2.09, 7.96, 15.50),
            'rar_xl': (1.0, 1.225, 2.64, 5.29, 6.90), 'rar_xxl': (1.0, 1.60, 3.79, 6.63, 8.00)}
    assert rar.PAPER.keys() == want.keys() and set(rar.PAPER) <= set(rar.SIZES)
    for size, scales in want.items():
        g, p = rar.PAPER[size]['cfg_scale'], rar.PAPER[size]['guidance_scale_pow']
        got = [rar.guidance_scale(t, 256, g, p) for t in (0, 64, 128, 192, 255)]
        assert got == pytest.approx(scales, abs=6e-3), size
    constant = [rar.guidance_scale(t, 256, 4.0, 0.0) for t in (0, 100, 255)]  # pow 0
    assert constant == [4.0, 4.0, 4.0]
    knobs = sample.generate_knobs(rar.Model)  # sample.py's flags: generate's keyword arguments
    assert all(set(settings) <= set(knobs) for settings in rar.PAPER.values())


@pytest.mark.parametrize('cfg_scale,pow', [(1.0, 2.75), (4.0, 2.75), (3.0, 0.0),
                                           (0.5, 1.0)])  # 0.5: guidance below 1 counts too
def test_kv_cache_generation_equals_the_no_cache_forward(cfg_scale, pow):
    model, labels = tiny(), torch.tensor([0, 2, 4])
    seen = []  # the logits of every cached call, in order
    decode = model.decode

    def recorded(*args):  # decode's arguments, as generate passes them
        logits = decode(*args)
        seen.append(logits)
        return logits

    model.decode = recorded
    tokens = model.generate(labels, cfg_scale=cfg_scale, temperature=1e-6,  # ~greedy
                            guidance_scale_pow=pow)
    del model.decode
    assert tokens.shape == (3, L)
    assert model.nfe == len(seen) == L
    assert seen[0].shape[1] == 2  # the 2-slot prefix, then one token a call
    cached = torch.cat([seen[0][:, -1:]] + seen[1:], dim=1)  # (B or 2B, L, V): z_0 .. z_{L-1}
    guided = llamagen.guided(cfg_scale)
    rows = llamagen.cfg_batch(labels, K) if guided else labels
    with torch.no_grad():
        raster = torch.arange(L).expand(len(rows), L)
        forced = model(tokens.repeat(len(rows) // 3, 1), rows, raster)[0]
    assert torch.allclose(cached, forced, atol=1e-5)
    if guided:  # each token's logits mixed with its own scale from the schedule
        s = torch.tensor([rar.guidance_scale(t, L, cfg_scale, pow) for t in range(L)])
        forced = forced[3:] + (forced[:3] - forced[3:]) * s[None, :, None]
    assert torch.equal(tokens, forced.argmax(-1))
    assert all(b.attn.kv_cache is None for b in model.blocks)  # the caches are gone after generate


@pytest.fixture(scope='module')
def tok(tiny_vq):  # conftest's 16-px VQ tokenizer
    return tiny_vq


def official_names(k, levels):  # ours -> MaskGIT's names (the inverse of vq.ldm_key here)
    part, rest = k.split('.', 1)
    m = re.match(r'conv_blocks\.(\d+)\.(res|upsample\.conv)(.*)', rest)
    if not m:
        return k
    i, kind, tail = int(m[1]), m[2], m[3]
    level = i if part == 'encoder' else levels - 1 - i
    direction = 'down' if part == 'encoder' else 'up'
    block = 'block' if kind == 'res' else 'upsample_conv'
    return f'{part}.{direction}.{level}.{block}{tail}'


def random_official_sd(cfg):
    """Random weights of a VQModel under MaskGIT's names; norm weights around 1."""
    torch.manual_seed(0)
    sd = {}
    for k, v in vq.VQModel(cfg).state_dict().items():
        is_norm_weight = k.endswith('norm1.weight') or k.endswith('norm2.weight')
        std = 0.1 if v.dim() > 1 else 0.5
        sd[official_names(k, 2)] = torch.randn_like(v) * std + is_norm_weight
    return sd


def test_maskgit_vqgan_equals_its_official_network_read_directly(tmp_path):
    """A tiny MaskGIT-VQGAN (same structure) saved under the official names, bare (as the .bin),
    loads through load_official; encode and decode_code equal the official network written out on
    those names: [0, 1] pixels, bias-free residual convs, shortcut on h, avg-pool down, up levels
    run in reverse, plain L2 codebook, decoder output clamped and saved as floor(255 x)."""
    cfg = vq.VQConfig(codebook_size=16, codebook_embed_dim=32, codebook_l2_norm=False,
                      codebook_show_usage=False, maskgit=True, ch=32, encoder_ch_mult=(1, 2),
                      decoder_ch_mult=(1, 2), z_channels=32)
    sd = random_official_sd(cfg)
    torch.save(sd, tmp_path / 'maskgit.bin')
    tok = llamagen.load_official(vq.VQModel(cfg), str(tmp_path / 'maskgit.bin')).eval()

    def gn(h, name):  # GroupNorm(32, eps 1e-6) -> SiLU
        return F.silu(F.group_norm(h, 32, sd[name + '.weight'], sd[name + '.bias'], 1e-6))

    def res(p, x):
        h = F.conv2d(gn(x, p + 'norm1'), sd[p + 'conv1.weight'], padding=1)
        h = F.conv2d(gn(h, p + 'norm2'), sd[p + 'conv2.weight'], padding=1)
        if p + 'nin_shortcut.weight' in sd:
            return h + F.conv2d(h, sd[p + 'nin_shortcut.weight'])
        return h + x

    def conv(part, h, name, pad=1):
        weight, bias = sd[f'{part}.{name}.weight'], sd.get(f'{part}.{name}.bias')
        return F.conv2d(h, weight, bias, padding=pad)

    def encoder(h):
        h = conv('encoder', h, 'conv_in')
        for level in range(2):
            h = res(f'encoder.down.{level}.block.1.', res(f'encoder.down.{level}.block.0.', h))
            if level == 0:
                h = F.avg_pool2d(h, 2)
        h = res('encoder.mid.1.', res('encoder.mid.0.', h))
        return conv('encoder', gn(h, 'encoder.norm_out'), 'conv_out', 0)

    def decoder(h):
        h = conv('decoder', h, 'conv_in')
        h = res('decoder.mid.1.', res('decoder.mid.0.', h))
        for level in (1, 0):
            h = res(f'decoder.up.{level}.block.1.', res(f'decoder.up.{level}.block.0.', h))
            if level:
                h = F.interpolate(h, scale_factor=2.0, mode='nearest')
                h = conv('decoder', h, f'up.{level}.upsample_conv')
        return conv('decoder', gn(h, 'decoder.norm_out'), 'conv_out', 1)

    x = torch.rand(2, 3, 16, 16)  # official pixels in [0, 1]; ours in [-1, 1]
    z = encoder(x).permute(0, 2, 3, 1).reshape(-1, 32)
    codebook = sd['quantize.embedding.weight']
    ids = torch.cdist(z, codebook).argmin(1).view(2, 8, 8)
    assert torch.equal(tok.encode(x * 2 - 1), ids.flatten(1).int())  # what is cached: (B, h*w)
    img = decoder(codebook[ids].permute(0, 3, 1, 2))  # official: clamp, x255, truncate
    official = (img.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
    ours = llamagen.to_uint8(tok.decode_code(ids.flatten(1)))
    assert (official.int() - ours.int()).abs().max() <= 1
    assert (official == ours).float().mean() > 0.99


def test_trains_and_samples_on_the_builtin_dataset(tok, tmp_path):
    run = tmp_path / 'rar'
    train.main(['--method', 'rar', '--tokenizer', tok, '--dim', '32', '--n-layer', '2',
                '--n-head', '2', '--max-steps', '3', '--anneal-start', '0', '--anneal-end', '1',
                '--global-batch-size', '8', '--log-every', '1', '--run-dir', str(run),
                '--results-dir', str(tmp_path)] + DATA)  # default --model: rar_tiny
    ckpt = torch.load(run / 'last.pt', weights_only=True)
    assert ckpt['method'] == 'rar'
    assert ckpt['config']['block_size'] == 16 and ckpt['config']['vocab_size'] == 32
    assert ckpt['config']['anneal_start'] == 0 and ckpt['config']['anneal_end'] == 1
    # codes, mask token, 10 classes, null
    assert ckpt['model']['embeddings.weight'].shape == (32 + 1 + 10 + 1, 32)
    assert len(open(run / 'log.jsonl').readlines()) == 3
    assert os.path.exists(run / 'samples' / '0000003.png')
    sample.main(['--ckpt', str(run / 'last.pt'), '--grid', str(tmp_path / 'g.png'),
                 '--per-class', '2', '--num-samples', '6', '--out', str(tmp_path / 's.npz'),
                 '--batch-size', '3', '--cfg-scale', '3', '--guidance-scale-pow', '0'])
    assert Image.open(tmp_path / 'g.png').size == (2 * 18 + 2, 10 * 18 + 2)
    assert np.load(tmp_path / 's.npz')['arr_0'].shape == (6, 16, 16, 3)
