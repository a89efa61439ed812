"""Evaluate a saved prompt checkpoint, classify images with it, and aggregate an output tree into the papers' tables.

    python eval.py evaluate --checkpoint RUN_DIR --dataset dtd --root DATA --subsample new   # or its prompts.pt
    python eval.py predict --checkpoint RUN_DIR photo.jpg more_photos/ [--classes names.txt] [--topk 5] [--json]
    python eval.py table --output output                   # every results.json below: one table per protocol
    python eval.py table --output output/base2new --baseline ivlp [--json]  # + paired differences, 95% intervals

Tables: base-to-new (base, new, HM per dataset + average), few-shot (accuracy per dataset and shots), multi-source
DG (accuracy per target domain and their average), cross-dataset and ImageNet DG. A row never averages runs whose
configurations differ in anything but the seed (`scan`).

The average row is the papers' (CoCoOp arXiv:2203.05557v2 Table 1, and every later table): mean base and mean new
accuracy over the datasets, and the HM of those two means (not the mean of per-dataset HMs). Each run's numbers are
first averaged over seeds. Published numbers are kept as data below, with their source, and printed alongside.

Cross-dataset transfer and ImageNet domain generalization (`--output output/cross_dataset`, or
`.../domain_generalization`):
accuracy on the source and every target, and the average over targets, next to MaPLe's published rows.
`--baseline METHOD` adds, for every other method, the paired difference to the baseline: method minus baseline on the
same dataset and seed (base, new and the seed's HM; in DG the seed's average over target domains), only over the
seeds both have, its mean and a two-sided 95% confidence interval from Student's t with n - 1 degrees of freedom.
The papers compare means of 3 seeds without one; with the seeds paired, the seed-to-seed spread of the task (which
few-shot images, which initialisation) cancels from the difference.
Not included: plots.
"""

import json
import math
import statistics
import sys
import warnings
from pathlib import Path

import torch

import clip_model
import data
import prompts
import testbed

DATASET_ORDER = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]  # the papers' column order
LEARNER_KEYS = ("n_ctx", "ctx_init", "class_specific", "class_token_position", "n_ctx_text", "n_ctx_vision",
                "text_depth", "vision_depth")  # train.py flags that shape a learner

# Published base/new accuracy (ViT-B/16, 16 shots, mean of 3 seeds). Sources: CoCoOp arXiv:2203.05557v2 Table 1
# (zero-shot CLIP, CoOp), PromptSRC arXiv:2307.06948v2 Table 1 (averages as in muzairkhattak/PromptSRC's README),
# ProMetaR arXiv:2404.00851v1 Table 1 (its OxfordPets, SUN397 and UCF101 new-class values could not be checked
# against the paper's PDF and may be off by a few tenths).
PUBLISHED = {
    "zeroshot": {"imagenet": (72.43, 68.14), "caltech101": (96.84, 94.00), "oxford_pets": (91.17, 97.26),
                 "stanford_cars": (63.37, 74.89), "oxford_flowers": (72.08, 77.80), "food101": (90.10, 91.22),
                 "fgvc_aircraft": (27.19, 36.29), "sun397": (69.36, 75.35), "dtd": (53.24, 59.90),
                 "eurosat": (56.48, 64.05), "ucf101": (70.53, 77.50)},
    "coop": {"imagenet": (76.47, 67.88), "caltech101": (98.00, 89.81), "oxford_pets": (93.67, 95.29),
             "stanford_cars": (78.12, 60.40), "oxford_flowers": (97.60, 59.67), "food101": (88.33, 82.26),
             "fgvc_aircraft": (40.44, 22.30), "sun397": (80.60, 65.89), "dtd": (79.44, 41.18),
             "eurosat": (92.19, 54.74), "ucf101": (84.69, 56.05)},
    "promptsrc": {"imagenet": (77.60, 70.73), "caltech101": (98.10, 94.03), "oxford_pets": (95.33, 97.30),
                  "stanford_cars": (78.27, 74.97), "oxford_flowers": (98.07, 76.50), "food101": (90.67, 91.53),
                  "fgvc_aircraft": (42.73, 37.87), "sun397": (82.67, 78.47), "dtd": (83.37, 62.97),
                  "eurosat": (92.90, 73.90), "ucf101": (87.10, 78.80)},
    "prometar": {"imagenet": (77.76, 70.75), "caltech101": (98.11, 94.29), "oxford_pets": (95.57, 97.43),
                 "stanford_cars": (78.32, 75.18), "oxford_flowers": (98.13, 77.66), "food101": (90.80, 91.89),
                 "fgvc_aircraft": (42.02, 38.63), "sun397": (82.70, 79.02), "dtd": (83.02, 64.05),
                 "eurosat": (94.94, 77.44), "ucf101": (86.97, 79.84)},
}
PUBLISHED_AVERAGE = {"ivlp": (84.21, 71.79)}  # PromptSRC README (IVLP, 20 epochs); per-dataset rows not retrieved


def average_row(rows: dict) -> tuple:
    """(mean base, mean new, HM of the two means) over datasets {name: (base, new)}."""
    base = statistics.fmean(b for b, _ in rows.values())
    new = statistics.fmean(n for _, n in rows.values())
    return base, new, data.harmonic_mean(base, new)


