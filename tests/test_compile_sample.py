"""Compiled sampling and the random-weights benchmark (issue 19, parts 4 and 5, sampling half):
the eager raster loop unchanged, its static-shape step (Model.step) giving the same tokens eagerly
and through torch.compile, and sample.py --benchmark --random-weights [--compile] on the CPU."""
import pytest
import torch

import llamagen
import npp
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
    """The logits (17, 2B, V) of every forward call of generate fed codes (B, 16) (CFG doubled):
    decode as generate calls it, the class prefix first."""
    cond = llamagen.cfg_batch(LABELS, model.cfg.num_classes)
    mask = torch.ones(17, 17, dtype=torch.bool).tril()
    out = []
    with llamagen.kv_caches(model, len(cond), 17, torch.float32, 'cpu'):
        out.append(model.decode(model.cls_embedding(cond), 0, mask)[:, -1])
        for t in range(15):
            x = model.tok_embeddings(codes[:, t:t + 1].repeat(2, 1))
            out.append(model.decode(x, 1 + t, mask)[:, -1])
    return torch.stack(out)


def test_static_step_run_eagerly_gives_the_same_tokens():
    """The step compile_step compiles, uncompiled: the whole cache and (T, S) mask rows give the
    tokens of the default loop (cache sliced to start+T)."""
    model = tiny().eval()
    eager = tokens(model)
    model.compiled_step = model.step
    assert torch.equal(tokens(model), eager)
    assert model.nfe == 16


def test_compiled_sampling_matches_eager():
    """Inductor (the machine's C compiler, ~10 s): the same tokens; logits within 1e-4, since the
    softmax sums over all 17 cached keys (the unwritten ones weigh exactly 0), not start+T."""
    model = tiny().eval()
    codes = tokens(model)
    eager = step_logits(model, codes)
    model.compile_step()
    assert torch.equal(tokens(model), codes)
    compiled = step_logits(model, codes)
    assert (compiled - eager).abs().max() < 1e-4


def test_npp_compiled_sampling_matches_eager():
    """NPP samples with the core's loop. backend='aot_eager' (traced, not code-generated): the
    inductor path is the test above; this one is about NPP's tables going through the step."""
    model = tiny(npp).eval()
    before = tokens(model)
    model.compile_step(backend='aot_eager')
    assert torch.equal(tokens(model), before)


def test_random_weights_benchmark_on_the_cpu(capsys):
    args = ['--method', 'llamagen', '--model', 'GPT-tiny', '--image-size', '32',
            '--random-weights', '--benchmark', '--batch-size', '2']
    sample.main(args)
    out = capsys.readouterr().out
    assert 'images/s at batch 2 on cpu (fp32, eager), 4 forward calls per image' in out
    sample.main(args + ['--compile'])
    assert '(fp32, compiled), 4 forward calls per image' in capsys.readouterr().out


@pytest.mark.parametrize('argv, message', [
    (['--method', 'par', '--model', 'GPT-tiny', '--image-size', '32', '--compile'],
     '--compile: compiled sampling is for the core raster loop (llamagen, npp); par has its own'),
])
def test_compile_refuses_other_methods(argv, message):
    with pytest.raises(SystemExit, match=message.replace('(', r'\(').replace(')', r'\)')):
        sample.main(argv + ['--random-weights', '--benchmark', '--batch-size', '1'])


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
