"""
Train a tokenizer or a generator, on 1 process or N (torchrun), on the built-in dataset or an
ImageFolder.

  python train.py --method llamagen                # classroom run: built-in 32x32 data, on a CPU
  torchrun --nproc_per_node=8 train.py --method llamagen --model GPT-B \\
      --data-path /imagenet/train --image-size 256 --tokenizer vq_ds16_c2i.pt --epochs 300 \\
      --global-batch-size 256 --lr 1e-4

--stage tokenizer trains the method's Tokenizer; --stage generator (the default) trains the method's
Model on codes extracted once (each image and its flip) by the frozen tokenizer. Without
--tokenizer, the method's default tokenizer for the dataset is trained first and cached under
--results-dir.
A generator run keeps its tokenizer as RUN/tokenizer.pt, so the run can be moved anywhere.
At scale the generator stage takes --fsdp (shard it over the processes), --grad-checkpoint and
--compile; --benchmark times its training step on random inputs (no data, no tokenizer).
Chapters: data, DDP / FSDP setup, run directory, tokenizer, model, EMA, optimizer, loop,
checkpoint, benchmark.
"""
import argparse
import copy
import hashlib
import importlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import llamagen
import vq

try:
    import fcntl  # file locks on the caches that runs share (POSIX only)
except ImportError:
    fcntl = None

METHODS = ('llamagen', 'par', 'npp', 'rar', 'iar2', 'mar')

# the classroom run on the built-in dataset; a method's CLASSROOM overrides these per stage
STAGE_DEFAULTS = {
    'tokenizer': dict(lr=1e-3, global_batch_size=32, max_steps=400, warmup_steps=0,
                      lr_schedule='constant'),
    'generator': dict(lr=1e-3, global_batch_size=64, max_steps=800, warmup_steps=100,
                      lr_schedule='constant', cfg_scale=2.0),
}


# --- data: the built-in dataset ----------------------------------------------------------------
CLASSES = ('red disk', 'blue square', 'green triangle', 'yellow ring', 'magenta cross',
           'cyan h-stripes', 'orange v-stripes', 'white checker', 'pink dots', 'purple gradient')
COLORS = ((220, 40, 40), (40, 80, 230), (40, 200, 60), (230, 210, 40), (210, 40, 210),
          (40, 210, 220), (240, 140, 30), (230, 230, 230), (250, 130, 170), (120, 60, 230))


def render(index, size=32, seed=0):
    """Image `index` of the built-in dataset: (size, size, 3) uint8 and its label (index % 10).
    Shape, colour and texture define a class; position, size, hue and background vary within it.
    Drawn at twice the size, then box-filtered down (anti-aliased edges)."""
    rng = np.random.default_rng([seed, index])
    label = index % len(CLASSES)
    s = 2 * size
    bg = tuple(int(v) for v in rng.integers(0, 60, 3))
    fg = tuple(int(np.clip(c + rng.integers(-35, 36), 0, 255)) for c in COLORS[label])
    img = Image.new('RGB', (s, s), bg)
    d = ImageDraw.Draw(img)
    r = s * rng.uniform(0.16, 0.3)  # the shape's radius
    cx, cy = s * rng.uniform(0.32, 0.68, 2)  # and centre
    box = [cx - r, cy - r, cx + r, cy + r]
    w = r * 0.35  # half the width of a cross's bar
    if label == 0:
        d.ellipse(box, fill=fg)
    elif label == 1:
        d.rectangle(box, fill=fg)
    elif label == 2:
        d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fg)
    elif label == 3:
        d.ellipse(box, outline=fg, width=max(2, int(w)))
    elif label == 4:
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif label in (5, 6):
        draw_stripes(d, s, rng, fg, horizontal=label == 5)
    elif label == 7:
        draw_checker(d, s, rng, fg)
    elif label == 8:
        for px, py in s * rng.uniform(0.2, 0.8, (2, 2)):
            d.ellipse([px - 0.45 * r, py - 0.45 * r, px + 0.45 * r, py + 0.45 * r], fill=fg)
    else:  # a linear ramp from the background to the class colour, along a random diagonal
        t = np.linspace(0, 1, s)
        ramp = (np.add.outer(t, t if rng.uniform() < 0.5 else 1 - t) / 2)[..., None]
        img = Image.fromarray((np.array(bg) * (1 - ramp) + np.array(fg) * ramp).astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.BOX)), label


def draw_stripes(d, s, rng, fg, horizontal):  # stripes with a random period and phase
    period = s * rng.uniform(0.15, 0.3)
    phase = rng.uniform(0, 1)
    for a in (np.arange(-1, s / period + 2) + phase) * period:
        d.rectangle([0, a, s, a + period / 2] if horizontal else [a, 0, a + period / 2, s], fill=fg)


def draw_checker(d, s, rng, fg):  # squares of a random cell size and offset
    cell = s * rng.uniform(0.12, 0.22)
    ox, oy = rng.uniform(-s * 0.2, 0, 2)
    for i in range(int(s / cell) + 2):
        for j in range(i % 2, int(s / cell) + 2, 2):
            d.rectangle([ox + j * cell, oy + i * cell, ox + (j + 1) * cell, oy + (i + 1) * cell],
                        fill=fg)


def builtin_images(n, image_size=32, seed=0):
    """The first n built-in images: uint8 (n, H, W, 3) and int64 labels (n,)."""
    imgs, labels = zip(*(render(i, image_size, seed) for i in range(n)))
    return np.stack(imgs), np.array(labels, dtype=np.int64)


def builtin_dataset(n, image_size, seed):
    """The built-in images as a dataset of (uint8 (3, H, W), label), like ImageFolder's."""
    imgs, labels = builtin_images(n, image_size, seed)
    data = TensorDataset(torch.from_numpy(imgs).permute(0, 3, 1, 2), torch.from_numpy(labels))
    data.classes = CLASSES
    data.key = f'builtin{n}-s{seed}'  # names its cached codes
    return data


# --- data: ImageFolder (one sub-folder per class; sorted names give the ImageNet indices) --------
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.gif', '.tif', '.tiff', '.jfif')