BASE2NEW_SHOTS = 16  # the base-to-new protocol's shots per class (CoCoOp Sec. 5.1, train.py's default --shots)


def scan(output) -> list:
    """Every finished train.py run under `output` (any folder: the output root, a protocol folder, one run folder),
    one dict each: protocol, dataset, label (the table row's name), shots, seed, target (multi-source DG) and the
    results. Skipped: --eval-only runs and the per-suite averages of --target-domain all (their targets are read).

    Names come from the run folder, <dataset>/<method>/shots_<K>/seed_<S>[/<target>] (so variants such as coop+gram
    are rows of their own), or from the configuration where the run sits elsewhere (--output-dir). Runs that differ
    in anything but the seed (data.run_identity) never share a row: where one label holds several configurations,
    each gets the differing flags in brackets, "coop [lr 0.05]" (the shots are a column or in the label already)."""
    records = []
    for path in sorted(Path(output).resolve().rglob("results.json")):
        result = json.loads(path.read_text())
        config = result.get("config", {})
        splits = result.get("splits", {})
        protocol = config.get("protocol") or ("base2new" if {"base", "new"} <= set(splits) else "fewshot")
        if config.get("eval_only") or config.get("target_domain") == "all" or "average" in splits:
            continue
        depth = 1 if protocol == "multi_source_dg" else 0  # DG: the target's folder below the seed's
        parts = path.parts[:-1 - depth]
        laid_out = len(parts) >= 4 and parts[-1].startswith("seed_") and parts[-2].startswith("shots_")
        if laid_out:
            dataset, method = parts[-4], parts[-3]
        else:
            dataset = data.folder_run_name(config["root"]) if config.get("dataset") == "folder" else \
                config.get("dataset", "?")
            method = data.run_method(config)
        shots = config.get("shots", int(parts[-2].removeprefix("shots_")) if laid_out and
                           parts[-2].removeprefix("shots_").isdigit() else BASE2NEW_SHOTS)
        label = method if protocol in ("fewshot", "multi_source_dg") else \
            row_name(method, f"shots_{data.shots_name(shots)}")  # there the shots are a column
        records.append({"protocol": protocol, "dataset": dataset, "label": label, "shots": shots,
                        "seed": result.get("seed", config.get("seed")), "target": config.get("target_domain"),
                        "identity": data.run_identity(config, "seed", "shots", "dataset", "root", "target_domain"),
                        "result": result})
    return distinguish_configurations(records)


def distinguish_configurations(records: list) -> list:
    """Where runs of one protocol share a label but not a configuration (seed, dataset and target aside), append the
    flags that differ to each label, so that they are never averaged together."""
    groups = {}
    for r in records:
        groups.setdefault((r["protocol"], r["label"]), []).append(r)
    for members in groups.values():
        identities = [m["identity"] for m in members]
        keys = sorted({k for i in identities for k in i})
        differing = [k for k in keys if len({json.dumps(i.get(k), sort_keys=True) for i in identities}) > 1]
        if not differing:
            continue
        for m in members:
            m["label"] += " [" + ", ".join(f"{k} {m['identity'].get(k)}" for k in differing) + "]"
    return records


def row_name(method: str, shots_folder: str) -> str:
    """A base-to-new row's name: the method, with its shots where they are not the protocol's 16 ("coop (4-shot)",
    "coop (all images)"), so that runs with other shots in the same tree get rows of their own."""
    shots = shots_folder.removeprefix("shots_")
    if shots == "all":
        return f"{method} (all images)"
    return method if not shots.isdigit() or int(shots) == BASE2NEW_SHOTS else f"{method} ({shots}-shot)"


def collect_all(output) -> dict:
    """Every run under `output` (one scan), grouped for the tables: "base2new": {row label: {dataset: [results.json
    of each seed]}}; "fewshot": {(row label, dataset, shots): [results.json of each seed]}; "multi_source_dg":
    {(row label, dataset, shots): {seed: {target: accuracy}}}, from the per-target results that `--target-domain
    all` writes; "transfer" (cross-dataset and ImageNet DG): {(protocol, source dataset): {row label: [results]}}."""
    runs = {"base2new": {}, "fewshot": {}, "multi_source_dg": {}, "transfer": {}}
    for r in scan(output):
        label, dataset, result = r["label"], r["dataset"], r["result"]
        if r["protocol"] == "base2new":
            runs["base2new"].setdefault(label, {}).setdefault(dataset, []).append(result)
        elif r["protocol"] == "fewshot":
            runs["fewshot"].setdefault((label, dataset, r["shots"]), []).append(result)
        elif r["protocol"] == "multi_source_dg":
            runs["multi_source_dg"].setdefault((label, dataset, r["shots"]), {}).setdefault(r["seed"], {})[
                r["target"]] = result["splits"]["test"]["accuracy"]
        elif r["protocol"] in PUBLISHED_TRANSFER:
            runs["transfer"].setdefault((r["protocol"], dataset), {}).setdefault(label, []).append(result)
    return runs


def collect(output) -> dict:
    """Base-to-new runs (collect_all)."""
    return collect_all(output)["base2new"]


def collect_fewshot(output) -> dict:
    """Few-shot runs over all classes (collect_all)."""
    return collect_all(output)["fewshot"]


