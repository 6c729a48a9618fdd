"""IAR2 (iar2.py): official keys, the two-step quantisation against brute force, decode_code, the
tokenizer's stage-1 / stage-2 gradient routing, KV-cached generation (semantic and detail
sub-steps) against teacher forcing, causality in raster order and the 12-neighbour window, the
adaptive CFG schedule, and a tiny tokenizer + generator + sample run on the built-in dataset."""
import json
import math
import os

import pytest
import torch
from PIL import Image

import iar2
import llamagen
import sample
import train
import vq
from conftest import DATA


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def generator_b(name='IAR2-B'):  # the official 256 x 4096 codebooks, 24 x 24 codes (384 px)
    cfg = iar2.Config(**iar2.SIZES[name], vocab_size=256, sub_vocab_size=4096, block_size=576,
                      num_classes=1000)
    return iar2.Model(cfg)


def test_keys_match_official_iar2_b_and_tokenizer(manifest):
    with torch.device('meta'):
        model = generator_b()
        tok = iar2.Tokenizer(iar2.TokenizerConfig(**iar2.TOKENIZER_SIZES['IAR2-VQ-16']))
    assert shapes(model) == manifest('iar2_b') and shapes(tok) == manifest('iar2_vq')
    assert sum(p.numel() for p in model.parameters()) == 143111616  # the manifest's num_params
    # the doubled official table, not in the state dict
    assert model.freqs_cis.shape == (1 + 2 * 576, 32, 2)
    for name, millions in (('IAR2-L', 408.2), ('IAR2-XL', 884.3), ('IAR2-XXL', 1570.1)):
        with torch.device('meta'):
            m = generator_b(name)
        assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == millions  # the note's
    assert list(m.mlp2[0].weight.shape) == [3072, 1536] and iar2.Model.__mro__[1] is llamagen.Model


def test_contract_fields():
    tok = iar2.Tokenizer(iar2.TokenizerConfig(**iar2.TOKENIZER_SIZES['IAR2-VQ-tiny']))
    fields = iar2.derive_config(tok, 16, 10)
    assert fields == dict(vocab_size=32, block_size=16, num_classes=10, sub_vocab_size=512)
    assert list(iar2.TOKENIZER_SIZES)[0] == 'IAR2-VQ-16'
    assert iar2.CLASSROOM == {'tokenizer': {'max_steps': 800},
                              'generator': {'lr_schedule': 'cosine'}}
    assert [s for s in iar2.SIZES if s.endswith('tiny')] == ['IAR2-tiny']
    assert set(iar2.PAPER) == {'IAR2-B', 'IAR2-L', 'IAR2-XL', 'IAR2-XXL'}
    assert iar2.PAPER['IAR2-B']['cfg_scale1'] == (1.75, 3.0)


def tiny_tokenizer(**kw):
    cfg = dict(codebook_size=8, codebook_size_second=16, encoder_ch_mult=(1, 2),
               decoder_ch_mult=(1, 2), z_channels=32, ch=32, num_res_blocks=1)
    torch.manual_seed(0)
    tok = iar2.Tokenizer(iar2.TokenizerConfig(**{**cfg, **kw}))
    # a trained-looking detail codebook
    torch.nn.init.normal_(tok.quantize.embedding_second, std=0.3)
    return tok


def nearest(codes, v):  # the index of the row of codes (K, e) closest to v (e,), by brute force
    return min(range(len(codes)), key=lambda c: ((v - codes[c]) ** 2).sum().item())


def test_two_step_assignment_equals_brute_force():
    q = tiny_tokenizer().quantize.eval()
    z = torch.randn(2, 8, 3, 3)
    _, _, ids = q(z)  # (B, 2, h, w)
    e1 = torch.nn.functional.normalize(q.embedding.weight, dim=-1)
    e2 = q.embedding_second
    for b in range(2):
        for i in range(3):
            for j in range(3):
                v = z[b, :, i, j] / z[b, :, i, j].norm()  # the l2-normalised latent
                s = nearest(e1, v)  # the nearest semantic code
                d = nearest(e2, v - e1[s])  # the nearest detail code to the residual
                assert (ids[b, 0, i, j].item(), ids[b, 1, i, j].item()) == (s, d)
    # the details range over all 16 codes
    assert len(set(ids[:, 1].flatten().tolist())) > 1 and ids[:, 1].max() >= 8


