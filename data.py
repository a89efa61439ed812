"""Datasets, few-shot splits, transforms and loaders of the CoOp protocol, without Dassl.

Reproduces the data protocol of CoOp ("Learning to Prompt for Vision-Language Models", arXiv:2109.01134v6)
and CoCoOp ("Conditional Prompt Learning for Vision-Language Models", arXiv:2203.05557v2) as implemented
in KaiyangZhou/CoOp @ ff61507c + KaiyangZhou/Dassl.pytorch v0.6.3 (c61a1b57): the same folders under one
`--root`, the same split files, the same few-shot draw for the same seed (Python `random`, per label in
first-appearance order), CoCoOp's base/new class halves, Dassl's transforms and loader settings. The
domain-generalisation suites (PACS, VLCS, OfficeHome, DomainNet) follow MetaPrompt ("Learning Domain
Invariant Prompt for Vision-Language Models", arXiv:2212.04196v2; Vill-Lab/2024-TIP-MetaPrompt @ ca996074).

Folder layout under --root (CoOp's DATASETS.md; MetaPrompt's for the DG suites):
    imagenet/images/{train,val}/<wnid>/*.JPEG  (+ classnames.txt, optional: a copy ships in splits/)
    caltech-101/101_ObjectCategories/<class>/*.jpg      oxford_pets/images/*.jpg
    stanford_cars/{cars_train,cars_test}/*.jpg           oxford_flowers/jpg/*.jpg
    food-101/images/<class>/*.jpg                        fgvc_aircraft/{images/*.jpg, variants.txt,
    sun397/{SUN397/<l>/<scene>/*.jpg, ClassName.txt,         images_variant_{train,val,test}.txt}
            Training_01.txt, Testing_01.txt}             dtd/images/<class>/*.jpg
    eurosat/2750/<Class>/*.jpg                           ucf101/UCF-101-midframes/<Action>/*.jpg
    imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg
    imagenet-sketch/images/<wnid>/*   imagenet-adversarial/imagenet-a/<wnid>/*   imagenet-rendition/imagenet-r/<wnid>/*
    pacs/{images/<domain>/<class>/*, splits/<domain>_{train,crossval}_kfold.txt}
    vlcs/<DOMAIN>/{train,crossval,test}/<class folder>/*.jpg   (Dassl's archive calls the folder VLCS/)
    office_home/<domain>/{train,val}/<Class>/*.jpg            (Dassl's archive calls it office_home_dg/)
    domainnet/{<domain>/<class>/*.jpg, splits/<domain>_{train,test}.txt}
A `split_zhou_<Name>.json` inside a dataset folder takes precedence over the copy shipped in splits/.

Deliberate differences from CoOp:
  * Files inside a class folder are read in sorted order (ImageNet and its variants, the DG folders).
    CoOp uses unsorted `os.listdir`, so its ImageNet few-shot subsets depend on the file system and
    cannot be reproduced elsewhere; ours are the same on every machine.
  * Few-shot selections are cached as JSON with paths relative to the image folder (CoOp: pickles of
    absolute paths), at the same place: <dataset folder>/split_fewshot/shot_{K}-seed_{S}.json
    (DG suites: <target domain>_shot_{K}-seed_{S}.json; MetaPrompt prefixes the target's index).
  * Test-only datasets (ImageNet-V2/-Sketch/-A/-R) return an empty train list (CoOp sets train = test).
Your own images (`--dataset folder --root DIR`, `read_folder`): DIR/<class>/<image> split once into DIR/split.json
(CoOp's format and proportions), or DIR/{train,val,test}/<class>/<image> as given.
Also here: small synthetic datasets for tests (`make_synthetic_dataset`; `make_synthetic_dg_dataset`, three domains);
image-caption pairs in open_clip's CSV convention (`read_pairs`, GRAM's meta-training data). The offline testbed's
world and its styles are read like any CoOp dataset or DG suite (`world`, `world_styles`); testbed.py writes them.
Not included: Dassl's other transforms (colour jitter, Gaussian noise, ...), the `repeat` option of
few-shot sampling, multi-view (K_TRANSFORMS) loading, unlabelled/target-domain loaders.

Shape legend: B images in a batch, H = W = image size.
"""
import argparse
import csv
import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler
from torchvision import transforms as T
from torchvision.datasets.utils import download_file_from_google_drive, download_url, extract_archive

SPLITS_DIR = Path(__file__).resolve().parent / "splits"  # shipped split files and class lists

# --- constants, with their source ---------------------------------------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CoOp configs INPUT.PIXEL_MEAN = openai/CLIP clip.py
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # CoOp configs INPUT.PIXEL_STD
IMAGE_SIZE = 224  # CoOp configs INPUT.SIZE
RRC_SCALE = (0.08, 1.0)  # Dassl defaults.py INPUT.RRCROP_SCALE (torchvision default)
VAL_SHOTS_CAP = 4  # CoOp datasets/*.py: val few-shot uses min(num_shots, 4)
P_TRAIN, P_VAL = 0.5, 0.2  # CoOp dtd.py read_and_split_data (rest is test)
P_VAL_TRAINVAL = 0.2  # CoOp oxford_pets.py split_trainval
GENERATED_SPLIT_SEED = 1  # our choice: seed of a split made here when CoOp's file is unavailable
TRAIN_BATCH_SIZE = 32  # CoOp configs DATALOADER.TRAIN_X.BATCH_SIZE
TEST_BATCH_SIZE = 100  # Dassl defaults.py DATALOADER.TEST.BATCH_SIZE
NUM_WORKERS = 8  # CoOp configs DATALOADER.NUM_WORKERS
ALL_SHOTS = -1  # every training image (CoOp NUM_SHOTS = -1; train.py's `--shots all`)
PACS_ERROR_PATHS = ("sketch/dog/n02103406_4068-1.png",)  # MetaPrompt datasets/pacs.py: unreadable image
VLCS_CLASSES = ("bird", "car", "chair", "dog", "person")  # MetaPrompt datasets/vlcs.py, label order
# what counts as an image in class folders: torchvision datasets/folder.py IMG_EXTENSIONS (ImageFolder's list)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A user-facing data problem (missing folder, missing or corrupt image, bad name): one clear line."""


class Datum(NamedTuple):
    """One sample, as Dassl's `Datum`: absolute image path, 0-based label, class name, domain index."""

    impath: str
    label: int
    classname: str
    domain: int = 0


class DatasetSplits(NamedTuple):
    """What `build_dataset` returns; unpacks as `train, val, test, classnames = build_dataset(...)`."""

    train: list
    val: list
    test: list
    classnames: list


# --- class names and prompt templates -------------------------------------------------------------------
CALTECH_NEW_CNAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_NEW_CNAMES = {  # CoOp datasets/eurosat.py NEW_CNAMES
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}


def clean_classname(dataset, raw):
    """Class name as CoOp stores it (`Datum.classname`), from the raw folder/annotation name.

    caltech101/eurosat: CoOp's NEW_CNAMES; sun397: "a/apse/indoor" -> "indoor apse"; stanford_cars: the
    trailing year moves to the front; ucf101: "ApplyEyeMakeup" -> "Apply_Eye_Makeup"; office_home: lower
    case (Dassl digits_dg.py); every other dataset keeps the raw name.
    """
    if dataset == "caltech101":
        return CALTECH_NEW_CNAMES.get(raw, raw)
    if dataset == "eurosat":
        return EUROSAT_NEW_CNAMES.get(raw, raw)
    if dataset == "sun397":  # drop the letter folder; words like indoor/outdoor go first
        return " ".join(raw.strip("/").split("/")[1:][::-1])
    if dataset == "stanford_cars":
        *words, year = raw.split(" ")
        return " ".join([year, *words])
    if dataset == "ucf101":
        return "_".join(re.findall("[A-Z][^A-Z]*", raw))
    if dataset == "office_home":
        return raw.lower()
    return raw


def prompt_classname(classname):
    """The name that goes into a prompt: every CoOp-family trainer replaces "_" by " "."""
    return classname.replace("_", " ")


# Zero-shot templates, CoOp trainers/zsclip.py CUSTOM_TEMPLATES (keyed there by the Dassl class name);
# DG suites: MetaPrompt trainers/meta.py:200-204 (no final period there).
CUSTOM_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.", "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.", "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.", "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.", "SUN397": "a photo of a {}.", "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.", "ImageNet": "a photo of a {}.", "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.", "ImageNetA": "a photo of a {}.", "ImageNetR": "a photo of a {}.",
    "PACS": "a photo of a {}", "VLCS": "a photo of a {}", "OfficeHome": "a photo of a {}",
    "DomainNet": "a photo of a {}", "Synthetic": "a photo of a {}.", "World": "a photo of a {}.",
    "SyntheticDG": "a photo of a {}.", "WorldStyles": "a photo of a {}.",
    "Folder": "a photo of a {}.",  # your own images: train.py --template changes it
}

