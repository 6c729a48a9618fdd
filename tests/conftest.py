"""One thread per test process: the test tensors are tiny, and two threads on a busy 2-core machine wait
on each other (the suite took 5-8 minutes with two threads, under 2 minutes with one)."""
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')  # before torch, numpy and scipy start their thread pools
import torch  # noqa: E402

torch.set_num_threads(1)