def collect_dg(output) -> dict:
    """Multi-source DG runs (collect_all)."""
    return collect_all(output)["multi_source_dg"]


def fewshot_table(runs: dict) -> str:
    """Markdown: per (method, dataset, shots) the test accuracy over all classes, mean ± std over seeds."""
    lines = ["| method | dataset | shots | seeds | accuracy |", "|---|---|---|---|---|"]
    for (label, dataset, shots), results in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        mean, spread = seed_mean(results, "test")
        lines.append(f"| {label} | {dataset} | {data.shots_name(shots)} | {len(results)} | "
                     f"{mean:.2f} ± {spread:.2f} |")
    return "\n".join(lines)


# Few-shot multi-source DG, mean accuracy over 3 seeds and every target domain, ViT-B/16: MetaPrompt's README
# (Vill-Lab/2024-TIP-MetaPrompt, the TIP paper's DG table). Keys: (method, shots); None = any number of shots.
PUBLISHED_DG = {
    ("zeroshot", None): {"pacs": 95.7, "vlcs": 75.9, "office_home": 79.4, "domainnet": 56.8},  # "CLIP"
    ("zeroshot (template)", None): {"pacs": 96.1, "vlcs": 82.3, "office_home": 82.1, "domainnet": 56.9},
    ("cocoop", 5): {"pacs": 96.7, "vlcs": 78.3, "office_home": 84.1, "domainnet": 61.1},
    ("metaprompt", 1): {"pacs": 96.9, "vlcs": 81.1, "office_home": 84.1, "domainnet": 61.2},
    ("metaprompt", 5): {"pacs": 97.0, "vlcs": 82.6, "office_home": 85.2, "domainnet": 61.8},
}


def published_dg(method: str, dataset: str, shots: int) -> str:
    if method == "zeroshot":
        values = [PUBLISHED_DG[(name, None)].get(dataset) for name in ("zeroshot", "zeroshot (template)")]
        return " / ".join(f"{v:.1f}" for v in values) + " (CLIP / with template)" if None not in values else "-"
    value = PUBLISHED_DG.get((method, shots), {}).get(dataset)
    return f"{value:.1f}" if value is not None else "-"


def dg_table(runs: dict) -> str:
    """Markdown: per (method, dataset, shots) the accuracy on each target domain (mean over seeds) and the average
    over targets, mean ± std over seeds (each seed's average over its targets), next to the published average."""
    lines = ["| method | dataset | shots | seeds | per target | average | published |", "|---|---|---|---|---|---|---|"]
    for (method, dataset, shots), per_seed in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        targets = sorted({t for accuracies in per_seed.values() for t in accuracies})
        per_target = ", ".join(f"{t} {statistics.fmean(a[t] for a in per_seed.values() if t in a):.2f}"
                               for t in targets)
        averages = [statistics.fmean(a.values()) for a in per_seed.values()]
        spread = statistics.stdev(averages) if len(averages) > 1 else 0.0
        lines.append(f"| {method} | {dataset} | {shots} | {len(per_seed)} | {per_target} | "
                     f"{statistics.fmean(averages):.2f} ± {spread:.2f} | {published_dg(method, dataset, shots)} |")
    return "\n".join(lines)


# Cross-dataset transfer and ImageNet domain generalization (ViT-B/16, trained on ImageNet's 1000 classes with 16
# shots, mean of 3 seeds): the rows of MaPLe (arXiv:2210.03117v3) for CLIP, CoOp, CoCoOp and MaPLe, as tabulated in
# ThomasWangY/2024-AAAI-HPT README.md (its cross-dataset row labelled "CLIP" is CoOp's: ImageNet 71.51). Per protocol
# and method: ({dataset: accuracy}, the published average over the target datasets).
PUBLISHED_TRANSFER = {
    "cross_dataset": {
        "coop": ({"imagenet": 71.51, "caltech101": 93.70, "oxford_pets": 89.14, "stanford_cars": 64.51,
                  "oxford_flowers": 68.71, "food101": 85.30, "fgvc_aircraft": 18.47, "sun397": 64.15, "dtd": 41.92,
                  "eurosat": 46.39, "ucf101": 66.55}, 63.88),
        "cocoop": ({"imagenet": 71.02, "caltech101": 94.43, "oxford_pets": 90.14, "stanford_cars": 65.32,
                    "oxford_flowers": 71.88, "food101": 86.06, "fgvc_aircraft": 22.94, "sun397": 67.36, "dtd": 45.73,
                    "eurosat": 45.37, "ucf101": 68.21}, 65.74),
        "maple": ({"imagenet": 70.72, "caltech101": 93.53, "oxford_pets": 90.49, "stanford_cars": 65.57,
                   "oxford_flowers": 72.23, "food101": 86.20, "fgvc_aircraft": 24.74, "sun397": 67.01, "dtd": 46.49,
                   "eurosat": 48.06, "ucf101": 68.69}, 66.30),
    },
    "domain_generalization": {
        "zeroshot": ({"imagenet": 66.73, "imagenetv2": 60.83, "imagenet_sketch": 46.15, "imagenet_a": 47.77,
                      "imagenet_r": 73.96}, 57.17),
        "coop": ({"imagenet": 71.51, "imagenetv2": 64.20, "imagenet_sketch": 47.99, "imagenet_a": 49.71,
                  "imagenet_r": 75.21}, 59.28),
        "cocoop": ({"imagenet": 71.02, "imagenetv2": 64.07, "imagenet_sketch": 48.75, "imagenet_a": 50.63,
                    "imagenet_r": 76.18}, 59.90),
        # its published average, 60.26, is 0.015 below the mean of its own columns (60.275): more than rounding
        # explains; kept as the source prints it (the tables recompute averages from the columns)
        "maple": ({"imagenet": 70.72, "imagenetv2": 64.07, "imagenet_sketch": 49.15, "imagenet_a": 50.90,
                   "imagenet_r": 76.98}, 60.26),
    },
}
TRANSFER_ORDER = DATASET_ORDER + ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def collect_transfer(output) -> dict:
    """Cross-dataset and ImageNet-DG runs (collect_all)."""
    return collect_all(output)["transfer"]