def center_crop_arr(pil, size):
    """ADM's preprocessing: halve with BOX while large, BICUBIC to size, centre crop."""
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    arr = np.asarray(pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC))
    y = (arr.shape[0] - size) // 2
    x = (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def list_images(root):
    """-> (classes, [(path, label)], key) of an ImageFolder. Classes: the sub-folders of root,
    sorted, hidden ones (a name starting with '.') skipped, as torchvision's ImageFolder; images:
    the files with an image extension anywhere below a class folder, sorted. The key names the
    cached codes: it changes with the list of files, their sizes and their mtimes."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    samples = []
    digest = hashlib.sha1()
    for label, name in enumerate(classes):
        found = []
        for folder, dirs, files in os.walk(os.path.join(root, name), followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))  # walked in sorted order
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'):
                    found.append(os.path.join(folder, f))
        if not found:
            raise SystemExit(f'train.py: --data-path {root}: class folder {name} has no images')
        for path in found:
            st = os.stat(path)
            entry = f'{os.path.relpath(path, root)}\t{st.st_size}\t{st.st_mtime_ns}\n'
            digest.update(entry.encode())
            samples.append((path, label))
    if not samples:
        raise SystemExit(f'train.py: --data-path {root}: no images '
                         '(expected one sub-folder of images per class)')
    key = os.path.basename(os.path.normpath(root)) + '-' + digest.hexdigest()[:10]
    return classes, samples, key


class ImageFolder(Dataset):
    def __init__(self, root, size):
        if not os.path.isdir(root):
            raise SystemExit(f'train.py: --data-path {root}: not a directory')
        self.root, self.size = root, size
        self.classes, self.samples, self.key = list_images(root)
        self.unreadable = set()  # reported once each, per process
        self.first = {}  # label -> (index of its first image, count)
        for i, (_, label) in enumerate(self.samples):
            start, n = self.first.get(label, (i, 0))
            self.first[label] = (start, n + 1)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        """-> uint8 (3, H, W), label. An unreadable image is reported once and replaced by the next
        readable image of the same class, never by another class's."""
        label = self.samples[i][1]
        start, n = self.first[label]
        for j in range(min(n, 20)):
            path = self.samples[start + (i - start + j) % n][0]
            try:
                arr = center_crop_arr(Image.open(path).convert('RGB'), self.size)
                return torch.from_numpy(arr.copy()).permute(2, 0, 1), label
            except Exception as e:
                self.report(path, e)
        raise RuntimeError(f'train.py: --data-path {self.root}: class {self.classes[label]}: '
                           f'{min(n, 20)} unreadable images in a row; stopped')

    def report(self, path, error):
        if path not in self.unreadable:
            self.unreadable.add(path)
            print(f'train.py: skipping unreadable image {path} ({type(error).__name__}: '
                  f'{error}); {len(self.unreadable)} so far', flush=True)


class ResumableSampler(torch.utils.data.Sampler):
    """A DistributedSampler's indices for this rank, cut to whole batches, starting `skip` batches
    into the epoch (resuming mid-epoch). One DataLoader iterates it every epoch, so its workers
    persist across epochs."""

    def __init__(self, dataset, local_bs, seed, rank, world):
        self.inner = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.local_bs = local_bs
        self.per_epoch = len(self.inner) // local_bs  # batches per epoch
        self.skip = 0

    def __iter__(self):
        return iter(list(self.inner)[self.skip * self.local_bs:self.per_epoch * self.local_bs])

    def __len__(self):
        return (self.per_epoch - self.skip) * self.local_bs


def batches(dataset, local_bs, seed, rank, world, start_step, workers, device):
    """Endless batches of a DistributedSampler; resuming at start_step skips the indices used."""
    sampler = ResumableSampler(dataset, local_bs, seed, rank, world)
    if sampler.per_epoch == 0:
        raise SystemExit(f'train.py: {len(dataset)} samples are fewer than one global batch')
    loader = DataLoader(dataset, local_bs, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == 'cuda', persistent_workers=workers > 0)
    epoch, sampler.skip = divmod(start_step, sampler.per_epoch)
    while True:
        sampler.inner.set_epoch(epoch)
        yield from loader
        epoch, sampler.skip = epoch + 1, 0


# --- the code cache: tok.encode of every image and its flip, on disk, read through a memory map -
class CodeCache(Dataset):
    """RESULTS_DIR/codes/KEY/: codes.npy (N, 2, ...) (each image, then its flip; int32 ids, or
    float16 moments), labels.npy (N,), done.npy (N,) bool, and manifest.json, which says what the
    codes are of and, last, that they are complete. Entry 2i is image i, 2i + 1 its flip (with
    flip=False, entry i is image i, unflipped: one cache serves both). Read through memory maps:
    a rank's memory does not grow with the dataset."""

    def __init__(self, folder, flip=True):
        self.codes = np.load(os.path.join(folder, 'codes.npy'), mmap_mode='r')
        self.labels = np.load(os.path.join(folder, 'labels.npy'), mmap_mode='r')
        self.views = 2 if flip else 1  # entries per image

    def __len__(self):
        return self.views * len(self.labels)

    def __getitem__(self, i):
        image, view = divmod(i, self.views)
        codes = torch.from_numpy(np.array(self.codes[image, view]))  # a copy, off the map
        return codes, int(self.labels[image])


def cache_manifest(tok, data, image_size, codes):
    """What a code cache is of: rebuilt whenever any of it changes. codes: one encoded image."""
    dtype = np.float16 if codes.is_floating_point() else np.int32  # MAR's moments in 16 bits
    return {'tokenizer': llamagen.tokenizer_key(tok), 'dataset': data.key,
            'image_size': image_size, 'count': len(data), 'shape': list(codes.shape[1:]),
            'dtype': np.dtype(dtype).name}


@torch.inference_mode()
def extract_codes(tok, data, folder, args, rank, world, device):
    """The code cache of tok on data at folder, built once: each rank encodes the images it owns
    (r, r + world, ...) straight into the memory maps, marking each done. An interrupted build
    resumes where it stopped; a cache of anything else is rebuilt; a second run waits for the
    first one's build, then reuses it."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    x = data[0][0][None].to(device).float() / 127.5 - 1
    want = cache_manifest(tok, data, args.image_size, tok.encode(x))
    with cache_lock(folder, rank):
        found = agree(read_manifest(folder))
        if found != {**want, 'complete': True}:
            if rank == 0:
                create_cache(folder, want, found)
            barrier()
            encode_missing(tok, data, folder, args, rank, world, device)
            barrier()
            if rank == 0:  # written last: a half-built cache is never taken for a complete one
                write_manifest(folder, {**want, 'complete': True})
            barrier()
    return CodeCache(folder, args.flip)


def read_manifest(folder):
    path = os.path.join(folder, 'manifest.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_manifest(folder, manifest):
    path = os.path.join(folder, 'manifest.json')
    llamagen.atomic_write(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def create_cache(folder, want, found):
    """Rank 0: new memory maps, unless found is an unfinished build of the same codes."""
    if found is not None and {**found, 'complete': False} == {**want, 'complete': False}:
        print(f'train.py: resuming the unfinished code cache {folder}', flush=True)
        return
    if found is not None:
        print(f'train.py: the code cache {folder} is of other codes; rebuilding it', flush=True)
    os.makedirs(folder, exist_ok=True)
    n = want['count']
    np.lib.format.open_memmap(os.path.join(folder, 'codes.npy'), 'w+', want['dtype'],
                              (n, 2, *want['shape'])).flush()
    np.lib.format.open_memmap(os.path.join(folder, 'labels.npy'), 'w+', np.int64, (n,)).flush()
    np.lib.format.open_memmap(os.path.join(folder, 'done.npy'), 'w+', np.bool_, (n,)).flush()
    write_manifest(folder, {**want, 'complete': False})


def encode_missing(tok, data, folder, args, rank, world, device):
    """This rank's images not yet done, encoded with their flips into the memory maps."""
    codes = np.load(os.path.join(folder, 'codes.npy'), mmap_mode='r+')
    labels = np.load(os.path.join(folder, 'labels.npy'), mmap_mode='r+')
    done = np.load(os.path.join(folder, 'done.npy'), mmap_mode='r+')
    todo = [i for i in range(rank, len(data), world) if not done[i]]
    workers = args.num_workers if args.data_path else 0
    loader = DataLoader(Subset(data, todo), 64, num_workers=workers,
                        pin_memory=device.type == 'cuda')
    bar = tqdm(total=len(todo) * world, desc='extracting codes', unit='img', disable=rank != 0)
    start = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True).float() / 127.5 - 1
        pair = torch.stack([tok.encode(x), tok.encode(x.flip(-1))], 1)  # (B, 2, ...)
        rows = todo[start:start + len(x)]
        codes[rows] = pair.cpu().numpy().astype(codes.dtype)
        labels[rows] = y.numpy()
        codes.flush()  # the rows on disk before they are marked done
        done[rows] = True
        done.flush()
        start += len(x)
        bar.update(len(x) * world)
    bar.close()


