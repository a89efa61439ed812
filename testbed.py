"""The offline testbed: a procedural world of shapes, colours and patterns, its captions, and its small CLIP.

Real CLIP weights and the benchmark datasets cannot be fetched on machines without a network, and a randomly
initialised CLIP has no zero-shot knowledge, so base-to-new generalization cannot be seen with it. This file makes a
small world where it can, on a CPU, in minutes:

- **The world**: 32 px images of a shape (6) in a colour (8), with a pattern, a size and a position, on a tinted
  gradient with noise, and captions of them from 15 templates ("a small red striped star on the top left"). One
  seeded random stream: the same seed gives the same bytes on every machine.
- **The downstream task** (`python testbed.py world DIR`, used by `train.py --dataset world`): 48 colour x shape
  classes in CoOp's layout (`DIR/world/images/<colour>_<shape>/*.png` and `split_zhou_World.json`, 20 / 4 / 50
  train / val / test images per class). Base classes form a checkerboard (colour index + shape index even) and come
  first in label order, so CoCoOp's base/new rule (arXiv:2203.05557v2 Sec. 4.1) picks them; the images are washed
  out (blended 60 % towards grey), a style shift for the prompts to learn.
- **Image-text pairs** (`python testbed.py pairs DIR --n N`): N images of the pretraining distribution with one
  caption each, as a CSV in open_clip's convention (columns `filepath` and `title`, tab-separated), the unlabelled
  pairs GRAM (arXiv:2303.06571v2) meta-trains on.
- **The small CLIP** (`python testbed.py pretrain` -> `testbed/clip_world.pt` + `.sha256`): `clip_model.CLIP`
  (OpenAI's architecture, tokenizer and full 49,408-token vocabulary), vision 128 wide / 3 layers / patch 8 at
  32 px, text 64 wide / 3 layers, context 16, trained contrastively (CLIP arXiv:2103.00020v1 Sec. 2.3) on captions
  of the *base* combinations only: the new classes are new combinations of words it has seen, so zero-shot transfer
  to them is real but weak, as with real CLIP. The loss counts every caption consistent with an image as a positive
  (captions mention a subset of the scene's attributes); only the token-embedding rows of words the world uses are
  trained. 1,000 AdamW steps take about 10-15 minutes on 2 CPU cores.

Imports only `clip_model` from this project. Not included: data augmentation in pretraining beyond the world's own
randomness; mixed precision; other worlds (the sizes were chosen to fit a 2-core CPU and a 10 MB checkpoint).

Shape legend: N images, B a batch, H = W = 32 px, E embed dim.
"""

import argparse
import csv
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import clip_model

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "testbed" / "clip_world.pt"  # the shipped small CLIP; its SHA256 is in CHECKPOINT.sha256

# --- the world ---------------------------------------------------------------------------------------------------
# Classes are colour x shape combinations; "base" combinations form a checkerboard, so every colour and every shape
# occurs among both base and new classes.
WORLD_COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 75, 215), "yellow": (230, 205, 35),
                 "purple": (135, 55, 175), "orange": (240, 135, 30), "pink": (240, 130, 185), "cyan": (40, 200, 210)}
WORLD_SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
WORLD_PATTERNS = ("plain", "striped", "dotted")
WORLD_SIZES = ("small", "large")
WORLD_POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")
WORLD_IMAGE_SIZE, WORLD_DRAW_SCALE = 32, 2  # drawn at 64 px, then box-downsampled
WORLD_MAX_ROTATION = 14  # degrees
WORLD_NOISE_STD = 6.0  # per-pixel Gaussian noise (0-255 scale), from the scene's own random stream
WORLD_CROP_SCALE = (0.5, 1.0)  # train-time RandomResizedCrop scale: Dassl's 0.08 would crop a 32 px shape away
WORLD_WASHOUT = 0.6  # downstream style shift: blend 60 % towards grey (washed-out colours)
WORLD_SPLIT = (20, 4, 50)  # train / val / test images per class of the downstream task
WORLD_SEED = 0
# The DG task: the world in five styles, each a domain (leave-one-style-out multi-source DG, MetaPrompt's setting).
WORLD_STYLES = {"clean": {}, "washed": {"washout": WORLD_WASHOUT}, "dark": {"brightness": 0.35},
                "noisy": {"noise_std": 40.0}, "outline": {"outline": True}}