# MetaPrompt's frozen hand-made templates (Vill-Lab/2024-TIP-MetaPrompt trainers/meta.py:200-230, no final period;
# any dataset whose name contains "ImageNet" gets the 8-template ensemble); datasets the release does not list (the
# synthetic set, the testbed) use CUSTOM_TEMPLATES.
METAPROMPT_TEMPLATES = {
    "StanfordCars": "a photo of a {}", "Caltech101": "a photo of a {}", "OxfordFlowers": "a photo of a {}, a type of flower",
    "EuroSAT": "a centered satellite photo of {}", "DescribableTextures": "{} texture",
    "Food101": "a photo of a {}, a type of food", "FGVCAircraft": "a photo of a {}, a type of aircraft",
    "OxfordPets": "a photo of a {}, a type of pet", "UCF101": "a photo of a person doing {}", "SUN397": "a photo of a {}",
    "PACS": "a photo of a {}", "VLCS": "a photo of a {}", "OfficeHome": "a photo of a {}", "DomainNet": "a photo of a {}",
}
METAPROMPT_IMAGENET_TEMPLATES = ["itap of a {}", "a bad photo of the {}", "a origami {}", "a photo of the large {}",
                                 "a {} in a video game", "art of the {}", "a photo of the small {}", "a photo of a {}"]

# The 80 templates of openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb, in order
# (= CoOp trainers/imagenet_templates.py IMAGENET_TEMPLATES).
IMAGENET_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]
# CoOp trainers/imagenet_templates.py IMAGENET_TEMPLATES_SELECT (used by ZeroshotCLIP2).
IMAGENET_TEMPLATES_SELECT = [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
]
# PromptSRC / ProMetaR trainers/imagenet_templates.py: "a photo of a {}." first, then CLIP's first 60
# templates without it (60 in all); their frozen teacher averages the text features over these.
IMAGENET_TEMPLATES_PROMPTSRC = ["a photo of a {}."] + [t for t in IMAGENET_TEMPLATES[:60] if t != "a photo of a {}."]


# --- the dataset table ---------------------------------------------------------------------------------
class DatasetSpec(NamedTuple):
    """Where a dataset lives and how its lists are read. Paths: dataset_dir under --root, image_dir under it."""

    coop_name: str  # Dassl/CoOp class name; keys CUSTOM_TEMPLATES and the split_zhou_<coop_name>.json file
    dataset_dir: str
    image_dir: str  # split-file paths are relative to dataset_dir/image_dir
    kind: str  # how the lists are read: split | fgvc | imagenet | imagenet_variant | pacs | vlcs | ...
    url: str  # where to get it
    layout: str  # expected layout, shown in errors
    domains: tuple = ()  # DG suites only, in MetaPrompt's order (DATASET.ID indexes it)


