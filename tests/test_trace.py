"""Watching generation (issue 22): every method's generate(..., trace=f) calls f after each of its
model.nfe forward calls with the canvas so far, and sample.py --trace draws it. Tiny random models
and tokenizers (16 px images, a 4x4 token grid unless said), CFG on: the frames are the calls, each
shows exactly the tokens of the calls before it, the last is the sample, and tracing changes
nothing that is sampled."""
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import iar2
import llamagen
import mar
import npp
import par
import rar
import sample
import vq

METHODS = ('llamagen', 'npp', 'par', 'rar', 'iar2', 'mar')
MODULES = dict(llamagen=llamagen, npp=npp, par=par, rar=rar, iar2=iar2, mar=mar)
SMALL = dict(ch=32, z_channels=32, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2),
             num_res_blocks=1)  # stride 4
TOKENIZERS = dict(
    vq=lambda: vq.VQModel(vq.VQConfig(**SMALL, codebook_size=32)),
    iar2=lambda: iar2.Tokenizer(iar2.TokenizerConfig(**SMALL, codebook_size=8,
                                                     codebook_size_second=16)),
    mar=lambda: vq.KLModel(vq.KLConfig(**{**SMALL, 'z_channels': 4}, embed_dim=4)),
)
GPT = dict(dim=32, n_layer=2, n_head=2)
SIZES = dict(  # each method's generator at the tiny size
    llamagen=GPT, npp=GPT, par=GPT, rar=GPT,
    iar2=dict(GPT, factorized_n_layer=1),
    mar=dict(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32,
             decoder_depth=1, decoder_num_heads=2, buffer_size=2, diffloss_d=1, diffloss_w=32,
             num_sampling_steps=3, clip_denoised=10.0),
)
KNOBS = dict(  # guided sampling; MAR: more iterations than tokens, so some reveal nothing
    llamagen=dict(cfg_scale=2.0, top_k=20), npp=dict(cfg_scale=2.0), par=dict(cfg_scale=2.0),
    rar=dict(cfg_scale=3.0), iar2=dict(cfg_scale1=(1.0, 3.0), cfg_scale2=(1.5, 3.0)),
    mar=dict(cfg_scale=3.0, num_iter=20),
)


def randomize(model):
    """Move the official zero inits (uniform logits, identity adaLN blocks, a DiffLoss that
    predicts 0) to random values, so that every sample depends on every part of the model."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        zero_init = 'output' in name or 'lm_head' in name or 'adaLN' in name or 'final' in name
        if zero_init or 'spe_tok' in name:
            torch.nn.init.normal_(p, std=0.3)
    return model


def tiny(method, **kw):
    """-> (model, tokenizer), random weights, for 16 px images and 5 classes."""
    module = MODULES[method]
    torch.manual_seed(0)
    tok = TOKENIZERS.get(method, TOKENIZERS['vq'])().eval()
    fields = {**SIZES[method], **module.derive_config(tok, 16, 5), **kw}
    return randomize(module.Model(module.Config(**fields))).eval(), tok


def record(model, labels, seed=0, **knobs):
    """-> (codes, calls): generate's output and every trace call's arguments."""
    calls = []

    def trace(codes, filled, uncond=None, denoising=None):
        calls.append(dict(codes=codes, filled=filled, uncond=uncond, denoising=denoising))

    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        codes = model.generate(labels, generator=g, trace=trace, **knobs)
    return codes, calls


def per_token(model, codes):
    """codes as generate returns them -> (B, L, k): the k values of each token, raster order."""
    if isinstance(model, mar.Model):
        return mar.patchify(codes, model.cfg.patch_size)
    return codes.view(len(codes), -1, model.cfg.block_size).transpose(1, 2)


def mar_calls(num_iter, L):  # the iterations of MAR's generate that reveal tokens
    n_masked, calls = L, 0
    for step in range(num_iter):
        n_next = mar.next_mask_len(step, num_iter, L, n_masked)
        if n_next < n_masked or step == num_iter - 1:
            calls += 1
            n_masked = n_next
    return calls


def forward_calls(method, model):
    """Forward calls per image, as --benchmark reports them, by each method's rule."""
    if method == 'par':
        L, n = model.cfg.block_size, model.cfg.ar_token_num
        return 1 + (n - 1) + (L - n) // n
    if method == 'mar':
        return mar_calls(KNOBS['mar']['num_iter'], model.L)
    return model.cfg.block_size