WORLD_OUTLINE_WIDTH = 4  # px at the 64 px drawing size
STYLES_SPLIT = (5, 4, 10)  # train / val / test images per class and style (5 shots per class and domain at most)
CAPTION_TEMPLATES = (  # {c} colour, {s} shape, {p} pattern, {z} size, {o} position
    "a {c} {s}", "a photo of a {c} {s}.", "a {c} {p} {s}", "a {z} {c} {s}", "a {z} {c} {p} {s} on the {o}",
    "a {s} that is {c}", "a picture of a {c} {s}", "the {c} {s}", "a {p} {c} {s}", "a {c} {s} on the {o}",
    "a drawing of a {z} {c} {s}", "a {s} colored {c}", "an image of a {c} {s}", "a photo of the {c} {s}.",
    "a {z} {p} {c} {s}",
)


def world_classes():
    """[(colour, shape)] in label order: the 24 base combinations first, then the 24 new ones, so that CoCoOp's
    rule (base = the first half of the labels) picks the checkerboard."""
    combos = [(c, s) for ci, c in enumerate(WORLD_COLOURS) for si, s in enumerate(WORLD_SHAPES)]
    is_base = [(ci + si) % 2 == 0 for ci in range(len(WORLD_COLOURS)) for si in range(len(WORLD_SHAPES))]
    return [c for c, b in zip(combos, is_base) if b] + [c for c, b in zip(combos, is_base) if not b]


def sample_world_attributes(rng, colour=None, shape=None):
    """A random scene: colour, shape, pattern, size, position (names), fixed colour/shape if given."""
    return {"c": colour or rng.choice(list(WORLD_COLOURS)), "s": shape or rng.choice(WORLD_SHAPES),
            "p": rng.choice(WORLD_PATTERNS), "z": rng.choice(WORLD_SIZES), "o": rng.choice(WORLD_POSITIONS)}


def shape_polygon(shape, cx, cy, r, angle):
    """Outline points of a shape of radius r around (cx, cy), rotated by `angle` radians (rings: two circles)."""
    if shape in ("circle", "ring"):
        n, radii = 32, [r]
    elif shape == "square":
        n, radii, angle = 4, [r], angle + math.pi / 4
    elif shape == "triangle":
        n, radii, angle = 3, [r], angle - math.pi / 2
    elif shape == "star":
        n, radii, angle = 10, [r, 0.45 * r], angle - math.pi / 2
    else:  # cross: a plus sign of arm half-width r / 3
        w = r / 3
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w),
                   (-w, w), (-w, r)]
        return [(cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
                for x, y in corners]
    return [(cx + radii[k % len(radii)] * math.cos(angle + 2 * math.pi * k / n),
             cy + radii[k % len(radii)] * math.sin(angle + 2 * math.pi * k / n)) for k in range(n)]


def render_world_image(attrs, rng, washout=0.0, outline=False, noise_std=WORLD_NOISE_STD, brightness=1.0):
    """A 32 px RGB image of the scene `attrs` (PIL), drawn at 64 px: tinted gradient background, shape with its
    pattern and a jittered colour, pixel noise; `washout` blends it towards grey (the downstream style shift). The
    other styles of the DG task: `outline` draws only the shape's contour, `noise_std` sets the pixel noise,
    `brightness` scales the image (the defaults give the bytes of the base-to-new task)."""
    n = WORLD_IMAGE_SIZE * WORLD_DRAW_SCALE
    grey, tint = rng.randint(70, 190), [rng.randint(-20, 20) for _ in range(3)]
    slope = rng.uniform(-0.6, 0.6)
    ramp = slope * (np.arange(n) - n / 2)  # (n,) a horizontal gradient
    pixels = np.broadcast_to(grey + np.asarray(tint)[None, None, :] + ramp[None, :, None], (n, n, 3))  # (n, n, 3)
    background = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    jitter = rng.uniform(0.8, 1.15)
    colour = tuple(max(0, min(255, int(v * jitter))) for v in WORLD_COLOURS[attrs["c"]])
    fill = Image.new("RGB", (n, n), colour)
    if attrs["p"] != "plain":  # darker stripes or dots inside the shape
        dark = tuple(v // 3 for v in colour)
        draw = ImageDraw.Draw(fill)
        for k in range(0, n, 8):
            if attrs["p"] == "striped":
                draw.rectangle([k, 0, k + 3, n], fill=dark)
            else:
                for j in range(2, n, 8):
                    draw.ellipse([k + 2, j, k + 5, j + 3], fill=dark)
    r = n * (0.17 if attrs["z"] == "small" else 0.3)
    offset = {"center": (0, 0), "top left": (-1, -1), "top right": (1, -1), "bottom left": (-1, 1),
              "bottom right": (1, 1)}[attrs["o"]]
    cx, cy = n / 2 + offset[0] * (n / 2 - r - 2), n / 2 + offset[1] * (n / 2 - r - 2)
    mask = Image.new("L", (n, n), 0)
    angle = math.radians(rng.uniform(-WORLD_MAX_ROTATION, WORLD_MAX_ROTATION))
    outline_width = {"outline": 255, "width": WORLD_OUTLINE_WIDTH} if outline else {"fill": 255}
    ImageDraw.Draw(mask).polygon(shape_polygon(attrs["s"], cx, cy, r, angle), **outline_width)
    if attrs["s"] == "ring":
        ImageDraw.Draw(mask).ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2],
                                     **(outline_width if outline else {"fill": 0}))
    image = Image.composite(fill, background, mask).resize((WORLD_IMAGE_SIZE,) * 2, Image.BOX)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, noise_std, (WORLD_IMAGE_SIZE,) * 2 + (3,))
    pixels = (np.asarray(image, dtype=np.float64) + noise) * brightness if brightness != 1.0 else \
        np.asarray(image, dtype=np.float64) + noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return Image.blend(image, Image.new("RGB", image.size, (128, 128, 128)), washout) if washout else image