def test_decode_code_reproduces_the_quantised_latent():
    tok = tiny_tokenizer().eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    z_q, _, ids = tok.quantize_img(x)  # ids (B, 2, h, w)
    latent = tok.quantize.codebook()[ids[:, 0]] + tok.quantize.embedding_second[ids[:, 1]]
    latent = latent.permute(0, 3, 1, 2)  # (B, e, h, w)
    assert torch.allclose(latent, z_q, atol=1e-6) and ids.shape == (2, 2, 4, 4)
    codes = tok.encode(x)  # (B, 2L) int32: the semantic ids, then the detail ids
    assert codes.dtype == torch.int32 and codes.shape == (2, 32)
    assert torch.equal(codes[:, :16], ids[:, 0].flatten(1).int())
    assert torch.equal(codes[:, 16:], ids[:, 1].flatten(1).int())
    assert torch.equal(tok.training_input(codes), ids.flatten(1))  # int64, what forward takes
    ref = tok.decode(latent)
    assert torch.allclose(tok.decode_code(codes), ref, atol=1e-6)
    assert torch.allclose(tok.decode_code(codes.long()), ref, atol=1e-6)  # as generate gives them
    # z_q is z + (e - z): equal up to rounding
    assert torch.allclose(tok.decode(z_q), ref, atol=1e-4)


def test_tokenizer_stages_route_gradients():
    tok = tiny_tokenizer(first_stage_frac=0.5)
    modes = []
    usage = []
    for step in range(10):
        tok.on_step(step, 10)
        modes.append(tok.quantize.mode)
        usage.append(tok.metrics()['codebook usage'])
    # official cycle [2nd, 2nd, 1st]
    assert modes == ['semantic'] * 5 + ['detail', 'detail', 'both', 'detail', 'detail']
    # no ids yet: one value (0) of 8 semantic codes, then of 16 detail codes
    assert usage == [0.125] * 5 + [0.0625] * 5
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    grads = {}
    for mode in ('semantic', 'detail', 'both'):
        tok.zero_grad(set_to_none=True)
        tok.quantize.mode = mode
        recon, losses = tok(x)
        (torch.nn.functional.mse_loss(recon, x) + sum(losses.values())).backward()
        q = tok.quantize
        grads[mode] = (q.embedding.weight.grad, q.embedding_second.grad, sorted(losses))
    # stage 1: no detail codebook
    assert grads['semantic'][0] is not None and grads['semantic'][1] is None
    # semantic codebook frozen: AdamW skips it
    assert grads['detail'][0] is None and grads['detail'][1] is not None
    assert grads['both'][0] is not None and grads['both'][1] is not None
    assert 'vq_first' in grads['both'][2]
    # on 'both' steps the semantic codes get the two-codebook term plus the semantic-only one
    assert not torch.allclose(grads['both'][0], grads['semantic'][0])


def tiny(grid=5, **kw):
    cfg = dict(dim=48, n_layer=2, n_head=2, vocab_size=8, sub_vocab_size=16,
               block_size=grid * grid, num_classes=5, factorized_n_layer=2)
    torch.manual_seed(0)
    model = iar2.Model(iar2.Config(**{**cfg, **kw}))
    for out in (model.output1, model.output2):  # the official zero init makes every logit 0
        torch.nn.init.normal_(out[2].weight, std=0.5)
    return model.eval()


def record(model):  # -> {1: semantic logits, 2: detail logits}, one tensor per head call
    outs = {1: [], 2: []}
    model.output1.register_forward_hook(lambda m, a, o: outs[1].append(o))
    model.output2.register_forward_hook(lambda m, a, o: outs[2].append(o))
    return outs


