"""Train a tokenizer or a generator, on 1 process or N (torchrun), on the built-in dataset or an ImageFolder.

  python train.py --method llamagen                       # classroom run: built-in 32x32 data, CPU
  torchrun --nproc_per_node=8 train.py --method llamagen --model GPT-B --data-path /imagenet/train \
      --image-size 256 --tokenizer vq_ds16_c2i.pt --epochs 300 --global-batch-size 256 --lr 1e-4
--stage tokenizer trains the method's Tokenizer; --stage generator (default) trains the method's Model
on tokens extracted once (image and flip) by the frozen tokenizer. Without --tokenizer, the default
tokenizer for the dataset is trained first and cached under --results-dir.
Chapters: data, DDP setup, output dir, tokenizer, model, EMA, optimizer, loop, checkpoint, cleanup.
"""
import argparse, copy, hashlib, importlib, json, math, os, time  # noqa: E401
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import vq
from sample import derived_fields, load_checkpoint, load_tokenizer, save_checkpoint, save_grid, setup_ddp, tokenizer_sizes

METHODS = tuple(m for m in ('llamagen', 'par', 'npp', 'rar', 'iar2', 'mar') if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), m + '.py')))
STAGE_DEFAULTS = {  # the classroom run on the built-in dataset (model: the method's size ending in 'tiny')
    'tokenizer': dict(lr=1e-3, global_batch_size=32, max_steps=400, warmup_steps=0, lr_schedule='constant'),
    'generator': dict(lr=1e-3, global_batch_size=64, max_steps=800, warmup_steps=100, lr_schedule='constant')}

# --- data: the built-in dataset ---------------------------------------------------------------------
CLASSES = ('red disk', 'blue square', 'green triangle', 'yellow ring', 'magenta cross',
           'cyan h-stripes', 'orange v-stripes', 'white checker', 'pink dots', 'purple gradient')
COLORS = ((220, 40, 40), (40, 80, 230), (40, 200, 60), (230, 210, 40), (210, 40, 210),
          (40, 210, 220), (240, 140, 30), (230, 230, 230), (250, 130, 170), (120, 60, 230))


def render(index, size=32, seed=0):
    """Image `index` of the built-in dataset: (size, size, 3) uint8 and its label (index % 10).
    Shape, colour and texture define a class; position, size, hue and background vary within it."""
    rng, label, s = np.random.default_rng([seed, index]), index % len(CLASSES), 2 * size  # drawn at 2x
    bg = tuple(int(v) for v in rng.integers(0, 60, 3))
    fg = tuple(int(np.clip(c + rng.integers(-35, 36), 0, 255)) for c in COLORS[label])
    img = Image.new('RGB', (s, s), bg)
    d, r, (cx, cy) = ImageDraw.Draw(img), s * rng.uniform(0.16, 0.3), s * rng.uniform(0.32, 0.68, 2)
    box, w = [cx - r, cy - r, cx + r, cy + r], r * 0.35
    if label in (0, 1):
        (d.ellipse if label == 0 else d.rectangle)(box, fill=fg)
    elif label == 2:
        d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fg)
    elif label == 3:
        d.ellipse(box, outline=fg, width=max(2, int(w)))
    elif label == 4:
        [d.rectangle(b, fill=fg) for b in ([cx - r, cy - w, cx + r, cy + w], [cx - w, cy - r, cx + w, cy + r])]
    elif label in (5, 6):  # stripes with a random period and phase
        period, phase = s * rng.uniform(0.15, 0.3), rng.uniform(0, 1)
        for a in (np.arange(-1, s / period + 2) + phase) * period:
            d.rectangle([0, a, s, a + period / 2] if label == 5 else [a, 0, a + period / 2, s], fill=fg)
    elif label == 7:
        cell, (ox, oy) = s * rng.uniform(0.12, 0.22), rng.uniform(-s * 0.2, 0, 2)
        for i in range(int(s / cell) + 2):
            for j in range(i % 2, int(s / cell) + 2, 2):
                d.rectangle([ox + j * cell, oy + i * cell, ox + (j + 1) * cell, oy + (i + 1) * cell], fill=fg)
    elif label == 8:
        for px, py in s * rng.uniform(0.2, 0.8, (2, 2)):
            d.ellipse([px - 0.45 * r, py - 0.45 * r, px + 0.45 * r, py + 0.45 * r], fill=fg)
    else:  # a linear ramp from the background to the class colour, along a random diagonal
        t = np.linspace(0, 1, s)
        ramp = (np.add.outer(t, t if rng.uniform() < 0.5 else 1 - t) / 2)[..., None]
        img = Image.fromarray((np.array(bg) * (1 - ramp) + np.array(fg) * ramp).astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.BOX)), label