def world_caption(attrs, rng):
    """A caption of the scene from one of the templates; returns (text, the attribute keys it mentions)."""
    template = rng.choice(CAPTION_TEMPLATES)
    mentioned = tuple(k for k in "cspzo" if "{" + k + "}" in template)
    return template.format(**attrs), mentioned


def refuse_existing(folder: Path):
    """A dataset is written once: never over an existing folder (create its parent otherwise)."""
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; delete it to write it again")
    folder.parent.mkdir(parents=True, exist_ok=True)


def make_world_dataset(root, seed=WORLD_SEED, per_class=WORLD_SPLIT, washout=WORLD_WASHOUT):
    """Write the downstream task in CoOp's layout: `<root>/world/images/<colour>_<shape>/*.png` and
    `split_zhou_World.json` (48 classes, base first; entries [relpath, label, class name]); deterministic for a
    seed. The folder is built under a temporary name and renamed at the end, so an interrupted run leaves no
    half-made world behind. Returns the class names in label order."""
    rng = random.Random(seed)
    root = Path(root)
    refuse_existing(root / "world")
    with tempfile.TemporaryDirectory(dir=root, prefix=".world-") as tmp:
        folder = Path(tmp) / "world"
        splits = {"train": [], "val": [], "test": []}
        for label, (colour, shape) in enumerate(world_classes()):
            (folder / "images" / f"{colour}_{shape}").mkdir(parents=True, exist_ok=True)
            for i in range(sum(per_class)):
                relpath = f"{colour}_{shape}/{i:03d}.png"
                render_world_image(sample_world_attributes(rng, colour, shape), rng, washout).save(
                    folder / "images" / relpath)
                split = "train" if i < per_class[0] else "val" if i < per_class[0] + per_class[1] else "test"
                splits[split].append([relpath, label, f"{colour} {shape}"])
        # CoOp's split format, indented as Dassl's write_json (atomic: the whole folder is renamed below)
        (folder / "split_zhou_World.json").write_text(json.dumps(splits, indent=4, separators=(",", ": ")))
        os.replace(folder, root / "world")
    return [f"{c} {s}" for c, s in world_classes()]


