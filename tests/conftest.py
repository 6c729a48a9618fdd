"""Shared test set-up. One thread per test process: the test tensors are tiny, and two threads on a
busy 2-core machine wait on each other (the suite took 5-8 minutes with two threads, under 2 with
one). Test files import the tiny command-line sizes below: `from conftest import DATA`."""
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')  # before torch, numpy and scipy start their threads
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
MANIFESTS = os.path.join(os.path.dirname(__file__), 'manifests')  # copies of the official key lists

# train.py flags of the tiny runs: 64 built-in images of 16 px; a VQ of 32 codes at stride 4 (4x4
# tokens); a 2-layer generator of width 32
DATA = ['--num-images', '64', '--image-size', '16']
VQ = ['--ch', '32', '--z-channels', '32', '--encoder-ch-mult', '1', '2', '2', '--decoder-ch-mult',
      '1', '2', '2', '--codebook-size', '32', '--num-res-blocks', '1']
GPT = ['--dim', '32', '--n-layer', '2', '--n-head', '2']


@pytest.fixture(scope='session')
def manifest():
    """manifest('rar_b') -> {key: shape} of that official state dict, in its order."""
    def load(name):
        with open(os.path.join(MANIFESTS, name.removesuffix('.json') + '.json')) as f:
            return {k: list(shape) for k, shape in json.load(f)['keys']}
    return load


@pytest.fixture(scope='session')
def tiny_vq(tmp_path_factory):
    """A VQ tokenizer for DATA (32 codes, stride 4), trained 2 steps once per session."""
    import train
    root = tmp_path_factory.mktemp('tiny_vq')
    train.main(['--stage', 'tokenizer', '--max-steps', '2', '--global-batch-size', '8'] + VQ + DATA
               + ['--run-dir', str(root / 'tok'), '--results-dir', str(root)])
    return str(root / 'tok' / 'last.pt')


def tiny_gpt(module, **kw):
    """A small module.Model (the core's or a subclass) in eval mode. Its output layer gets random
    weights: the official zero init would make every logit 0."""
    cfg = dict(dim=64, n_layer=2, n_head=4, vocab_size=32, block_size=16, num_classes=5)
    torch.manual_seed(0)
    model = module.Model(module.Config(**{**cfg, **kw}))
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()