def builtin_images(n, image_size=32, seed=0):
    """The first n built-in images: uint8 (n, H, W, 3) and int64 labels (n,)."""
    imgs, labels = zip(*(render(i, image_size, seed) for i in range(n)))
    return np.stack(imgs), np.array(labels, dtype=np.int64)


# --- data: ImageFolder (one sub-folder per class; sorted names give the standard ImageNet indices) ---
def center_crop_arr(pil, size):  # ADM: halve with BOX while large, BICUBIC to size, centre crop
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    arr = np.asarray(pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC))
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


class ImageFolder(Dataset):
    def __init__(self, root, size):
        if not os.path.isdir(root):
            raise SystemExit(f'train.py: --data-path {root}: not a directory')
        self.root, self.size, self.classes = root, size, sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.samples = [(os.path.join(root, c, f), y) for y, c in enumerate(self.classes) for f in sorted(os.listdir(os.path.join(root, c)))
                        if f.lower().endswith(('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.gif', '.tif', '.tiff', '.jfif'))]
        if not self.samples:
            raise SystemExit(f'train.py: --data-path {root}: no images (expected one sub-folder of images per class)')
        self.key = os.path.basename(os.path.normpath(root)) + '-' + hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:8]

    def __len__(self): return len(self.samples)  # noqa: E704

    def __getitem__(self, i):  # -> uint8 (3, H, W), label; an unreadable image is reported and replaced by the next
        for path, y in (self.samples[j % len(self.samples)] for j in range(i, i + 20)):
            try:
                return torch.from_numpy(center_crop_arr(Image.open(path).convert('RGB'), self.size).copy()).permute(2, 0, 1), y
            except Exception:
                print(f'train.py: skipping unreadable image {path}', flush=True)
        raise RuntimeError(f'train.py: --data-path {self.root}: 20 unreadable images in a row; stopped')


def batches(dataset, local_bs, seed, rank, world, start_step, workers):
    """Endless batches of a DistributedSampler; resuming at start_step skips the indices already used."""
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // local_bs
    if per_epoch == 0:
        raise SystemExit(f'train.py: {len(dataset)} samples are fewer than one global batch')
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        yield from DataLoader(dataset, local_bs, sampler=list(sampler)[skip * local_bs:per_epoch * local_bs], num_workers=workers)
        epoch, skip = epoch + 1, 0


def config_from(cls, args, size, **derived):  # size preset, then --flags, then data-derived fields
    over = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**{**size, **over, **derived})