def make_styles_dataset(root, seed=WORLD_SEED, per_class=STYLES_SPLIT):
    """Write the DG task in the layout of the DG suites: `<root>/world_styles/<style>/{train,val,test}/<colour>_<shape>/
    *.png`, the 48 classes in every style of WORLD_STYLES; each style from its own seeded stream (seed * 100 + its
    index), deterministic. Built under a temporary name and renamed at the end."""
    root = Path(root)
    refuse_existing(root / "world_styles")
    with tempfile.TemporaryDirectory(dir=root, prefix=".world_styles-") as tmp:
        folder = Path(tmp) / "world_styles"
        for index, (style, options) in enumerate(WORLD_STYLES.items()):
            rng = random.Random(seed * 100 + index)
            for colour, shape in world_classes():
                for i in range(sum(per_class)):
                    split = "train" if i < per_class[0] else "val" if i < per_class[0] + per_class[1] else "test"
                    path = folder / style / split / f"{colour}_{shape}" / f"{i:03d}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    render_world_image(sample_world_attributes(rng, colour, shape), rng, **options).save(path)
        os.replace(folder, root / "world_styles")
    return list(WORLD_STYLES)


DATASETS = ("world", "world_styles")  # what train.py and eval.py read as datasets (data.DATASETS has their layout)


def ensure_dataset(name, root) -> Path:
    """The testbed dataset `name` ("world" or "world_styles") under `root`, written on first use (what
    `train.py --dataset world` calls)."""
    folder = Path(root).expanduser() / name
    if not folder.is_dir():
        print(f"writing the testbed's {name} dataset to {folder} (a few seconds, once)", file=sys.stderr)
        (make_world_dataset if name == "world" else make_styles_dataset)(Path(root).expanduser())
    return folder