DATASETS = {
    "imagenet": DatasetSpec("ImageNet", "imagenet", "images", "imagenet", "https://image-net.org/ (ILSVRC-2012)",
                            "imagenet/images/{train,val}/<wnid>/*.JPEG (val re-organised into wnid folders)"),
    "caltech101": DatasetSpec("Caltech101", "caltech-101", "101_ObjectCategories", "split",
                              "https://data.caltech.edu/records/mzrjq-6wc02",
                              "caltech-101/101_ObjectCategories/<class>/image_*.jpg"),
    "oxford_pets": DatasetSpec("OxfordPets", "oxford_pets", "images", "split",
                               "https://www.robots.ox.ac.uk/~vgg/data/pets/", "oxford_pets/images/<Breed>_<n>.jpg"),
    "stanford_cars": DatasetSpec("StanfordCars", "stanford_cars", "", "split",
                                 "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (mirrors: Kaggle)",
                                 "stanford_cars/{cars_train,cars_test}/*.jpg"),
    "oxford_flowers": DatasetSpec("OxfordFlowers", "oxford_flowers", "jpg", "split",
                                  "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
                                  "oxford_flowers/jpg/image_*.jpg"),
    "food101": DatasetSpec("Food101", "food-101", "images", "split",
                           "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
                           "food-101/images/<class>/*.jpg"),
    "fgvc_aircraft": DatasetSpec("FGVCAircraft", "fgvc_aircraft", "images", "fgvc",
                                 "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
                                 "fgvc_aircraft/{images/*.jpg, variants.txt, images_variant_{train,val,test}.txt}"
                                 " (the data/ folder of the archive, renamed)"),
    "sun397": DatasetSpec("SUN397", "sun397", "SUN397", "split", "https://vision.princeton.edu/projects/2010/SUN/",
                          "sun397/{SUN397/<letter>/<scene>/*.jpg, ClassName.txt, Training_01.txt, Testing_01.txt}"),
    "dtd": DatasetSpec("DescribableTextures", "dtd", "images", "split", "https://www.robots.ox.ac.uk/~vgg/data/dtd/",
                       "dtd/images/<class>/<class>_*.jpg"),
    "eurosat": DatasetSpec("EuroSAT", "eurosat", "2750", "split", "https://github.com/phelber/EuroSAT",
                           "eurosat/2750/<Class>/<Class>_*.jpg"),
    "ucf101": DatasetSpec("UCF101", "ucf101", "UCF-101-midframes", "split",
                          "https://drive.google.com/file/d/10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O (CoOp's mid-frames)",
                          "ucf101/UCF-101-midframes/<Action_Name>/v_*.jpg"),
    "imagenetv2": DatasetSpec("ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
                              "imagenet_variant", "https://github.com/modestyachts/ImageNetV2 (matched-frequency)",
                              "imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg"),
    "imagenet_sketch": DatasetSpec("ImageNetSketch", "imagenet-sketch", "images", "imagenet_variant",
                                   "https://github.com/HaohanWang/ImageNet-Sketch",
                                   "imagenet-sketch/images/<wnid>/* (the archive's sketch/ folder renamed images/)"),
    "imagenet_a": DatasetSpec("ImageNetA", "imagenet-adversarial", "imagenet-a", "imagenet_variant",
                              "https://github.com/hendrycks/natural-adv-examples",
                              "imagenet-adversarial/imagenet-a/<wnid>/* (200 wnids)"),
    "imagenet_r": DatasetSpec("ImageNetR", "imagenet-rendition", "imagenet-r", "imagenet_variant",
                              "https://github.com/hendrycks/imagenet-r",
                              "imagenet-rendition/imagenet-r/<wnid>/* (200 wnids)"),
    "pacs": DatasetSpec("PACS", "pacs", "images", "pacs",
                        "https://drive.google.com/uc?id=1m4X4fROCCXMO0lRLrr6Zz9Vb3974NWhE (Dassl's archive)",
                        "pacs/{images/<domain>/<class>/*, splits/<domain>_{train,crossval}_kfold.txt}",
                        ("art_painting", "cartoon", "photo", "sketch")),
    "vlcs": DatasetSpec("VLCS", "vlcs", "", "vlcs",
                        "https://drive.google.com/uc?id=1r0WL5DDqKfSPp9E3tRENwHaXNs1olLZd (Dassl's archive)",
                        "vlcs/<CALTECH|LABELME|PASCAL|SUN>/{train,crossval,test}/<class folder>/*.jpg",
                        ("caltech", "labelme", "pascal", "sun")),
    "office_home": DatasetSpec("OfficeHome", "office_home", "", "office_home",
                               "https://drive.google.com/uc?id=1gkbf_KaxoBws-GWT3XIPZ7BnkqbAxIFa (Dassl's archive)",
                               "office_home/<domain>/{train,val}/<Class>/*.jpg",
                               ("art", "clipart", "product", "real_world")),
    "domainnet": DatasetSpec("DomainNet", "domainnet", "", "domainnet", "http://ai.bu.edu/M3SDA/ (cleaned splits)",
                             "domainnet/{<domain>/<class>/*.jpg, splits/<domain>_{train,test}.txt}",
                             ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")),
    "synthetic": DatasetSpec("Synthetic", "synthetic", "images", "split", "made by make_synthetic_dataset()",
                             "synthetic/{images/<class>/*.jpg, split_zhou_Synthetic.json}"),
    "synthetic_dg": DatasetSpec("SyntheticDG", "synthetic_dg", "", "dg_folders", "made by make_synthetic_dg_dataset()",
                                "synthetic_dg/<domain>/{train,val,test}/<class>/*.jpg",
                                ("light", "dark", "sand")),
    "world_styles": DatasetSpec("WorldStyles", "world_styles", "", "dg_folders",
                                "made by: python testbed.py styles ROOT",
                                "world_styles/<style>/{train,val,test}/<colour_shape>/*.png",
                                ("clean", "washed", "dark", "noisy", "outline")),
    "world": DatasetSpec("World", "world", "images", "split", "made by: python testbed.py world ROOT",
                         "world/{images/<colour_shape>/*.png, split_zhou_World.json}"),
    # your own images: --root is the image folder itself (see read_folder)
    "folder": DatasetSpec("Folder", "", "", "folder", "your own images",
                          "DIR/<class>/<image>, or DIR/{train,val,test}/<class>/<image> (val optional); "
                          "DIR/classnames.txt optional"),
}
TEST_ONLY = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def get_spec(name):
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def metaprompt_templates(name):
    """MetaPrompt's frozen templates for dataset `name` (a list: one template, or ImageNet's ensemble of 8)."""
    coop_name = get_spec(name).coop_name
    if "ImageNet" in coop_name:
        return list(METAPROMPT_IMAGENET_TEMPLATES)
    return [METAPROMPT_TEMPLATES.get(coop_name, CUSTOM_TEMPLATES[coop_name])]


def zero_shot_template(name):
    """CoOp's single zero-shot template for dataset `name` (e.g. "dtd" -> "{} texture.")."""
    return CUSTOM_TEMPLATES[get_spec(name).coop_name]


def hand_templates(name, method, template=None):
    """The hand-made prompts of a learner on dataset `name` (zero-shot CLIP, MetaPrompt's frozen branch): the user's
    `template` (train.py --template) where given, else MetaPrompt's templates or CoOp's zero-shot template."""
    if template:
        return [template]
    return metaprompt_templates(name) if method == "metaprompt" else [zero_shot_template(name)]


# --- small file helpers --------------------------------------------------------------------------------
def read_json(path):
    """Read a JSON file, gzip-compressed if its name ends in .gz."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def write_json_atomic(obj, path):
    """Write JSON as Dassl's write_json does (indent 4), via a temporary file and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=4, separators=(",", ": "))
    os.replace(tmp, path)


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def list_images(folder):
    """Image files of one folder, sorted (CoOp: unsorted os.listdir, see the module docstring)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def list_subfolders(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))


def shipped_or_local(folder, local_name, shipped_name):
    """A file in the dataset folder takes precedence over the copy shipped in splits/."""
    local = Path(folder) / local_name
    return local if local.exists() else SPLITS_DIR / shipped_name


# --- split files (CoOp OxfordPets.read_split / save_split, DTD.read_and_split_data) ----------------------
def items_from_entries(entries, image_dir):
    """[[relpath, label, classname(, domain)], ...] -> [Datum], paths made absolute under image_dir."""
    return [Datum(os.path.join(image_dir, e[0]), int(e[1]), e[2], int(e[3]) if len(e) > 3 else 0) for e in entries]


def entries_from_items(items, image_dir):
    """[Datum] -> [[relpath, label, classname(, domain)]], relpaths relative to image_dir, "/" separated."""
    def entry(d):
        rel = Path(os.path.relpath(d.impath, image_dir)).as_posix()
        return [rel, d.label, d.classname] + ([d.domain] if d.domain else [])
    return [entry(d) for d in items]


def read_split(path, image_dir):
    """CoOp split JSON {"train"|"val"|"test": [[relpath, label, classname], ...]} -> (train, val, test)."""
    split = read_json(path)
    return tuple(items_from_entries(split[key], image_dir) for key in ("train", "val", "test"))


def save_split(train, val, test, path, image_dir):
    split = {key: entries_from_items(items, image_dir) for key, items in zip(("train", "val", "test"),
                                                                            (train, val, test))}
    write_json_atomic(split, path)


def split_by_class(classes, rng, p_trn=P_TRAIN, p_val=P_VAL):
    """CoOp DTD.read_and_split_data's split of [(class name, [image paths])] (label = position): per class in turn,
    shuffle its paths, the first round(n*p_trn) go to train, the next round(n*p_val) to val, the rest to test."""
    train, val, test = [], [], []
    for label, (classname, images) in enumerate(classes):
        images = list(images)
        rng.shuffle(images)
        n_train, n_val = round(len(images) * p_trn), round(len(images) * p_val)
        for part, paths in ((train, images[:n_train]), (val, images[n_train:n_train + n_val]),
                            (test, images[n_train + n_val:])):
            part.extend(Datum(p, label, classname) for p in paths)
    return train, val, test


def read_and_split_data(image_dir, rng, p_trn=P_TRAIN, p_val=P_VAL, dataset=""):
    """CoOp DTD.read_and_split_data: the class folders (sorted) split by `split_by_class`. Ours lists files sorted
    before shuffling (CoOp: unsorted)."""
    folders = list_subfolders(image_dir)
    if not folders:
        raise DataError(f"{image_dir} holds no class folders; expected <class>/<image> inside it")
    classes = []
    for folder in folders:
        images = [os.path.join(image_dir, folder, f) for f in list_images(Path(image_dir) / folder)]
        if not images:
            raise DataError(f"class folder {Path(image_dir) / folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                            "add its images or remove the folder")
        classes.append((clean_classname(dataset, folder), images))
    return split_by_class(classes, rng, p_trn, p_val)


def split_trainval(trainval, rng, p_val=P_VAL_TRAINVAL):
    """CoOp OxfordPets.split_trainval: per label (first-appearance order) shuffle the indices, the first
    round(n*p_val) go to val, the rest to train."""
    by_label = {}
    for idx, item in enumerate(trainval):
        by_label.setdefault(item.label, []).append(idx)
    train, val = [], []
    for idxs in by_label.values():
        n_val = round(len(idxs) * p_val)
        rng.shuffle(idxs)
        for n, idx in enumerate(idxs):
            (val if n < n_val else train).append(trainval[idx])
    return train, val


def read_sun397_partition(folder, image_dir, text_file):
    """CoOp SUN397.read_data: lines "/a/abbey/sun_x.jpg"; label = line index of the scene in ClassName.txt."""
    cname2lab = {line.lstrip("/"): i for i, line in enumerate(read_lines(folder / "ClassName.txt"))}
    items = []
    for line in read_lines(folder / text_file):
        relpath = line.lstrip("/")
        scene = os.path.dirname(relpath)
        items.append(Datum(os.path.join(image_dir, relpath), cname2lab[scene], clean_classname("sun397", scene)))
    return items


# --- Food101 / SUN397: CoOp's split files are not shipped (10 MB and 5 MB) -----------------------------------
GDRIVE_SPLIT_IDS = {  # CoOp DATASETS.md Google Drive ids of split_zhou_<Name>.json
    "food101": "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl",
    "sun397": "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq",
}


def check_split_against_published(name, train, val, image_dir):
    """Compare the few-shot draw on a downloaded split with the selection CoOp published for it
    (splits/fewshot_check_<Name>.json.gz: shot_1-seed_1 of linzhiqiu/cross_modal_adaptation's indices/)."""
    ref = read_json(SPLITS_DIR / f"fewshot_check_{get_spec(name).coop_name}.json.gz")
    rng = random.Random(ref["seed"])
    drawn = {"train": generate_fewshot(train, ref["shots"], rng)}
    drawn["val"] = generate_fewshot(val, min(ref["shots"], VAL_SHOTS_CAP), rng)
    for key in ("train", "val"):
        if [e[0] for e in entries_from_items(drawn[key], image_dir)] != ref[key]["relpaths"]:
            return False
    return True


def gdrive_url(file_id):
    return f"https://drive.google.com/uc?id={file_id}"


def download_coop_split(name, folder, image_dir):
    """Fetch CoOp's original split file from Google Drive into a temporary folder; it is moved next to the data
    only if it is valid JSON and reproduces CoOp's published few-shot selection, and deleted otherwise."""
    filename = f"split_zhou_{get_spec(name).coop_name}.json"
    by_hand = (f"download {gdrive_url(GDRIVE_SPLIT_IDS[name])} by hand and save it as {folder / filename}, or run "
               "without --download to use a split made here (not comparable with published numbers)")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".split-") as tmp:
        try:
            download_file_from_google_drive(GDRIVE_SPLIT_IDS[name], tmp, filename)
        except Exception as e:  # noqa: BLE001 -- gdown missing (RuntimeError), quota or 404 (gdown's own types)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"could not download CoOp's {filename} from Google Drive ({reason}); {by_hand}") from None
        try:
            train, val, _ = read_split(Path(tmp) / filename, image_dir)
        except (OSError, ValueError, KeyError, IndexError, TypeError):  # an HTML quota page, a truncated file, ...
            raise DataError(f"the file Google Drive returned for {filename} is not a CoOp split file (deleted); "
                            f"{by_hand}") from None
        if not check_split_against_published(name, train, val, image_dir):
            raise DataError(f"downloaded {filename} does not reproduce CoOp's published few-shot selection (deleted); "
                            f"{by_hand}")
        os.replace(Path(tmp) / filename, folder / filename)
    return folder / filename


def generate_split(name, folder, image_dir):
    """A split with CoOp's proportions from a fixed seed; saved next to the data, never mistaken for CoOp's."""
    rng = random.Random(GENERATED_SPLIT_SEED)
    if name == "sun397":  # test = the official Testing_01.txt, exactly as CoOp; train/val 80/20 of Training_01
        train, val = split_trainval(read_sun397_partition(folder, image_dir, "Training_01.txt"), rng)
        test = read_sun397_partition(folder, image_dir, "Testing_01.txt")
    else:  # food101: random 50/20/30 of every class folder, as CoOp
        train, val, test = read_and_split_data(image_dir, rng, dataset=name)
    path = folder / f"split_generated_{get_spec(name).coop_name}.json"
    save_split(train, val, test, path, image_dir)
    return path


def obtain_split(name, folder, image_dir, download):
    """Split file of food101/sun397 when CoOp's is not in the folder: download it, or make one (with a warning)."""
    if download:  # the user asked for CoOp's file: a failure is an error, never a silent fallback
        return download_coop_split(name, folder, image_dir)
    path = folder / f"split_generated_{get_spec(name).coop_name}.json"
    if not path.exists():
        path = generate_split(name, folder, image_dir)
    warnings.warn(f"{name}: using {path.name}, made here from seed {GENERATED_SPLIT_SEED} with CoOp's proportions; "
                  f"results are not comparable with published ones (get CoOp's file with --download)", stacklevel=3)
    return path


def find_split_file(name, folder, image_dir, download):
    spec = get_spec(name)
    local = folder / f"split_zhou_{spec.coop_name}.json"
    shipped = SPLITS_DIR / f"split_zhou_{spec.coop_name}.json.gz"
    if local.exists():
        return local
    if shipped.exists():
        return shipped
    if name in GDRIVE_SPLIT_IDS:
        return obtain_split(name, folder, image_dir, download)
    raise DataError(f"no split file for {name}: expected {local}")


# --- per-dataset readers: (train, val, test) lists of Datum, plus the class names where a class list exists -
def read_fgvc(folder, image_dir):
    """CoOp FGVCAircraft: labels = line index in variants.txt; lines "<imageid> <variant name>"."""
    classnames = read_lines(folder / "variants.txt")
    cname2lab = {c: i for i, c in enumerate(classnames)}

    def read(split):
        lines = [line.split(" ", 1) for line in read_lines(folder / f"images_variant_{split}.txt")]
        return [Datum(os.path.join(image_dir, f"{im}.jpg"), cname2lab[c], c) for im, c in lines]
    return read("train"), read("val"), read("test"), classnames


def read_imagenet_classnames(path):
    """CoOp ImageNet.read_classnames: lines "<wnid> <class name>" -> {wnid: name}, file order."""
    return dict(line.split(" ", 1) for line in read_lines(path))


def read_class_folders(image_dir, folders, names):
    """Images of class folder i get label i; all folders must exist."""
    missing = [f for f in folders if not (Path(image_dir) / f).is_dir()]
    if missing:
        raise DataError(f"{len(missing)} of {len(folders)} class folders missing in {image_dir}, e.g. {missing[0]}")
    items = [Datum(os.path.join(image_dir, f, im), label, name)
             for label, (f, name) in enumerate(zip(folders, names)) for im in list_images(Path(image_dir) / f)]
    if not items:
        raise DataError(f"the class folders in {image_dir} hold no images; delete them and extract the dataset again")
    return items


def read_imagenet(folder, image_dir):
    """CoOp ImageNet: train = ILSVRC train, val = test = ILSVRC val; labels = sorted wnids."""
    classnames = read_imagenet_classnames(shipped_or_local(folder, "classnames.txt", "imagenet_classnames.txt"))
    wnids = sorted(classnames)
    names = [classnames[w] for w in wnids]
    train = read_class_folders(os.path.join(image_dir, "train"), wnids, names)
    test = read_class_folders(os.path.join(image_dir, "val"), wnids, names)
    return train, test, test, names


def read_imagenet_variant(name, folder, image_dir):
    """CoOp ImageNetV2/Sketch/A/R: test-only; A and R hold 200 classes, labelled 0..199 in sorted wnid order."""
    if name in ("imagenet_a", "imagenet_r"):
        classnames = read_imagenet_classnames(SPLITS_DIR / f"{name}_wnids.txt")
    else:
        classnames = read_imagenet_classnames(shipped_or_local(folder, "classnames.txt", "imagenet_classnames.txt"))
    wnids = sorted(classnames)
    folders = [str(i) for i in range(len(wnids))] if name == "imagenetv2" else wnids
    names = [classnames[w] for w in wnids]
    return [], [], read_class_folders(image_dir, folders, names), names


def split_domains(spec, target):
    """MetaPrompt: SOURCE_DOMAINS.pop(DATASET.ID); target given by name or by that index. Multi-source DG needs at
    least two source domains (the leave-one-domain-out split needs a domain on each side)."""
    domains = list(spec.domains)
    choices = f"one of {', '.join(domains)} (or its index), or all"
    if target is None:
        raise DataError(f"{spec.coop_name} needs a target domain: --target-domain {choices}")
    if str(target) not in domains and not (str(target).isdigit() and int(target) < len(domains)):
        raise DataError(f"'{target}' is not a domain of {spec.coop_name}: --target-domain {choices}")
    if len(domains) < 3:
        raise DataError(f"{spec.coop_name} has {len(domains)} domains: multi-source DG needs at least two source "
                        "domains besides the target")
    index = int(target) if str(target).isdigit() else domains.index(str(target))
    return domains[:index] + domains[index + 1:], domains[index]


def read_dg_list_file(path, image_dir, domain, label_offset, name_part):
    """Lines "<relpath> <label>" (PACS: 1-based labels; DomainNet: 0-based); class name = a path component."""
    items = []
    for line in read_lines(path):
        relpath, label = line.rsplit(" ", 1)
        if relpath not in PACS_ERROR_PATHS:
            items.append(Datum(os.path.join(image_dir, relpath), int(label) - label_offset,
                               relpath.split("/")[name_part], domain))
    return items


def read_dg_folders(split_dir, domain, classnames=None, dataset=""):
    """Dassl DigitsDG/VLCS readers: label = index of the sorted class folder; files sorted (Dassl: glob order)."""
    items = []
    for label, folder in enumerate(list_subfolders(split_dir)):
        name = classnames[label] if classnames else clean_classname(dataset, folder)
        items += [Datum(os.path.join(split_dir, folder, im), label, name, domain)
                  for im in list_images(Path(split_dir) / folder)]
    if not items:
        raise DataError(f"{split_dir} holds no images in class folders; delete the dataset folder and extract it again")
    return items


# Which lists of a DG suite make its val and test sets (MetaPrompt datasets/{pacs,vlcs,office_home,domainnet}.py);
# train is always the sources' "train" list.
DG_VAL_TEST = {"pacs": ("crossval", "train+crossval"), "vlcs": ("crossval", "test"),
               "office_home": ("val", "train+val"), "domainnet": ("test", "test"),
               "synthetic_dg": ("val", "test"), "world_styles": ("val", "test")}  # ours: train / val / test folders


def dg_list_path(name, folder, domain, split):
    """The list file (PACS, DomainNet) or split folder (VLCS, OfficeHome) of one domain and split."""
    if name == "pacs":
        return folder / "splits" / f"{domain}_{split}_kfold.txt"
    if name == "domainnet":
        return folder / "splits" / f"{domain}_{split}.txt"
    return folder / (domain.upper() if name == "vlcs" else domain) / split


def dg_lists(name, target):
    """[(part, domain index, domain, split)] of every list a DG run reads, part in train / val / test."""
    sources, target = split_domains(get_spec(name), target)
    val_split, test_split = DG_VAL_TEST[name]
    return [(part, d, dname, s) for part, domains, splits in (("train", sources, "train"), ("val", sources, val_split),
                                                              ("test", [target], test_split))
            for d, dname in enumerate(domains) for s in splits.split("+")]


def read_dg(name, folder, image_dir, target):
    """Multi-source DG (MetaPrompt datasets/{pacs,vlcs,office_home,domainnet}.py): train/val = the source
    domains (domain = index among the sources), test = the target domain (domain 0)."""
    out = {"train": [], "val": [], "test": []}
    for part, d, dname, split in dg_lists(name, target):
        path = dg_list_path(name, folder, dname, split)
        if name == "pacs":
            out[part] += read_dg_list_file(path, image_dir, d, 1, -2)
        elif name == "domainnet":
            out[part] += read_dg_list_file(path, image_dir, d, 0, 1)
        else:
            out[part] += read_dg_folders(path, d, classnames=VLCS_CLASSES if name == "vlcs" else None, dataset=name)
    return out["train"], out["val"], out["test"]


# --- your own images: an image folder, --dataset folder --root DIR ------------------------------------------------
FOLDER_SPLIT_FILE = "split.json"  # CoOp's split format, written once, then reused and editable by hand
FOLDER_CLASSNAMES_FILE = "classnames.txt"  # optional: "<folder> <class name>" lines
FOLDER_SPLITS = ("train", "val", "test")  # a split given as folders (val optional)
FEWSHOT_DIR = "split_fewshot"  # the few-shot cache (fewshot_cache_path), never a class folder
FEATURE_CACHE_DIR = "feature_cache"  # frozen image features (cached_image_features), never a class folder
RESERVED_DIRS = (FEWSHOT_DIR, FEATURE_CACHE_DIR)


def walk_images(folder, skipped) -> list:
    """Image files anywhere under `folder`, sorted (as torchvision's ImageFolder, any depth); files with another
    extension are appended to `skipped` (hidden files are ignored)."""
    images = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                is_image = Path(name).suffix.lower() in IMAGE_SUFFIXES
                (images if is_image else skipped).append(os.path.join(dirpath, name))
    return sorted(images)


def scan_class_folders(image_dir, skipped, exclude=()) -> dict:
    """{class folder: [image paths]} of image_dir/<class>/..., folders sorted; an empty class folder is an error."""
    folders = [f for f in list_subfolders(image_dir) if f not in exclude]
    if not folders:
        raise DataError(f"{image_dir} holds no class folders: put the images of each class in a folder of its own, "
                        f"{image_dir}/<class>/<image>")
    classes = {}
    for f in folders:
        classes[f] = walk_images(Path(image_dir) / f, skipped)
        if not classes[f]:
            raise DataError(f"class folder {Path(image_dir) / f} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                            "add its images or remove the folder")
    return classes


def folder_layout(folder) -> str:
    """"splits" when the split is given as folders (train/ and test/, val/ optional), "classes" otherwise."""
    present = [s for s in FOLDER_SPLITS if (Path(folder) / s).is_dir()]
    if {"train", "test"} <= set(present):
        return "splits"
    if present:
        raise DataError(f"{folder} has {', '.join(p + '/' for p in present)} but not both train/ and test/: give "
                        f"train/ and test/ (val/ optional), each holding <class>/<image>, or put the class folders "
                        f"directly in {folder}")
    return "classes"


def folder_classnames(folder, class_folders) -> dict:
    """{class folder: class name}: underscores and dashes become spaces ("golden_retriever" -> "golden retriever"),
    unless DIR/classnames.txt names the folder ("<folder> <class name>" lines, split at a tab or the first space)."""
    names = {f: " ".join(f.replace("_", " ").replace("-", " ").split()) for f in class_folders}
    path = Path(folder) / FOLDER_CLASSNAMES_FILE
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                line = line.strip()
                if not line:
                    continue
                key, _, name = line.partition("\t" if "\t" in line else " ")
                if key not in names:
                    raise DataError(f"{path} line {number}: there is no class folder {key!r}; each line is "
                                    "'<folder> <class name>' for a folder of images")
                if not name.strip():
                    raise DataError(f"{path} line {number}: no class name after the folder {key!r}; write "
                                    "'<folder> <class name>'")
                names[key] = name.strip()
    check_class_list(list(names.values()), f"the class names of {folder}")
    return names


def check_class_list(names, what):
    """A class list for prompts: no empty name, no name twice (two classes with one prompt cannot be told apart)."""
    for i, name in enumerate(names):
        if not name.strip():
            raise DataError(f"{what}: name {i + 1} is empty; give every class a name")
    seen = set()
    for name in names:
        if name in seen:
            raise DataError(f"{what}: the name {name!r} is there twice; every class needs a name of its own "
                            f"(a folder's name can be changed in {FOLDER_CLASSNAMES_FILE})")
        seen.add(name)


def read_class_list(path) -> list:
    """Class names, one a line (blank lines at the end ignored); empty or repeated names are errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"class list {path} not found; write one class name a line")
    names = [line.strip() for line in path.read_text(encoding="utf-8").rstrip().splitlines()]
    if not names or names == [""]:
        raise DataError(f"class list {path} is empty; write one class name a line")
    for number, name in enumerate(names, start=1):
        if not name:
            raise DataError(f"class list {path} line {number} is empty; remove it, one class name a line")
    check_class_list(names, f"class list {path}")
    return names


def class_folder_of(item, image_dir) -> str:
    """The class folder of an item: the first part of its path under image_dir."""
    return Path(os.path.relpath(item.impath, image_dir)).parts[0]


def read_folder(folder):
    """(train, val, test, class names) of your own image folder.

    DIR/train/<class>/... and DIR/test/<class>/... (and DIR/val/<class>/...): those splits, labels by sorted class
    folder; without val/, CoOp's split_trainval draws 20% of train (seed GENERATED_SPLIT_SEED). Otherwise
    DIR/<class>/...: DIR/split.json if it is there (CoOp's format, so it can be edited by hand), else a stratified
    split with CoOp's 50/20/30 proportions (split_by_class, seed GENERATED_SPLIT_SEED) written to DIR/split.json.
    Class names: DIR/classnames.txt, else split.json's, else the folder names with "_" and "-" as spaces. Files that
    are not images (by extension) are skipped, with one notice."""
    folder, skipped = Path(folder), []
    rng = random.Random(GENERATED_SPLIT_SEED)
    if folder_layout(folder) == "splits":
        per_split = {s: scan_class_folders(folder / s, skipped) if (folder / s).is_dir() else {}
                     for s in FOLDER_SPLITS}
        folders = sorted(set().union(*per_split.values()))
        untrained = [f for f in folders if f not in per_split["train"]]
        if untrained:
            raise DataError(f"class {untrained[0]} has no folder in {folder / 'train'}: every class needs training "
                            f"images; add {folder / 'train' / untrained[0]}/ or remove the class from val/ and test/")
        names, label = folder_classnames(folder, folders), {f: i for i, f in enumerate(folders)}
        train, val, test = ([Datum(p, label[f], names[f]) for f, paths in per_split[s].items() for p in paths]
                            for s in FOLDER_SPLITS)
        if not (folder / "val").is_dir():  # CoOp OxfordPets: val = 20% of trainval
            train, val = split_trainval(train, rng)
    else:
        path = folder / FOLDER_SPLIT_FILE
        if path.exists():
            train, val, test = read_split(path, str(folder))
            on_disk = {p for f in list_subfolders(folder) if f not in RESERVED_DIRS
                       for p in walk_images(folder / f, skipped)}
            unlisted = on_disk - {d.impath for d in train + val + test}
            if unlisted:
                warnings.warn(f"{len(unlisted)} images under {folder} are not in {path.name}, e.g. {min(unlisted)}; "
                              f"delete {path} to split again, or add them to it", stacklevel=2)
            if (folder / FOLDER_CLASSNAMES_FILE).exists():
                names = folder_classnames(folder, sorted({class_folder_of(d, folder) for d in train + val + test}))
                train, val, test = ([d._replace(classname=names[class_folder_of(d, folder)]) for d in items]
                                    for items in (train, val, test))
        else:
            classes = scan_class_folders(folder, skipped, exclude=RESERVED_DIRS)
            names = folder_classnames(folder, list(classes))
            train, val, test = split_by_class([(names[f], paths) for f, paths in classes.items()], rng)
            empty = sorted(set(classes) - {class_folder_of(d, folder) for d in train})
            if empty:
                raise DataError(f"class folder {folder / empty[0]} has {len(classes[empty[0]])} image(s): a 50/20/30 "
                                f"split leaves it no training image; add images (at least 2 per class)")
            save_split(train, val, test, path, str(folder))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} file(s) under {folder} that are not images (not "
                      f"{'/'.join(IMAGE_SUFFIXES)}), e.g. {skipped[0]}", stacklevel=2)
    classnames = classnames_of(train, val, test)
    check_class_list(classnames, f"the class names of {folder}")
    return train, val, test, classnames



def read_lists(name, folder, download=False, target=None):
    """(train, val, test, classnames) of dataset `name` in `folder`, as CoOp/MetaPrompt read them."""
    spec = get_spec(name)
    image_dir = str(folder / spec.image_dir) if spec.image_dir else str(folder)
    if spec.kind == "fgvc":
        return read_fgvc(folder, image_dir)
    if spec.kind == "imagenet":
        return read_imagenet(folder, image_dir)
    if spec.kind == "imagenet_variant":
        return read_imagenet_variant(name, folder, image_dir)
    if spec.kind == "folder":
        return read_folder(folder)
    if spec.kind == "split":
        train, val, test = read_split(find_split_file(name, folder, image_dir, download), image_dir)
    else:
        train, val, test = read_dg(name, folder, image_dir, target)
    return train, val, test, classnames_of(train, val, test)


# --- few-shot sampling (Dassl DatasetBase.generate_fewshot_dataset) ------------------------------------------
def generate_fewshot(items, k, rng, warn=True):
    """K items per class, drawn as Dassl does: for each label in order of first appearance,
    `rng.sample(items_of_label, k)`; a class with fewer than k items gives all of them (one warning naming every
    such class, unless warn=False). DG lists are grouped by domain first, then label (MetaPrompt's
    _generate_fewshot_dataset); with a single domain that is exactly Dassl's grouping.
    `random.seed(S)` re-seeds the hidden `random.Random` instance behind the module functions, so
    `random.Random(S)` gives the identical stream (the golden-file test checks it)."""
    if k < 1:
        return list(items)
    groups = {}  # domain -> label -> items, in first-appearance order
    for item in items:
        groups.setdefault(item.domain, {}).setdefault(item.label, []).append(item)
    out, short = [], []
    for by_label in groups.values():
        for members in by_label.values():
            if len(members) < k:
                short.append(f"{members[0].classname} has {len(members)}")
                out.extend(members)
            else:
                out.extend(rng.sample(members, k))
    if short and warn:
        warnings.warn(f"{len(short)} class(es) with fewer than {k} images, taking all of them (Dassl behaviour): "
                      f"{', '.join(short)}", stacklevel=2)
    return out


def fewshot_cache_path(folder, shots, seed, target=None):
    prefix = f"{target}_" if target is not None else ""  # DG: one cache per held-out domain, as MetaPrompt
    return Path(folder) / "split_fewshot" / f"{prefix}shot_{shots}-seed_{seed}.json"


def source_digest(train, val, image_dir):
    """SHA256 of the train and val lists a few-shot selection is drawn from (relative path, label, class name and
    domain of every item, in order): a cached selection is valid only for the lists it records."""
    digest = hashlib.sha256()
    prefix = len(str(image_dir).rstrip("/")) + 1
    for part, items in (("train", train), ("val", val)):
        digest.update(f"{part}\n".encode())
        for d in items:
            rel = d.impath[prefix:] if d.impath.startswith(str(image_dir)) else d.impath
            digest.update(f"{rel}\t{d.label}\t{d.classname}\t{d.domain}\n".encode())
    return digest.hexdigest()


def load_or_sample_fewshot(path, image_dir, train, val, shots, seed, sample_val=True):
    """CoOp's caching, tied to the split: a cache file drawn from the same train/val lists (same SHA256) wins;
    otherwise sample train then val (same stream) and save, with a notice when a stale cache is replaced (e.g.
    CoOp's split file arrived after a generated one was used: the old draw may hold its test images)."""
    digest = source_digest(train, val, image_dir)
    if path.exists():
        try:
            cached = read_json(path)
        except ValueError:
            cached = {}
        if cached.get("source_sha256") == digest:
            cached_val = items_from_entries(cached["val"], image_dir) if "val" in cached else val
            return items_from_entries(cached["train"], image_dir), cached_val
        warnings.warn(f"{path} was drawn from other train/val lists than the current split (or records none); "
                      f"drawing the {shots}-shot selection again", stacklevel=2)
    if not train:
        raise DataError(f"no training images to draw {shots} shots from in {image_dir}")
    rng = random.Random(seed)
    train = generate_fewshot(train, shots, rng)
    cache = {"train": entries_from_items(train, image_dir), "source_sha256": digest}
    if sample_val:  # CoOp ImageNet: only train is sampled (val = test)
        val = generate_fewshot(val, min(shots, VAL_SHOTS_CAP), rng, warn=False)  # val trains nothing: no notice
        cache["val"] = entries_from_items(val, image_dir)
    write_json_atomic(cache, path)
    return train, val


# --- base-to-new classes (CoCoOp OxfordPets.subsample_classes) ---------------------------------------------
def subsample_classes(*lists, subsample="all"):
    """CoCoOp: labels of the first list, sorted; base = the first ceil(n/2), new = the rest; every list keeps
    the items of the selected classes (order kept), relabelled 0..m-1. "all" returns the lists unchanged."""
    if subsample not in ("all", "base", "new"):
        raise DataError(f"subsample must be all, base or new, not '{subsample}'")
    if subsample == "all":
        return lists
    labels = sorted({item.label for item in lists[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}
    return tuple([d._replace(label=relabel[d.label]) for d in items if d.label in relabel] for items in lists)


# --- checks ----------------------------------------------------------------------------------------------
def download_hint(name, root):
    spec = get_spec(name)
    if name in DOWNLOADERS:
        how = f"get it with: python data.py --dataset {name} --root {root} --download"
    elif name == "world":
        how = f"make it with: python testbed.py world {root}"
    elif spec.kind == "folder":
        return f"--root is your image folder: {spec.layout}"
    else:
        how = f"get it from {spec.url}"
    return f"{how}; expected layout under the root: {spec.layout}"


def check_folder(name, root, folder):
    image_dir = folder / get_spec(name).image_dir
    if not Path(root).is_dir():
        raise DataError(f"data root {root} does not exist; {download_hint(name, root)}")
    for what, path in (("dataset folder", folder), ("image folder", image_dir)):
        if not path.is_dir():
            raise DataError(f"{what} {path} not found; {download_hint(name, root)}")


REQUIRED_WHAT = {  # what the files a reader needs besides the images are, for the error message
    "fgvc_aircraft": "the class list and split lists of the archive's data/ folder",
    "sun397": "SUN397's class list and partition 01 (ClassName.txt, Training_01.txt, Testing_01.txt from "
              "Partitions.zip), needed to make a split when CoOp's split_zhou_SUN397.json is not there",
    "pacs": "PACS's split lists (splits/ in Dassl's archive)",
    "domainnet": "DomainNet's split lists (splits/ of the cleaned release)",
    "vlcs": "a domain's split folder", "office_home": "a domain's split folder",
}


def required_paths(name, folder, target=None, download=False):
    """Files and folders the reader of `name` needs besides the images (cheap to check, before any work)."""
    spec = get_spec(name)
    if spec.kind == "fgvc":
        return [folder / "variants.txt"] + [folder / f"images_variant_{s}.txt" for s in ("train", "val", "test")]
    if name == "sun397":
        splits = [folder / f"split_{kind}_SUN397.json" for kind in ("zhou", "generated")]
        if download or any(p.exists() for p in splits):
            return []
        return [folder / f for f in ("ClassName.txt", "Training_01.txt", "Testing_01.txt")]
    if name in DG_VAL_TEST:
        return list(dict.fromkeys(dg_list_path(name, folder, dname, split)
                                  for _, _, dname, split in dg_lists(name, target)))
    return []


def check_request(name, root, shots=16, download=False, target_domain=None):
    """Everything about a dataset request that needs no download and no image: the name, the shots, the target
    domain, the root, the dataset and image folders and the files the reader needs (unless --download will fetch
    the dataset). Raises DataError with one line that says what is wrong and how to fix it."""
    spec = get_spec(name)
    if shots < -1:
        raise DataError(f"--shots {shots}: give a number of images per class (1, 2, 4, 8, 16), or -1 for all")
    if spec.domains:
        split_domains(spec, target_domain)
    elif target_domain is not None:
        suites = ", ".join(n for n, s in DATASETS.items() if s.domains)
        raise DataError(f"{name} has no domains; --target-domain is only for the DG suites ({suites})")
    root = Path(root).expanduser()
    folder = root / spec.dataset_dir
    if download and not folder.is_dir():
        if name not in DOWNLOADERS:
            raise DataError(f"{name} cannot be downloaded automatically; {download_hint(name, root)}")
        return
    check_folder(name, root, folder)
    if spec.kind == "folder":
        check_image_folder(folder)
    for path in required_paths(name, folder, target_domain, download):
        if not path.exists():
            raise DataError(f"{path} not found: {name} needs {REQUIRED_WHAT[name]}; {download_hint(name, root)}")


def check_image_folder(folder):
    """The checks of read_folder that need neither a split nor a write: the layout, that every class folder holds
    images (unless split.json lists them), classnames.txt."""
    folder = Path(folder)
    if folder_layout(folder) == "splits":
        for split in FOLDER_SPLITS:
            if (folder / split).is_dir():
                folder_classnames(folder, list(scan_class_folders(folder / split, [])))
    elif not (folder / FOLDER_SPLIT_FILE).exists():
        folder_classnames(folder, list(scan_class_folders(folder, [], exclude=RESERVED_DIRS)))


def check_images_exist(items, folder, own=False):
    """Dassl asserts every listed image exists; we report how many are missing, never skip them."""
    paths = sorted({d.impath for d in items})
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing and own:  # your own folder (--dataset folder): its split.json lists them
        raise DataError(f"{len(missing)} of {len(paths)} images listed in {Path(folder) / FOLDER_SPLIT_FILE} are "
                        f"missing, e.g. {missing[0]}; fix the file, or delete it to split the folder again")
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} images listed in the split are missing under {folder}, "
                        f"e.g. {missing[0]}; if an extraction or copy was interrupted, delete {folder} and get the "
                        "dataset again (--download where supported)")


def classnames_of(*lists):
    """Class names by label, from the items (Dassl takes them from train_x, which holds every label)."""
    mapping = {d.label: d.classname for items in lists for d in items}
    if sorted(mapping) != list(range(len(mapping))):
        raise DataError(f"labels are not 0..{len(mapping) - 1}: some classes have no image in any split")
    return [mapping[i] for i in range(len(mapping))]


def build_dataset(name, root, shots=16, seed=1, subsample="all", download=False, target_domain=None):
    """The train/val/test lists and class names of `name`, exactly as CoOp (or MetaPrompt for DG) builds them.

    shots < 1 keeps the full train/val lists (CoOp NUM_SHOTS = -1). Test-only datasets (ImageNet variants)
    ignore shots and subsample. DG suites (pacs, vlcs, office_home, domainnet) need target_domain.
    Returns DatasetSplits(train, val, test, classnames); classnames[label] for the (relabelled) labels.
    """
    check_request(name, root, shots, download, target_domain)
    spec = get_spec(name)
    root = Path(root).expanduser()
    folder = root / spec.dataset_dir
    if download and not folder.is_dir():
        download_dataset(name, root)
        check_request(name, root, shots, False, target_domain)
    train, val, test, classnames = read_lists(name, folder, download, target_domain)
    if name not in TEST_ONLY:
        if shots >= 1:
            image_dir = str(folder / spec.image_dir) if spec.image_dir else str(folder)
            target = split_domains(spec, target_domain)[1] if spec.domains else None
            path = fewshot_cache_path(folder, shots, seed, target)
            train, val = load_or_sample_fewshot(path, image_dir, train, val, shots, seed, name != "imagenet")
        names = [Datum("", label, c) for label, c in enumerate(classnames)]  # relabelled along with the lists
        train, val, test, names = subsample_classes(train, val, test, names, subsample=subsample)
        classnames = [d.classname for d in names]
    check_images_exist(train + val + test, folder, own=spec.kind == "folder")
    return DatasetSplits(train, val, test, classnames)


# --- images, transforms, loaders -----------------------------------------------------------------------------
def read_image(path):
    """PIL decode to RGB (Dassl read_image); a file that cannot be decoded raises DataError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def build_transform(train, size=IMAGE_SIZE, crop_scale=RRC_SCALE):
    """Dassl transforms.py with CoOp's INPUT config; output (3, size, size) float tensors, CLIP-normalised."""
    normalize = T.Normalize(CLIP_MEAN, CLIP_STD)
    bicubic = T.InterpolationMode.BICUBIC
    if train:  # "random_resized_crop", "random_flip", "normalize"
        return T.Compose([T.RandomResizedCrop(size, scale=crop_scale, interpolation=bicubic),
                          T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size), T.ToTensor(), normalize])


class ImageListDataset(Dataset):
    """A list of Datum as a torch Dataset; item = {"img": (3, H, W), "label", "domain", "index"}."""

    def __init__(self, items, transform):
        self.items, self.transform = list(items), transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        d = self.items[index]
        img = self.transform(read_image(d.impath))  # (3, H, W)
        return {"img": img, "label": d.label, "domain": d.domain, "index": index}


def build_loader(items, train, batch_size=None, size=IMAGE_SIZE, num_workers=NUM_WORKERS, seed=None,
                 crop_scale=RRC_SCALE, pin_memory=None):
    """Dassl build_data_loader: train = RandomSampler (torch Generator seeded with `seed`) and
    drop_last = len(items) >= batch_size; test = sequential, batch 100. Batches: {"img": (B, 3, H, W),
    "label": (B,), "domain": (B,), "index": (B,)}. Workers, persistent workers, and pinned memory (for copies to a
    GPU that overlap the next batch; pin_memory=None: when a GPU is visible)."""
    batch_size = batch_size or (TRAIN_BATCH_SIZE if train else TEST_BATCH_SIZE)
    dataset = ImageListDataset(items, build_transform(train, size, crop_scale))
    if train:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      generator=generator if train else None,  # also seeds the workers' augmentations
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      persistent_workers=num_workers > 0,
                      drop_last=train and len(dataset) >= batch_size)


def dataset_folder(name, root) -> Path:
    """The folder of dataset `name` under --root (--dataset folder: the root itself)."""
    return Path(root).expanduser() / get_spec(name).dataset_dir


def feature_cache_file(name, root, tag: str) -> Path:
    """Where the frozen image features of dataset `name` for one backbone setting (`tag`) are kept."""
    return dataset_folder(name, root) / FEATURE_CACHE_DIR / f"{tag}.pt"


def image_key(path, folder) -> str:
    """An image's identity in a cache: its path under `folder`, size and modification time (an edit re-encodes it)."""
    stat = os.stat(path)
    return f"{Path(os.path.relpath(path, folder)).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}"


@torch.no_grad()
def cached_image_features(items, encode, cache_file, size=IMAGE_SIZE, num_workers=NUM_WORKERS) -> torch.Tensor:
    """(N, E) per-image values of `items` (in order), each computed once per `cache_file`: `encode((B, 3, H, W)) ->
    (B, E)` runs only on the images the file does not hold yet (test transform, batches of 100), and the file is then
    rewritten atomically with them added. Used for frozen CLIP image features: evaluation encodes each test image once
    per backbone, for every class subset, seed and method whose image encoder has no prompts."""
    cache_file = Path(cache_file)
    folder = cache_file.parent.parent
    cache = torch.load(cache_file, weights_only=True) if cache_file.exists() else {"keys": [], "features": None}
    index = {k: i for i, k in enumerate(cache["keys"])}
    keys = [image_key(d.impath, folder) for d in items]
    missing = list({k: d for k, d in zip(keys, items) if k not in index}.items())
    if missing:
        loader = build_loader([d for _, d in missing], train=False, size=size, num_workers=num_workers)
        new = torch.cat([encode(batch["img"]).float().cpu() for batch in loader])  # (M, E)
        features = new if cache["features"] is None else torch.cat([cache["features"], new])
        cache = {"keys": cache["keys"] + [k for k, _ in missing], "features": features}
        index = {k: i for i, k in enumerate(cache["keys"])}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{cache_file}.{os.getpid()}.tmp"  # one per process: torchrun's processes may write at once
        torch.save(cache, tmp)
        os.replace(tmp, cache_file)
    return cache["features"][[index[k] for k in keys]]


def benchmark_loader(items, size=IMAGE_SIZE, batch_size=TRAIN_BATCH_SIZE, num_workers=2, n_batches=20):
    """Images per second of the train pipeline (decode + train transform + collate), after one warm-up batch."""
    loader = build_loader(items, train=True, batch_size=batch_size, size=size, num_workers=num_workers, seed=0)
    n_images, start = 0, None
    while n_images < n_batches * batch_size:
        for batch in loader:
            if start is None:  # first batch: worker start-up, not throughput
                start = time.perf_counter()
                continue
            n_images += batch["img"].shape[0]
            if n_images >= n_batches * batch_size:
                break
    return n_images / (time.perf_counter() - start)


# --- image-text pairs (GRAM's meta-training data) in open_clip's CSV convention ----------------------------------
class Pair(NamedTuple):
    """One image-caption pair: absolute image path, caption."""

    impath: str
    caption: str


CSV_IMG_KEY, CSV_CAPTION_KEY, CSV_SEPARATOR = "filepath", "title", "\t"  # open_clip's --csv-* defaults


def read_pairs(path, img_key=CSV_IMG_KEY, caption_key=CSV_CAPTION_KEY, separator=CSV_SEPARATOR) -> list:
    """Image-caption pairs from a CSV in open_clip's convention (mlfoundations/open_clip training/data.py
    `CsvDataset`: columns --csv-img-key / --csv-caption-key, separator --csv-separator, a tab by default). Image paths
    are read as given (relative to the working directory) or, failing that, relative to the CSV's folder. Each
    problem is one DataError naming the row and the fix: a missing file or column, a missing image, an empty
    caption."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"pairs file {path} not found; write one with: python testbed.py pairs DIR (or pass "
                        "--pairs with a CSV of image paths and captions)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        columns = reader.fieldnames or []
        if img_key not in columns or caption_key not in columns:
            raise DataError(f"{path} has columns {', '.join(columns) or '(none)'}; pass --csv-img-key and "
                            f"--csv-caption-key naming its image and caption columns (now {img_key!r} and "
                            f"{caption_key!r}), and --csv-separator if it is not a tab")
        pairs = []
        for row_number, row in enumerate(reader, start=2):  # line 1 is the header
            image, caption = (row.get(img_key) or "").strip(), (row.get(caption_key) or "").strip()
            if not caption:
                raise DataError(f"{path} line {row_number}: empty caption; give every image a caption or drop the row")
            candidates = [Path(image).expanduser(), path.parent / image]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise DataError(f"{path} line {row_number}: image {image} not found (also not under {path.parent}); "
                                "fix the path or drop the row")
            pairs.append(Pair(str(found.resolve()), caption))
    return pairs


# --- metrics (Dassl evaluator.py Classification; CoCoOp base-to-new harmonic mean) -------------------------------
def classification_metrics(y_true, y_pred):
    """Accuracy (micro, %) and macro-F1 (%) over the classes present in y_true, as Dassl's evaluator
    (sklearn f1_score(average="macro", labels=np.unique(y_true)); a class never predicted has F1 0)."""
    y_true, y_pred = torch.as_tensor(y_true), torch.as_tensor(y_pred)
    f1s = []
    for c in torch.unique(y_true):
        tp = ((y_pred == c) & (y_true == c)).sum().item()
        fp = ((y_pred == c) & (y_true != c)).sum().item()
        fn = ((y_pred != c) & (y_true == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": 100.0 * (y_true == y_pred).float().mean().item(), "macro_f1": 100.0 * sum(f1s) / len(f1s)}


def harmonic_mean(base, new):
    """HM of base and new accuracy (CoCoOp Sec. 4.1): the headline number of the base-to-new tables."""
    return 2 * base * new / (base + new) if base + new else 0.0


# --- synthetic data ----------------------------------------------------------------------------------------
SYNTHETIC_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SYNTHETIC_SHAPES = ("circle", "square", "triangle")


def draw_shape(colour, shape, image_size, rng):
    """One image: a coloured shape at a random place and size on a random pale background."""
    w, h = image_size
    img = Image.new("RGB", (w, h), tuple(rng.randint(150, 255) for _ in range(3)))
    r = rng.randint(min(w, h) // 6, min(w, h) // 3)
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def make_synthetic_dataset(root, n_classes=6, n_per_class=10, image_size=(32, 32), seed=0):
    """Write a DTD-like dataset `<root>/synthetic/{images/<colour_shape>/*.jpg, split_zhou_Synthetic.json}`
    (classes like "red_circle", CoOp's 50/20/30 split); deterministic for a seed.
    Returns the class names in label order (sorted folder names, as read_and_split_data labels them)."""
    rng = random.Random(seed)
    classnames = sorted([f"{c}_{s}" for s in SYNTHETIC_SHAPES for c in SYNTHETIC_COLOURS][:n_classes])
    folder = Path(root) / "synthetic"
    image_dir = folder / "images"
    for name in classnames:
        colour, shape = name.split("_")
        (image_dir / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            draw_shape(SYNTHETIC_COLOURS[colour], shape, image_size, rng).save(
                image_dir / name / f"{name}_{i:04d}.jpg", quality=90)
    train, val, test = read_and_split_data(str(image_dir), rng)
    save_split(train, val, test, folder / "split_zhou_Synthetic.json", str(image_dir))
    return classnames


SYNTHETIC_DG_BACKGROUNDS = {"light": (225, 225, 225), "dark": (40, 40, 40), "sand": (200, 180, 120)}  # domains


def make_synthetic_dg_dataset(root, n_classes=4, per_domain=(6, 2, 4), image_size=(32, 32), seed=0):
    """Write a small multi-source DG suite `<root>/synthetic_dg/<domain>/{train,val,test}/<class>/*.jpg`: the
    synthetic classes on three backgrounds (light, dark, sand), one per domain; deterministic for a seed."""
    rng = random.Random(seed)
    classnames = sorted([f"{c}_{s}" for s in SYNTHETIC_SHAPES for c in SYNTHETIC_COLOURS][:n_classes])
    for domain, background in SYNTHETIC_DG_BACKGROUNDS.items():
        for split, n in zip(("train", "val", "test"), per_domain):
            for name in classnames:
                colour, shape = name.split("_")
                folder = Path(root) / "synthetic_dg" / domain / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    image = draw_shape(SYNTHETIC_COLOURS[colour], shape, image_size, rng)
                    pixels = np.asarray(image).copy()
                    pixels[(pixels > 140).all(-1)] = background  # the pale background becomes the domain's
                    Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return classnames


# --- downloads (torchvision's download utilities; md5 checked where the publisher gives one) -----------------
def fetch(url, downloads, md5=None):
    """Download one file into `downloads` (md5 verified by torchvision) and return its path."""
    filename = url.rsplit("/", 1)[-1]
    download_url(url, str(downloads), filename, md5)
    return Path(downloads) / filename


def fetch_extract(url, downloads, dest, md5=None):
    archive = fetch(url, downloads, md5)
    extract_archive(str(archive), str(dest), remove_finished=True)


def download_dtd(root, tmp):
    fetch_extract("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz", tmp, root,
                  "fff73e5086ae6bdbea199a49dfb8a4c1")  # archive holds dtd/{images,imdb,labels}


def download_eurosat(root, tmp):  # torchvision's mirror of the RGB release; the archive holds 2750/
    fetch_extract("https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                  "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip", tmp, root / "eurosat",
                  "c8fa014336c82ac7804f0398fcb19387")


def download_oxford_pets(root, tmp):
    base = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/"
    fetch_extract(base + "images.tar.gz", tmp, root / "oxford_pets", "5c4f3ee8e5d25df40f4fd59a7f44e54c")
    fetch_extract(base + "annotations.tar.gz", tmp, root / "oxford_pets", "95a8c909bbe2e81eed6a22bccdf3f68f")


def download_oxford_flowers(root, tmp):
    base = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
    fetch_extract(base + "102flowers.tgz", tmp, root / "oxford_flowers", "52808999861908f626f3c1f4e79d11fa")
    shutil.move(str(fetch(base + "imagelabels.mat", tmp, "e0620be6f572b9609742df49c70aed4d")),
                str(root / "oxford_flowers" / "imagelabels.mat"))


def download_fgvc_aircraft(root, tmp):  # CoOp: keep only data/ of the archive, renamed fgvc_aircraft/
    fetch_extract("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                  tmp, tmp)  # the publisher gives no checksum
    shutil.move(str(tmp / "fgvc-aircraft-2013b" / "data"), str(root / "fgvc_aircraft"))


def download_food101(root, tmp):  # the archive holds food-101/{images,meta}
    fetch_extract("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", tmp, root, "85eeb15f3717b99a5da872d97d918f87")


def download_caltech101(root, tmp):  # a zip holding caltech-101/101_ObjectCategories.tar.gz
    fetch_extract("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip", tmp, tmp,
                  "3138e1922a9193bfa496528edbbc45d0")
    extract_archive(str(tmp / "caltech-101" / "101_ObjectCategories.tar.gz"), str(root / "caltech-101"))


def download_sun397(root, tmp):
    folder = root / "sun397"
    fetch_extract("http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz", tmp, folder,
                  "8ca2778205c41d23104230ba66911c7a")
    fetch_extract("https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip", tmp, tmp)
    partitions = tmp / "Partitions" if (tmp / "Partitions").is_dir() else tmp
    for name in ["ClassName.txt", "Training_01.txt", "Testing_01.txt"]:
        shutil.move(str(partitions / name), str(folder / name))


DOWNLOADERS = {
    "dtd": download_dtd, "eurosat": download_eurosat, "oxford_pets": download_oxford_pets,
    "oxford_flowers": download_oxford_flowers, "fgvc_aircraft": download_fgvc_aircraft,
    "food101": download_food101, "caltech101": download_caltech101, "sun397": download_sun397,
}


def download_dataset(name, root):
    """Fetch, verify and extract `name` into the CoOp layout under root. Archives and the extracted tree live in a
    temporary folder under root; the dataset folder is renamed into place only when complete, so an interrupted
    download or extraction leaves nothing half-made (the next --download starts over; leftovers are removed)."""
    if name not in DOWNLOADERS:
        raise DataError(f"{name} cannot be downloaded automatically; {download_hint(name, root)}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    prefix = f".download-{name}-"
    for stale in root.glob(prefix + "*"):  # a download that was killed: start over
        shutil.rmtree(stale, ignore_errors=True)
    folder = root / get_spec(name).dataset_dir
    with tempfile.TemporaryDirectory(dir=root, prefix=prefix) as tmp:
        stage = Path(tmp) / "stage"  # the downloaders write <stage>/<dataset folder>
        stage.mkdir()
        try:
            DOWNLOADERS[name](stage, Path(tmp))
        except (OSError, RuntimeError) as e:  # network errors are URLError (an OSError); md5 -> RuntimeError
            raise DataError(f"download of {name} failed: {e}; {download_hint(name, root)}") from None
        if not (stage / folder.name).is_dir():
            raise DataError(f"the {name} archives did not hold a {folder.name}/ folder; {download_hint(name, root)}")
        os.replace(stage / folder.name, folder)


# --- command line --------------------------------------------------------------------------------------------
def summary(name, splits):
    n_cls = len(splits.classnames)
    shown = ", ".join(prompt_classname(c) for c in splits.classnames[:5]) + (", ..." if n_cls > 5 else "")
    return (f"{name}: {n_cls} classes ({shown})\n"
            f"train {len(splits.train)} | val {len(splits.val)} | test {len(splits.test)}")


def parse_shots(text: str) -> int:
    """A command line's --shots: a positive number of images per class, or "all" (ALL_SHOTS)."""
    if text == "all":
        return ALL_SHOTS
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of images per class (1, 2, 4, 8, 16), "
                                         "or all for every training image")
    return int(text)


def shots_name(shots: int) -> str:
    """How run folders and tables name a number of shots: "16", or "all"."""
    return "all" if shots == ALL_SHOTS else str(shots)


def folder_run_name(root) -> str:
    """How run folders and tables name your own image folder: <folder name>-<first 8 hex digits of the SHA256 of its
    absolute path>, so that two folders called `images` never share a run folder or a table row."""
    path = Path(root).expanduser().resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


# train.py's flags that do not change a run's results (where it is written, how it is shown, on which device and how many processes
# share it, whether it was resumed); --gram counts by its file's SHA256 (gram_sha256), not its path
BOOKKEEPING_FLAGS = ("output_dir", "resume", "overwrite", "no_progress", "num_workers", "download", "rank",
                     "world_size", "compile", "compile_backend", "gram_checkpoint_every", "gram", "device")


# train.py --gram-parts: which half of a GRAM file a run uses, and its run folder's suffix (<method><suffix>)
GRAM_PARTS = {"both": "+gram", "init": "+gram-init", "regulator": "+gram-reg"}


def run_method(config: dict) -> str:
    """The method a run's folder and table row are named by: e.g. coop, coop+gram, coop+gram-init."""
    suffix = GRAM_PARTS[config.get("gram_parts", "both")] if config.get("gram_sha256") else ""
    return config.get("method", "?") + suffix


def run_identity(config: dict, *also_ignored: str) -> dict:
    """What makes a run's results: its train.py configuration without the bookkeeping flags and `also_ignored`
    (--root only counts for your own folder, where it is the dataset), as JSON values."""
    skip = {*BOOKKEEPING_FLAGS, *also_ignored, *(("root",) if config.get("dataset") != "folder" else ())}
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in skip}))