@torch.inference_mode()
def extract_codes(tok, dataset, args, rank, world, device):
    """Token ids of every image and its flip, computed once (sharded over ranks) and cached."""
    key = f'{os.path.abspath(args.tokenizer)}{os.stat(args.tokenizer).st_mtime_ns}{dataset.key}{args.image_size}'
    path = os.path.join(args.results_dir, 'codes', hashlib.sha1(key.encode()).hexdigest()[:12] + '.pt')
    if not os.path.exists(path):  # each rank encodes its shard; rank 0 joins them
        os.makedirs(os.path.dirname(path), exist_ok=True)
        codes, labels = [], []
        for x, y in DataLoader(Subset(dataset, range(rank, len(dataset), world)), 64):
            x = x.to(device).float() / 127.5 - 1
            c = torch.stack([tok.encode(x), tok.encode(x.flip(-1))], 1)  # (B, 2, ...): ids (h, w), IAR2 (2, h, w), MAR moments
            codes.append((c if c.is_floating_point() else c.flatten(2).int()).cpu())  # ids -> (B, 2, L) raster order
            labels.append(y)
        torch.save({'codes': torch.cat(codes), 'labels': torch.cat(labels)}, f'{path}.part{rank}')
        dist.barrier() if dist.is_initialized() else None
        if rank == 0:
            parts = [torch.load(f'{path}.part{r}', weights_only=True) for r in range(world)]
            order = torch.cat([torch.arange(r, len(dataset), world) for r in range(world)]).argsort()  # dataset order
            save_checkpoint({k: torch.cat([p[k] for p in parts])[order] for k in ('codes', 'labels')}, path)
            [os.remove(f'{path}.part{r}') for r in range(world)]
        dist.barrier() if dist.is_initialized() else None
    data = torch.load(path, weights_only=True)  # codes (N, 2, ...) -> (2N, ...): each image and its flip
    return TensorDataset(data['codes'].flatten(0, 1), data['labels'].repeat_interleave(2))


