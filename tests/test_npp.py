"""NPP (npp.py): p = 1 is LlamaGen, the patch loss against a token-by-token reference, the
official key manifest, NPP checkpoints sampling through LlamaGen, the stage/LR schedule, and a tiny
train.py run across a stage boundary that then samples."""
import argparse
import json

import pytest
import torch
from PIL import Image

import llamagen
import npp
import sample
import train
import vq
from conftest import DATA, GPT, tiny_gpt
GEN = GPT + ['--global-batch-size', '8',
       '--log-every', '1', '--sample-every', '1000', '--ckpt-every', '1000'] + DATA


def tiny(**kw):
    return tiny_gpt(npp, **{'block_size': 64, **kw})


def as_llamagen(model):  # the same weights in the core's class
    keep = {k: v for k, v in vars(model.cfg).items() if k in llamagen.Config.__dataclass_fields__}
    ref = llamagen.Model(llamagen.Config(**keep))
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.train(model.training)


@pytest.mark.parametrize('training', [False, True])
def test_patch_1_is_llamagen(training):
    model = tiny().train(training)
    ref = as_llamagen(model)
    tokens, labels = torch.randint(0, 32, (3, 64)), torch.tensor([0, 2, 4])
    torch.manual_seed(1)  # the same dropout masks in both (dropout on)
    logits, loss = model(tokens, labels)
    torch.manual_seed(1)
    ref_logits, ref_loss = ref(tokens, labels)
    assert logits.shape == (3, 64, 32) and torch.equal(logits, ref_logits)
    # the same per-token terms; only the order of the final mean's sum differs from F.cross_entropy
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)