def teacher_forced(model, sem, det, labels):
    return model(torch.cat([sem, det], 1), labels)[0]


def test_entropy_loss_closed_form_and_its_terms_per_stage():
    V = 8
    spread = torch.eye(V) * 10  # each vector sure of its own code: per-sample entropy 0, usage flat
    assert vq.entropy_loss(spread).item() == pytest.approx(-math.log(V), abs=1e-3)
    same = torch.zeros(V, V)
    same[:, 0] = 10  # all sure of code 0: nothing to reward
    assert abs(vq.entropy_loss(same).item()) < 1e-3
    assert abs(vq.entropy_loss(torch.zeros(V, V)).item()) < 1e-3  # unsure: log V - log V
    # the classroom tokenizer has it (official 0), on the semantic distances in stage 1, on both
    # codebooks' in stage 2
    assert iar2.TOKENIZER_SIZES['IAR2-VQ-tiny']['entropy_loss_ratio'] == 0.1
    assert 'entropy_loss_ratio' not in iar2.TOKENIZER_SIZES['IAR2-VQ-16']
    q = tiny_tokenizer(entropy_loss_ratio=0.1).quantize.train()
    z = torch.randn(2, 8, 3, 3)
    zf = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    e1, e2 = q.codebook(), q.embedding_second
    d1 = torch.cdist(zf, e1).pow(2)
    d2 = torch.cdist(zf - e1[d1.argmin(1)], e2).pow(2)
    semantic, both = vq.entropy_loss(-d1), vq.entropy_loss(-d1) + vq.entropy_loss(-d2)
    for mode, want in (('semantic', semantic), ('detail', both), ('both', both)):
        q.mode = mode
        losses = q(z)[1]
        assert losses['entropy'].item() == pytest.approx(0.1 * want.item(), rel=1e-4)


