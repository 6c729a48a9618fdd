"""
Sample a generator, ours or an official checkpoint: a PNG grid, or an ADM-style .npz for FID, on
1 process or N.

  python sample.py --ckpt results/001-llamagen-generator/last.pt --grid grid.png   # a row per class
  torchrun --nproc_per_node=8 sample.py --ckpt RUN/last.pt --num-samples 50000 --out samples.npz
  python sample.py --official --method llamagen --model GPT-B --gpt-ckpt c2i_B_256.pt \\
      --vq-ckpt vq_ds16_c2i.pt --benchmark

The .npz holds arr_0 uint8 (N, H, W, 3) and arr_1 labels (N,), class-balanced, as the ADM
evaluator reads it. The keyword arguments of the method's generate() become flags.
"""
import argparse
import importlib
import inspect
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import llamagen

METHODS = ('llamagen', 'par', 'npp', 'rar', 'iar2', 'mar')


def generate_knobs(cls):
    """The keyword arguments of cls.generate with their defaults (the generator excluded)."""
    params = inspect.signature(cls.generate).parameters.items()
    return {k: v.default for k, v in params if k != 'generator' and v.default is not v.empty}


@torch.inference_mode()
def sample(model, tok, labels, args, generator):
    """labels (B,) -> images (B, 3, H, W) in [-1, 1], resized (bicubic, as official) to
    --image-size-eval if given; official models are evaluated at 256 px, as in the papers."""
    knobs = {k: getattr(args, k) for k in generate_knobs(type(model))
             if getattr(args, k, None) is not None}
    with torch.autocast(labels.device.type, torch.bfloat16, enabled=args.precision == 'bf16'):
        codes = model.generate(labels, generator=generator, **knobs)
        img = tok.decode_code(codes).float()
    size = args.image_size_eval or (min(img.shape[-1], 256) if args.official else img.shape[-1])
    return F.interpolate(img, size=size, mode='bicubic') if size != img.shape[-1] else img


def load(args, ckpt):
    """-> (model, tokenizer) on the CPU: our run (ckpt, read from --ckpt) or the official files."""
    module = importlib.import_module(args.method)
    if ckpt is not None:
        return llamagen.load_generator(module, ckpt, args.ckpt)
    tok = llamagen.load_tokenizer(module, args.vq_ckpt, args.vq_model)
    derived = module.derive_config(tok, args.image_size, args.num_classes)
    model = module.Model(module.Config(**module.SIZES[args.model], **derived))
    return module.load_official(model, args.gpt_ckpt), tok


def write_grid(model, tok, args, generator, device):  # one row per class
    classes = torch.tensor(args.classes or range(min(model.cfg.num_classes, 10)), device=device)
    images = sample(model, tok, classes.repeat_interleave(args.per_class), args, generator)
    llamagen.save_grid(images, args.grid, args.per_class)
    print(f'wrote {args.grid}: {len(classes)} classes x {args.per_class}')


def benchmark(model, tok, args, generator, device, reps=3):  # after one warm-up batch
    labels = torch.arange(args.batch_size, device=device) % model.cfg.num_classes
    sample(model, tok, labels, args, generator)
    synchronize(device)
    t0 = time.time()
    for _ in range(reps):
        sample(model, tok, labels, args, generator)
    synchronize(device)
    speed = reps * args.batch_size / (time.time() - t0)
    print(f'benchmark: {speed:.3g} images/s at batch {args.batch_size} on {device} '
          f'({args.precision}), {model.nfe} forward calls per image')


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def write_npz(model, tok, args, generator, rank, world, device):
    """--num-samples class-balanced samples, sample i on rank i % world, joined by rank 0. Each
    file is written whole or not at all (llamagen.atomic_write): an interrupted run leaves the
    last samples.npz as it was, never a truncated one."""
    n_cls = model.cfg.num_classes
    out = npz_path(args.out)
    per_rank = math.ceil(args.num_samples / (world * args.batch_size)) * args.batch_size
    labels = (torch.arange(per_rank * world) % n_cls)[rank::world]
    imgs = []
    for i in range(0, per_rank, args.batch_size):
        batch = labels[i:i + args.batch_size].to(device)
        imgs.append(llamagen.to_uint8(sample(model, tok, batch, args, generator)).numpy())
    mine = np.concatenate(imgs)  # (per_rank, H, W, 3) uint8
    llamagen.atomic_write(f'{out}.part{rank}.npy', lambda f: np.save(f, mine))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:  # interleave the parts back into sample order, keep the first N
        parts = [np.load(f'{out}.part{r}.npy') for r in range(world)]
        arr = np.stack(parts, 1).reshape(-1, *parts[0].shape[1:])[:args.num_samples]
        classes = np.arange(len(arr)) % n_cls  # (N,) the label of each sample
        llamagen.atomic_write(out, lambda f: np.savez(f, arr_0=arr, arr_1=classes))
        for r in range(world):
            os.remove(f'{out}.part{r}.npy')
        print(f'wrote {out}: arr_0 {arr.shape} {arr.dtype}, {n_cls} classes')


def npz_path(out):
    """--out as np.savez names a path: with .npz appended unless it ends so."""
    return out if out.endswith('.npz') else out + '.npz'


def check_flags(p, args):
    """Stop (argparse's usage and one line) on a flag no run could use, before any work."""
    positive = {'--batch-size': args.batch_size, '--per-class': args.per_class,
                '--image-size': args.image_size, '--num-classes': args.num_classes,
                '--image-size-eval': args.image_size_eval}
    for flag, value in positive.items():
        if value is not None and value <= 0:
            p.error(f'{flag} must be positive, not {value}')
    if args.num_samples < 0:
        p.error(f'--num-samples must be 0 or more, not {args.num_samples}')