@pytest.mark.parametrize('method', METHODS)
def test_a_frame_per_forward_call_each_with_the_tokens_of_the_calls_so_far(method):
    model, _ = tiny(method)
    labels = torch.tensor([0, 3, 4])
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        plain = model.generate(labels, generator=g, **KNOBS[method])
    nfe = model.nfe
    codes, calls = record(model, labels, **KNOBS[method])
    assert torch.equal(codes, plain) and model.nfe == nfe  # tracing changes nothing sampled
    assert len(calls) == nfe == forward_calls(method, model)
    final = per_token(model, codes)  # (B, L, k)
    before = torch.zeros_like(calls[0]['filled'])
    differs = 0  # calls whose unconditional tokens differ from the guided ones
    for call in calls:
        filled = call['filled']
        assert filled.shape == final.shape[:2] and filled.dtype == torch.bool
        fresh = filled & ~before
        assert (filled >= before).all() and fresh.any(1).all()  # each call adds tokens to all
        # exactly the tokens so far, the neutral value (0) elsewhere
        want = torch.where(filled[..., None], final, 0)
        assert torch.equal(per_token(model, call['codes']), want)
        # the unconditional branch's tokens at this call's positions, the canvas elsewhere
        uncond = per_token(model, call['uncond'])
        assert torch.equal(uncond[~fresh], want[~fresh])
        differs += not torch.equal(uncond, want)
        before = filled
    assert before.all() and torch.equal(calls[-1]['codes'], codes)
    assert differs > len(calls) // 4


@pytest.mark.parametrize('method', METHODS)
def test_without_guidance_there_is_no_uncond(method):
    model, _ = tiny(method)
    knobs = {**KNOBS[method], 'cfg_scale': 1.0, 'cfg_scale1': (1.0, 1.0), 'cfg_scale2': (1.0, 1.0)}
    knobs = {k: v for k, v in knobs.items() if k in sample.generate_knobs(type(model))}
    codes, calls = record(model, torch.tensor([1, 2]), **knobs)
    assert len(calls) == model.nfe and all(c['uncond'] is None for c in calls)
    assert torch.equal(calls[-1]['codes'], codes)


def test_mar_reports_diffloss_steps_and_covers_every_token_once():
    model, _ = tiny('mar')
    codes, calls = record(model, torch.tensor([0, 1]), **KNOBS['mar'])
    fresh = [c['filled'] for c in calls]
    fresh = [f & ~b for f, b in zip(fresh, [torch.zeros_like(fresh[0])] + fresh[:-1])]
    assert (sum(f.long() for f in fresh) == 1).all()  # every token from exactly one call
    final = per_token(model, codes)
    for call, new in zip(calls, fresh):
        steps = call['denoising']
        assert len(steps) == model.cfg.num_sampling_steps
        for x in steps:  # this call's tokens: the step's x_t; the others: as in codes
            x = per_token(model, x)
            assert torch.equal(x[~new], per_token(model, call['codes'])[~new])
        assert torch.equal(per_token(model, steps[-1])[new], final[new])  # x_0: the sample