def default_num_workers() -> int:
    """Loader processes for evaluation: CoOp's 8, never more than the machine's cores (the order of a test set does
    not depend on them; training keeps CoOp's 8, whose augmentation streams do)."""
    return min(NUM_WORKERS, os.cpu_count() or 1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a command-line mistake prints the error line first and alone, then a one-line pointer to
    --help, and exits 2 (argparse's code); argparse itself prints the whole usage text first."""

    def error(self, message):
        sys.stderr.write(f"error: {message}\n{self.prog} --help lists every flag\n")
        sys.exit(2)


def check_writable(folder, what: str, why: str):
    """One line unless a file can be created in `folder` (or, where it does not exist yet, in its nearest existing
    parent): a real write, since permission bits do not tell (root, read-only mounts, immutable folders)."""
    folder = Path(folder).expanduser()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DataError(f"{what} {folder} cannot be written ({e.strerror} in {existing}): {why}") from None


def check_images_decode(items):
    """Decode every image of your own folder once, before any work: a corrupt or unreadable one is named (read_image's
    one line). The benchmark datasets are not checked this way: decoding all of ImageNet up front would cost hours."""
    for path in sorted({d.impath for d in items}):
        read_image(path)


def error_line(error) -> str:
    """The one line a command prints for a user error. An error raised in a DataLoader worker arrives with the
    worker's traceback in its message; its last line is the original "module.Error: message"."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def one_line_warnings():
    """Command lines print a warning as one line, "warning: <message>" (Python's default adds the source line)."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def main(argv=None):
    p = ArgumentParser(description="Build a CoOp-protocol dataset split and print a summary.")
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--root", required=True, help="data root holding the CoOp dataset folders")
    p.add_argument("--shots", type=int, default=16, help="K images per class (CoOp NUM_SHOTS; <1: all)")
    p.add_argument("--seed", type=int, default=1, help="few-shot seed (papers: 1, 2, 3)")
    p.add_argument("--subsample", default="all", choices=["all", "base", "new"], help="CoCoOp class half")
    p.add_argument("--target-domain", default=None, help="DG suites: held-out domain (name or MetaPrompt ID)")
    p.add_argument("--download", action="store_true", help="fetch and extract the dataset if it is missing")
    p.add_argument("--benchmark", action="store_true", help="also measure train-loader images/second")
    p.add_argument("--num-workers", type=int, default=2, help="loader workers for --benchmark")
    args = p.parse_args(argv)
    try:
        splits = build_dataset(args.dataset, args.root, args.shots, args.seed, args.subsample, args.download,
                               args.target_domain)
        print(summary(args.dataset, splits))
        if args.benchmark:
            print(f"train loader: {benchmark_loader(splits.train, num_workers=args.num_workers):.1f} images/s")
    except DataError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    one_line_warnings()
    main()
