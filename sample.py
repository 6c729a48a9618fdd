"""
Sample a generator, ours or an official checkpoint: a PNG grid, or an ADM-style .npz for FID, on 1 process or N.
  python sample.py --ckpt results/001-llamagen-generator/last.pt --grid grid.png     # a row per class
  torchrun --nproc_per_node=8 sample.py --ckpt RUN/last.pt --num-samples 50000 --out samples.npz
  python sample.py --official --method llamagen --model GPT-B --gpt-ckpt c2i_B_256.pt --vq-ckpt vq_ds16_c2i.pt --benchmark
The .npz holds arr_0 uint8 (N, H, W, 3) and arr_1 labels (N,), class-balanced, as the ADM evaluator reads it.
"""
import argparse, importlib, inspect, math, os, time  # noqa: E401
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import vq


PAPER = {  # --official: each paper's FID sampling settings per model (../notes), at 256 px; command-line flags win
    'llamagen': {'GPT-B': dict(cfg_scale=2.0), 'GPT-L': dict(cfg_scale=2.0), **{m: dict(cfg_scale=s, image_size=384) for m, s in (('GPT-XL', 1.75), ('GPT-XXL', 1.75), ('GPT-3B', 1.65))}},
    'npp': {'GPT-B': dict(cfg_scale=2.0), 'GPT-L': dict(cfg_scale=1.75), 'GPT-XL': dict(cfg_scale=1.7), 'GPT-XXL': dict(cfg_scale=1.65)},
    'par': {m: dict(cfg_scale=s, image_size=384) for m, s in (('GPT-L', 1.6), ('GPT-XL', 1.5), ('GPT-XXL', 1.435), ('GPT-3B', 1.345), ('GPT-3B-16x', 1.5))},
    'rar': {m: dict(cfg_scale=g, guidance_scale_pow=p, temperature=t) for m, g, p, t in (('rar_b', 16.0, 2.75, 1.0), ('rar_l', 15.5, 2.5, 1.02), ('rar_xl', 6.9, 1.5, 1.02), ('rar_xxl', 8.0, 1.2, 1.02))},
    'iar2': {m: dict(cfg_scale1=(1.75, 3.0), cfg_scale2=(1.75, 3.0), w_attn=0.05, image_size=384) for m in ('IAR2-B', 'IAR2-L', 'IAR2-XL', 'IAR2-XXL')},
    'mar': {m: dict(cfg_scale=s, num_iter=256) for m, s in (('mar_base', 2.9), ('mar_large', 3.0), ('mar_huge', 3.2))},
}