def transfer_table(protocol: str, source: str, per_method: dict) -> str:
    """Markdown: per method the accuracy on the source and on every target (mean over seeds) and the average over the
    targets (the papers' "average" column), then the published row where there is one, its average recomputed from
    its own columns."""
    datasets = sorted({d for runs in per_method.values() for r in runs for d in r["splits"]},
                      key=lambda d: (d != source, TRANSFER_ORDER.index(d) if d in TRANSFER_ORDER else
                                     len(TRANSFER_ORDER), d))
    targets = [d for d in datasets if d != source]
    lines = [f"{protocol}, trained on {source}:", "",
             "| method | seeds | " + " | ".join(datasets) + " | average (targets) |",
             "|---" * (len(datasets) + 3) + "|"]
    for method, results in per_method.items():
        means = {d: statistics.fmean(r["splits"][d]["accuracy"] for r in results) for d in datasets}
        cells = " | ".join(f"{means[d]:.2f}" for d in datasets)
        lines.append(f"| {method} | {len(results)} | {cells} | {statistics.fmean(means[d] for d in targets):.2f} |")
        if method in PUBLISHED_TRANSFER[protocol] and source == "imagenet":
            published, _ = PUBLISHED_TRANSFER[protocol][method]
            cells = " | ".join(f"{published[d]:.2f}" if d in published else "-" for d in datasets)
            average = published_transfer_average(protocol, method, targets)
            lines.append(f"| {method} (published) | 3 | {cells} | {average:.2f} |")
    return "\n".join(lines)


def published_transfer_average(protocol: str, method: str, targets=None) -> float:
    """Mean of a published row over `targets` (default: all its targets), from its own columns."""
    published, _ = PUBLISHED_TRANSFER[protocol][method]
    targets = [d for d in published if d != "imagenet"] if targets is None else [d for d in targets if d in published]
    return statistics.fmean(published[d] for d in targets)


