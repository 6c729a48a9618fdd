"""IAR2 (iar2.py): official keys, the two-step quantisation against brute force, decode_code, the
tokenizer's stage-1 / stage-2 gradient routing, KV-cached generation (semantic and detail sub-steps)
against teacher forcing, causality in raster order and the 12-neighbour window, the adaptive CFG
schedule, and a tiny tokenizer + generator + sample run on the built-in dataset."""
import json
import os

import pytest
import torch
from PIL import Image

import iar2
import llamagen
import sample
import train

KEYS = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'reference', 'official_keys')


@pytest.fixture(autouse=True)
def one_thread():  # these tests run many tiny ops (per-token loops): 2 OpenMP threads on a busy 2-core
    n = torch.get_num_threads()  # machine spend most of their time waiting for each other (10x slower)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def manifest(name):
    path = os.path.join(KEYS, name)
    if not os.path.exists(path):
        pytest.skip(f'{path} not found')
    ref = json.load(open(path))
    return {k: s for k, s in ref['keys']}, ref['num_params']


def shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}, sum(p.numel() for p in model.parameters())


def test_keys_match_official_iar2_b_and_tokenizer():
    with torch.device('meta'):
        model = iar2.Model(iar2.Config(**iar2.SIZES['IAR2-B'], vocab_size=256, sub_vocab_size=4096, block_size=576, num_classes=1000))
        tok = iar2.Tokenizer(iar2.TokenizerConfig(**iar2.TOKENIZER_SIZES['IAR2-VQ-16']))
    assert shapes(model) == manifest('iar2_b.json') and shapes(tok) == manifest('iar2_vq.json')
    assert model.freqs_cis.shape == (1 + 2 * 576, 32, 2)  # the doubled official table, not in the state dict
    for name, millions in (('IAR2-L', 408.2), ('IAR2-XL', 884.3), ('IAR2-XXL', 1570.1)):  # the note's counts
        with torch.device('meta'):
            m = iar2.Model(iar2.Config(**iar2.SIZES[name], vocab_size=256, sub_vocab_size=4096, block_size=576, num_classes=1000))
        assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == millions
    assert list(m.mlp2[0].weight.shape) == [3072, 1536] and list(iar2.Model.__mro__)[1] is llamagen.Model


def tiny_tokenizer(**kw):
    cfg = dict(codebook_size=8, codebook_size_second=16, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
               z_channels=32, ch=32, num_res_blocks=1)
    torch.manual_seed(0)
    tok = iar2.Tokenizer(iar2.TokenizerConfig(**{**cfg, **kw}))
    torch.nn.init.normal_(tok.quantize.embedding_second, std=0.3)  # a trained-looking detail codebook
    return tok


def test_two_step_assignment_equals_brute_force():
    q = tiny_tokenizer().quantize.eval()
    z = torch.randn(2, 8, 3, 3)
    _, _, ids = q(z)  # (B, 2, h, w)
    e1, e2 = torch.nn.functional.normalize(q.embedding.weight, dim=-1), q.embedding_second
    for b in range(2):
        for i in range(3):
            for j in range(3):
                v = z[b, :, i, j] / z[b, :, i, j].norm()  # the l2-normalised latent
                s = min(range(len(e1)), key=lambda c: ((v - e1[c]) ** 2).sum().item())  # nearest semantic code
                d = min(range(len(e2)), key=lambda c: ((v - e1[s] - e2[c]) ** 2).sum().item())  # nearest to the residual
                assert (ids[b, 0, i, j].item(), ids[b, 1, i, j].item()) == (s, d)
    assert len(set(ids[:, 1].flatten().tolist())) > 1 and ids[:, 1].max() >= 8  # details range over all 16


def test_decode_code_reproduces_the_quantised_latent():
    tok = tiny_tokenizer().eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    z_q, _, ids = tok.quantize_img(x)
    latent = tok.quantize.codebook()[ids[:, 0]] + tok.quantize.embedding_second[ids[:, 1]]  # (B, h, w, e)
    assert torch.allclose(latent.permute(0, 3, 1, 2), z_q, atol=1e-6) and ids.shape == (2, 2, 4, 4)
    assert torch.equal(tok.encode(x), ids)
    ref = tok.decode(latent.permute(0, 3, 1, 2))
    for args in ((ids,), (ids.flatten(1),), (ids[:, 0].flatten(1), ids[:, 1].flatten(1)), (ids[:, 0], ids[:, 1])):
        assert torch.allclose(tok.decode_code(*args), ref, atol=1e-6)
    assert torch.allclose(tok.decode(z_q), ref, atol=1e-4)  # z_q is z + (e - z): equal up to rounding