@pytest.mark.parametrize('grid,n', [(8, 4), (8, 16)])
def test_par_order_follows_its_regions(grid, n):
    model, _ = tiny('par', block_size=grid * grid, ar_token_num=n, spe_token_num=n - 1)
    _, calls = record(model, torch.tensor([2]), cfg_scale=1.5)
    s, r = math.isqrt(n), grid // math.isqrt(n)  # regions per side, tokens per region side
    before = torch.zeros(grid * grid, dtype=torch.bool)
    for call_index, call in enumerate(calls):
        new = (call['filled'][0] & ~before).nonzero()[:, 0]
        before = call['filled'][0]
        row, col = new // grid, new % grid
        region = (row // r) * s + col // r
        relative = (row % r) * r + col % r
        if call_index < n:  # the first n calls: one token each, at (0, 0) of region call_index
            assert region.tolist() == [call_index] and relative.tolist() == [0]
        else:  # then one token per region, all at the same relative position, in raster order
            assert sorted(region.tolist()) == list(range(n))
            assert relative.tolist() == [call_index - n + 1] * n


def test_trace_frames_grey_exactly_the_tokens_not_generated():
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    filled = np.zeros(16, dtype=bool)
    filled[[0, 1, 5, 15]] = True
    fresh = np.zeros(16, dtype=bool)
    fresh[5] = True
    im = np.asarray(sample.draw_canvas(img, filled, fresh, 2))  # 4x4 tokens of 4 px, scale 2
    assert im.shape == (32, 32, 3)
    big = img.repeat(2, 0).repeat(2, 1)
    for i in range(16):
        r, c = divmod(i, 4)
        block, want = im[8 * r:8 * r + 8, 8 * c:8 * c + 8], big[8 * r:8 * r + 8, 8 * c:8 * c + 8]
        if not filled[i]:
            assert (block == sample.GREY).all()
        elif fresh[i]:  # outlined, the inside as decoded
            assert (block[0] == sample.FRESH).all() and (block[:, -1] == sample.FRESH).all()
            assert (block[1:-1, 1:-1] == want[1:-1, 1:-1]).all()
        else:
            assert (block == want).all()


def test_order_map_numbers_each_token_by_its_call():
    order = np.arange(1, 17)[::-1].copy()  # token 0 by the last call
    im = np.asarray(sample.draw_order(order, 16, 96))
    assert im.shape == (96, 96, 3)
    assert (im[1, 1] == sample.heat(np.array([1.0]))[0]).all()  # a corner: no digit there
    assert (im[-2, -2] == sample.heat(np.array([0.0]))[0]).all()
    half = np.asarray(sample.draw_order(order, 8, 96))  # calls 9.. not yet: grey
    assert (half[1, 1] == sample.GREY).all() and (half[-2, -2] == im[-2, -2]).all()


def write_run(folder, method, cfg_scale=2.0):
    """A run folder as train.py leaves it, from a tiny random model -> RUN/last.pt."""
    model, tok = tiny(method)
    folder.mkdir()
    torch.save(llamagen.tokenizer_file(tok, method), folder / 'tokenizer.pt')
    torch.save(dict(model=model.state_dict(), method=method, stage='generator', kind='Model',
                    config=asdict(model.cfg), tokenizer='tokenizer.pt', step=1,
                    args=dict(cfg_scale=cfg_scale)), folder / 'last.pt')
    return str(folder / 'last.pt')


@pytest.mark.parametrize('method', METHODS)
def test_sample_py_trace_changes_nothing_sampled(method, tmp_path, capsys):
    ckpt = write_run(tmp_path / 'run', method)
    extra = ['--num-sampling-steps', '2'] if method == 'mar' else []
    flags = ['--ckpt', ckpt, '--num-samples', '5', '--batch-size', '3', '--seed', '1', *extra]
    sample.main([*flags, '--out', str(tmp_path / 'plain.npz')])
    trace = str(tmp_path / 'trace.png')
    sample.main([*flags, '--out', str(tmp_path / 'traced.npz'), '--trace', trace, '--trace-cfg',
                 '--classes', '0', '2'])
    plain, traced = np.load(tmp_path / 'plain.npz'), np.load(tmp_path / 'traced.npz')
    assert np.array_equal(plain['arr_0'], traced['arr_0'])
    calls = int(capsys.readouterr().out.split('2 classes x ')[1].split()[0])
    model, _ = tiny(method)
    if method != 'mar':  # MAR: its default num_iter (64) over 16 tokens: 16 calls
        assert calls == forward_calls(method, model)
    else:
        assert calls == mar_calls(64, model.L)
    assert Image.open(trace).size[0] > 0


@pytest.mark.parametrize('method', ['par', 'mar'])
def test_the_last_frame_is_the_sample_pixel_for_pixel(method, tmp_path):
    ckpt = write_run(tmp_path / 'run', method)
    args, ckpt_dict = sample.parse_args(['--ckpt', ckpt, '--precision', 'fp32', '--trace-cfg',
                                         '--trace', str(tmp_path / 't.png')])
    model, tok = sample.load(args, ckpt_dict)
    model.eval()
    labels = torch.tensor([0, 1, 2])
    codes, calls = sample.record_trace(model, labels, args, torch.Generator().manual_seed(3))
    images = sample.sample(model, tok, labels, args, torch.Generator().manual_seed(3))
    frames = sample.decode(tok, [c['codes'] for c in calls], args, torch.device('cpu'))
    assert frames.shape[:2] == (model.nfe, 3) and torch.equal(calls[-1]['codes'], codes)
    assert np.array_equal(frames[-1], llamagen.to_uint8(images).numpy())
    assert all(c['uncond'] is not None for c in calls)  # an unconditional frame per call
    shown = [len(c['denoising']) for c in calls]
    assert shown == [len(calls[0]['denoising'])] * len(calls)
    assert shown[0] == (model.cfg.num_sampling_steps if method == 'mar' else 0)
    # the drawn frames: a token block is all grey exactly when its token is not generated yet
    pictures, order, denoising = sample.trace_pictures(tok, calls, args, torch.device('cpu'))
    g = math.isqrt(calls[0]['filled'].shape[1])
    for k, call in enumerate(calls):
        for b in range(3):
            both = pictures[b][k]  # --trace-cfg: the frame, 2 px, the unconditional one
            size = both.height
            assert both.width == 2 * size + 2
            im = np.asarray(both.crop((0, 0, size, size)))
            blocks = im.reshape(g, size // g, g, size // g, 3).transpose(0, 2, 1, 3, 4)
            grey = (blocks == sample.GREY).all((2, 3, 4)).flatten()  # (L,)
            assert np.array_equal(grey, ~call['filled'][b].numpy())
    assert order.min() == 1 and order.max() == len(calls)
    assert len(denoising[0]) == shown[0]


def test_gif_has_a_frame_per_call_and_trace_cfg_needs_guidance(tmp_path):
    ckpt = write_run(tmp_path / 'run', 'par')
    gif = tmp_path / 'trace.gif'
    sample.main(['--ckpt', ckpt, '--trace', str(gif), '--trace-cfg', '--classes', '1'])
    with Image.open(gif) as im:
        assert im.n_frames == 7  # 4x4 tokens, n = 4: 1 + 3 + 3 calls
    with pytest.raises(SystemExit, match='without guidance'):
        sample.main(['--ckpt', ckpt, '--trace', str(gif), '--trace-cfg', '--cfg-scale', '1'])
    with pytest.raises(SystemExit, match='unknown format'):
        sample.main(['--ckpt', ckpt, '--trace', str(tmp_path / 'trace.jpg')])


def test_trace_of_an_official_checkpoint(tmp_path):
    """--official goes through the contract only: an official-style LlamaGen file (a bare
    state dict under 'model') and tokenizer."""
    model, tok = tiny('llamagen')
    torch.save({'model': model.state_dict()}, tmp_path / 'gpt.pt')
    torch.save({'model': tok.state_dict()}, tmp_path / 'vq.pt')
    sizes = dict(llamagen.SIZES, test=GPT)
    tok_sizes = dict(llamagen.TOKENIZER_SIZES, test=dict(SMALL, codebook_size=32))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llamagen, 'SIZES', sizes)
        mp.setattr(llamagen, 'TOKENIZER_SIZES', tok_sizes)
        sample.main(['--official', '--method', 'llamagen', '--model', 'test', '--vq-model', 'test',
                     '--gpt-ckpt', str(tmp_path / 'gpt.pt'), '--vq-ckpt', str(tmp_path / 'vq.pt'),
                     '--image-size', '16', '--num-classes', '5', '--cfg-scale', '2',
                     '--trace', str(tmp_path / 'trace.png'), '--trace-cfg'])
    assert Image.open(tmp_path / 'trace.png').size[0] > 0
