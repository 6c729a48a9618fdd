"""One thread per test process: the test tensors are tiny, and two threads on a busy 2-core machine wait
on each other (the suite took 5-8 minutes with two threads, under 2 minutes with one)."""
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')  # before torch, numpy and scipy start their thread pools
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
MANIFESTS = os.path.join(os.path.dirname(__file__), 'manifests')  # copies of the official key lists


@pytest.fixture(scope='session')
def manifest():
    """manifest('rar_b') -> {key: shape} of that official state dict, in its order (tests/manifests)."""
    def load(name):
        ref = json.load(open(os.path.join(MANIFESTS, name.removesuffix('.json') + '.json')))
        return {k: list(shape) for k, shape in ref['keys']}
    return load


@pytest.fixture(scope='session')
def tiny_vq(tmp_path_factory):
    """A VQ tokenizer for 16-px built-in images (32 codes, stride 4), trained 2 steps once per session."""
    import train
    root = tmp_path_factory.mktemp('tiny_vq')
    train.main(['--stage', 'tokenizer', '--max-steps', '2', '--global-batch-size', '8', '--ch', '32', '--z-channels', '32',
                '--encoder-ch-mult', '1', '2', '2', '--decoder-ch-mult', '1', '2', '2', '--codebook-size', '32',
                '--num-res-blocks', '1', '--num-images', '64', '--image-size', '16',
                '--run-dir', str(root / 'tok'), '--results-dir', str(root)])
    return str(root / 'tok' / 'last.pt')