# --- one stage: output dir, model, EMA, optimizer, loop, checkpoint -----------------------------------
def train_stage(args, module, stage, data, rank, world, device, tok=None):
    # output dir: rank 0's choice; a run is never overwritten unless resumed
    n_runs = len(os.listdir(args.results_dir)) if os.path.isdir(args.results_dir) else 0
    box = [args.run_dir or os.path.join(args.results_dir, f'{n_runs:03d}-{args.method}-{stage}')]
    dist.broadcast_object_list(box) if dist.is_initialized() else None
    run, master, ckpt_path = box[0], rank == 0, os.path.join(box[0], 'last.pt')
    if os.path.exists(ckpt_path) and args.resume != ckpt_path:
        raise SystemExit(f'train.py: {ckpt_path} exists; pass --resume {ckpt_path} or another --run-dir')
    resume = load_checkpoint(args.resume, args.method, stage) if args.resume else None
    os.makedirs(os.path.join(run, 'samples'), exist_ok=True) if master else None
    # model (its config from the checkpoint when resuming); the tokenizer stage adds a PatchGAN
    per_sample = 1 if tok is None else (args.image_size // tok.stride) ** 2  # tokens per image
    cfg = (config_from(module.TokenizerConfig, args, tokenizer_sizes(module)[args.model]) if stage == 'tokenizer' else
           config_from(module.Config, args, module.SIZES[args.model], **derived_fields(module.Config, tok, args.image_size, len(data.classes))))
    cfg = type(cfg)(**resume['config']) if resume else cfg
    torch.manual_seed(args.seed)  # the same initial weights on every rank and run
    model = (module.Tokenizer if stage == 'tokenizer' else module.Model)(cfg).to(device)
    if args.image_size % (tok or model).stride:
        raise SystemExit(f'train.py: --image-size {args.image_size} is not divisible by the tokenizer stride {(tok or model).stride}')
    data = extract_codes(tok, data, args, rank, world, device) if stage == 'generator' else data
    disc = vq.PatchGAN(n_layers=min(3, args.image_size.bit_length() - 3)).to(device) if stage == 'tokenizer' else None  # 2 below 32px
    lpips = vq.LPIPS.load(*args.lpips.split(',')).to(device) if args.lpips and stage == 'tokenizer' else None
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema > 0 else None
    # optimizer: AdamW, weight decay on >= 2-D weights but MAR's DiffLoss (official); none for tokenizers (officially Adam)
    params, fused, wd = list(model.parameters()), device.type == 'cuda', args.weight_decay if stage == 'generator' else 0.0
    opt = torch.optim.AdamW([{'params': [p for n, p in model.named_parameters() if (p.dim() >= 2 and 'diffloss' not in n) == d],
                              'weight_decay': w} for d, w in ((True, wd), (False, 0.0))], lr=args.lr, betas=(0.9, 0.95), fused=fused)
    opt_d = torch.optim.AdamW(disc.parameters(), args.lr, (0.9, 0.95), weight_decay=0.0, fused=fused) if disc else None
    state = dict(model=model, optimizer=opt, ema=ema, discriminator=disc, optimizer_disc=opt_d)  # what we checkpoint
    [obj.load_state_dict(resume[k]) for k, obj in state.items() if resume and obj is not None]
    step = start = resume['step'] if resume else 0
    ddp_model, ddp_disc = (DDP(m, find_unused_parameters=stage == 'tokenizer') if m is not None and dist.is_initialized() else m
                           for m in (model, disc))  # (IAR2's tokenizer leaves a codebook unused on some steps)
    it = batches(data, args.global_batch_size // world, args.seed, rank, world, step, args.num_workers if args.data_path else 0)
    total = args.max_steps if args.epochs is None else args.epochs * (len(data) // (2 if tok else 1) // args.global_batch_size)  # epochs over images, not image + flip
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')
    print(f'{stage}: {type(model).__name__} {sum(p.numel() for p in params) / 1e6:.2f}M params, {len(data)} samples, {total} steps, run {run}') if master else None
    loss_sum, t0, bar = torch.zeros((), device=device), time.time(), tqdm(total=total, initial=step, disable=not master)  # loop
    while step < total:
        x, y = (t.to(device, non_blocking=True) for t in next(it))  # (a new DataLoader draws from the RNG)
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # then reseed: resume-exact, per rank
        scale = model.on_step(step, total)  # schedules of the method; a float: it owns the LR schedule
        opt.param_groups[0]['lr'] = opt.param_groups[1]['lr'] = lr = lr_at(step, total, args) if scale is None else args.lr * scale
        with autocast:
            if stage == 'tokenizer':  # random flip; L2 + quantizer losses (+ hinge generator loss)
                x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(-1), x).float() / 127.5 - 1
                recon, qloss = ddp_model(x)
                loss = F.mse_loss(recon.float(), x) + sum(qloss.values()) + (0.0 if lpips is None else lpips(recon.float(), x).mean())
                loss = loss - args.disc_weight * ddp_disc(recon).float().mean() if step >= args.disc_start else loss
            else:  # MAR: cached posterior moments -> a fresh latent sample each step, as official
                out = ddp_model(tok.sample(x) if x.is_floating_point() else x.long(), y)
                loss = out[1] if isinstance(out, tuple) else out  # (logits, loss), or MAR's loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        if disc is not None and step >= args.disc_start:  # discriminator: real vs detached fakes
            with autocast:
                d_loss = vq.hinge_d_loss(ddp_disc(x).float(), ddp_disc(recon.detach()).float())
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        if ema is not None:  # exponential moving average of the parameters; buffers are copied
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), params, 1 - args.ema)
                [e.copy_(b) for e, b in zip(ema.buffers(), model.buffers())]
        loss_sum, step = loss_sum + loss.detach(), step + 1
        bar.update(1)
        if (step % args.log_every == 0 or step % args.ckpt_every == 0 or step == total) and not torch.stack(
                [p.isfinite().all() for p in params]).all():  # a NaN/inf loss poisons the weights: keep the last good save
            raise SystemExit(f'train.py: loss is nan or inf by step {step}; stopped. Last good checkpoint: {ckpt_path if os.path.exists(ckpt_path) else "none"}')
        if step % args.log_every == 0 or step == total:  # rank-averaged loss since the last log line
            dist.all_reduce(loss_sum) if dist.is_initialized() else None
            avg, dt = loss_sum.item() / (((step - 1) % args.log_every + 1) * world), time.time() - t0
            rec = {'step': step, 'loss': avg, 'lr': lr, 'elapsed': round(dt, 1), ('tokens/s' if per_sample > 1 else 'images/s'):
                   round((step - start) * args.global_batch_size * per_sample / max(dt, 1e-9), 1)}
            rec.update({'codebook usage': round(model.quantize.usage(), 4)} if hasattr(model, 'quantize') else {})
            if master:
                bar.write(' '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in rec.items()))
                print(json.dumps(rec), file=open(os.path.join(run, 'log.jsonl'), 'a'), flush=True)
                save_curve(os.path.join(run, 'log.jsonl'), os.path.join(run, 'loss.png'))
            loss_sum.zero_()
        if master and (step % args.sample_every == 0 or step == total):
            grid(model if ema is None else ema, x, tok, args, os.path.join(run, 'samples', f'{step:07d}.png'))
        if step % args.ckpt_every == 0 or step == total:
            ck = {k: obj.state_dict() for k, obj in state.items() if obj is not None}
            ck.update(step=step, method=args.method, stage=stage, kind=type(model).__name__, config=asdict(cfg),
                      args=vars(args), tokenizer=args.tokenizer if tok is not None else None)
            save_checkpoint(ck, ckpt_path) if master else None
            dist.barrier() if dist.is_initialized() else None
    bar.close()