# --- image-text pairs of the pretraining distribution ------------------------------------------------------------
def base_classes():
    """The 24 base colour-shape combinations: the only ones the pretraining captions (and the pairs) show."""
    return world_classes()[:len(world_classes()) // 2]


def sample_pretraining_scene(rng):
    """A scene of the pretraining distribution: a random base combination, no wash-out (regime (b) of the
    testbed: new combinations are held out of pretraining)."""
    return sample_world_attributes(rng, *rng.choice(base_classes()))


CSV_IMG_KEY, CSV_CAPTION_KEY, CSV_SEPARATOR = "filepath", "title", "\t"  # open_clip's --csv-* defaults


def write_pairs(folder, n, seed=WORLD_SEED, separator=CSV_SEPARATOR) -> Path:
    """N rendered images (`<folder>/images/<i>.png`) of the pretraining distribution and one caption each, as
    `<folder>/pairs.csv` in open_clip's CSV convention (header `filepath<sep>title`; paths absolute, as open_clip
    opens them as given). Deterministic for a seed. Returns the CSV's path."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, not {n}")
    rng = random.Random(seed)
    folder = Path(folder).expanduser().resolve()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        scene = sample_pretraining_scene(rng)
        path = folder / "images" / f"{i:06d}.png"
        render_world_image(scene, rng).save(path)
        rows.append((str(path), world_caption(scene, rng)[0]))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="pairs.csv", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=separator, lineterminator="\n")
        writer.writerow((CSV_IMG_KEY, CSV_CAPTION_KEY))
        writer.writerows(rows)
    os.replace(tmp, folder / "pairs.csv")
    return folder / "pairs.csv"


# --- pretraining the small CLIP (CLIP arXiv:2103.00020v1 Sec. 2.3, with multi-positive targets) ------------------
TESTBED_CONFIG = {"embed_dim": 64, "image_resolution": WORLD_IMAGE_SIZE, "vision_layers": 3,
                  "vision_width": 128, "vision_patch_size": 8, "context_length": 16, "vocab_size": 49408,
                  "transformer_width": 64, "transformer_heads": 1, "transformer_layers": 3}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # openai/CLIP clip.py _transform Normalize
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ZERO_SHOT_TEMPLATE = "a photo of a {}."  # CoOp's template for generic objects (zsclip.py CUSTOM_TEMPLATES)
ATTRIBUTES = "cspzo"  # colour, shape, pattern, size, position (CAPTION_TEMPLATES keys)


def render_pretraining_set(n_images: int, rng: random.Random):
    """Images of base colour-shape combinations only, as uint8 (N, 3, H, W), and their scenes."""
    scenes = [sample_pretraining_scene(rng) for _ in range(n_images)]
    images = torch.stack([torch.frombuffer(bytearray(render_world_image(a, rng).tobytes()), dtype=torch.uint8)
                          for a in scenes])  # (N, H*W*3)
    size = WORLD_IMAGE_SIZE
    return images.view(n_images, size, size, 3).permute(0, 3, 1, 2).contiguous(), scenes  # (N, 3, H, W)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, CLIP-normalised (B, 3, H, W)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def positives(scenes: list, mentioned: list) -> torch.Tensor:
    """(B, B) mask: caption j is consistent with image i iff every attribute it mentions matches scene i."""
    values = torch.tensor([[hash(scene[k]) for k in ATTRIBUTES] for scene in scenes])  # (B, 5)
    said = torch.tensor([[k in m for k in ATTRIBUTES] for m in mentioned])  # (B, 5) caption j mentions k
    agree = values[:, None, :] == values[None, :, :]  # (B_image, B_caption, 5)
    return (agree | ~said[None, :, :]).all(-1).float()  # (B, B)


def multi_positive_contrastive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with soft targets spread uniformly over the positives of each row / column."""
    image_to_text = -(positive / positive.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    text_to_image = -(positive / positive.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def world_token_ids() -> torch.Tensor:
    """Every token id the world's captions, class prompts and templates can produce (rows worth training)."""
    words = list(WORLD_COLOURS) + list(WORLD_SHAPES) + list(WORLD_PATTERNS) + list(WORLD_SIZES) \
        + list(WORLD_POSITIONS) + ["a photo of a ."] + [t.format(c="", s="", p="", z="", o="")
                                                          for t in CAPTION_TEMPLATES]
    return torch.unique(clip_model.tokenize(words, context_length=TESTBED_CONFIG["context_length"]))


def load_images(folder: Path, relpaths: list) -> torch.Tensor:
    """PNG files of the world -> uint8 (N, 3, H, W) (32 px already: the test transform is the identity)."""
    return torch.stack([torch.from_numpy(np.array(Image.open(folder / "images" / r).convert("RGB"))).permute(2, 0, 1)
                        for r in relpaths])


@torch.no_grad()
def zero_shot_accuracy(model, root) -> dict:
    """Zero-shot accuracy (%) with "a photo of a {}." on the downstream test set's base and new classes (24-way
    each, as the base-to-new protocol evaluates them)."""
    folder = ensure_dataset("world", root)
    test = json.loads((folder / "split_zhou_World.json").read_text())["test"]
    n_base, result = len(base_classes()), {}
    for subsample, labels in (("base", range(n_base)), ("new", range(n_base, 2 * n_base))):
        names = [f"{c} {s}" for c, s in world_classes()[labels.start:labels.stop]]
        text = clip_model.tokenize([ZERO_SHOT_TEMPLATE.format(n) for n in names], context_length=model.context_length)
        text_features = F.normalize(model.encode_text(text), dim=-1)  # (24, E)
        items = [(relpath, label - labels.start) for relpath, label, _ in test if label in labels]
        images = normalize_images(load_images(folder, [r for r, _ in items]))  # (N, 3, H, W)
        image_features = F.normalize(model.encode_image(images), dim=-1)  # (N, E)
        predictions = (image_features @ text_features.t()).argmax(-1)  # (N,)
        result[subsample] = 100.0 * (predictions == torch.tensor([y for _, y in items])).float().mean().item()
    return result


def save_fp16(model, path: Path) -> str:
    """Atomic fp16 state-dict file next to its SHA256 (the loader restores float32)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def pretrain(steps=1000, batch_size=256, n_images=50_000, lr=1.5e-3, weight_decay=0.1, warmup=30, seed=0,
             output=CHECKPOINT):
    """Pretrain the small CLIP (AdamW, linear warm-up then cosine; multi-positive contrastive loss) and save it."""
    random.seed(seed)
    torch.manual_seed(seed)
    rng, start = random.Random(seed), time.time()
    images, scenes = render_pretraining_set(n_images, rng)
    print(f"rendered {len(scenes)} images in {time.time() - start:.0f} s")
    model = clip_model.CLIP(**TESTBED_CONFIG).train()
    row_mask = torch.zeros(TESTBED_CONFIG["vocab_size"], 1)
    row_mask[world_token_ids()] = 1
    model.token_embedding.weight.register_hook(lambda g: g * row_mask)  # unused rows keep their init
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=lr)
    order = torch.randperm(n_images)
    for step in range(steps):
        step_lr = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        idx = order[(step * batch_size + torch.arange(batch_size)) % n_images]
        batch_scenes = [scenes[i] for i in idx.tolist()]
        captions = [world_caption(scene, rng) for scene in batch_scenes]
        text = clip_model.tokenize([c for c, _ in captions], context_length=TESTBED_CONFIG["context_length"])
        image_features = F.normalize(model.encode_image(normalize_images(images[idx])), dim=-1)  # (B, E)
        text_features = F.normalize(model.encode_text(text), dim=-1)  # (B, E)
        logits = model.logit_scale.exp() * image_features @ text_features.t()  # (B, B)
        loss = multi_positive_contrastive_loss(logits, positives(batch_scenes, [m for _, m in captions]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  logit scale {model.logit_scale.exp().item():.1f}  "
                  f"lr {step_lr:.2e}  {time.time() - start:.0f} s", flush=True)
    model.eval()
    digest = save_fp16(model, Path(output))
    shipped = clip_model.load(output, device="cpu")  # what users get: the fp16 file, back in float32
    with tempfile.TemporaryDirectory() as root:
        accuracy = zero_shot_accuracy(shipped, root)
    print(f"wrote {output} (sha256 {digest}); zero-shot accuracy on the world's downstream test set: "
          f"base {accuracy['base']:.1f} %, new {accuracy['new']:.1f} % (chance {100 / 24:.1f} %); "
          f"{time.time() - start:.0f} s in all")
    return accuracy


def check_checkpoint(path=CHECKPOINT):
    """The shipped small CLIP must be the file that was pretrained: compare its SHA256 with the recorded one."""
    path = Path(path)
    record = path.with_name(path.name + ".sha256")
    if not path.is_file() or not record.is_file():
        raise clip_model.CheckpointError(f"{path} or its {record.name} is missing; restore them from the "
                                         "repository or rebuild them with: python testbed.py pretrain")
    expected = record.read_text().split()[0]
    if clip_model.sha256_of(path) != expected:
        raise clip_model.CheckpointError(f"{path} does not match its SHA256 {expected}; restore it from the "
                                         "repository or rebuild it with: python testbed.py pretrain")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    world = sub.add_parser("world", help="write the downstream task in CoOp's layout to DIR/world")
    world.add_argument("dir")
    styles = sub.add_parser("styles", help="write the DG task (the world in 5 styles) to DIR/world_styles")
    styles.add_argument("dir")
    pairs = sub.add_parser("pairs", help="write N image-caption pairs and DIR/pairs.csv (open_clip convention)")
    pairs.add_argument("dir")
    pairs.add_argument("--n", type=int, default=10_000, help="number of pairs")
    pairs.add_argument("--seed", type=int, default=WORLD_SEED)
    pairs.add_argument("--csv-separator", default=CSV_SEPARATOR, help="open_clip's --csv-separator (a tab)")
    pre = sub.add_parser("pretrain", help="rebuild testbed/clip_world.pt (about 10-15 min on 2 CPU cores)")
    pre.add_argument("--steps", type=int, default=1000, help="optimizer steps (~0.75 s each on one core)")
    pre.add_argument("--threads", type=int, default=1, help="torch threads: one is faster for these small ops")
    pre.add_argument("--batch-size", type=int, default=256)
    pre.add_argument("--images", type=int, default=50_000, help="images rendered once; captions redrawn each pass")
    pre.add_argument("--lr", type=float, default=1.5e-3, help="AdamW peak lr, cosine decay")
    pre.add_argument("--weight-decay", type=float, default=0.1)
    pre.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--output", default=str(CHECKPOINT))
    args = p.parse_args(argv)
    if args.command == "world":
        make_world_dataset(args.dir)
        print(f"wrote {Path(args.dir) / 'world'}: {len(world_classes())} classes, "
              f"{'/'.join(map(str, WORLD_SPLIT))} train/val/test images each")
    elif args.command == "styles":
        make_styles_dataset(args.dir)
        print(f"wrote {Path(args.dir) / 'world_styles'}: styles {', '.join(WORLD_STYLES)}, {len(world_classes())} "
              f"classes, {'/'.join(map(str, STYLES_SPLIT))} train/val/test images per class and style")
    elif args.command == "pairs":
        print(f"wrote {write_pairs(args.dir, args.n, args.seed, args.csv_separator)}: {args.n} image-caption pairs")
    else:
        torch.set_num_threads(args.threads)
        pretrain(args.steps, args.batch_size, args.images, args.lr, args.weight_decay, args.warmup, args.seed,
                 Path(args.output))


if __name__ == "__main__":
    try:
        main()
    except (FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