def test_tokenizer_stages_route_gradients():
    tok = tiny_tokenizer(first_stage_frac=0.5)
    modes = []
    for step in range(10):
        tok.on_step(step, 10)
        modes.append(tok.quantize.mode)
    assert modes == ['semantic'] * 5 + ['detail', 'detail', 'both', 'detail', 'detail']  # official cycle [2nd, 2nd, 1st]
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    grads = {}
    for mode in ('semantic', 'detail', 'both'):
        tok.zero_grad(set_to_none=True)
        tok.quantize.mode = mode
        recon, losses = tok(x)
        (torch.nn.functional.mse_loss(recon, x) + sum(losses.values())).backward()
        grads[mode] = (tok.quantize.embedding.weight.grad, tok.quantize.embedding_second.grad, sorted(losses))
    assert grads['semantic'][0] is not None and grads['semantic'][1] is None  # stage 1: no detail codebook
    assert grads['detail'][0] is None and grads['detail'][1] is not None  # semantic codebook frozen: AdamW skips it
    assert grads['both'][0] is not None and grads['both'][1] is not None and 'vq_first' in grads['both'][2]
    # on 'both' steps the semantic codes get the two-codebook term plus the semantic-only one
    assert not torch.allclose(grads['both'][0], grads['semantic'][0])


def tiny(grid=5, **kw):
    cfg = dict(dim=48, n_layer=2, n_head=2, vocab_size=8, sub_vocab_size=16, block_size=grid * grid, num_classes=5,
               factorized_n_layer=2)
    torch.manual_seed(0)
    model = iar2.Model(iar2.Config(**{**cfg, **kw}))
    for out in (model.output1, model.output2):  # the official zero init makes every logit 0
        torch.nn.init.normal_(out[2].weight, std=0.5)
    return model.eval()


def record(model):
    outs = {1: [], 2: []}
    model.output1.register_forward_hook(lambda m, a, o: outs[1].append(o))
    model.output2.register_forward_hook(lambda m, a, o: outs[2].append(o))
    return outs


def teacher_forced(model, sem, det, labels):
    return model(torch.cat([sem, det], 1), labels)[0]