def lr_at(step, total, args):  # linear warmup, then constant or cosine to --end-lr
    p = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    lr = args.end_lr + (args.lr - args.end_lr) * 0.5 * (1 + math.cos(math.pi * p)) if args.lr_schedule == 'cosine' else args.lr
    return args.lr * (step + 1) / args.warmup_steps if step < args.warmup_steps else lr


def save_curve(log, path):  # the loss of a log.jsonl as a PNG (PIL only), to compare runs by eye
    steps, loss = np.array([(r['step'], r['loss']) for r in map(json.loads, open(log))]).T
    lo, hi, d = loss.min(), loss.max(), ImageDraw.Draw(img := Image.new('RGB', (480, 240), 'white'))
    d.line([(50 + 420 * s / steps[-1], 225 - 200 * (v - lo) / max(hi - lo, 1e-12)) for s, v in zip(steps, loss)], fill=(200, 30, 30), width=2)
    [d.text(xy, t, fill='black') for xy, t in (((2, 20), f'{hi:.4g}'), ((2, 220), f'{lo:.4g}'), ((380, 228), f'step {steps[-1]:.0f}'))]
    img.save(path)


@torch.no_grad()
def grid(model, x, tok, args, path):  # tokenizer: 8 images over their reconstructions; generator: 8 per class
    if tok is None:
        return save_grid(torch.cat([x[:8], model.eval()(x[:8])[0]]), path, 8), model.train()
    labels = torch.arange(min(model.cfg.num_classes, 10), device=x.device).repeat_interleave(8)
    out = model.generate(labels, cfg_scale=args.cfg_scale, generator=torch.Generator(x.device).manual_seed(args.seed))
    save_grid(tok.decode_code(*out) if isinstance(out, tuple) else tok.decode_code(out), path, 8)


