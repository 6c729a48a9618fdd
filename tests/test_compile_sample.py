"""Compiled sampling and the random-weights benchmark (issue 19, parts 4 and 5, sampling half):
decode's static-shape form (a tensor start) giving the same tokens eagerly and through
torch.compile, for every method (MAR: its DiffLoss step), and sample.py --benchmark
--random-weights [--compile] on the CPU."""
import pytest
import torch

import iar2
import llamagen
import mar
import npp
import par
import rar
import sample

LABELS = torch.tensor([1, 2])


def tiny(module=llamagen):
    """A 4-layer model of a 4x4 grid, 64 codes, weights of std 0.1 (output too: the default zero
    output layer would make every logit equal and every comparison trivial)."""
    torch.manual_seed(0)
    model = module.Model(module.Config(vocab_size=64, block_size=16, num_classes=10))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def tokens(model):
    g = torch.Generator().manual_seed(0)
    return model.generate(LABELS, cfg_scale=2.0, top_k=20, generator=g)


@torch.inference_mode()
def step_logits(model, codes):
    """The logits (17, 2B, V) of every forward call of generate fed codes (B, 16) (CFG doubled),
    through decode_call as generate calls it, the class prefix first."""
    cond = llamagen.cfg_batch(LABELS, model.cfg.num_classes)
    mask = torch.ones(17, 17, dtype=torch.bool).tril()
    out = []
    with llamagen.kv_caches(model, len(cond), 17, torch.float32, 'cpu'):
        out.append(llamagen.decode_call(model, model.cls_embedding(cond), 0, mask)[:, -1])
        for t in range(15):
            x = model.tok_embeddings(codes[:, t:t + 1].repeat(2, 1))
            out.append(llamagen.decode_call(model, x, 1 + t, mask)[:, -1])
    return torch.stack(out)


def test_static_step_run_eagerly_gives_the_same_tokens():
    """decode with a tensor start, uncompiled: the whole cache and (T, S) mask rows give the
    tokens of the int-start loop (cache sliced to start+T)."""
    model = tiny().eval()
    eager = tokens(model)
    model.compiled_decode = model.decode
    assert torch.equal(tokens(model), eager)
    assert model.nfe == 16


def test_compiled_sampling_matches_eager():
    """Inductor (the machine's C compiler, ~10 s): the same tokens; logits within 1e-4, since the
    softmax sums over all 17 cached keys (the unwritten ones weigh exactly 0), not start+T."""
    model = tiny().eval()
    codes = tokens(model)
    eager = step_logits(model, codes)
    model.compile_sampling()
    assert torch.equal(tokens(model), codes)
    compiled = step_logits(model, codes)
    assert (compiled - eager).abs().max() < 1e-4


def every_method():
    """(name, tiny model, generate's keywords) for the six methods."""
    small = dict(dim=64, n_layer=2, n_head=4, vocab_size=64, block_size=16, num_classes=10)
    yield 'llamagen', llamagen.Model(llamagen.Config(**small)), dict(cfg_scale=2.0, top_k=20)
    yield 'npp', npp.Model(npp.Config(**small)), dict(cfg_scale=2.0)
    yield 'par', par.Model(par.Config(**small)), dict(cfg_scale=2.0)  # 4 groups of 4
    rar_cfg = dict(rar.SIZES['rar_tiny'], vocab_size=64, block_size=16, num_classes=10)
    yield 'rar', rar.Model(rar.Config(**rar_cfg)), dict(cfg_scale=4.0)
    iar2_cfg = dict(small, vocab_size=16, sub_vocab_size=32)
    yield 'iar2', iar2.Model(iar2.Config(**iar2_cfg)), dict(cfg_scale1=(1.5, 3.0),
                                                           cfg_scale2=(1.5, 3.0))
    mar_cfg = dict(img_size=32, vae_stride=4, vae_embed_dim=4, num_classes=10,
                   encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                   decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, buffer_size=4,
                   diffloss_d=1, diffloss_w=32, num_sampling_steps=5, clip_denoised=10.0)
    yield 'mar', mar.Model(mar.Config(**mar_cfg)), dict(cfg_scale=3.0, num_iter=8)


# graphs compiled per method: one per shape of the cached call (PAR: T = 1 and n; RAR: the
# 2-slot prefix and T = 1); MAR: DiffLoss's step for k > 0 and k = 0, each for its first row
# count and then for any (dynamic shapes)
GRAPHS = dict(llamagen=1, npp=1, par=2, rar=2, iar2=1, mar=4)


@pytest.mark.parametrize('name', GRAPHS)
def test_every_method_compiles_to_the_eager_samples(name):
    """backend='aot_eager' (traced and functionalised, not code-generated: the inductor path is
    tested above): the same samples as eager, bit for bit, twice, from graphs compiled once per
    shape; a recompilation per step (a shape or a guard that changes with the position) shows."""
    model, kw = {n: (m, kw) for n, m, kw in every_method()}[name]
    torch.manual_seed(1)  # weights of std 0.1: the zero-initialised heads would make it trivial
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model.eval()
    eager = model.generate(LABELS, generator=torch.Generator().manual_seed(0), **kw)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend('aot_eager')(gm, example_inputs)
    model.compile_sampling(backend=counting)
    for _ in range(2):
        compiled = model.generate(LABELS, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(compiled, eager)
    assert len(graphs) == GRAPHS[name]


def test_random_weights_benchmark_on_the_cpu(capsys):
    args = ['--method', 'llamagen', '--model', 'GPT-tiny', '--image-size', '32',
            '--random-weights', '--benchmark', '--batch-size', '2']
    sample.main(args)
    out = capsys.readouterr().out
    assert 'images/s at batch 2 on cpu (fp32, eager), 4 forward calls per image' in out
    sample.main(args + ['--compile'])
    assert '(fp32, compiled), 4 forward calls per image' in capsys.readouterr().out


@pytest.mark.parametrize('argv, message', [
    (['--random-weights'], '--random-weights is for --benchmark, with --method and --model'),
    (['--random-weights', '--benchmark', '--method', 'llamagen', '--model', 'GPT-tiny',
      '--grid', 'g.png'], '--random-weights samples noise: only --benchmark'),
    (['--random-weights', '--benchmark', '--method', 'llamagen', '--model', 'GPT-Q'],
     '--model GPT-Q: not a size of llamagen'),
])
def test_random_weights_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        sample.main(argv)
    assert message in capsys.readouterr().err


def test_mar_compiled_diffloss_matches_eager():
    """Inductor on MAR's compiled part, DiffLoss's reverse steps: a fused kernel rounds
    differently, so the latents agree within 1e-4, not bit for bit."""
    model, kw = {n: (m, kw) for n, m, kw in every_method()}['mar']
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model.eval()
    eager = model.generate(LABELS, generator=torch.Generator().manual_seed(0), **kw)
    model.compile_sampling()
    compiled = model.generate(LABELS, generator=torch.Generator().manual_seed(0), **kw)
    assert (compiled - eager).abs().max() < 1e-4
