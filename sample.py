"""
Sample a generator, ours or an official checkpoint: a PNG grid, or an ADM-style .npz for FID, on
1 process or N.

  python sample.py --ckpt results/001-llamagen-generator/last.pt --grid grid.png   # a row per class
  torchrun --nproc_per_node=8 sample.py --ckpt RUN/last.pt --num-samples 50000 --out samples.npz
  python sample.py --official --method llamagen --model GPT-B --gpt-ckpt c2i_B_256.pt \\
      --vq-ckpt vq_ds16_c2i.pt --benchmark --download   # the files fetched into the cache once
  python sample.py --ckpt RUN/last.pt --trace trace.png      # the canvas after every forward call
  python sample.py --random-weights --method llamagen --model GPT-XL --image-size 384 \\
      --benchmark --compile                      # paper-size speed, no files; compiled step

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
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import llamagen

METHODS = ('llamagen', 'par', 'npp', 'rar', 'iar2', 'mar')


def generate_knobs(cls):
    """The keyword arguments of cls.generate with their defaults (the generator and the trace
    callback excluded)."""
    params = inspect.signature(cls.generate).parameters.items()
    return {k: v.default for k, v in params
            if k not in ('generator', 'trace') and v.default is not v.empty}


def knobs(model, args):  # the generate() keywords given as flags (or their defaults)
    return {k: getattr(args, k) for k in generate_knobs(type(model))
            if getattr(args, k, None) is not None}


@torch.inference_mode()
def sample(model, tok, labels, args, generator):
    """labels (B,) -> images (B, 3, H, W) in [-1, 1], resized (bicubic, as official) to
    --image-size-eval if given; official models are evaluated at 256 px, as in the papers."""
    with torch.autocast(labels.device.type, torch.bfloat16, enabled=args.precision == 'bf16'):
        codes = model.generate(labels, generator=generator, **knobs(model, args))
        img = tok.decode_code(codes).float()
    size = args.image_size_eval or (min(img.shape[-1], 256) if args.official else img.shape[-1])
    return F.interpolate(img, size=size, mode='bicubic') if size != img.shape[-1] else img


def load(args, ckpt, rank=0):
    """-> (model, tokenizer) on the CPU: our run (ckpt, read from --ckpt) or the official files
    (--download: rank 0 fetches them, the other ranks wait for them)."""
    module = importlib.import_module(args.method)
    if ckpt is not None:  # --weights raw: the trained weights, not the EMA
        return llamagen.load_generator(module, ckpt, args.ckpt, ema=args.weights != 'raw')
    if args.random_weights:  # the paper's tokenizer config, its weights random as the model's
        cfg = module.TOKENIZER_SIZES[args.vq_model or next(iter(module.TOKENIZER_SIZES))]
        tok = module.Tokenizer(module.TokenizerConfig(**cfg))
        derived = module.derive_config(tok, args.image_size, args.num_classes)
        return module.Model(module.Config(**module.SIZES[args.model], **derived)), tok
    tok = official_file(args.vq_ckpt, args.download, rank,
                        lambda path: llamagen.load_tokenizer(module, path, args.vq_model))
    derived = module.derive_config(tok, args.image_size, args.num_classes)
    model = module.Model(module.Config(**module.SIZES[args.model], **derived))
    model = official_file(args.gpt_ckpt, args.download, rank,
                          lambda path: module.load_official(model, path))
    return model, tok


def official_file(name, download, rank, load):
    """load(path) of --gpt-ckpt / --vq-ckpt: the file given, or with --download the released file
    of that name, from the download cache (fetched there first if need be: llamagen.download)."""
    if download and not os.path.isfile(name):
        return llamagen.load_released(name, load, rank)
    return load(name)


def write_grid(model, tok, args, generator, device):  # one row per class
    classes = torch.tensor(args.classes or range(min(model.cfg.num_classes, 10)), device=device)
    images = sample(model, tok, classes.repeat_interleave(args.per_class), args, generator)
    llamagen.save_grid(images, args.grid, args.per_class)
    print(f'wrote {args.grid}: {len(classes)} classes x {args.per_class}')


def benchmark(model, tok, args, generator, device, reps=3):
    """Images/s over reps batches after one warm-up batch (--compile: the compilation), forward
    calls per image and, on CUDA, the peak memory of the timed batches."""
    labels = torch.arange(args.batch_size, device=device) % model.cfg.num_classes
    sample(model, tok, labels, args, generator)
    synchronize(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    for _ in range(reps):
        sample(model, tok, labels, args, generator)
    synchronize(device)
    speed = reps * args.batch_size / (time.time() - t0)
    mode = 'compiled' if args.compile else 'eager'
    memory = ''
    if device.type == 'cuda':
        memory = f', peak memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB'
    print(f'benchmark: {speed:.3g} images/s at batch {args.batch_size} on {device} '
          f'({args.precision}, {mode}), {model.nfe} forward calls per image{memory}')


def compile_sampling(model, device):
    """--compile: the method's compile_sampling, CUDA graphs on CUDA (mode='reduce-overhead'). The
    token methods compile their cached forward call (decode), MAR its DiffLoss step."""
    mode = None
    if device.type == 'cuda':
        mode = 'reduce-overhead'
    model.compile_sampling(mode)


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
    # one bar, rank 0's, counting every rank's images: the ranks go in step, a batch each
    bar = tqdm(total=per_rank * world, desc='sampling', unit='img', disable=rank != 0)
    for i in range(0, per_rank, args.batch_size):
        batch = labels[i:i + args.batch_size].to(device)
        imgs.append(llamagen.to_uint8(sample(model, tok, batch, args, generator)).numpy())
        bar.update(len(batch) * world)
    bar.close()
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


# --- --trace: the canvas after every forward call of generate ----------------------------------
GREY = (128, 128, 128)  # the token positions not generated yet
FRESH = (255, 32, 32)  # the outline of the positions a call generated
# the order map's colours, call 1 to the last: viridis at 5 points, interpolated
VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)])
TEXT = 16  # pixels of label above each picture (a 12 px font)
COLS = 16  # pictures per row


@torch.inference_mode()
def record_trace(model, labels, args, generator):
    """labels (B,) -> (sample, calls): the finished codes and, for each forward call of generate,
    a dict (on the CPU) of its canvas 'codes', 'filled' (B, L) bool, 'uncond' (or None) and
    'denoising' (MAR: (label 'i/n', latents) for at most COLS of DiffLoss's n steps, evenly
    spaced, the last included; others: empty)."""
    calls = []

    def trace(codes, filled, uncond=None, denoising=None):
        n = len(denoising or ())
        shown = sorted({round(i) for i in np.linspace(0, n - 1, min(n, COLS))})
        steps = [(f'{i + 1}/{n}', denoising[i].cpu()) for i in shown]
        if uncond is not None:
            uncond = uncond.cpu()
        calls.append(dict(codes=codes.cpu(), filled=filled.cpu(), uncond=uncond,
                          denoising=steps))

    with torch.autocast(labels.device.type, torch.bfloat16, enabled=args.precision == 'bf16'):
        codes = model.generate(labels, generator=generator, trace=trace, **knobs(model, args))
    return codes, calls


@torch.inference_mode()
def decode(tok, codes, args, device, batch=64):
    """A list of N codes tensors (B, ...) -> uint8 (N, B, H, W, 3), decoded `batch` at a time."""
    flat = torch.cat(codes)
    images = []
    with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == 'bf16'):
        for i in range(0, len(flat), batch):
            img = tok.decode_code(flat[i:i + batch].to(device)).float()
            images.append(llamagen.to_uint8(img).numpy())
    images = np.concatenate(images)
    return images.reshape(len(codes), -1, *images.shape[1:])


def draw_canvas(img, filled, fresh, scale):
    """img uint8 (H, W, 3), filled / fresh (L,) bool over the token grid (raster order) -> a PIL
    image scale times larger (nearest): the tokens not generated yet grey, each token of this call
    outlined. A token is a block of H / sqrt(L) pixels."""
    g = math.isqrt(len(filled))
    b = img.shape[0] // g  # pixels per token side
    todo = np.kron(~filled.reshape(g, g), np.ones((b, b), dtype=bool))  # (H, W)
    img = np.where(todo[..., None], np.uint8(GREY), img)
    im = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    s = b * scale
    for i in np.flatnonzero(fresh):
        r, c = divmod(int(i), g)
        draw.rectangle([c * s, r * s, c * s + s - 1, r * s + s - 1], outline=FRESH)
    return im


def heat(t):
    """t in [0, 1] (L,) -> uint8 (L, 3) colours along VIRIDIS."""
    x = t * (len(VIRIDIS) - 1)
    i = np.minimum(x.astype(int), len(VIRIDIS) - 2)
    f = (x - i)[:, None]
    return (VIRIDIS[i] * (1 - f) + VIRIDIS[i + 1] * f).round().astype(np.uint8)


def number_font(s, most):
    """The largest font (7 px to 0.6 s, at most 16) in which the number `most` fits a token of s
    pixels with 2 pixels either side; None when even 7 px does not: it would not be legible."""
    for size in range(min(16, int(0.6 * s)), 6, -1):
        font = ImageFont.load_default(size=size)
        if font.getlength(str(most)) <= s - 4:
            return font
    return None


def draw_order(order, upto, size):
    """order (L,) the call (1..K) that generated each token, raster order -> a size x size PIL
    image: the generation order as a heat map (dark: early, yellow: late) with the call number
    written where it fits; the tokens of calls after upto grey (the GIF grows the map)."""
    g = math.isqrt(len(order))
    s = size // g  # pixels per token side
    most = int(order.max())
    colours = heat((order - 1) / max(most - 1, 1))
    colours[order > upto] = GREY
    im = Image.fromarray(colours.reshape(g, g, 3)).resize((g * s, g * s), Image.NEAREST)
    font = number_font(s, most)
    if font is None:
        return im
    draw = ImageDraw.Draw(im)
    for i in np.flatnonzero(order <= upto):
        r, c = divmod(int(i), g)
        ink = 'black' if order[i] > (most + 1) / 2 else 'white'  # on yellow-green, on blue
        xy = ((c + 0.5) * s, (r + 0.5) * s)
        draw.text(xy, str(int(order[i])), fill=ink, font=font, anchor='mm')
    return im


def pair(a, b):  # two pictures side by side, 2 pixels apart
    out = Image.new('RGB', (a.width + 2 + b.width, max(a.height, b.height)), 'white')
    out.paste(a, (0, 0))
    out.paste(b, (a.width + 2, 0))
    return out


def page(title, blocks):
    """A picture of labelled pictures: the title, then per block (heading, cells) its cells, each
    (label, PIL image), in rows of COLS pictures (a pair counts two)."""
    font = ImageFont.load_default(size=12)  # 11 px: spaces of 2 px
    placed = []  # (x, y, label, image or None)
    width = int(font.getlength(title)) + 8
    y = TEXT + 4
    for heading, cells in blocks:
        placed.append((4, y, heading, None))
        y += TEXT
        per_row = max(1, COLS * cells[0][1].height // cells[0][1].width)
        for i in range(0, len(cells), per_row):
            x = 4
            row = cells[i:i + per_row]
            for label, im in row:
                placed.append((x, y, label, im))
                x += im.width + 4
            width = max(width, x)
            y += TEXT + max(im.height for _, im in row) + 4
        y += 4
    out = Image.new('RGB', (width, y), 'white')
    draw = ImageDraw.Draw(out)
    draw.text((4, 2), title, fill='black', font=font)
    for x, y0, label, im in placed:
        draw.text((x, y0), label, fill='black', font=font)
        if im is not None:
            out.paste(im, (x, y0 + TEXT))
    return out


def trace_pictures(tok, calls, args, device):
    """The calls of record_trace -> (frames, order, denoising) per class b: frames[b] the K
    canvases as PIL images (--trace-cfg: each paired with the unconditional one), order[b] (L,)
    the call that generated each token, denoising[b] the middle call's labelled DiffLoss steps
    (empty when the calls report none)."""
    K = len(calls)
    filled = torch.stack([c['filled'] for c in calls]).numpy()  # (K, B, L)
    fresh = filled & ~np.concatenate([np.zeros_like(filled[:1]), filled[:-1]])
    images = decode(tok, [c['codes'] for c in calls], args, device)  # (K, B, H, W, 3)
    scale = max(1, 96 // images.shape[2])  # 32 px -> 96 px
    uncond = None
    if args.trace_cfg:
        uncond = decode(tok, [c['uncond'] for c in calls], args, device)
    frames = []
    for b in range(images.shape[1]):
        frames.append([draw_canvas(images[k, b], filled[k, b], fresh[k, b], scale)
                       for k in range(K)])
        if uncond is not None:
            ours = [draw_canvas(uncond[k, b], filled[k, b], fresh[k, b], scale) for k in range(K)]
            frames[b] = [pair(f, u) for f, u in zip(frames[b], ours)]
    m = K // 2  # the middle call
    steps = calls[m]['denoising']
    denoising = [[] for _ in frames]
    if steps:
        x = decode(tok, [latents for _, latents in steps], args, device)  # (steps, B, H, W, 3)
        for b, row in enumerate(denoising):
            for j, (label, _) in enumerate(steps):
                row.append((label, draw_canvas(x[j, b], filled[m, b], fresh[m, b], scale)))
    return frames, 1 + (~filled).sum(0), denoising


def write_trace(model, tok, args, device):
    """--trace: for each of --classes (default the first 4), the decoded canvas after every
    forward call of generate, then the order map; a .gif has a frame per call. The samples are
    those of --grid with --per-class 1 and the same --seed: the trace has a generator of its
    own, so what else this run samples does not change."""
    classes = list(args.classes or range(min(model.cfg.num_classes, 4)))
    generator = torch.Generator(device).manual_seed(args.seed)
    _, calls = record_trace(model, torch.tensor(classes, device=device), args, generator)
    if args.trace_cfg and calls[0]['uncond'] is None:
        raise SystemExit('--trace-cfg: these settings sample without guidance, so there is no '
                         'unconditional branch to show (give a CFG scale other than 1)')
    frames, order, denoising = trace_pictures(tok, calls, args, device)
    K, size = len(calls), frames[0][0].height
    title = (f'{args.method}: {K} forward calls; grey: not generated yet; red: generated by the '
             'call')
    if args.trace_cfg:
        title += '; right of each: the same call, unconditional branch alone'
    if args.trace.lower().endswith('.gif'):
        pages = []
        for k in range(K):
            blocks = [(f'class {c}', [(f'call {k + 1}/{K}', frames[b][k]),
                                      ('order', draw_order(order[b], k + 1, size))])
                      for b, c in enumerate(classes)]
            pages.append(page(title, blocks))
        pages[0].save(args.trace, save_all=True, append_images=pages[1:], loop=0,
                      duration=[250] * (K - 1) + [2000])
    else:
        blocks = []
        for b, c in enumerate(classes):
            cells = [(str(k + 1), im) for k, im in enumerate(frames[b])]
            blocks.append((f'class {c}', cells + [('order', draw_order(order[b], K, size))]))
            if denoising[b]:
                heading = f'class {c}, call {K // 2 + 1}: the DiffLoss sample after step i/n'
                blocks.append((heading, denoising[b]))
        page(title, blocks).save(args.trace)
    print(f'wrote {args.trace}: {len(classes)} classes x {K} forward calls')


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
    if args.trace_cfg and not args.trace:
        p.error('--trace-cfg needs --trace FILE.png or FILE.gif')
    if args.random_weights and not (args.benchmark and args.method and args.model):
        p.error('--random-weights is for --benchmark, with --method and --model (no files)')
    if args.random_weights and (args.grid or args.trace or args.num_samples):
        p.error('--random-weights samples noise: only --benchmark, no --grid, --trace or --out')
    if args.download and not args.official:
        p.error('--download fetches the official files: --official --gpt-ckpt NAME --vq-ckpt NAME')


def check_outputs(args):
    """Stop with one line unless every file this run will write can be written: found out
    before the sampling (hours at 50,000 samples), not after it."""
    outputs = []
    if args.grid:
        outputs.append(('--grid', args.grid))
        ext = os.path.splitext(args.grid)[1].lower()
        if ext not in Image.registered_extensions():  # PIL picks the format by the extension
            raise SystemExit(f"--grid {args.grid}: unknown image format '{ext}' (use .png)")
    if args.trace:
        outputs.append(('--trace', args.trace))
        ext = os.path.splitext(args.trace)[1].lower()
        if ext not in ('.png', '.gif'):
            raise SystemExit(f"--trace {args.trace}: unknown format '{ext}' (use .png or .gif)")
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


def check_official_files(args):
    """Stop with one line, before any work, on a --gpt-ckpt / --vq-ckpt that is no file: with
    --download, unless it is a released file's name (the line lists them); without, say that
    --download fetches it when it is one."""
    for flag, name in (('--gpt-ckpt', args.gpt_ckpt), ('--vq-ckpt', args.vq_ckpt)):
        if os.path.isfile(name):
            continue
        if args.download:
            llamagen.released(name)
        elif name in llamagen.RELEASES:
            raise SystemExit(f'{flag} {name}: no such file; it is a released one: --download '
                             f'fetches it into {llamagen.cache_dir()}')


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
    p.add_argument('--weights', choices=('ema', 'raw'),
                   help='--ckpt: the EMA weights (the default when the run has them) or the '
                        'trained (raw) ones')
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
    p.add_argument('--download', action='store_true', help='--official: a --gpt-ckpt/--vq-ckpt '
                   "that is no file but a released file's name (README) is fetched from its "
                   'authors into the download cache ($AR_MINIMAL_CACHE, else '
                   '$XDG_CACHE_HOME/ar-minimal or ~/.cache/ar-minimal) and used from there')
    p.add_argument('--image-size', type=int, default=256,
                   help='official: the generator trained at this size')
    p.add_argument('--image-size-eval', type=int, help='resize samples to this size (bicubic; '
                   '--official: 384 -> 256 as for the papers\' FID)')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--grid', help='write a PNG with a row per class')
    p.add_argument('--classes', type=int, nargs='+',
                   help='grid classes (default: the first 10), trace classes (the first 4)')
    p.add_argument('--per-class', type=int, default=8, help='grid columns')
    p.add_argument('--num-samples', type=int, default=0,
                   help='write this many class-balanced samples to --out')
    p.add_argument('--out', default='samples.npz')
    p.add_argument('--batch-size', type=int, default=32, help='per process')
    p.add_argument('--trace', help='write the decoded canvas after every forward call of '
                   'generate and the generation order: a .png, or a .gif of a frame per call')
    p.add_argument('--trace-cfg', action='store_true', help='--trace: beside each canvas, the '
                   "same call's tokens from the unconditional branch alone (needs guidance)")
    p.add_argument('--benchmark', action='store_true',
                   help='print images/s and forward calls per image')
    p.add_argument('--random-weights', action='store_true', help='--benchmark a model of '
                   '--method/--model/--image-size with random weights (and its paper tokenizer '
                   'config): no files')
    p.add_argument('--compile', action='store_true', help='torch.compile the sampling step, '
                   "CUDA graphs on CUDA: the cached forward call; MAR's DiffLoss step")
    p.add_argument('--precision', choices=('fp32', 'bf16'),
                   help='default: bf16 on GPU, fp32 on CPU')
    p.add_argument('--seed', type=int, default=0)
    known = p.parse_known_args(argv)[0]
    if known.official and not (known.method and known.gpt_ckpt and known.vq_ckpt and known.model):
        p.error('--official needs --method, --model, --gpt-ckpt and --vq-ckpt')
    if not (known.official or known.ckpt or known.random_weights):
        p.error('give --ckpt RUN/last.pt, or --official with the official files')
    check_flags(p, known)
    check_outputs(known)
    if known.official:
        check_official_files(known)
    ckpt = None
    if not (known.official or known.random_weights):
        ckpt = llamagen.load_file(known.ckpt)
        llamagen.check_run(ckpt, known.ckpt, known.method or ckpt.get('method'), 'generator')
        p.set_defaults(method=ckpt['method'], cfg_scale=ckpt['args'].get('cfg_scale'))
        if known.weights == 'ema' and not ckpt.get('ema'):
            p.error(f'--weights ema: {known.ckpt} has no EMA weights (trained without --ema)')
    elif known.weights:
        p.error('--weights is for our checkpoints (--ckpt)')
    module = importlib.import_module(known.method or ckpt['method'])
    if known.random_weights and known.model not in module.SIZES:
        p.error(f'--model {known.model}: not a size of {known.method} ({", ".join(module.SIZES)})')
    for k, v in generate_knobs(module.Model).items():  # the method's generate() knobs -> flags
        kind = {tuple: float, type(None): float, bool: parse_bool}.get(type(v), type(v))
        p.add_argument('--' + k.replace('_', '-'), type=kind,
                       nargs='+' if isinstance(v, tuple) else None, help=f'default {v}')
    p.add_argument('-h', '--help', action='help')
    if known.official or known.random_weights:  # the paper's settings for this model; flags win
        p.set_defaults(**module.PAPER.get(known.model, {}))
    return p.parse_args(argv), ckpt


def main(argv=None):
    args, ckpt = parse_args(argv)
    rank, world, device = llamagen.setup_ddp()
    args.precision = args.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    model, tok = load(args, ckpt, rank)
    check_classes(args, model.cfg.num_classes)
    model = model.to(device).eval()
    tok = tok.to(device).eval()
    if args.compile:
        compile_sampling(model, device)
    generator = torch.Generator(device).manual_seed(args.seed * world + rank)
    if args.grid and rank == 0:
        write_grid(model, tok, args, generator, device)
    if args.trace and rank == 0:
        write_trace(model, tok, args, device)
    if args.benchmark and rank == 0:
        benchmark(model, tok, args, generator, device)
    if args.num_samples:
        write_npz(model, tok, args, generator, rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