# --- command line: the method's Config fields become flags through one visible loop ---------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    p.add_argument('--method', choices=METHODS, default='llamagen')
    p.add_argument('--stage', choices=('tokenizer', 'generator'), default='generator')
    p.add_argument('--model', help="size: the method's SIZES (generator) or TOKENIZER_SIZES (tokenizer); default: its '-tiny' one")
    p.add_argument('--data-path', help='ImageFolder root (default: the built-in dataset)')
    p.add_argument('--tokenizer', help='tokenizer checkpoint, ours or official (default: train one, cache it)')
    p.add_argument('--run-dir', help='default: RESULTS_DIR/NNN-METHOD-STAGE')
    p.add_argument('--resume', help='RUN/last.pt: continue that run exactly')
    p.add_argument('--lr-schedule', choices=('constant', 'cosine'), help='default: constant (MAR classroom: cosine)')
    for name, kind in (('epochs', int), ('max-steps', int), ('global-batch-size', int), ('lr', float), ('warmup-steps', int)):
        p.add_argument('--' + name, type=kind, help='default: STAGE_DEFAULTS (--epochs overrides --max-steps)')
    for name, default, help in (
            ('results-dir', 'results', None), ('num-images', 10000, 'size of the built-in dataset'), ('image-size', 32, None), ('seed', 0, None),
            ('end-lr', 1e-5, 'floor of the cosine schedule'), ('weight-decay', 0.05, None), ('ema', 0.0, 'EMA decay (0: none)'),
            ('disc-start', 20000, 'tokenizer: the step the PatchGAN loss starts'), ('disc-weight', 0.5, None), ('grad-clip', 1.0, 'MAR: 3.0'),
            ('lpips', '', 'tokenizer: perceptual loss from VGG16.pth,LPIPS_VGG.pth (torchvision and LPIPS weights)'),
            ('cfg-scale', 2.0, 'for the sample grids'), ('num-workers', 8, 'image loading (ImageFolder)'),
            ('log-every', 100, None), ('sample-every', 1000, None), ('ckpt-every', 1000, None)):
        p.add_argument('--' + name, type=type(default), default=default, help=help)
    module = importlib.import_module(p.parse_known_args(argv)[0].method)
    seen = {a.dest for a in p._actions} | {'vocab_size', 'block_size', 'num_classes', 'img_size', 'vae_stride', 'vae_embed_dim', 'sub_vocab_size'}  # derived
    for f in {f.name: f for f in fields(module.TokenizerConfig) + fields(module.Config) if f.name not in seen}.values():  # config fields -> --flags
        kind = type(f.default)
        p.add_argument('--' + f.name.replace('_', '-'), nargs='+' if kind is tuple else None, help=f'config (default {f.default})',
                       type={bool: lambda s: s.lower() in ('1', 'true', 'yes'), tuple: int}.get(kind, kind))
    p.add_argument('-h', '--help', action='help')
    args = p.parse_args(argv)
    for k, v in {**STAGE_DEFAULTS[args.stage], **getattr(module, 'CLASSROOM', {}).get(args.stage, {})}.items():  # unset: classroom
        setattr(args, k, v) if getattr(args, k) is None else None
    args.model = args.model or next(k for k in (module.SIZES if args.stage == 'generator' else tokenizer_sizes(module)) if k.endswith('tiny'))
    if args.resume:  # continue in the run's own directory, with the tokenizer it was trained on
        args.run_dir, args.tokenizer = args.run_dir or os.path.dirname(args.resume), args.tokenizer or load_checkpoint(args.resume).get('tokenizer')
    return args, module


def main(argv=None):
    args, module = parse_args(argv)
    rank, world, device = setup_ddp()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.data_path:
        data = ImageFolder(args.data_path, args.image_size)
    elif not 16 <= args.image_size <= 256:
        raise SystemExit(f'train.py: --image-size {args.image_size}: the built-in dataset renders 16 to 256 pixels')
    else:
        imgs, labels = builtin_images(args.num_images, args.image_size, args.seed)
        data = TensorDataset(torch.from_numpy(imgs).permute(0, 3, 1, 2), torch.from_numpy(labels))
        data.classes, data.key = CLASSES, f'builtin{args.num_images}-s{args.seed}'
    if args.stage == 'tokenizer':
        return train_stage(args, module, 'tokenizer', data, rank, world, device)
    if args.tokenizer is None:  # the method's default tokenizer for this dataset, trained once and cached
        targs = argparse.Namespace(**{**vars(args), **STAGE_DEFAULTS['tokenizer'], 'resume': None, 'epochs': None, 'ema': 0.0})
        sizes = tokenizer_sizes(module)
        targs.model = next(iter(sizes)) if args.data_path else next(k for k in sizes if k.endswith('tiny'))  # paper size first
        key = hashlib.sha1(repr(config_from(module.TokenizerConfig, targs, sizes[targs.model])).encode()).hexdigest()[:8]
        targs.run_dir = os.path.join(args.results_dir, 'tokenizers', f'{module.Tokenizer.__name__}-{data.key}-{args.image_size}px-{key}')
        args.tokenizer = os.path.join(targs.run_dir, 'last.pt')
        if not os.path.exists(args.tokenizer):
            print(f'no --tokenizer given: training the default tokenizer first, cached at {args.tokenizer}') if rank == 0 else None
            train_stage(targs, module, 'tokenizer', data, rank, world, device)
    tok = load_tokenizer(args.tokenizer, module).to(device).eval().requires_grad_(False)
    train_stage(args, module, 'generator', data, rank, world, device, tok)
    dist.destroy_process_group() if dist.is_initialized() else None  # cleanup


if __name__ == '__main__':
    main()