def check_outputs(args):
    """Stop with one line unless every file this run will write can be written: found out
    before the sampling (hours at 50,000 samples), not after it."""
    outputs = []
    if args.grid:
        outputs.append(('--grid', args.grid))
        ext = os.path.splitext(args.grid)[1].lower()
        if ext not in Image.registered_extensions():  # PIL picks the format by the extension
            raise SystemExit(f"--grid {args.grid}: unknown image format '{ext}' (use .png)")
    if args.num_samples:
        outputs.append(('--out', npz_path(args.out)))
    for flag, path in outputs:
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise SystemExit(f'{flag} {path}: is a directory')
        if not os.path.exists(folder):
            raise SystemExit(f'{flag} {path}: the directory {folder} does not exist')
        if not os.path.isdir(folder):
            raise SystemExit(f'{flag} {path}: {folder} is not a directory')
        if not os.access(folder, os.W_OK | os.X_OK):  # the file is made there, then renamed
            raise SystemExit(f'{flag} {path}: the directory {folder} is not writable')


def check_classes(args, num_classes):
    """--classes against the loaded model: class num_classes is CFG's null class, not a class."""
    for c in args.classes or ():
        if not 0 <= c < num_classes:
            raise SystemExit(f'--classes {c}: out of range, the model has classes 0 to '
                             f'{num_classes - 1}')


def parse_bool(s):
    return s.lower() in ('1', 'true', 'yes')


def parse_args(argv=None):
    """-> (args, our checkpoint or None). The checkpoint is read here, once: the method's
    generate() knobs become flags, and the run's training cfg scale is their default."""
    p = argparse.ArgumentParser(description=__doc__, add_help=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', help='our generator checkpoint (RUN/last.pt)')
    p.add_argument('--official', action='store_true',
                   help='official files: --gpt-ckpt, --vq-ckpt, --model')
    p.add_argument('--method', choices=METHODS,
                   help='with --official: which method; otherwise checked against --ckpt')
    p.add_argument('--gpt-ckpt')
    p.add_argument('--vq-ckpt')
    p.add_argument('--model', help="size of the official generator (a key of the method's "
                                   "SIZES, e.g. GPT-B, rar_b)")
    p.add_argument('--vq-model', help='size of the official tokenizer (default: the first of '
                                      "the method's TOKENIZER_SIZES)")
    p.add_argument('--image-size', type=int, default=256,
                   help='official: the generator trained at this size')
    p.add_argument('--image-size-eval', type=int, help='resize samples to this size (bicubic; '
                   '--official: 384 -> 256 as for the papers\' FID)')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--grid', help='write a PNG with a row per class')
    p.add_argument('--classes', type=int, nargs='+', help='grid classes (default: the first 10)')
    p.add_argument('--per-class', type=int, default=8, help='grid columns')
    p.add_argument('--num-samples', type=int, default=0,
                   help='write this many class-balanced samples to --out')
    p.add_argument('--out', default='samples.npz')
    p.add_argument('--batch-size', type=int, default=32, help='per process')
    p.add_argument('--benchmark', action='store_true',
                   help='print images/s and forward calls per image')
    p.add_argument('--precision', choices=('fp32', 'bf16'),
                   help='default: bf16 on GPU, fp32 on CPU')
    p.add_argument('--seed', type=int, default=0)
    known = p.parse_known_args(argv)[0]
    if known.official and not (known.method and known.gpt_ckpt and known.vq_ckpt and known.model):
        p.error('--official needs --method, --model, --gpt-ckpt and --vq-ckpt')
    if not known.official and not known.ckpt:
        p.error('give --ckpt RUN/last.pt, or --official with the official files')
    check_flags(p, known)
    check_outputs(known)
    ckpt = None
    if not known.official:
        ckpt = llamagen.load_file(known.ckpt)
        llamagen.check_run(ckpt, known.ckpt, known.method or ckpt.get('method'), 'generator')
        p.set_defaults(method=ckpt['method'], cfg_scale=ckpt['args'].get('cfg_scale'))
    module = importlib.import_module(known.method or ckpt['method'])
    for k, v in generate_knobs(module.Model).items():  # the method's generate() knobs -> flags
        kind = {tuple: float, type(None): float, bool: parse_bool}.get(type(v), type(v))
        p.add_argument('--' + k.replace('_', '-'), type=kind,
                       nargs='+' if isinstance(v, tuple) else None, help=f'default {v}')
    p.add_argument('-h', '--help', action='help')
    if known.official:  # the paper's settings for this released model; flags win
        p.set_defaults(**module.PAPER.get(known.model, {}))
    return p.parse_args(argv), ckpt


def main(argv=None):
    args, ckpt = parse_args(argv)
    rank, world, device = llamagen.setup_ddp()
    args.precision = args.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    model, tok = load(args, ckpt)
    check_classes(args, model.cfg.num_classes)
    model = model.to(device).eval()
    tok = tok.to(device).eval()
    generator = torch.Generator(device).manual_seed(args.seed * world + rank)
    if args.grid and rank == 0:
        write_grid(model, tok, args, generator, device)
    if args.benchmark and rank == 0:
        benchmark(model, tok, args, generator, device)
    if args.num_samples:
        write_npz(model, tok, args, generator, rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