# --- DDP and FSDP (llamagen.setup_ddp starts the processes) ------------------------------------
def barrier():
    if dist.is_initialized():
        dist.barrier()


def ddp(module, **kwargs):  # the module as DDP sees it, or itself on one process
    return DDP(module, **kwargs) if dist.is_initialized() else module


def blocks(model):
    """The repeated blocks of any method: the children of its nn.ModuleLists, outermost lists only
    (llamagen, npp, par: layers; iar2: layers and factorized_blocks; rar: blocks; mar:
    encoder_blocks, decoder_blocks and DiffLoss's res_blocks). What --fsdp shards one by one and
    --grad-checkpoint and --compile act on."""
    found = []
    inside = set()  # the modules of the lists found so far, nested lists included
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and module not in inside:
            found.extend(module)
            inside.update(module.modules())
    return found


def shard(model, device):
    """--fsdp: FSDP2 (fully_shard) on each of blocks(model), then on the root (the embeddings,
    norms and heads left over), across all processes. Each parameter becomes a DTensor holding
    1/world of its rows on this rank, and so do its gradient and AdamW state; a block's whole
    weights exist only during its forward and backward. On CUDA they are gathered in bf16 and
    gradients reduced in fp32; on the CPU all stays fp32. Inputs keep their dtype (RoPE tables,
    MAR's latents and diffusion targets stay fp32): autocast picks each op's precision, as
    without --fsdp."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # torch >= 2.6
    policy = MixedPrecisionPolicy(cast_forward_inputs=False)
    if device.type == 'cuda':
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                      cast_forward_inputs=False)
    for block in blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


# each optimizer of a checkpoint and the model whose parameters it steps (their names key its state)
OPTIMIZED = {'optimizer': 'model', 'optimizer_disc': 'discriminator'}


def full_state(state):
    """{name: state dict} of a checkpoint's models and optimizers, whole, on rank 0 (the other
    ranks get {}): plain CPU tensors under the parameter names (FQNs), from sharded (--fsdp) and
    plain models alike (every rank takes part: a sharded tensor is gathered). An optimizer's
    state is keyed by its model's parameter names on every path, so a run resumes with or
    without --fsdp, on any number of processes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {}
    for name, obj in state.items():
        if name in OPTIMIZED:
            out[name] = get_optimizer_state_dict(state[OPTIMIZED[name]], obj, options=options)
        else:
            out[name] = get_model_state_dict(obj, options=options)
    return out


def restore(state, ckpt):
    """Load a checkpoint's full state dicts into state's models and optimizers, sharded or not:
    rank 0's copy is broadcast and each rank keeps its shards."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    for name, obj in state.items():
        if name not in OPTIMIZED:  # the models first: the optimizers find their parameters there
            set_model_state_dict(obj, ckpt[name], options=options)
    for name, obj in state.items():
        if name in OPTIMIZED:
            model = state[OPTIMIZED[name]]
            saved = named_optimizer_state(ckpt[name], model, obj)
            set_optimizer_state_dict(model, obj, saved, options=options)


def named_optimizer_state(saved, model, opt):
    """An optimizer state dict keyed by parameter names, as full_state writes it. Checkpoints
    written before --fsdp hold torch's own format, keyed 0, 1, ... in the order of opt's
    parameters: renamed."""
    ids = [i for group in saved['param_groups'] for i in group['params']]
    if not ids or isinstance(ids[0], str):
        return saved
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in opt.param_groups for p in group['params']]
    groups = [{**group, 'params': [names[i] for i in group['params']]}
              for group in saved['param_groups']]
    return {'state': {names[i]: s for i, s in saved['state'].items()}, 'param_groups': groups}


def local(p):  # this rank's part of a parameter: its shard under --fsdp (a DTensor), else itself
    return p.to_local() if hasattr(p, 'to_local') else p


@contextmanager
def eager(compiled):
    """Compiled blocks (--compile) run eagerly inside: generate's cached calls are never
    compiled (torch >= 2.6)."""
    if not compiled:
        yield
        return
    with torch.compiler.set_stance('force_eager'):
        yield


def agree(value):  # rank 0's value on every rank
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box)
    return box[0]


@contextmanager
def cache_lock(path, rank):
    """Rank 0 holds an exclusive lock (path + '.lock') while it builds a cache that runs share
    (the default tokenizer, extracted codes): a second run waits, then reuses the result. The OS
    releases the lock when its process dies, so a killed run never blocks the next one."""
    if rank != 0 or fcntl is None:  # (no fcntl on Windows: no lock)
        yield
        return
    with open(path + '.lock', 'w') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f'train.py: waiting for another run to finish {path}', flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


# --- one stage: run directory, model, optimizer, loop, checkpoint -------------------------------
def open_run(args, stage, rank, resume):
    """-> the run directory, rank 0's choice: --run-dir, the checkpoint's own when resuming, or
    the next free RESULTS_DIR/NNN-METHOD-STAGE. A run is never overwritten unless resumed."""
    run = args.run_dir
    if rank == 0 and run is None:
        run = claim_run_dir(args.results_dir, f'{args.method}-{stage}')
    run = agree(run)
    ckpt_path = os.path.join(run, 'last.pt')
    if os.path.exists(ckpt_path) and resume is None:
        raise SystemExit(f'train.py: {ckpt_path} exists; pass --resume {ckpt_path} or another '
                         '--run-dir')
    if rank == 0:
        os.makedirs(os.path.join(run, 'samples'), exist_ok=True)
    if rank == 0 and resume:  # the steps logged after the checkpoint are run again: drop them
        keep_log_until(os.path.join(run, 'log.jsonl'), resume['step'])
    return run


def claim_run_dir(results_dir, name):
    """RESULTS_DIR/NNN-NAME for the first free NNN, claimed by os.mkdir, which fails for all but
    one of the runs that try the same folder at once."""
    os.makedirs(results_dir, exist_ok=True)
    n = len(os.listdir(results_dir))
    while True:
        path = os.path.join(results_dir, f'{n:03d}-{name}')
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1


def keep_log_until(path, step):  # rewrite log.jsonl without the records after step
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [line for line in f if json.loads(line)['step'] <= step]
    with open(path, 'w') as f:
        f.writelines(records)


def config_from(cls, args, size, derived=None):
    """A config: the size preset, then the --flags given, then the fields the data fixes."""
    derived = derived or {}
    given = {f.name: getattr(args, f.name) for f in fields(cls)
             if getattr(args, f.name, None) is not None}
    fixed = sorted(set(given) & set(derived))
    if fixed:
        flag = '--' + fixed[0].replace('_', '-')
        raise SystemExit(f'train.py: {flag} is fixed by the tokenizer and the data; leave it out')
    return cls(**{**size, **given, **derived})


def lr_at(step, total, args):
    """Linear warmup over --warmup-steps, then constant or cosine down to --end-lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == 'constant':
        return args.lr
    p = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return args.end_lr + (args.lr - args.end_lr) * 0.5 * (1 + math.cos(math.pi * p))