@pytest.mark.parametrize('grid,cfg,rope_repeat', [(5, 1.0, True), (5, 3.0, True), (4, 2.0, False)])
def test_kv_cache_generation_equals_teacher_forcing(grid, cfg, rope_repeat):
    model, labels = tiny(grid, rope_repeat=rope_repeat), torch.tensor([0, 2, 4])
    outs = record(model)
    model.train()  # generate runs in eval mode and gives the mode back
    codes = model.generate(labels, cfg_scale=cfg, generator=torch.Generator().manual_seed(0))
    assert model.training
    model.eval()
    L = grid * grid
    assert codes.shape == (3, 2 * L) and codes.dtype == torch.long
    assert model.nfe == L and len(outs[1]) == len(outs[2]) == L
    cached = [torch.stack(outs[i], 1).float() for i in (1, 2)]  # (kB, L, V), (kB, L, V2)
    cond = llamagen.cfg_batch(labels, 5) if llamagen.guided(cfg) else labels
    forced = model(codes.repeat(len(cond) // 3, 1), cond)[0]
    assert torch.allclose(cached[0], forced[0], atol=1e-5)
    assert torch.allclose(cached[1], forced[1], atol=1e-5)
    assert all(m.kv_cache is None for m in model.modules() if isinstance(m, llamagen.Attention))


def test_window_matches_the_official_slots_and_is_causal():
    for g in (24, 5, 3):
        idx, valid = iar2.window_index(g)
        for i in range(g):
            for j in range(g):
                above = [(i + dr, j + dc) for dr in (-2, -1) for dc in range(-2, 3)]
                slots = above + [(i, j - 2), (i, j - 1)]
                want = [r * g + c if 0 <= r and 0 <= c < g else None for r, c in slots]
                p = i * g + j
                got = [int(idx[p, s]) if valid[p, s] else None for s in range(12)]
                assert got == want and all(q < p for q in got if q is not None)


def test_classroom_size_turns_each_pair_by_its_own_grid_cell():
    """IAR2-tiny: pair j (sequence position j + 1) turns by grid cell j, as in LlamaGen; the paper
    sizes keep the official quirk (cell j // 2), which their checkpoints need."""
    def rope_table(size, **kw):  # (1 + rows, 16, 2) at head dim 32, on an 8 x 8 grid
        cfg = dict(n_layer=1, n_head=4, dim=128, vocab_size=8, sub_vocab_size=16, block_size=64,
                   num_classes=5, factorized_n_layer=1)
        with torch.device('meta'):  # no weights needed: the table is computed from the config
            model = iar2.Model(iar2.Config(**{**cfg, **iar2.SIZES[size], **kw}))
        return model.rope_table()
    grid = llamagen.rope_2d(llamagen.grid_positions(8), 32, 10000.0)  # (64, 16, 2)
    tiny_table = rope_table('IAR2-tiny')
    assert tiny_table.shape == (65, 16, 2) and torch.equal(tiny_table[1:], grid)
    assert all('rope_repeat' not in cfg for name, cfg in iar2.SIZES.items() if name != 'IAR2-tiny')
    paper = rope_table('IAR2-B', n_layer=1, n_head=4, dim=128)  # the paper's Config default
    assert torch.equal(paper[1::2], grid) and torch.equal(paper[2::2], grid)


@pytest.mark.parametrize('rope_repeat', [True, False])
def test_causality_in_raster_order(rope_repeat):
    model, L = tiny(rope_repeat=rope_repeat), 25
    sem, det = torch.randint(0, 8, (2, L)), torch.randint(0, 16, (2, L))
    labels = torch.tensor([1, 3])
    base = teacher_forced(model, sem, det, labels)
    for k in (0, 7, 12, 24):
        s2 = sem.clone()
        s2[:, k] = (s2[:, k] + 1) % 8
        out = teacher_forced(model, s2, det, labels)
        assert torch.equal(out[0][:, :k + 1], base[0][:, :k + 1])
        assert torch.equal(out[1][:, :k], base[1][:, :k])
        assert not torch.allclose(out[1][:, k], base[1][:, k])  # the detail head sees s_k
        d2 = det.clone()
        d2[:, k] = (d2[:, k] + 1) % 16
        out2 = teacher_forced(model, sem, d2, labels)
        assert torch.equal(out2[0][:, :k + 1], base[0][:, :k + 1])
        assert torch.equal(out2[1][:, :k + 1], base[1][:, :k + 1])
        if k < L - 1:  # the next position sees both tokens of pair k
            assert not torch.allclose(out[0][:, k + 1], base[0][:, k + 1])
            assert not torch.allclose(out2[0][:, k + 1], base[0][:, k + 1])


def class_attention_reference(model, codes, labels):
    """(B, L) head-mean attention of each query of the last layer to the class token, from an
    uncached teacher-forced pass: the last attention's inputs, recomputed by hand."""
    seen = []
    hook = model.layers[-1].attention.register_forward_hook(lambda m, args, out: seen.append(args))
    with torch.no_grad():  # codes come from inference mode
        model(codes, labels)
    hook.remove()
    attn = model.layers[-1].attention
    x, freqs = seen[0][:2]
    B, L = x.shape[:2]
    q, k, _ = attn.wqkv(x).view(B, L, 3, attn.n_head, -1).unbind(2)
    q = llamagen.apply_rope(q, freqs).transpose(1, 2)
    k = llamagen.apply_rope(k, freqs).transpose(1, 2)
    future = torch.ones(L, L).triu(1).bool()
    probs = (q @ k.transpose(2, 3) / k.shape[-1] ** 0.5).masked_fill(future, -1e9).softmax(-1)
    return probs[:, :, :, 0].mean(1)


def test_cfg_schedule_formula_and_its_use_in_generate(monkeypatch):
    a = torch.tensor([1.0, 0.5, 0.0])
    # the note: w = n/(L-1) + w_attn * a, s1 (1 - w) + s2 w
    for n, L in ((0, 64), (10, 64), (63, 64), (0, 1)):
        w = (n / (L - 1) if L > 1 else 0.5) + 0.05 * a
        scale = iar2.cfg_schedule((1.75, 3.0), n, L, a, 0.05)[:, 0]
        assert torch.allclose(scale, 1.75 * (1 - w) + 3.0 * w)
    # overshoots s2
    last = iar2.cfg_schedule((1.75, 3.0), 63, 64, torch.tensor([1.0]), 0.05).item()
    assert abs(last - 3.0625) < 1e-6
    model, labels, mixed, attns = tiny(), torch.tensor([0, 3]), [], []
    outs = record(model)
    sample_logits, cls_attention = llamagen.sample_logits, model.cls_attention

    def spy_sample(lg, *a, **k):  # the logits after CFG
        mixed.append(lg)
        return sample_logits(lg, *a, **k)

    def spy_attention(*a):  # the attention to the class token of each position, (B,)
        attns.append(cls_attention(*a))
        return attns[-1]

    monkeypatch.setattr(llamagen, 'sample_logits', spy_sample)
    monkeypatch.setattr(model, 'cls_attention', spy_attention)
    codes = model.generate(labels, cfg_scale1=(1.5, 4.0), cfg_scale2=(2.0, 3.0), w_attn=0.3)
    a_ref = class_attention_reference(model, codes, labels)  # (B, L)
    assert torch.allclose(torch.stack(attns, 1), a_ref, atol=1e-5) and attns[0].eq(1).all()
    for n in range(25):
        for i, pair in ((1, (1.5, 4.0)), (2, (2.0, 3.0))):
            c, u = outs[i][n].float().chunk(2)
            w = n / 24 + 0.3 * a_ref[:, n]
            scale = (pair[0] * (1 - w) + pair[1] * w)[:, None]
            assert torch.allclose(mixed[2 * n + i - 1], u + (c - u) * scale, atol=1e-5)
    with pytest.raises(SystemExit, match='two scales'):
        model.generate(labels, cfg_scale1=(2.0,))


def test_trains_and_samples_on_the_builtin_dataset(tmp_path):
    tok_run, run = tmp_path / 'tok', tmp_path / 'gen'
    train.main(['--method', 'iar2', '--stage', 'tokenizer', '--max-steps', '3',
                '--global-batch-size', '8', '--ch', '32', '--z-channels', '32',
                '--encoder-ch-mult', '1', '2', '2', '--decoder-ch-mult', '1', '2', '2',
                '--codebook-size', '16', '--codebook-size-second', '32', '--num-res-blocks', '1',
                '--log-every', '1', '--run-dir', str(tok_run), '--results-dir', str(tmp_path)]
               + DATA)
    log = [json.loads(line) for line in open(tok_run / 'log.jsonl')]
    # stage 1 (2 steps), then stage 2
    assert len(log) == 3 and all('codebook usage' in r for r in log)
    train.main(['--method', 'iar2', '--tokenizer', str(tok_run / 'last.pt'), '--dim', '24',
                '--n-layer', '2', '--n-head', '2', '--factorized-n-layer', '1', '--max-steps', '3',
                '--global-batch-size', '8', '--log-every', '1', '--run-dir', str(run),
                '--results-dir', str(tmp_path)] + DATA)
    ckpt = torch.load(run / 'last.pt', weights_only=True)
    assert ckpt['config']['vocab_size'] == 16 and ckpt['config']['sub_vocab_size'] == 32
    assert ckpt['config']['block_size'] == 16 and 'tok_embeddings2.weight' in ckpt['model']
    assert os.path.exists(run / 'samples' / '0000003.png')
    sample.main(['--ckpt', str(run / 'last.pt'), '--grid', str(tmp_path / 'g.png'),
                 '--per-class', '1', '--cfg-scale1', '1.5', '3', '--w-attn', '0.1'])
    assert Image.open(tmp_path / 'g.png').size == (18 + 2, 10 * 18 + 2)