@pytest.mark.parametrize('grid,cfg,rope_repeat', [(5, 1.0, True), (5, 3.0, True), (4, 2.0, False)])
def test_kv_cache_generation_equals_teacher_forcing(grid, cfg, rope_repeat):
    model, labels = tiny(grid, rope_repeat=rope_repeat), torch.tensor([0, 2, 4])
    outs = record(model)
    sem, det = model.generate(labels, cfg_scale=cfg, generator=torch.Generator().manual_seed(0))
    L = grid * grid
    assert sem.shape == det.shape == (3, L) and model.nfe == L and len(outs[1]) == len(outs[2]) == L
    cached = [torch.stack(outs[i], 1).float() for i in (1, 2)]  # (kB, L, V), (kB, L, V2)
    cond = model.cfg_labels(labels, cfg)
    forced = teacher_forced(model, sem.repeat(len(cond) // 3, 1), det.repeat(len(cond) // 3, 1), cond)
    assert torch.allclose(cached[0], forced[0], atol=1e-5) and torch.allclose(cached[1], forced[1], atol=1e-5)
    assert all(m.kv_cache is None for m in model.modules() if isinstance(m, llamagen.Attention))


def test_window_matches_the_official_slots_and_is_causal():
    for g in (24, 5, 3):
        idx, valid = iar2.window_index(g)
        for i in range(g):
            for j in range(g):
                slots = [(i - 2, j + d) for d in range(-2, 3)] + [(i - 1, j + d) for d in range(-2, 3)] + [(i, j - 2), (i, j - 1)]
                want = [(r * g + c if 0 <= r and 0 <= c < g else None) for r, c in slots]
                got = [int(idx[i * g + j, s]) if valid[i * g + j, s] else None for s in range(12)]
                assert got == want and all(q < i * g + j for q in got if q is not None)


@pytest.mark.parametrize('rope_repeat', [True, False])
def test_causality_in_raster_order(rope_repeat):
    model, L = tiny(rope_repeat=rope_repeat), 25
    sem, det, labels = torch.randint(0, 8, (2, L)), torch.randint(0, 16, (2, L)), torch.tensor([1, 3])
    base = teacher_forced(model, sem, det, labels)
    for k in (0, 7, 12, 24):
        s2 = sem.clone()
        s2[:, k] = (s2[:, k] + 1) % 8
        out = teacher_forced(model, s2, det, labels)
        assert torch.equal(out[0][:, :k + 1], base[0][:, :k + 1]) and torch.equal(out[1][:, :k], base[1][:, :k])
        assert not torch.allclose(out[1][:, k], base[1][:, k])  # the detail head is conditioned on s_k
        d2 = det.clone()
        d2[:, k] = (d2[:, k] + 1) % 16
        out2 = teacher_forced(model, sem, d2, labels)
        assert torch.equal(out2[0][:, :k + 1], base[0][:, :k + 1]) and torch.equal(out2[1][:, :k + 1], base[1][:, :k + 1])
        if k < L - 1:  # the next position sees both tokens of pair k
            assert not torch.allclose(out[0][:, k + 1], base[0][:, k + 1]) and not torch.allclose(out2[0][:, k + 1], base[0][:, k + 1])


def test_cfg_schedule_formula_and_its_use_in_generate(monkeypatch):
    a = torch.tensor([1.0, 0.5, 0.0])
    for n, L in ((0, 64), (10, 64), (63, 64), (0, 1)):  # the note: w = n/(L-1) + w_attn * a, s1 (1 - w) + s2 w
        w = (n / (L - 1) if L > 1 else 0.5) + 0.05 * a
        assert torch.allclose(iar2.cfg_schedule((1.75, 3.0), n, L, a, 0.05)[:, 0], 1.75 * (1 - w) + 3.0 * w)
    assert abs(iar2.cfg_schedule((1.75, 3.0), 63, 64, torch.tensor([1.0]), 0.05).item() - 3.0625) < 1e-6  # overshoots s2
    model, labels, mixed = tiny(), torch.tensor([0, 3]), []
    outs = record(model)
    sample_logits = llamagen.sample_logits
    monkeypatch.setattr(llamagen, 'sample_logits', lambda lg, *a, **k: mixed.append(lg) or sample_logits(lg, *a, **k))
    seen = []  # the last layer's attention inputs of a teacher-forced pass, for an uncached reference
    s, d = model.generate(labels, cfg_scale1=(1.5, 4.0), cfg_scale2=(2.0, 3.0), w_attn=0.3)
    model.layers[-1].attention.register_forward_hook(lambda m, args, out: seen.append(args))
    teacher_forced(model, s, d, labels)
    attn = model.layers[-1].attention
    x, freqs = seen[0][:2]
    q, k, _ = attn.wqkv(x).view(2, 25, 3, 2, -1).unbind(2)
    q, k = llamagen.apply_rope(q, freqs).transpose(1, 2), llamagen.apply_rope(k, freqs).transpose(1, 2)
    probs = (q @ k.transpose(2, 3) / k.shape[-1] ** 0.5).masked_fill(torch.ones(25, 25).triu(1).bool(), -1e9).softmax(-1)
    a_ref = probs[:, :, :, 0].mean(1)  # (B, L): head-mean attention of each query to the class token
    assert torch.allclose(torch.stack(model.attn_record, 1), a_ref, atol=1e-5) and model.attn_record[0].eq(1).all()
    for n in range(25):
        for i, pair in ((1, (1.5, 4.0)), (2, (2.0, 3.0))):
            c, u = outs[i][n].float().chunk(2)
            w = n / 24 + 0.3 * a_ref[:, n]
            scale = (pair[0] * (1 - w) + pair[1] * w)[:, None]
            assert torch.allclose(mixed[2 * n + i - 1], u + (c - u) * scale, atol=1e-5)
    with pytest.raises(SystemExit, match='two scales'):
        model.generate(labels, cfg_scale1=(2.0,))


DATA = ['--num-images', '40', '--image-size', '16']


def test_trains_and_samples_on_the_builtin_dataset(tmp_path):
    tok_run, run = tmp_path / 'tok', tmp_path / 'gen'
    train.main(['--method', 'iar2', '--stage', 'tokenizer', '--max-steps', '3', '--global-batch-size', '8', '--ch', '32',
                '--z-channels', '32', '--encoder-ch-mult', '1', '2', '2', '--decoder-ch-mult', '1', '2', '2',
                '--codebook-size', '16', '--codebook-size-second', '32', '--num-res-blocks', '1', '--log-every', '1',
                '--run-dir', str(tok_run), '--results-dir', str(tmp_path)] + DATA)
    log = [json.loads(line) for line in open(tok_run / 'log.jsonl')]
    assert len(log) == 3 and all('codebook usage' in r for r in log)  # stage 1 (2 steps), then stage 2
    train.main(['--method', 'iar2', '--tokenizer', str(tok_run / 'last.pt'), '--dim', '24', '--n-layer', '2', '--n-head', '2',
                '--factorized-n-layer', '1', '--max-steps', '3', '--global-batch-size', '8', '--log-every', '1',
                '--run-dir', str(run), '--results-dir', str(tmp_path)] + DATA)
    ckpt = torch.load(run / 'last.pt', weights_only=True)
    assert ckpt['config']['vocab_size'] == 16 and ckpt['config']['sub_vocab_size'] == 32 and ckpt['config']['block_size'] == 16
    assert 'tok_embeddings2.weight' in ckpt['model'] and os.path.exists(run / 'samples' / '0000003.png')
    sample.main(['--ckpt', str(run / 'last.pt'), '--grid', str(tmp_path / 'g.png'), '--per-class', '1', '--cfg-scale1', '1.5',
                 '3', '--w-attn', '0.1'])
    assert Image.open(tmp_path / 'g.png').size == (18 + 2, 10 * 18 + 2)
