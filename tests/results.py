"""The README's "Results on the built-in dataset" table, and the sample-quality number it uses.

  python tests/results.py                                  # every method, the classroom defaults (about 1.5 h on 2 cores)
  python tests/results.py --methods llamagen rar --max-steps 400 --out results/table
  python tests/results.py --score samples.npz              # class accuracy of one sample.py --out file

Each method trains with `python train.py --method M`, its classroom run (the same batch and learning rate;
800 generator steps; MAR 4000, about 2x the time), its default tokenizer first (cached; that stage's time
is reported apart), then samples with its default knobs and the training grids' cfg scale.

Class accuracy needs no download: a small CNN, trained here on built-in images drawn with another seed
than the training set, classifies the samples; the number is the fraction classified as the class they
were asked for. On real built-in images it is about 1, on noise or shuffled labels about 0.1 (chance).
FID against 1000 built-in images is added when fid.py finds the Inception weights.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402


class Classifier(nn.Module):  # (B, 3, 32, 32) uint8-range floats -> (B, 10) logits
    def __init__(self, width=32):
        super().__init__()
        c = (3, width, 2 * width, 2 * width)
        self.convs = nn.ModuleList(nn.Conv2d(c[i], c[i + 1], 3, padding=1) for i in range(3))
        self.head = nn.Linear(c[-1], len(train.CLASSES))

    def forward(self, x):
        x = x / 127.5 - 1
        x = F.interpolate(x, size=32, mode='bilinear', antialias=True) if x.shape[-1] != 32 else x
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)  # 32 -> 16 -> 8 -> 4
        return self.head(x.mean((2, 3)))


def train_classifier(n=4000, steps=300, seed=12345, size=32, cache=None):
    """A Classifier trained on n built-in images rendered with `seed` (not the generators' seed 0)."""
    if cache and os.path.exists(cache):
        clf = Classifier()
        clf.load_state_dict(torch.load(cache, weights_only=True))
        return clf.eval()
    imgs, labels = train.builtin_images(n, size, seed)
    x, y = torch.from_numpy(imgs).permute(0, 3, 1, 2).float(), torch.from_numpy(labels)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = Classifier()
    opt = torch.optim.Adam(clf.parameters(), 3e-3)
    for _ in range(steps):
        i = torch.randint(0, n, (64,), generator=g)
        xb = torch.where(torch.rand(64, 1, 1, 1, generator=g) < 0.5, x[i].flip(-1), x[i])  # flips, as in training
        loss = F.cross_entropy(clf(xb), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if cache:
        os.makedirs(os.path.dirname(cache) or '.', exist_ok=True)
        torch.save(clf.state_dict(), cache)
    return clf.eval()


@torch.no_grad()
def class_accuracy(clf, images, labels):
    """images uint8 (N, H, W, 3), labels (N,) -> fraction classified as their label."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float()
    pred = torch.cat([clf(x[i:i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    return (pred == torch.as_tensor(np.asarray(labels))).float().mean().item()


def run(cmd):  # -> stdout; a failing step stops the table with its output
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f'results.py: {" ".join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}')
    return r.stdout


def last_log(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, 'log.jsonl'))][-1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--methods', nargs='+', default=list(train.METHODS))
    p.add_argument('--out', default=os.path.join('results', 'table'))
    p.add_argument('--max-steps', type=int, help="default: each method's classroom run (800 generator steps; MAR 4000)")
    p.add_argument('--samples', type=int, default=1000, help='for class accuracy (and FID)')
    p.add_argument('--score', help='only print the class accuracy of this .npz (arr_0 images, arr_1 labels)')
    args = p.parse_args()
    out = os.path.abspath(args.out)
    clf = train_classifier(cache=os.path.join(out, 'classifier.pt'))
    if args.score:
        s = np.load(args.score)
        return print(f'{args.score}: class accuracy {class_accuracy(clf, s["arr_0"], s["arr_1"]):.3f} ({len(s["arr_1"])} samples)')
    rows = []
    for m in args.methods:
        run_dir, t0 = os.path.join(out, f'{m}-generator'), time.time()
        if not os.path.exists(os.path.join(run_dir, 'last.pt')):  # (the default tokenizer first, if not cached)
            run(['train.py', '--method', m, '--results-dir', out, '--run-dir', run_dir] + (['--max-steps', str(args.max_steps)] if args.max_steps else []))
        rec = last_log(run_dir)  # the generator stage's last log line: loss, tokens/s, elapsed
        bench = run(['sample.py', '--ckpt', os.path.join(run_dir, 'last.pt'), '--benchmark', '--batch-size', '50'])
        ips, nfe = float(bench.split('benchmark: ')[1].split()[0]), int(bench.split('), ')[1].split()[0])
        npz = os.path.join(out, f'{m}-samples.npz')
        run(['sample.py', '--ckpt', os.path.join(run_dir, 'last.pt'), '--num-samples', str(args.samples), '--out', npz, '--batch-size', '50'])
        s = np.load(npz)
        acc = class_accuracy(clf, s['arr_0'], s['arr_1'])
        fid = 'n/a'
        try:  # FID, when fid.py finds the Inception weights
            fid = run(['fid.py', f'builtin:{args.samples}:{s["arr_0"].shape[1]}', npz]).split('FID')[1].split()[0]
        except SystemExit:
            pass
        rows.append((m, rec['loss'], rec.get('tokens/s', float('nan')), rec['elapsed'], ips, nfe, acc, fid, time.time() - t0))
        print(rows[-1], flush=True)
    print('| method | final loss | train tokens/s | train s | sample images/s | forward calls / image | class acc | FID | wall s |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    for m, loss, tps, secs, ips, nfe, acc, fid, wall in rows:
        print(f'| {m} | {loss:.3f} | {tps:.0f} | {secs:.0f} | {ips:.1f} | {nfe} | {acc:.2f} | {fid} | {wall:.0f} |')


if __name__ == '__main__':
    main()