def patch_cells(g, p):
    """[raster indices of the tokens of patch j] for the (g/p)^2 patches of a g x g grid, in
    raster order over the coarse grid, the tokens of a patch row-major (the definition)."""
    n = g // p
    cells = []
    for j in range(n * n):
        rows = range((j // n) * p, (j // n + 1) * p)
        cols = range((j % n) * p, (j % n + 1) * p)
        cells.append([r * g + c for r in rows for c in cols])
    return cells


@pytest.mark.parametrize('p', [2, 4])
def test_patch_loss_matches_token_by_token_reference(p):
    model, g, hd = tiny(), 8, 16
    model.patch = p
    tokens, labels = torch.randint(0, 32, (2, g * g)), torch.tensor([1, 3])
    logits, loss = model(tokens, labels)
    n = g // p  # coarse grid side
    assert logits.shape == (2, n * n, 32)
    # the definition, one patch at a time: patch j = (j // n, j % n) on the coarse grid
    cells = patch_cells(g, p)
    emb, nll, ref_logits = model.tok_embeddings.weight, [], []
    pos = torch.tensor([[j // n, j % n] for j in range(n * n)])  # in patch units
    freqs = torch.cat([torch.zeros(1, hd // 2, 2), llamagen.rope_2d(pos, hd, 10000.0)])
    for b in range(2):
        x = [model.cls_embedding.embedding_table.weight[labels[b]]]
        for j in range(n * n - 1):
            x.append(torch.stack([emb[tokens[b, k]] for k in cells[j]]).mean(0))
        out = model.backbone(torch.stack(x)[None], freqs[: n * n])[0]  # (n*n, V)
        ref_logits.append(out)
        for j in range(n * n):
            for k in cells[j]:  # every token of patch j is a target of position j
                nll.append(-out[j].log_softmax(-1)[tokens[b, k]])
    assert torch.allclose(logits, torch.stack(ref_logits), atol=1e-5)
    assert torch.allclose(loss, torch.stack(nll).mean(), atol=1e-6) and len(nll) == 2 * g * g
    # causality in patch order: changing a token of patch k leaves the positions <= k unchanged
    for k in (0, n * n // 2):
        changed = tokens.clone()
        changed[:, cells[k][-1]] = (changed[:, cells[k][-1]] + 1) % 32
        out, _ = model(changed, labels)
        assert torch.equal(out[:, :k + 1], logits[:, :k + 1])
        assert not torch.allclose(out[:, k + 1:], logits[:, k + 1:])


def test_integer_patchify_layout():
    ids = torch.arange(16).reshape(1, 16)  # a 4x4 grid in raster order
    expected = [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]
    assert npp.patchify(ids, 2).tolist() == expected
    assert npp.patchify(ids, 1).tolist() == [[[k] for k in range(16)]]
    assert npp.patchify(ids, 4).tolist() == [[list(range(16))]]


def test_keys_match_official_npp_manifest(manifest):
    with torch.device('meta'):
        cfg = npp.Config(**npp.SIZES['GPT-B'], vocab_size=16384, block_size=256, num_classes=1000)
        model = npp.Model(cfg)
    ref = manifest('npp_gpt_b_c2i_256')
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref
    assert sum(v.numel() for v in model.parameters()) == 110888448  # no new parameters
    assert npp.Model.generate is llamagen.Model.generate and model.freqs_cis.shape == (257, 32, 2)


def test_npp_checkpoint_samples_through_llamagen(tmp_path):
    model = tiny(block_size=16)
    model.on_step(0, 10)  # in the 2x2 stage: generate must not depend on it
    assert model.patch == 2
    kw = dict(cfg_scale=2.0, temperature=0.9, top_k=8)
    labels = torch.tensor([0, 3, 4])
    a = model.generate(labels, generator=torch.Generator().manual_seed(0), **kw)
    b = as_llamagen(model).generate(labels, generator=torch.Generator().manual_seed(0), **kw)
    assert a.shape == (3, 16) and torch.equal(a, b)
    # an official-layout file (state dict under 'model' + a pickled Namespace) through
    # sample.py --official
    tok = vq.VQModel(vq.VQConfig(**vq.VQ_SIZES['VQ-tiny']))
    cfg = npp.Config(**npp.SIZES['GPT-tiny'], vocab_size=512, block_size=16, num_classes=10)
    gpt = npp.Model(cfg)
    ns = argparse.Namespace(gpt_model='GPT-tiny', patch_level=2, epoch_rate=0.5)
    torch.save({'model': tok.state_dict(), 'args': ns}, tmp_path / 'vq.pt')
    torch.save({'model': gpt.state_dict(), 'steps': 1, 'args': ns}, tmp_path / 'gpt.pt')
    sample.main(['--official', '--method', 'npp', '--gpt-ckpt', str(tmp_path / 'gpt.pt'),
                 '--vq-ckpt', str(tmp_path / 'vq.pt'), '--model', 'GPT-tiny',
                 '--vq-model', 'VQ-tiny', '--image-size', '16', '--num-classes', '10',
                 '--grid', str(tmp_path / 'g.png'), '--classes', '1', '2', '--per-class', '2'])
    assert Image.open(tmp_path / 'g.png').size == (2 * 18 + 2, 2 * 18 + 2)


def test_schedule_stages_and_lr():
    assert npp.stage_ends(2, 0.5, 300) == [150, 300]
    assert npp.stage_ends(3, 0.5, 300) == [75, 150, 300]
    assert npp.stage_ends(4, 0.5, 300) == [37, 75, 150, 300]
    assert npp.stage_ends(1, 0.5, 300) == [300]
    # level 2 over 300 steps: warmup 10 steps per stage, decay over the last 30 steps of each stage
    model = tiny(patch_level=2, warmup_ratio=10 / 300, decay_ratio=0.2, end_lr_ratio=0.1)
    scale, patch = {}, {}
    for s in range(300):
        scale[s] = model.on_step(s, 300)
        patch[s] = model.patch
    assert {patch[s] for s in range(150)} == {2} and {patch[s] for s in range(150, 300)} == {1}
    for start in (0, 150):  # the warmup restarts with the stage, then constant, then the decay
        warmup = [scale[start + k] for k in range(10)]
        assert warmup == pytest.approx([(k + 1) / 10 for k in range(10)])
        assert [scale[s] for s in range(start + 10, start + 121)] == pytest.approx([1.0] * 111)
        assert scale[start + 135] == pytest.approx(0.1 + 0.9 * 15 / 30)
        assert scale[start + 149] == pytest.approx(0.1 + 0.9 / 30)
    model = tiny(patch_level=3)  # 4x4, 2x2, tokens
    sides = []
    for s in (0, 74, 75, 149, 150, 299):
        model.on_step(s, 300)
        sides.append(model.patch)
    assert sides == [4, 4, 2, 2, 1, 1]


def test_train_py_npp_crosses_a_stage_and_samples(tiny_vq, tmp_path):
    run = tmp_path / 'npp'  # tiny_vq: conftest's 16-px VQ tokenizer
    train.main(GEN + ['--method', 'npp', '--tokenizer', tiny_vq, '--max-steps', '6',
                      '--warmup-steps', '0', '--lr', '1e-3', '--warmup-ratio', '0.34',
                      '--decay-ratio', '0', '--run-dir', str(run), '--results-dir', str(tmp_path)])
    ckpt = torch.load(run / 'last.pt', weights_only=True)
    assert ckpt['method'] == 'npp' and ckpt['step'] == 6 and ckpt['config']['patch_level'] == 2
    log = [json.loads(line) for line in open(run / 'log.jsonl')]
    # stages: steps 0-2 on 2x2 patches, 3-5 tokens; a 2-step warmup in each stage
    assert [r['lr'] for r in log] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4, 1e-3, 1e-3])
    assert all(0 < r['loss'] < 10 for r in log)
    sample.main(['--ckpt', str(run / 'last.pt'), '--grid', str(tmp_path / 'g.png'),
                 '--per-class', '2'])
    assert Image.open(tmp_path / 'g.png').size == (2 * 18 + 2, 10 * 18 + 2)