def update(opt, loss, params, grad_clip):  # one optimizer step on loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def train_tokenizer(args, module, data, rank, world, device, resume=None):
    """The tokenizer stage: L2 + quantizer (or KL) losses, LPIPS when its weights are given, and a
    PatchGAN hinge loss from --disc-start on. Tokenizers train without weight decay (officially
    Adam)."""
    run = open_run(args, 'tokenizer', rank, resume)
    cfg = config_from(module.TokenizerConfig, args, module.TOKENIZER_SIZES[args.model])
    cfg = module.TokenizerConfig(**resume['config']) if resume else cfg
    torch.manual_seed(args.seed)  # the same initial weights on every rank and run
    tok = module.Tokenizer(cfg).to(device)
    if args.image_size % tok.stride:
        raise SystemExit(f'train.py: --image-size {args.image_size} is not divisible by the '
                         f'tokenizer stride {tok.stride}')
    disc = vq.PatchGAN(n_layers=min(3, args.image_size.bit_length() - 3)).to(device)  # 2 below 32px
    lpips = None
    if args.lpips:
        vgg_path, lin_path = args.lpips.split(',')
        lpips = vq.LPIPS.load(llamagen.load_file(vgg_path), llamagen.load_file(lin_path)).to(device)
    fused = device.type == 'cuda'
    opt = torch.optim.AdamW(tok.parameters(), args.lr, (0.9, 0.95), weight_decay=0.0, fused=fused)
    opt_disc = torch.optim.AdamW(disc.parameters(), args.lr, (0.9, 0.95), weight_decay=0.0,
                                 fused=fused)
    state = dict(model=tok, optimizer=opt, discriminator=disc, optimizer_disc=opt_disc)
    # IAR2's tokenizer leaves a codebook unused on some steps, and the PatchGAN sits out the steps
    # before --disc-start: DDP must not wait for their gradients
    ddp_tok = ddp(tok, find_unused_parameters=True)
    ddp_disc = ddp(disc, find_unused_parameters=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')
    total = total_steps(args, data, 1)

    def step_fn(x, y, step):
        if args.flip:  # half the images mirrored, as the ImageNet recipes do
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
        x = x.float() / 127.5 - 1
        gan = step >= args.disc_start
        with autocast:
            recon, losses = ddp_tok(x)
            loss = F.mse_loss(recon.float(), x) + sum(losses.values())
            if lpips is not None:
                loss = loss + lpips(recon.float(), x).mean()
            if gan:  # the hinge generator loss: make the PatchGAN call the reconstruction real
                loss = loss - args.disc_weight * ddp_disc(recon).float().mean()
        update(opt, loss, list(tok.parameters()), args.grad_clip)
        if gan:  # the discriminator: real images vs the detached reconstructions
            with autocast:
                d_loss = vq.hinge_d_loss(ddp_disc(x).float(), ddp_disc(recon.detach()).float())
            opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_disc.step()
        if step + 1 == total:  # the last step: fit what depends on the final weights
            tok.calibrate(x)
        return loss

    @torch.no_grad()
    def grid_fn(model, x, path):  # 8 images over their reconstructions
        x = x[:8].float() / 127.5 - 1
        llamagen.save_grid(torch.cat([x, model.eval()(x)[0]]), path, 8)
        model.train()

    meta = dict(method=args.method, stage='tokenizer', kind=type(tok).__name__, config=cfg)
    loop(args, state, meta, data, step_fn, grid_fn, run, rank, world, device, resume,
         metrics=tok.metrics)


def train_generator(args, module, data, tok, rank, world, device, resume=None):
    """The generator stage: the method's Model on the frozen tokenizer's cached codes."""
    run = open_run(args, 'generator', rank, resume)
    derived = module.derive_config(tok, args.image_size, len(data.classes))
    cfg = config_from(module.Config, args, module.SIZES[args.model], derived)
    cfg = module.Config(**resume['config']) if resume else cfg
    torch.manual_seed(args.seed)  # the same initial weights on every rank and run
    model = module.Model(cfg).to(device)
    codes = extract_codes(tok, data, codes_path(args, tok, data), args, rank, world, device)
    meta = dict(method=args.method, stage='generator', kind=type(model).__name__, config=cfg,
                tokenizer='tokenizer.pt')  # the plain class's name: --fsdp changes the class
    state, forward = prepare_generator(model, module, args, device)
    params = list(model.parameters())

    def step_fn(codes, labels, step):
        if codes.is_floating_point():  # MAR's moments: cached in float16, sampled from in fp32
            codes = codes.float()
        return generator_update(forward, state['optimizer'], params, tok.training_input(codes),
                                labels, args.grad_clip)

    def plain(model):  # the model to sample from: rank 0's plain copy under --fsdp, else None
        if not args.fsdp:
            return model
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # {} off rank 0
        weights = get_model_state_dict(model, options=options)  # every rank gathers
        if rank != 0:
            return None
        model = module.Model(cfg).to(device)
        model.load_state_dict(weights)
        return model

    def grid_fn(model, x, path):  # 8 samples of each of the first 10 classes
        model = plain(model)
        if model is None:
            return
        labels = torch.arange(min(model.cfg.num_classes, 10), device=device).repeat_interleave(8)
        g = torch.Generator(device).manual_seed(args.seed)
        codes = model.generate(labels, cfg_scale=args.cfg_scale, generator=g)
        with torch.no_grad():
            llamagen.save_grid(tok.decode_code(codes), path, 8)

    score = None
    if args.eval_every and rank == 0:
        score = evaluator(args, data, tok, device)

    def eval_fn(model):  # --eval-every: {name: score} of the model's samples on rank 0, else {}
        model = plain(model)
        if model is None or score is None:
            return {}
        return score(model)

    if rank == 0:  # the run keeps its own tokenizer, found wherever the run is moved
        llamagen.save_checkpoint(llamagen.tokenizer_file(tok, args.method),
                                 os.path.join(run, 'tokenizer.pt'))
    tokens = (args.image_size // tok.stride) ** 2  # per image, for the log's tokens/s
    loop(args, state, meta, codes, step_fn, grid_fn, run, rank, world, device, resume, tokens,
         eval_fn=eval_fn if args.eval_every else None)


def prepare_generator(model, module, args, device):
    """-> (state, forward): what a checkpoint holds (model, ema with --ema, optimizer) and what a
    step calls (the model, DDP's or sharded). In this order: the EMA, a copy of the plain model;
    --grad-checkpoint on each block: its activations are recomputed in the backward pass (the RNG
    state kept: the same dropout, the same loss and gradients); --compile of each block's forward,
    in place (no new names in the state dict); --fsdp shards the model and the EMA alike; the
    optimizer last, on the parameters the step updates (sharded ones under --fsdp)."""
    state = dict(model=model)
    if args.ema > 0:  # never trained: neither checkpointed nor compiled
        state['ema'] = copy.deepcopy(model).requires_grad_(False)
    for block in blocks(model):
        if args.grad_checkpoint:
            activation_checkpoint(block)
        if args.compile:
            block.compile()
    if args.fsdp:
        shard(model, device)
    if args.fsdp and 'ema' in state:
        shard(state['ema'], device)
    state['optimizer'] = torch.optim.AdamW(module.param_groups(model, args.weight_decay),
                                           lr=args.lr, betas=(0.9, 0.95),
                                           fused=device.type == 'cuda')
    forward = model if args.fsdp else ddp(model)
    return state, forward


def generator_update(forward, opt, params, x, labels, grad_clip):
    """One generator step on its input x: bf16 autocast on GPU -> the loss."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == 'cuda'):
        _, loss = forward(x, labels)
    update(opt, loss, params, grad_clip)
    return loss


# --- --eval-every: a score of the generator's samples, during training ---------------------------
EVAL_BATCH = 100  # samples per generate call


@torch.no_grad()
def eval_images(model, tok, labels, args, device):
    """labels (N,) -> uint8 (N, H, W, 3) samples: model.generate at --cfg-scale, drawn from a
    generator of their own seeded by --seed (the same noise at every evaluation, and the
    training's random numbers untouched: a resumed run stays exact)."""
    g = torch.Generator(device).manual_seed(args.seed)
    images = []
    for i in range(0, len(labels), EVAL_BATCH):
        batch = labels[i:i + EVAL_BATCH].to(device)
        codes = model.generate(batch, cfg_scale=args.cfg_scale, generator=g)
        images.append(llamagen.to_uint8(tok.decode_code(codes)).numpy())
    return np.concatenate(images)


def chunks(images, size=50):  # uint8 (N, H, W, 3) -> batches of at most size, for fid.py
    return [images[i:i + size] for i in range(0, len(images), size)]


def evaluator(args, data, tok, device):
    """--eval-every's score(model) -> {name: value} of --eval-samples class-balanced samples: on
    the built-in data 'class_acc', fid.py's class accuracy (its classifier cached as
    RESULTS_DIR/classifier.pt); on an ImageFolder 'fid' against as many training images (evenly
    spaced over the sorted folder), when the FID Inception weights are found; otherwise None,
    said once."""
    import fid  # here: only the evaluation needs fid.py
    labels = torch.arange(args.eval_samples) % len(data.classes)
    if not args.data_path:
        cache = os.path.join(args.results_dir, 'classifier.pt')
        with cache_lock(cache, 0):  # runs that share a results dir train it once
            clf = fid.train_classifier(cache=cache)

        def class_acc(model):
            images = eval_images(model, tok, labels, args, device)
            return {'class_acc': round(fid.class_accuracy(clf, images, labels), 4)}
        return class_acc
    try:
        net = fid.load_inception(fid.find_weights(), device)
    except FileNotFoundError as e:
        print(f'train.py: --eval-every: {fid.first_line(e)}; no FID in this run')
        return None
    picks = np.linspace(0, len(data) - 1, args.eval_samples).round().astype(int)
    real = np.stack([data[int(i)][0].permute(1, 2, 0).numpy() for i in picks])  # (N, H, W, 3)
    ref = fid.compute_features(net, chunks(real), len(real), desc='eval: training images')

    def fid_score(model):
        images = eval_images(model, tok, labels, args, device)
        fake = fid.compute_features(net, chunks(images), len(images), desc='eval: samples')
        distance = fid.frechet_distance(ref['mu'], ref['sigma'], fake['mu'], fake['sigma'])
        return {'fid': round(distance, 4)}
    return fid_score


def codes_path(args, tok, data):  # where the codes of this tokenizer, data and size are cached
    key = f'{llamagen.tokenizer_key(tok)}-{data.key}-{args.image_size}'
    return os.path.join(args.results_dir, 'codes', hashlib.sha1(key.encode()).hexdigest()[:12])


def total_steps(args, data, per_image):
    """--max-steps, or --epochs passes over the images (with --flip, codes hold each image
    twice: per_image 2)."""
    if args.epochs is None:
        return args.max_steps
    return args.epochs * (len(data) // per_image // args.global_batch_size)


def loop(args, state, meta, data, step_fn, grid_fn, run, rank, world, device, resume, tokens=1,
         metrics=dict, eval_fn=None):
    """The training loop of both stages. state: what is checkpointed (model, optimizers, ...);
    meta: what else the checkpoint says; step_fn(x, y, step) -> loss does one update;
    grid_fn(model, x, path) draws samples; tokens per image (1: images/s); metrics() -> dict;
    eval_fn(model) -> {name: score}, every --eval-every steps and at the end (the generator)."""
    ckpt_path = os.path.join(run, 'last.pt')
    model = state['model']
    params = list(model.parameters())
    # exponential moving average of the weights, used for samples and sample.py (the generator
    # stage makes its own, before --fsdp shards the model)
    if args.ema > 0 and 'ema' not in state:
        state['ema'] = copy.deepcopy(model).requires_grad_(False)
    if resume:
        restore(state, resume)
    step = start = resume['step'] if resume else 0
    per_image = 2 if meta['stage'] == 'generator' and args.flip else 1  # an image and its flip
    total = total_steps(args, data, per_image)
    workers = args.num_workers if args.data_path else 0
    it = batches(data, args.global_batch_size // world, args.seed, rank, world, step, workers,
                 device)
    n_params = sum(p.numel() for p in params) / 1e6
    if rank == 0:
        print(f'{meta["stage"]}: {meta["kind"]} {n_params:.2f}M params, {len(data)} samples, '
              f'{total} steps, run {run}')
    loss_sum = torch.zeros((), device=device)
    t0 = time.time()
    bar = tqdm(total=total, initial=step, disable=rank != 0)
    while step < total:
        x, y = (t.to(device, non_blocking=True) for t in next(it))
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # resume-exact, per rank
        lr_scale = model.on_step(step, total)  # the method's schedules; a float: it owns the LR
        lr = lr_at(step, total, args) if lr_scale is None else args.lr * lr_scale
        for group in state['optimizer'].param_groups:
            group['lr'] = lr
        loss = step_fn(x, y, step)
        if 'ema' in state:
            ema_update(state['ema'], model, args.ema)
        loss_sum += loss.detach()
        step += 1
        bar.update(1)
        log_now = step % args.log_every == 0 or step == total
        save_now = step % args.ckpt_every == 0 or step == total
        eval_now = eval_fn is not None and (step % args.eval_every == 0 or step == total)
        if log_now or save_now or eval_now:
            stop_unless_finite(params, step, ckpt_path)
        scores = {}
        if eval_now:
            scores = evaluate(eval_fn, state.get('ema', model), args, rank)
        if log_now:
            seconds = time.time() - t0
            speed = (step - start) * args.global_batch_size * tokens / max(seconds, 1e-9)
            record = {'step': step, 'loss': mean_loss(loss_sum, step, args.log_every, world),
                      'lr': lr, 'elapsed': round(seconds, 1),
                      'tokens/s' if tokens > 1 else 'images/s': round(speed, 1), **metrics(),
                      **scores}
            if rank == 0:
                log(record, run, bar)
            loss_sum.zero_()
        elif scores:  # an evaluation between log lines: a record of its own (rank 0's)
            log({'step': step, **scores}, run, bar)
        # a sharded model's grid: every rank gathers the weights (grid_fn), rank 0 draws
        if (rank == 0 or args.fsdp) and (step % args.sample_every == 0 or step == total):
            with eager(args.compile):
                grid_fn(state.get('ema', model), x, os.path.join(run, 'samples', f'{step:07d}.png'))
        if save_now:
            save(state, meta, step, args, ckpt_path, rank)
    bar.close()


def evaluate(eval_fn, model, args, rank):  # --eval-every's {name: score}: rank 0's, {} elsewhere
    if rank != 0 and not args.fsdp:  # (a sharded model: every rank gathers its weights)
        return {}
    with eager(args.compile):
        return eval_fn(model)


def save(state, meta, step, args, path, rank):  # all gather (full_state), rank 0 writes
    checkpoint = full_state(state)
    checkpoint.update(meta, step=step, config=asdict(meta['config']), args=vars(args))
    if rank == 0:
        llamagen.save_checkpoint(checkpoint, path)
    barrier()


@torch.no_grad()
def ema_update(ema, model, decay):  # ema <- decay * ema + (1 - decay) * model; buffers copied
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def stop_unless_finite(params, step, ckpt_path):
    """A NaN/inf loss poisons the weights: check them (one sync), and stop before a save would
    overwrite the last good checkpoint. Each rank checks its own part (its shards under --fsdp)
    and all ranks agree."""
    finite = torch.stack([local(p).isfinite().all() for p in params]).all().float()
    if dist.is_initialized():
        dist.all_reduce(finite, dist.ReduceOp.MIN)
    if not finite:
        last = ckpt_path if os.path.exists(ckpt_path) else 'none'
        raise SystemExit(f'train.py: loss is nan or inf by step {step}; stopped. '
                         f'Last good checkpoint: {last}')


def mean_loss(loss_sum, step, log_every, world):  # rank-averaged loss since the last log line
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
    return loss_sum.item() / (((step - 1) % log_every + 1) * world)


def log(record, run, bar):  # one line on the terminal, the same in log.jsonl, and loss.png
    bar.write(' '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}'
                       for k, v in record.items()))
    with open(os.path.join(run, 'log.jsonl'), 'a') as f:
        print(json.dumps(record), file=f)
    save_curve(os.path.join(run, 'log.jsonl'), os.path.join(run, 'loss.png'))


EVAL_KEYS = ('class_acc', 'fid')  # --eval-every's scores in log.jsonl, drawn under the loss


def save_curve(log_path, path):
    """The loss of a log.jsonl as a PNG (PIL only), to compare runs by eye; below it, a panel of
    its own scale for each --eval-every score the log has."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    last = records[-1]['step']
    keys = ['loss'] + [k for k in EVAL_KEYS if any(k in r for r in records)]
    img = Image.new('RGB', (480, 240 * len(keys)), 'white')
    d = ImageDraw.Draw(img)
    for i, key in enumerate(keys):
        steps, values = np.array([(r['step'], r[key]) for r in records if key in r]).T
        draw_series(d, 240 * i, steps, values, last, key)
    img.save(path)


def draw_series(d, top, steps, values, last, key):
    """values (n,) at steps (n,) as a line in the 480x240 panel at height top (x: step 0..last);
    a score (not the loss) named and its points marked: evaluations are few."""
    lo, hi = values.min(), values.max()
    points = [(50 + 420 * s / last, top + 225 - 200 * (v - lo) / max(hi - lo, 1e-12))
              for s, v in zip(steps, values)]
    colour = (200, 30, 30)
    if key != 'loss':
        colour = (30, 80, 200)
        d.line([(0, top), (480, top)], fill=(190, 190, 190))  # the panels' border
        d.text((50, top + 4), key, fill=colour)
        for x, y in points:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    d.line(points, fill=colour, width=2)
    d.text((2, top + 20), f'{hi:.4g}', fill='black')
    d.text((2, top + 220), f'{lo:.4g}', fill='black')
    d.text((380, top + 228), f'step {last:.0f}', fill='black')


# --- the tokenizer a generator trains on --------------------------------------------------------
# the default tokenizer: the paper's from this many images and pixels on (its grid at least 8x8
# at stride 16); below, the tiny one, given more downsampling levels to keep its grid to 16x16
PAPER_TOKENIZER_FROM = dict(images=50000, image_size=128)
TINY_GRID = 16


def choose_tokenizer(module, args, n_images):
    """-> (size name, config field overrides, a line saying why): the tokenizer that suits the
    data (PAPER_TOKENIZER_FROM). The tiny one's stride is 4 (32 px: 8x8 tokens), doubled by a
    level of the widest width until the grid is at most TINY_GRID square."""
    sizes = module.TOKENIZER_SIZES
    paper, tiny = next(iter(sizes)), tiny_size(sizes)
    big = PAPER_TOKENIZER_FROM
    if n_images >= big['images'] and args.image_size >= big['image_size']:
        return paper, {}, (f'default tokenizer: {paper}, the paper\'s ({n_images} images at '
                            f'{args.image_size} px)')
    mult = list(sizes[tiny]['encoder_ch_mult'])
    while args.image_size // 2 ** (len(mult) - 1) > TINY_GRID:
        mult.append(mult[-1])
    grid = args.image_size // 2 ** (len(mult) - 1)
    why = (f'default tokenizer: {tiny} at stride {2 ** (len(mult) - 1)}, {grid}x{grid} tokens '
           f'({n_images} images at {args.image_size} px; the paper\'s {paper} from '
           f'{big["images"]} images at {big["image_size"]} px); --tokenizer FILE for another')
    return tiny, {'encoder_ch_mult': tuple(mult), 'decoder_ch_mult': tuple(mult)}, why


def default_tokenizer(args, module, data, rank, world, device):
    """The method's default tokenizer for this dataset (choose_tokenizer), trained once and
    cached under RESULTS_DIR/tokenizers."""
    defaults = {**STAGE_DEFAULTS['tokenizer'], **module.CLASSROOM.get('tokenizer', {})}
    targs = argparse.Namespace(**{**vars(args), **defaults, 'stage': 'tokenizer', 'resume': None,
                                  'epochs': None, 'ema': 0.0, **dict.fromkeys(RUNTIME, False)})
    sizes = module.TOKENIZER_SIZES
    targs.model, levels, why = choose_tokenizer(module, args, len(data))
    if rank == 0:
        print(why)
    for name, value in levels.items():  # unless given as flags
        if getattr(targs, name, None) is None:
            setattr(targs, name, value)
    cfg = config_from(module.TokenizerConfig, targs, sizes[targs.model])
    with torch.device('meta'):  # its stride, before minutes of training (no memory, no init)
        stride = module.Tokenizer(cfg).stride
    if args.image_size % stride:
        raise SystemExit(f'train.py: --image-size {args.image_size} is not divisible by the '
                         f'default tokenizer\'s stride {stride}')
    key = hashlib.sha1(repr(cfg).encode()).hexdigest()[:8]
    name = f'{module.Tokenizer.__name__}-{data.key}-{args.image_size}px-{key}'
    targs.run_dir = os.path.join(args.results_dir, 'tokenizers', name)
    path = os.path.join(targs.run_dir, 'last.pt')
    os.makedirs(os.path.dirname(targs.run_dir), exist_ok=True)
    with cache_lock(targs.run_dir, rank):
        step = agree(llamagen.load_file(path)['step'] if os.path.exists(path) else None)
        total = total_steps(targs, data, 1)
        if step is None and rank == 0:
            print(f'no --tokenizer given: training the default tokenizer first, cached at {path}')
        if step is not None and step < total:  # an interrupted training: not a tokenizer yet
            if rank == 0:
                print(f'the cached default tokenizer {path} stopped at step {step} of {total}: '
                      'resuming it')
            targs.resume = path
        if step is None or step < total:
            resume = llamagen.load_file(path) if targs.resume else None
            train_tokenizer(targs, module, data, rank, world, device, resume)
    return path


def tiny_size(sizes):  # the CPU size of a SIZES dict: its name ends in 'tiny'
    return next(k for k in sizes if k.endswith('tiny'))


# --- command line: the method's Config fields become flags through one visible loop --------------
def parse_bool(s):
    return s.lower() in ('1', 'true', 'yes')


# how the generator stage runs, not what it computes: a resumed run takes these from its own
# command line, never from the checkpoint (a run trained with --fsdp resumes without it)
RUNTIME = ('fsdp', 'grad_checkpoint', 'compile')
# flags a resumed run may change; every other flag is the run's own
RESUME_OVERRIDES = ('max_steps', 'epochs', 'log_every', 'sample_every', 'ckpt_every', 'num_workers',
                    'cfg_scale', 'results_dir', 'eval_every', 'eval_samples') + RUNTIME
POSITIVE = ('num_images', 'image_size', 'global_batch_size', 'log_every', 'sample_every',
            'ckpt_every', 'max_steps', 'epochs', 'eval_every', 'eval_samples')  # > 0 when given


def parse_args(argv=None):
    """-> (args, the method's module, the checkpoint of --resume or None). Every flag is checked
    here, before any work. A resumed run takes its own arguments from its checkpoint."""
    p = argparse.ArgumentParser(description=__doc__, add_help=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', choices=METHODS, default='llamagen')
    p.add_argument('--stage', choices=('tokenizer', 'generator'), default='generator')
    p.add_argument('--model', help="size: the method's SIZES (generator) or TOKENIZER_SIZES "
                                   "(tokenizer); default: its 'tiny' one")
    p.add_argument('--data-path', help='ImageFolder root (default: the built-in dataset)')
    p.add_argument('--tokenizer', help='tokenizer checkpoint, ours or official '
                                       '(default: train one, cache it)')
    p.add_argument('--run-dir', help='default: RESULTS_DIR/NNN-METHOD-STAGE')
    p.add_argument('--resume', help='RUN/last.pt: continue that run exactly, with its own flags '
                                    '(only ' + ', '.join(RESUME_OVERRIDES) + ' may change)')
    p.add_argument('--lr-schedule', choices=('constant', 'cosine'),
                   help='default: constant (MAR and IAR2 classroom: cosine)')
    for name, kind in (('epochs', int), ('max-steps', int), ('global-batch-size', int),
                       ('lr', float), ('warmup-steps', int)):
        p.add_argument('--' + name, type=kind,
                       help='default: STAGE_DEFAULTS (--epochs overrides --max-steps)')
    p.add_argument('--results-dir', default='results')
    p.add_argument('--num-images', type=int, default=10000, help='size of the built-in dataset')
    p.add_argument('--image-size', type=int, default=32)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--flip', action=argparse.BooleanOptionalAction, default=True,
                   help='train on mirrored images too, as the ImageNet recipes do; --no-flip '
                        'for data that is not mirror-symmetric (digits, letters)')
    p.add_argument('--end-lr', type=float, default=1e-5, help='floor of the cosine schedule')
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--ema', type=float, default=0.0, help='EMA decay (0: none)')
    p.add_argument('--disc-start', type=int, default=20000,
                   help='tokenizer: the step the PatchGAN loss starts')
    p.add_argument('--disc-weight', type=float, default=0.5)
    p.add_argument('--grad-clip', type=float, default=1.0, help='MAR: 3.0')
    p.add_argument('--lpips', default='', help='tokenizer: perceptual loss from '
                   'VGG16.pth,LPIPS_VGG.pth (torchvision and LPIPS weights)')
    p.add_argument('--cfg-scale', type=float, help='for the sample grids, --eval-every and, by '
                   'default, sample.py (default: 2.0; MAR classroom: 3.0)')
    p.add_argument('--num-workers', type=int, default=min(8, os.cpu_count() or 1),
                   help='processes loading images (ImageFolder; default: up to 8, the cores)')
    p.add_argument('--log-every', type=int, default=100)
    p.add_argument('--sample-every', type=int, default=1000)
    p.add_argument('--ckpt-every', type=int, default=1000)
    p.add_argument('--eval-every', type=int,
                   help='generator stage: every N steps and at the end, score --eval-samples '
                        'samples (at --cfg-scale) into log.jsonl and loss.png: class accuracy '
                        '(built-in data), FID against training images (ImageFolder, when the '
                        'FID Inception weights are found)')
    p.add_argument('--eval-samples', type=int, default=200,
                   help='--eval-every: class-balanced samples per evaluation')
    p.add_argument('--fsdp', action='store_true',
                   help='generator stage, under torchrun: shard the weights, gradients and AdamW '
                        'state over the processes (FSDP2, per block; bf16 on GPU); checkpoints '
                        'stay one full file. The tokenizer stage keeps DDP')
    p.add_argument('--grad-checkpoint', action='store_true',
                   help='generator stage: recompute each block\'s activations in the backward '
                        'pass (less memory, the same loss and gradients)')
    p.add_argument('--compile', action='store_true',
                   help='generator stage: torch.compile each block\'s forward (default: eager)')
    p.add_argument('--benchmark', action='store_true',
                   help='time the generator\'s training step at --model, --image-size, '
                        '--global-batch-size on random weights and inputs (no data, no tokenizer)')
    known = p.parse_known_args(argv)[0]
    resume = None
    method = known.method
    if known.resume:  # the run's method and stage decide which flags exist
        resume = llamagen.load_file(known.resume)
        if 'stage' not in resume:
            raise SystemExit(f'train.py: --resume {known.resume}: an official checkpoint, not a '
                             'run of train.py')
        method = resume['method']
    module = importlib.import_module(method)
    config_fields = {f.name: f for f in fields(module.TokenizerConfig) + fields(module.Config)}
    for name, f in config_fields.items():  # config fields -> --flags (the generator's win a clash)
        if f.name in {a.dest for a in p._actions}:
            continue
        kind = type(f.default)
        p.add_argument('--' + name.replace('_', '-'), nargs='+' if kind is tuple else None,
                       type={bool: parse_bool, tuple: int}.get(kind, kind),
                       help=f'config (default {f.default})')
    p.add_argument('-h', '--help', action='help')
    args = p.parse_args(argv)
    if resume:
        defaults = vars(p.parse_args([]))  # for the flags that the run's checkpoint predates
        args = resumed_args(args, given_flags(p, argv), resume, defaults)
    else:
        defaults = {**STAGE_DEFAULTS[args.stage], **module.CLASSROOM.get(args.stage, {})}
        for name, value in defaults.items():  # what is not given: the classroom run's
            if getattr(args, name) is None:
                setattr(args, name, value)
        sizes = module.SIZES if args.stage == 'generator' else module.TOKENIZER_SIZES
        args.model = args.model or tiny_size(sizes)
        if args.model not in sizes:
            raise SystemExit(f'train.py: --model {args.model}: not a size of {method} '
                             f'({args.stage}): {", ".join(sizes)}')
        if args.tokenizer and not os.path.isfile(args.tokenizer):
            raise SystemExit(f'train.py: --tokenizer {args.tokenizer}: no such file')
        if args.data_path:  # a resumed run finds its data from any working directory
            args.data_path = os.path.abspath(args.data_path)
    check_args(args)
    return args, module, resume


def given_flags(p, argv):
    """The flags given on the command line, {dest: value}: the parser again, with no defaults."""
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


def resumed_args(args, given, resume, defaults):
    """The run's own arguments from its checkpoint (today's defaults for flags it predates). A
    flag given now may change only what RESUME_OVERRIDES names (each change is printed); any
    other difference is refused. RUNTIME flags are this command's, given or not."""
    path = args.resume
    saved = {**defaults, **resume['args']}
    now = {**given, **{k: getattr(args, k) for k in RUNTIME}}
    changed = {k: v for k, v in now.items()
               if k not in ('resume', 'run_dir') and v != saved.get(k)}
    refused = sorted(set(changed) - set(RESUME_OVERRIDES))
    if refused:
        flag = '--' + refused[0].replace('_', '-')
        was = saved.get(refused[0])
        raise SystemExit(f'train.py: --resume {path}: {flag} {changed[refused[0]]} differs from '
                         f'the run\'s {"default" if was is None else was}; a resumed run keeps '
                         f'its flags (it may change {", ".join(RESUME_OVERRIDES)})')
    for k, v in changed.items():
        print(f'--resume: {k} {saved.get(k)} -> {v}')
    run_dir = os.path.dirname(os.path.abspath(path))  # 'last.pt' from inside the run, DIR//last.pt
    return argparse.Namespace(**{**saved, **changed, 'resume': path, 'run_dir': run_dir})


def check_args(args):
    """One line for a flag no run can use, before any work."""
    for name in POSITIVE:
        value = getattr(args, name)
        if value is not None and value <= 0:
            flag = '--' + name.replace('_', '-')
            raise SystemExit(f'train.py: {flag} {value}: must be positive')
    for name in ('lr', 'end_lr', 'weight_decay', 'ema', 'warmup_steps', 'disc_start'):
        if getattr(args, name) < 0:
            flag = '--' + name.replace('_', '-')
            raise SystemExit(f'train.py: {flag} {getattr(args, name)}: must not be negative')
    world = int(os.environ.get('WORLD_SIZE', 1))
    if args.global_batch_size % world:
        raise SystemExit(f'train.py: --global-batch-size {args.global_batch_size} is not '
                         f'divisible by the {world} processes')
    if not args.data_path and not args.benchmark and not 16 <= args.image_size <= 256:
        raise SystemExit(f'train.py: --image-size {args.image_size}: the built-in dataset '
                         'renders 16 to 256 pixels')
    if args.data_path and not os.path.isdir(args.data_path):
        raise SystemExit(f'train.py: --data-path {args.data_path}: not a directory')
    used = [name for name in RUNTIME + ('benchmark',) if getattr(args, name)]
    if args.stage == 'tokenizer' and used:
        raise SystemExit(f'train.py: --{used[0].replace("_", "-")} is for the generator stage; '
                         'the tokenizer stage trains with DDP')
    if args.stage == 'tokenizer' and args.eval_every:
        raise SystemExit('train.py: --eval-every scores samples: it is for the generator stage')
    if args.eval_every and args.data_path and args.eval_samples < 2:
        raise SystemExit(f'train.py: --eval-samples {args.eval_samples}: FID needs at least 2')
    if args.fsdp and 'RANK' not in os.environ:
        raise SystemExit('train.py: --fsdp shards over the processes of torchrun: run under '
                         'torchrun --nproc_per_node=N, or leave --fsdp out')


# --- benchmark: the generator's training step at paper size, on random inputs ------------------
# dense bf16 peak TFLOP/s (NVIDIA's datasheets, no sparsity) by a part of the device name
PEAK_TFLOPS = (('H100 80GB HBM3', 989), ('H100 SXM', 989), ('H200', 989), ('A100', 312))


def stand_in_tokenizer(module):
    """The tokenizer the benchmark pretends to train on, on the meta device (no weights, no
    memory): VQ-16 (16384 codes, stride 16) for the VQ methods, as the README's ImageNet runs;
    IAR2's own (256 semantic + 4096 detail codes); MAR's KL-16 (16-channel latents)."""
    sizes = module.TOKENIZER_SIZES
    name = next(iter(sizes))  # the paper size comes first
    if module.TokenizerConfig is vq.VQConfig:
        sizes, name = vq.VQ_SIZES, 'VQ-16'
    with torch.device('meta'):
        return module.Tokenizer(module.TokenizerConfig(**sizes[name]))


def benchmark(args, module, rank, world, device, warmup=5, steps=20):
    """python train.py --benchmark: random weights at --model, random inputs of the shape the
    stand-in tokenizer gives at --image-size, the training step of a real run (--fsdp,
    --grad-checkpoint, --compile included) in the method's default mode (no on_step: NPP at
    p = 1, RAR in raster order); warm-up steps (compilation), then timed steps.
    Prints the step time, images/s and tokens/s over all processes, and per device the achieved
    TFLOP/s, MFU and peak memory."""
    tok = stand_in_tokenizer(module)
    if args.image_size % tok.stride:
        raise SystemExit(f'train.py: --image-size {args.image_size} is not divisible by the '
                         f'stand-in tokenizer\'s stride {tok.stride}')
    derived = module.derive_config(tok, args.image_size, 1000)  # ImageNet's classes
    cfg = config_from(module.Config, args, module.SIZES[args.model], derived)
    torch.manual_seed(args.seed)
    model = module.Model(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    state, forward = prepare_generator(model, module, args, device)
    params = list(model.parameters())
    batch = args.global_batch_size // world
    with torch.device('meta'):  # the generator's input: its shape and dtype only
        like = tok.training_input(tok.encode(torch.empty(batch, 3, args.image_size,
                                                         args.image_size)))
    x = torch.randn(like.shape, device=device)  # MAR's latents
    if not like.is_floating_point():  # token ids (IAR2's detail ids too: 256 < 4096)
        x = torch.randint(0, tok.cfg.codebook_size, like.shape, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step():  # as loop's: the update, then the EMA's (with --ema)
        loss = generator_update(forward, state['optimizer'], params, x, labels, args.grad_clip)
        if 'ema' in state:
            ema_update(state['ema'], model, args.ema)
        return loss

    for _ in range(warmup):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()  # waits for the last step
    seconds = (time.perf_counter() - t0) / steps
    if rank == 0:
        tokens = (args.image_size // tok.stride) ** 2  # per image: the token grid
        print(benchmark_report(args, device, world, n_params, batch, tokens, seconds), flush=True)


def benchmark_report(args, device, world, n_params, batch, tokens, seconds):
    """The benchmark's lines. FLOPs: 6 x parameters x tokens per step (forward 2, backward 4), a
    rough estimate that leaves out attention and counts every parameter once per token."""
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    modes = [flag for flag in RUNTIME if getattr(args, flag)]
    tflops = 6 * n_params * batch * tokens / seconds / 1e12  # per device
    peak = next((value for part, value in PEAK_TFLOPS if part in name), None)
    mfu = 'MFU unknown (no dense bf16 peak known for this device)'
    if peak:
        mfu = f'MFU {100 * tflops / peak:.1f}% of {peak} TFLOP/s (dense bf16)'
    memory = 'peak memory n/a (CPU)'
    if device.type == 'cuda':
        memory = f'peak memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB'
    return (f'benchmark: {args.method} {args.model} {n_params / 1e6:.1f}M params, '
            f'{args.image_size} px ({tokens} tokens per image), batch {batch} x {world} '
            f'process(es), {", ".join(modes) or "eager"}, on {name}\n'
            f'train step {1000 * seconds:.1f} ms: {world * batch / seconds:.1f} images/s, '
            f'{world * batch * tokens / seconds:.0f} tokens/s\n'
            f'per device: {tflops:.3g} TFLOP/s (estimate: 6 x params x tokens), {mfu}, {memory}')


def build_data(args):  # the ImageFolder of --data-path, or the built-in dataset
    if args.data_path:
        return ImageFolder(args.data_path, args.image_size)
    return builtin_dataset(args.num_images, args.image_size, args.seed)


def main(argv=None):
    args, module, resume = parse_args(argv)
    rank, world, device = llamagen.setup_ddp()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.benchmark:
        benchmark(args, module, rank, world, device)
    elif args.stage == 'tokenizer':
        train_tokenizer(args, module, build_data(args), rank, world, device, resume)
    else:
        data = build_data(args)
        path = args.tokenizer
        if resume:  # the run's own tokenizer
            path = llamagen.run_tokenizer(resume, args.resume)
        path = path or default_tokenizer(args, module, data, rank, world, device)
        tok = llamagen.load_tokenizer(module, path).to(device).eval().requires_grad_(False)
        if args.image_size % tok.stride:
            raise SystemExit(f'train.py: --image-size {args.image_size} is not divisible by the '
                             f'tokenizer stride {tok.stride}')
        train_generator(args, module, data, tok, rank, world, device, resume)
    if dist.is_initialized():  # cleanup, together: a rank that leaves while another still
        dist.barrier()  # writes its files can abort in gloo's teardown
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