def to_uint8(x):  # [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), as the official samplers (truncating)
    return (127.5 * x + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(x, path, nrow):  # x (N, 3, H, W) in [-1, 1] -> PNG, nrow images per row, 2-pixel gaps
    a = F.pad(to_uint8(x.float()), (0, 0, 2, 0, 2, 0), value=255).numpy()  # (N, H+2, W+2, 3)
    a = np.concatenate([a, np.full((-len(a) % nrow, *a.shape[1:]), 255, np.uint8)])
    a = a.reshape(-1, nrow, *a.shape[1:]).transpose(0, 2, 1, 3, 4).reshape(-1, nrow * a.shape[2], 3)
    Image.fromarray(np.pad(a, ((0, 2), (0, 2), (0, 0)), constant_values=255)).save(path)


def setup_ddp():  # torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; plain `python` runs one process
    rank, world, local = (int(os.environ.get(k, 0)) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    device = torch.device('cuda', local) if torch.cuda.is_available() else torch.device('cpu')
    if 'RANK' in os.environ:
        torch.cuda.set_device(device) if device.type == 'cuda' else None
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, max(world, 1), device


def save_checkpoint(obj, path):  # plain dicts, loadable with weights_only=True, written atomically
    torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)  # a crash mid-write never leaves a broken file


def load_checkpoint(path, method=None, stage=None):  # ours: plain dicts; official ones pickle an allow-listed Namespace
    if not os.path.isfile(path):
        raise SystemExit(f'{path}: no such checkpoint')
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # e.g. an UnpicklingError naming a refused global
        raise SystemExit(f'{path}: refusing to load (weights_only=True): {str(e).splitlines()[0]}')
    if not isinstance(ckpt, dict):  # weights_only lets plain tensors and lists through
        raise SystemExit(f'{path}: not a checkpoint (a {type(ckpt).__name__}, not a dict)')
    if (method and ckpt.get('method') != method) or (stage and ckpt.get('stage') != stage):
        raise SystemExit(f'{path}: a {ckpt.get("method")} {ckpt.get("stage")} checkpoint, not a {" ".join(filter(None, (method, stage)))} one')
    return ckpt


def tokenizer_sizes(module):  # the paper size first, a CPU size ending in '-tiny'
    return getattr(module, 'TOKENIZER_SIZES', vq.VQ_SIZES)


def derived_fields(cls, tok, image_size, num_classes):
    """The Config fields that the tokenizer and the data fix, by each method's official names."""
    known = dict(vocab_size=getattr(tok.cfg, 'codebook_size', None), block_size=(image_size // tok.stride) ** 2,
                 num_classes=num_classes, img_size=image_size, vae_stride=tok.stride,  # MAR
                 vae_embed_dim=getattr(tok.cfg, 'embed_dim', None), sub_vocab_size=getattr(tok.cfg, 'codebook_size_second', None))  # IAR2
    return {f.name: known[f.name] for f in fields(cls) if known.get(f.name) is not None}


def load_tokenizer(path, module, size=None):
    """Our tokenizer checkpoint (EMA weights if any), or an official one of size TOKENIZER_SIZES[size]."""
    ckpt = load_checkpoint(path)
    if ckpt.get('stage') != 'tokenizer':  # an official file: the paper's size unless --vq-model names another
        cfg = module.TokenizerConfig(**tokenizer_sizes(module)[size or next(iter(tokenizer_sizes(module)))])
        return module.load_official(module.Tokenizer(cfg), path)
    if ckpt['kind'] != module.Tokenizer.__name__:
        raise SystemExit(f'{path}: a {ckpt["kind"]} tokenizer; --method {module.__name__} needs a {module.Tokenizer.__name__}')
    tok = module.Tokenizer(module.TokenizerConfig(**ckpt['config']))
    tok.load_state_dict(ckpt.get('ema') or ckpt['model'])
    return tok


def load_generator(args):
    """-> (model, tokenizer) on CPU: ours from --ckpt (EMA weights if any), or official files."""
    if args.official:
        module = importlib.import_module(args.method)
        tok = load_tokenizer(args.vq_ckpt, module, args.vq_model)
        cfg = module.Config(**module.SIZES[args.model], **derived_fields(module.Config, tok, args.image_size, args.num_classes))
        return module.load_official(module.Model(cfg), args.gpt_ckpt), tok
    ckpt = load_checkpoint(args.ckpt, args.method, 'generator')
    module = importlib.import_module(ckpt['method'])
    model = module.Model(module.Config(**ckpt['config']))
    model.load_state_dict(ckpt.get('ema') or ckpt['model'])
    return model, load_tokenizer(ckpt['tokenizer'], module)


@torch.inference_mode()
def sample(model, tok, labels, args, generator):
    """labels (B,) -> images (B, 3, H, W) in [-1, 1], at --image-size-eval if given (bicubic, as official)."""
    knobs = {k: getattr(args, k) for k in generate_knobs(type(model)) if getattr(args, k, None) is not None}
    with torch.autocast(labels.device.type, torch.bfloat16, enabled=args.precision == 'bf16'):
        out = model.generate(labels, generator=generator, **knobs)
        img = (tok.decode_code(*out) if isinstance(out, tuple) else tok.decode_code(out)).float()
    size = args.image_size_eval or (min(img.shape[-1], 256) if args.official else img.shape[-1])  # papers' FID: 256 px
    return F.interpolate(img, size=size, mode='bicubic') if size != img.shape[-1] else img


def generate_knobs(cls):  # keyword arguments of the method's generate, with their defaults
    return {k: v.default for k, v in inspect.signature(cls.generate).parameters.items() if k != 'generator' and v.default is not v.empty}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    p.add_argument('--ckpt', help='our generator checkpoint (RUN/last.pt)')
    p.add_argument('--official', action='store_true', help='official files: --gpt-ckpt, --vq-ckpt, --model')
    p.add_argument('--method', choices=('llamagen', 'par', 'npp', 'rar', 'iar2', 'mar'), help='with --official: which method; otherwise checked against --ckpt')
    p.add_argument('--gpt-ckpt')
    p.add_argument('--vq-ckpt')
    p.add_argument('--model', help="size of the official generator (a key of the method's SIZES, e.g. GPT-B, rar_b)")
    p.add_argument('--vq-model', help='size of the official tokenizer (default: the first of the method TOKENIZER_SIZES)')
    p.add_argument('--image-size', type=int, default=256, help='official: the generator trained at this size')
    p.add_argument('--image-size-eval', type=int, help='resize samples to this size (bicubic; --official: 384 -> 256 as for the papers\' FID)')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--grid', help='write a PNG with a row per class')
    p.add_argument('--classes', type=int, nargs='+', help='grid classes (default: the first 10)')
    p.add_argument('--per-class', type=int, default=8, help='grid columns')
    p.add_argument('--num-samples', type=int, default=0, help='write this many class-balanced samples to --out')
    p.add_argument('--out', default='samples.npz')
    p.add_argument('--batch-size', type=int, default=32, help='per process')
    p.add_argument('--benchmark', action='store_true', help='print images/s and forward calls per image')
    p.add_argument('--precision', choices=('fp32', 'bf16'), help='default: bf16 on GPU, fp32 on CPU')
    p.add_argument('--seed', type=int, default=0)
    known = p.parse_known_args(argv)[0]  # the method's generate arguments become flags (default: the method's)
    train_args = load_checkpoint(known.ckpt).get('args', {}) if known.ckpt else {}
    method = known.method or train_args.get('method')
    for k, v in generate_knobs(importlib.import_module(method).Model).items() if method else ():
        kind = {tuple: float, type(None): float, bool: lambda s: s.lower() in ('1', 'true', 'yes')}.get(type(v), type(v))
        p.add_argument('--' + k.replace('_', '-'), type=kind, nargs='+' if isinstance(v, tuple) else None, help=f'default {v}')
    p.add_argument('-h', '--help', action='help')
    p.set_defaults(cfg_scale=train_args.get('cfg_scale'))  # our checkpoints: the scale of the training grids
    p.set_defaults(**PAPER.get(known.method, {}).get(known.model, {}) if known.official else {})
    args = p.parse_args(argv)
    if args.official and not (args.method and args.gpt_ckpt and args.vq_ckpt and args.model):
        p.error('--official needs --method, --model, --gpt-ckpt and --vq-ckpt')
    if not args.official and not args.ckpt:
        p.error('give --ckpt RUN/last.pt, or --official with the official files')
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_ddp()
    args.precision = args.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    model, tok = (m.to(device).eval() for m in load_generator(args))
    n_cls = model.cfg.num_classes
    g = torch.Generator(device).manual_seed(args.seed * world + rank)
    if args.grid and rank == 0:
        classes = torch.tensor(args.classes or range(min(n_cls, 10)), device=device)
        save_grid(sample(model, tok, classes.repeat_interleave(args.per_class), args, g), args.grid, args.per_class)
        print(f'wrote {args.grid}: {len(classes)} classes x {args.per_class}')
    if args.benchmark and rank == 0:
        labels = torch.arange(args.batch_size, device=device) % n_cls
        sample(model, tok, labels, args, g)  # warm-up
        torch.cuda.synchronize() if device.type == 'cuda' else None
        t0, reps = time.time(), 3
        for _ in range(reps):
            sample(model, tok, labels, args, g)
        torch.cuda.synchronize() if device.type == 'cuda' else None
        print(f'benchmark: {reps * args.batch_size / (time.time() - t0):.3g} images/s at batch {args.batch_size} on {device} '
              f'({args.precision}), {model.nfe} forward calls per image')
    if args.num_samples:
        per_rank = math.ceil(args.num_samples / (world * args.batch_size)) * args.batch_size  # whole batches
        labels = (torch.arange(per_rank * world) % n_cls)[rank::world]  # class-balanced; sample i on rank i % world
        imgs = [to_uint8(sample(model, tok, labels[i:i + args.batch_size].to(device), args, g)).numpy()
                for i in range(0, per_rank, args.batch_size)]
        np.save(f'{args.out}.part{rank}.npy', np.concatenate(imgs))
        dist.barrier() if dist.is_initialized() else None
        if rank == 0:  # interleave the parts back into sample order, keep the first N
            parts = [np.load(f'{args.out}.part{r}.npy') for r in range(world)]
            arr = np.stack(parts, 1).reshape(-1, *parts[0].shape[1:])[:args.num_samples]
            np.savez(args.out, arr_0=arr, arr_1=(np.arange(len(arr)) % n_cls))
            [os.remove(f'{args.out}.part{r}.npy') for r in range(world)]
            print(f'wrote {args.out}: arr_0 {arr.shape} {arr.dtype}, {n_cls} classes')
    dist.destroy_process_group() if dist.is_initialized() else None


if __name__ == '__main__':
    main()