def seed_mean(results: list, split: str) -> tuple:
    values = [r["splits"][split]["accuracy"] for r in results]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(runs: dict) -> str:
    lines = ["| method | dataset | seeds | base | new | HM | published base / new / HM |", "|---|---|---|---|---|---|---|"]
    for method, per_dataset in runs.items():
        rows = {}
        for dataset in sorted(per_dataset, key=lambda d: (d not in DATASET_ORDER, DATASET_ORDER.index(d)
                                                          if d in DATASET_ORDER else 0, d)):
            (base, base_sd), (new, new_sd) = (seed_mean(per_dataset[dataset], s) for s in ("base", "new"))
            rows[dataset] = (base, new)
            ref = PUBLISHED.get(method, {}).get(dataset)
            ref_text = f"{ref[0]:.2f} / {ref[1]:.2f} / {data.harmonic_mean(*ref):.2f}" if ref else "-"
            lines.append(f"| {method} | {dataset} | {len(per_dataset[dataset])} | {base:.2f} ± {base_sd:.2f} | "
                         f"{new:.2f} ± {new_sd:.2f} | {data.harmonic_mean(base, new):.2f} | {ref_text} |")
        published = PUBLISHED.get(method, {})
        ref = None  # a published average only where it averages the same datasets
        if rows and set(rows) <= set(published):
            ref = average_row({d: published[d] for d in rows})
        elif method in PUBLISHED_AVERAGE and set(rows) == set(DATASET_ORDER):
            ref = (*PUBLISHED_AVERAGE[method], data.harmonic_mean(*PUBLISHED_AVERAGE[method]))
        ref_text = " / ".join(f"{x:.2f}" for x in ref) if ref else "-"
        if len(rows) < 2:  # one dataset: its row is the average
            continue
        base, new, hm = average_row(rows)
        lines.append(f"| {method} | **average ({len(rows)})** | | {base:.2f} | {new:.2f} | {hm:.2f} | {ref_text} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Paired differences over seeds with a 95% confidence interval (Student's t; scipy is not a dependency)

CONFIDENCE = 0.95  # two-sided


def student_t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) of Student's t with an integer number of degrees of freedom, in closed form (Abramowitz & Stegun,
    Handbook of Mathematical Functions, 26.7.3 for odd df and 26.7.4 for even df), theta = atan(t / sqrt(df))."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) [1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)]
        term = total = 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return s * total
    term = total = math.cos(theta)  # odd df: 2/pi [theta + sin(theta) (cos + 2/3 cos^3 + ... up to cos^(df-2))]
    for k in range(1, (df - 1) // 2):
        term *= 2 * k / (2 * k + 1) * c2
        total += term
    return 2 / math.pi * (theta + (s * total if df > 1 else 0.0))


def student_t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """t such that P(|T| <= t) = confidence (t(0.975, df) for 95%): bisection on student_t_two_sided, to float
    precision (t(0.975, 2) = 4.3027, t(0.975, 9) = 2.2622)."""
    low, high = 0.0, 1.0
    while student_t_two_sided(high, df) < confidence:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_two_sided(middle, df) < confidence else (low, middle)
    return (low + high) / 2


def paired_difference(method: dict, baseline: dict, confidence: float = CONFIDENCE) -> dict:
    """Method minus baseline over the seeds both have ({seed: value} each): n, the mean difference and the half-width
    and bounds of its two-sided confidence interval, t(n - 1) s / sqrt(n) (None below 2 seeds: no interval from one
    difference), and `unpaired`, how many seeds only one of the two has (left out)."""
    seeds = sorted(method.keys() & baseline.keys())
    diffs = [method[s] - baseline[s] for s in seeds]
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else None
    half = student_t_quantile(n - 1, confidence) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None
    return {"n": n, "unpaired": len(method.keys() ^ baseline.keys()), "mean": mean, "half_width": half,
            "low": None if half is None else mean - half, "high": None if half is None else mean + half,
            "confidence": confidence}


def base2new_by_seed(per_dataset: dict, datasets) -> dict:
    """{seed: {"base", "new", "HM"}} of one method: over one dataset, each seed's accuracies and their HM; over several,
    the seed's mean base and mean new over `datasets` and their HM (the papers' average row, per seed), for the seeds
    that have every one of them."""
    by_seed = [{r["seed"]: (r["splits"]["base"]["accuracy"], r["splits"]["new"]["accuracy"])
                for r in per_dataset[d]} for d in datasets]
    seeds = set.intersection(*(set(s) for s in by_seed))
    values = {}
    for seed in seeds:
        base = statistics.fmean(s[seed][0] for s in by_seed)
        new = statistics.fmean(s[seed][1] for s in by_seed)
        values[seed] = {"base": base, "new": new, "HM": data.harmonic_mean(base, new)}
    return values


def base2new_differences(runs: dict, baseline: str) -> list:
    """Paired differences to `baseline` for every other method of `collect`'s runs, per dataset both have and, with
    several, over their average: dicts with method, dataset, metric (base, new, HM) and paired_difference's keys."""
    if baseline not in runs:
        raise ValueError(f"--baseline {baseline}: no runs of that method here (methods: {', '.join(sorted(runs))})")
    rows = []
    for method, per_dataset in runs.items():
        if method == baseline:
            continue
        common = [d for d in per_dataset if d in runs[baseline]]
        groups = [(d, [d]) for d in common] + ([(f"average ({len(common)})", common)] if len(common) > 1 else [])
        for name, datasets in groups:
            mine, theirs = base2new_by_seed(per_dataset, datasets), base2new_by_seed(runs[baseline], datasets)
            for metric in ("base", "new", "HM"):
                difference = paired_difference({s: v[metric] for s, v in mine.items()},
                                               {s: v[metric] for s, v in theirs.items()})
                rows.append({"method": method, "baseline": baseline, "dataset": name, "metric": metric, **difference})
    return rows


def dg_differences(runs: dict, baseline: str) -> list:
    """Paired differences of each seed's average over target domains to `baseline` at the same dataset and shots,
    for every other method of `collect_dg`'s runs; a seed counts as paired only when both have the same targets."""
    if not any(method == baseline for method, _, _ in runs):
        raise ValueError(f"--baseline {baseline}: no DG runs of that method here")
    rows = []
    for (method, dataset, shots), per_seed in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        reference = runs.get((baseline, dataset, shots))
        if method == baseline or reference is None:
            continue
        mismatched = {s for s in per_seed.keys() & reference.keys() if set(per_seed[s]) != set(reference[s])}
        difference = paired_difference({s: statistics.fmean(a.values()) for s, a in per_seed.items()
                                        if s not in mismatched},
                                       {s: statistics.fmean(a.values()) for s, a in reference.items()
                                        if s not in mismatched})
        difference["unpaired"] += len(mismatched)
        rows.append({"method": method, "baseline": baseline, "dataset": dataset, "shots": shots, "metric": "average",
                     **difference})
    return rows


def difference_cell(d: dict) -> str:
    """'+2.33 [+0.90, +3.77]', the mean in bold where the interval excludes 0; one seed: no interval."""
    if d["n"] == 0:
        return "- (no common seed)"
    if d["half_width"] is None:
        return f"{d['mean']:+.2f} (1 seed, no interval)"
    resolved = d["low"] > 0 or d["high"] < 0
    mean = f"**{d['mean']:+.2f}**" if resolved else f"{d['mean']:+.2f}"
    return f"{mean} [{d['low']:+.2f}, {d['high']:+.2f}]"


def seeds_cell(d: dict) -> str:
    return f"{d['n']}" + (f" ({d['unpaired']} unpaired, left out)" if d["unpaired"] else "")


DIFFERENCE_LEGEND = ("method minus {baseline} on the same seed, mean over the paired seeds [{pct}% confidence "
                     "interval, Student's t]; bold: the interval excludes 0")


def difference_table(runs: dict, baseline: str) -> str:
    """Markdown: base / new / HM paired differences to `baseline` (base2new_differences), a row per method and
    dataset."""
    rows = base2new_differences(runs, baseline)
    lines = [DIFFERENCE_LEGEND.format(baseline=baseline, pct=round(100 * CONFIDENCE)) + ":", "",
             f"| method - {baseline} | dataset | seeds | base | new | HM |", "|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 3):
        base, new, hm = rows[i:i + 3]
        lines.append(f"| {base['method']} | {base['dataset']} | {seeds_cell(hm)} | {difference_cell(base)} | "
                     f"{difference_cell(new)} | {difference_cell(hm)} |")
    return "\n".join(lines)


def dg_difference_table(runs: dict, baseline: str) -> str:
    """Markdown: the paired difference of the average over target domains to `baseline` (dg_differences)."""
    lines = [DIFFERENCE_LEGEND.format(baseline=baseline, pct=round(100 * CONFIDENCE)) + ":", "",
             f"| method - {baseline} | dataset | shots | seeds | average over targets |", "|---|---|---|---|---|"]
    lines += [f"| {d['method']} | {d['dataset']} | {d['shots']} | {seeds_cell(d)} | {difference_cell(d)} |"
              for d in dg_differences(runs, baseline)]
    return "\n".join(lines)


def table_json(runs: dict, dg_runs: dict, baseline=None) -> dict:
    """The numbers of `eval.py table` for machines: per method and dataset the mean and std over seeds (base2new;
    DG: per target and the average), and with a baseline the paired differences."""
    out = {"base2new": [], "multi_source_dg": []}
    for method, per_dataset in runs.items():
        for dataset, results in per_dataset.items():
            (base, base_sd), (new, new_sd) = (seed_mean(results, s) for s in ("base", "new"))
            out["base2new"].append({"method": method, "dataset": dataset, "seeds": sorted(r["seed"] for r in results),
                                    "base": base, "base_std": base_sd, "new": new, "new_std": new_sd,
                                    "HM": data.harmonic_mean(base, new)})
    for (method, dataset, shots), per_seed in dg_runs.items():
        averages = [statistics.fmean(a.values()) for a in per_seed.values()]
        out["multi_source_dg"].append({"method": method, "dataset": dataset, "shots": shots, "seeds": sorted(per_seed),
                                       "average": statistics.fmean(averages),
                                       "average_std": statistics.stdev(averages) if len(averages) > 1 else 0.0})
    if baseline is not None:  # where the baseline has runs
        out["differences"] = ((base2new_differences(runs, baseline) if baseline in runs else [])
                              + (dg_differences(dg_runs, baseline)
                                 if any(m == baseline for m, _, _ in dg_runs) else []))
    return out


def fewshot_json(runs: dict) -> list:
    """collect_fewshot's rows for machines: mean and std of the accuracy over seeds."""
    rows = []
    for (label, dataset, shots), results in runs.items():
        mean, spread = seed_mean(results, "test")
        rows.append({"method": label, "dataset": dataset, "shots": data.shots_name(shots),
                     "seeds": sorted(r["seed"] for r in results), "accuracy": mean, "accuracy_std": spread})
    return rows


def checkpoint_learner(ckpt, clip, classnames, dataset):
    """The learner a train.py checkpoint describes, built for any class list and loaded with its prompts (ProMetaR
    trains IVLP's or CoOp's prompts; the hand-made templates are the run's)."""
    config = ckpt["config"]
    method = config["base"] if config["method"] == "prometar" else config["method"]
    templates = data.hand_templates(dataset, method, config.get("template"))
    learner = prompts.build_learner(method, clip, classnames, templates, **{k: config[k] for k in LEARNER_KEYS},
                                    raw_frozen_names=config.get("metaprompt_raw_frozen_names", True))
    prompts.load_prompts(learner, ckpt["prompts"])
    return learner


def evaluate_checkpoint(checkpoint, dataset, root, subsample, backbone=None, num_workers=None, split="test") -> dict:
    """Accuracy and macro-F1 of saved prompts on `dataset`'s test set (split="val": its validation set, CoOp's
    few-shot draw of at most 4 images per class for the run's seed) restricted to `subsample` classes."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_workers = data.default_num_workers() if num_workers is None else num_workers
    ckpt = read_run(checkpoint)  # a run folder or a prompts.pt / checkpoint.pt
    config = ckpt["config"]
    if dataset in testbed.DATASETS:  # the offline testbed is made, not downloaded
        testbed.ensure_dataset(dataset, root)
    data.check_request(dataset, root, config["shots"], False, config.get("target_domain"))  # before the backbone
    clip = clip_model.load(backbone or config["backbone"], device=device)
    _, val, test, classnames = data.build_dataset(dataset, root, shots=config["shots"], seed=config["seed"],
                                                  subsample=subsample, target_domain=config.get("target_domain"))
    test = val if split == "val" else test
    learner, dtype = checkpoint_learner(ckpt, clip, classnames, dataset), prompts.default_dtype(device)
    if isinstance(learner, prompts.FROZEN_IMAGE):  # CLIP's own image features, cached per backbone (as train.py)
        tag = prompts.feature_tag(clip, backbone or config["backbone"], dtype)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            features = data.cached_image_features(test, lambda images: clip.encode_image(images.to(device)),
                                                  data.feature_cache_file(dataset, root, tag),
                                                  clip.visual.input_resolution, num_workers)
        return data.classification_metrics([d.label for d in test], prompts.predict_features(learner, features))
    loader = data.build_loader(test, train=False, size=clip.visual.input_resolution, num_workers=num_workers)
    return data.classification_metrics(*prompts.predict(learner, loader, device, dtype))


# --- prediction with trained prompts ------------------------------------------------------------------------------
def read_run(checkpoint, method=None) -> dict:
    """The trained prompts of a run folder (its prompts.pt), or of a prompts.pt / checkpoint.pt given as a file; one
    line for a missing folder, an unfinished run, a GRAM meta-training folder or a run of another `method`."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise clip_model.CheckpointError(f"--checkpoint {path} does not exist; pass the folder of a finished train.py "
                                         "run (output/<protocol>/<dataset>/<method>/shots_K/seed_S)")
    if path.is_dir():
        found = [path / name for name in ("prompts.pt", "gram.pt", "checkpoint.pt") if (path / name).is_file()]
        if not found:
            raise clip_model.CheckpointError(f"--checkpoint {path} holds no prompts.pt; pass the folder of a "
                                             "finished train.py run")
        path = found[0]
    ckpt = prompts.read_checkpoint(path)
    if "regulators" in ckpt or ckpt["config"].get("method") == "gram":
        raise clip_model.CheckpointError(f"--checkpoint {path} is GRAM's meta-training (a prompt initialisation, not a "
                                         "classifier): train with it, train.py --method coop --gram <its gram.pt>, "
                                         "and predict with that run")
    if Path(checkpoint).is_dir() and path.name == "checkpoint.pt":
        raise clip_model.CheckpointError(f"--checkpoint {path.parent} holds an unfinished run (checkpoint.pt, no "
                                         "prompts.pt): finish it with train.py's --resume, or pass its checkpoint.pt "
                                         "to use the prompts of its last finished epoch")
    if method is not None and ckpt["config"]["method"] != method:
        raise clip_model.CheckpointError(f"--checkpoint {path} was trained with --method {ckpt['config']['method']}, "
                                         f"not {method}; pass a {method} run, or leave out --method")
    return ckpt


def image_files(paths) -> list:
    """Image files among `paths` (files, or folders searched at any depth), in the order given (each folder sorted);
    other files are skipped with one notice; a path that does not exist is an error."""
    images, skipped = [], []
    for path in map(Path, paths):
        if path.is_dir():
            images += data.walk_images(path, skipped)
        elif path.is_file():
            (images if path.suffix.lower() in data.IMAGE_SUFFIXES else skipped).append(str(path))
        else:
            raise FileNotFoundError(f"{path} not found; give image files or folders of images")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} file(s) that are not images (not {'/'.join(data.IMAGE_SUFFIXES)}), "
                      f"e.g. {skipped[0]}", stacklevel=2)
    if not images:
        raise data.DataError(f"no images ({', '.join(data.IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return images


@torch.no_grad()
def predict_images(checkpoint, paths, classes=None, topk=5, backbone=None, batch_size=data.TEST_BATCH_SIZE,
                   num_workers=None, progress=True, method=None) -> list:
    """Classify image files with a run's trained prompts: over the run's training classes, or over `classes` (any
    names, classes never trained on included). Returns [(path, [(class name, probability), ...] top-k first)]; the
    probabilities are the softmax of the CLIP logits over the whole class list. Batched, on CUDA when present."""
    from tqdm import tqdm
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = read_run(checkpoint, method)
    if classes is None and "classnames" not in ckpt:
        raise clip_model.CheckpointError(f"--checkpoint {checkpoint} records no class list; pass --classes FILE")
    classnames = list(classes) if classes is not None else ckpt["classnames"]
    data.check_class_list(classnames, "--classes")
    images = image_files(paths)  # every input is checked before the backbone is loaded
    clip = clip_model.load(backbone or ckpt["config"]["backbone"], device=device)
    learner = checkpoint_learner(ckpt, clip, classnames, ckpt["config"]["dataset"]).eval()
    items = [data.Datum(path, 0, "") for path in images]
    if num_workers is None:  # loader processes pay off only over several batches; never more than the cores
        num_workers = data.default_num_workers() if len(items) > batch_size else 0
    loader = data.build_loader(items, train=False, batch_size=batch_size, size=clip.visual.input_resolution,
                               num_workers=num_workers)
    k, results = min(topk, len(classnames)), []
    for batch in tqdm(loader, desc="predict", disable=not progress or len(loader) < 2, leave=False):
        dtype = prompts.default_dtype(device)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            logits = learner(batch["img"].to(device, non_blocking=True)).logits  # (B, C)
        probs, idx = logits.float().softmax(-1).topk(k, dim=-1)  # (B, k) each
        for i, p, c in zip(batch["index"].tolist(), probs.tolist(), idx.tolist()):
            results.append((images[i], [(classnames[j], q) for j, q in zip(c, p)]))
    return results


def prediction_table(results) -> str:
    """One row per image: its path, then the top-k class names with their probabilities, in aligned columns."""
    rows = [["image", *(f"top-{i + 1}" for i in range(len(results[0][1])))]]
    rows += [[path, *(f"{name} {p:.3f}" for name, p in top)] for path, top in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None):
    parser = data.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset and class subset")
    ev.add_argument("--checkpoint", required=True, help="a train.py run folder (or its prompts.pt)")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--root", default="data")
    ev.add_argument("--subsample", default="new", choices=["base", "new", "all"])
    ev.add_argument("--split", default="test", choices=["test", "val"], help="val: the validation images of the run's "
                    "few-shot draw (at most 4 a class), for choosing settings without looking at the test set")
    ev.add_argument("--backbone", default=None, help="default: the one the checkpoint was trained with")
    ev.add_argument("--num-workers", type=int, default=data.default_num_workers(),
                    help=f"loader processes (default: {data.NUM_WORKERS}, at most one per core)")
    pr = sub.add_parser("predict", help="classify images with a run's trained prompts")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    pr.add_argument("--checkpoint", required=True, help="a train.py run folder (or its prompts.pt)")
    pr.add_argument("--classes", default=None, help="class list, one name a line (default: the run's classes); "
                    "classes never trained on are welcome")
    pr.add_argument("--topk", type=int, default=5, help="classes shown per image")
    pr.add_argument("--json", action="store_true", help="JSON lines: {image, predictions: [{class, probability}]}")
    pr.add_argument("--method", default=None, help="check that the run was trained with this method")
    pr.add_argument("--backbone", default=None, help="default: the one the run was trained with")
    pr.add_argument("--batch-size", type=int, default=data.TEST_BATCH_SIZE)
    pr.add_argument("--num-workers", type=int, default=None, help="loader processes (default: up to "
                    f"{data.NUM_WORKERS}, one per core, none for a single batch)")
    pr.add_argument("--no-progress", action="store_true")
    table = sub.add_parser("table", help="aggregate an output tree into a markdown table")
    table.add_argument("--output", default="output", help="any folder: every results.json below it, one table per "
                       "protocol (default: output)")
    table.add_argument("--baseline", default=None, metavar="METHOD", help="also the paired difference of every other "
                       "method to this one over the seeds both have, with a 95%% confidence interval")
    table.add_argument("--json", action="store_true", help="the numbers as one JSON object instead of markdown")
    args = parser.parse_args(argv)
    if args.command == "table":
        if not Path(args.output).exists():
            raise FileNotFoundError(f"--output {args.output} does not exist; pass the folder train.py wrote into "
                                    "(output, or one protocol's or one run's folder)")
        found = collect_all(args.output)
        runs, dg_runs, transfer, fewshot = (found[k] for k in ("base2new", "multi_source_dg", "transfer", "fewshot"))
        if not runs and not dg_runs and not transfer and not fewshot:
            raise FileNotFoundError(f"no results.json of a finished train.py run under {args.output}")
        in_b2n = args.baseline in runs
        in_dg = any(method == args.baseline for method, _, _ in dg_runs)
        if args.baseline and not (in_b2n or in_dg):
            methods = sorted({*runs, *(method for method, _, _ in dg_runs)})
            raise ValueError(f"--baseline {args.baseline}: no runs of that method under {args.output} (methods: "
                             f"{', '.join(methods)})")
        if args.json:
            print(json.dumps({**table_json(runs, dg_runs, args.baseline),
                              "fewshot": fewshot_json(fewshot)}))
            return
        tables = [f"base2new:\n\n{markdown_table(runs)}"] if runs else []
        tables += [difference_table(runs, args.baseline)] if in_b2n else []
        tables += [f"fewshot:\n\n{fewshot_table(fewshot)}"] if fewshot else []
        tables += [f"multi_source_dg:\n\n{dg_table(dg_runs)}"] if dg_runs else []
        tables += [dg_difference_table(dg_runs, args.baseline)] if in_dg else []
        print("\n\n".join(tables + [transfer_table(p, source, per_method)
                                     for (p, source), per_method in transfer.items()]))
        return
    if args.command == "predict":
        if args.topk < 1:
            parser.error(f"--topk {args.topk}: give a number of classes of at least 1")
        classes = data.read_class_list(args.classes) if args.classes else None
        results = predict_images(args.checkpoint, args.paths, classes, args.topk, args.backbone, args.batch_size,
                                 args.num_workers, not args.no_progress, args.method)
        if args.json:
            print("\n".join(json.dumps({"image": path, "predictions": [{"class": c, "probability": p} for c, p in top]})
                            for path, top in results))
        else:
            print(prediction_table(results))
        return
    metrics = evaluate_checkpoint(args.checkpoint, args.dataset, args.root, args.subsample, args.backbone,
                                  args.num_workers, args.split)
    print(json.dumps({args.subsample: metrics} if args.split == "test" else {args.subsample: metrics, "split": "val"}))


if __name__ == "__main__":
    data.one_line_warnings()
    try:
        main()
    except (data.DataError, clip_model.CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {data.error_line(e)}")
