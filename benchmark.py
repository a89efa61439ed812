"""Speed and peak memory of the project's hot paths (a benchmark, not a test; numbers go into the README).

`python benchmark.py clip` times CLIP ViT-B/16 (random weights: the speed does not depend on them) on this machine:
the image forward (batch 4, 224 px) and the text forward for 47 prompts (DTD's class count) with and without
truncation to the longest prompt. Each case runs in a fresh process, so its peak resident memory (ru_maxrss,
weights included) is its own. Reported time: median over repeats after one warm-up, under `torch.no_grad()`.
`python benchmark.py methods` times one training iteration of CoOp, CoCoOp, IVLP, MaPLe, PromptSRC, ProMetaR (step A
+ the second-order meta step) and MetaPrompt (its step and split update) at ViT-B/16, batch 4 for every method (CoCoOp's config trains with batch 1), 24
classes (DTD's base classes, the setting
where the official ProMetaR code, mlvlab/ProMetaR @ c907bdb, took 41 s and 12.8 GB per iteration on a 2-core CPU),
the same way.

`python benchmark.py eval`: one test batch of 100 images (DTD's 47 classes) through CoOp, through CoOp from cached
image features, and through IVLP (images/s of evaluation). Options for these: `--precision`, `--plain` (also the plain
path: 77-token text, math attention, fp32, and the ratio), `--compile`, `--backbone FILE` (any CLIP checkpoint instead
of random ViT-B/16 weights), `--json`.

`python benchmark.py testbed` trains and evaluates zero-shot CLIP, CoOp, CoCoOp, IVLP, MaPLe, PromptSRC, ProMetaR and
MetaPrompt on the offline testbed with the shipped small CLIP and each method's testbed defaults from train.py, for
seeds 1 to 10: base-to-new on `world` (base / new / HM, mean ± std over the seeds), and leave-one-style-out
multi-source DG on `world_styles` with 1 and 5 shots per class and source style (accuracy per held-out style and the
average). Then, for each of IVLP and PromptSRC as the baseline, every other method's paired difference to it (same
seed, 95% interval: eval.py's `--baseline`). `--jobs N` runs N train.py processes at once (default: one a core),
each with one thread, so the table does not depend on N. The README's testbed tables come from this command; a run
whose results.json exists is not run again, so an interrupted call resumes.

`python benchmark.py gram` writes 10,000 image-caption pairs of the testbed's pretraining distribution, meta-trains
GRAM on them for CoOp and for IVLP (GRAM_TESTBED_STEPS each), then trains CoOp and IVLP with and without the GRAM file
at 1, 4 and 16 shots (base-to-new on `world`) and at 1 and 5 shots (DG on `world_styles`), for seeds 1 to 10
(`--jobs` as for `testbed`), and prints the two tables (methods named coop+gram, ivlp+gram) and GRAM's paired
differences (each method with its GRAM file minus without, same shots and seed). Resumable like `testbed`, whose runs
without GRAM it shares.

`python benchmark.py grid` runs any grid of train.py runs (or writes it as a SLURM job array), and `python benchmark.py
gpu` checks the CUDA path in one script and writes a report (docs/performance.md).
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import clip_model
import data
import eval as evaluation
import meta
import prompts
import testbed
import train

VIT_B16 = {"embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768,
           "vision_patch_size": 16, "context_length": 77, "vocab_size": 49408, "transformer_width": 512,
           "transformer_heads": 8, "transformer_layers": 12}  # shapes of OpenAI's ViT-B-16.pt
DTD_CLASSES = 47  # DTD (CoOp split_zhou_DescribableTextures.json)
BATCH = 4  # ProMetaR / PromptSRC configs DATALOADER.TRAIN_X.BATCH_SIZE
BASE_CLASSES = 24  # DTD base classes: ceil(47 / 2) (CoCoOp subsample_classes)
CASES = {"clip": ("image", "text_truncated", "text_full"),
         "methods": ("coop", "cocoop", "ivlp", "maple", "promptsrc", "prometar", "metaprompt"),
         "eval": ("eval_coop", "eval_coop_cached", "eval_ivlp")}
REFERENCE_CASES = ("image", "learner")  # methods' units, same run: an image forward; IVLP's image + 24-class text
EVAL_BATCH = 100  # Dassl DATALOADER.TEST.BATCH_SIZE


def training_step(method: str, model, precision: str = "fp32", backbone: str = "ViT-B/16"):
    """One iteration of train.py's loop for `method` on random images (batch 4, 24 classes, 4 distinct labels so
    that ProMetaR's meta step always runs)."""
    args = train.parse_args(["--method", method, "--dataset", "dtd", "--precision", precision, "--backbone", backbone])
    classnames = [f"class {i}" for i in range(BASE_CLASSES)]
    learner = train.learner_for(args, model, "dtd", classnames)
    params = prompts.prompt_parameters(learner)
    optimizer = torch.optim.SGD(params.values(), lr=args.lr, momentum=train.MOMENTUM)
    size = model.visual.input_resolution
    device = model.positional_embedding.device
    images, labels = torch.randn(BATCH, 3, size, size, device=device), torch.randperm(BASE_CLASSES)[:BATCH].to(device)
    templates = ["a photo of a {}.", "art of the {}."]  # two stand-ins: the teacher is computed once, not timed
    teacher = prompts.FrozenTeacher(model, classnames, templates) if method in ("promptsrc", "prometar") else None
    scaler = torch.amp.GradScaler(enabled=False)
    if method == "metaprompt":  # two domains, so that a DG-style split exists; base-to-new splits the classes
        domains = torch.arange(BATCH, device=device) % 2
        return lambda: train.metaprompt_step(args, learner, optimizer, images, labels, domains)
    if method != "prometar":
        return lambda: train.sgd_step(args, learner, teacher, optimizer, scaler, images, labels, device.type)
    gate = meta.GradientModulator({k: v.shape for k, v in params.items()}).to(device)
    gate_optimizer = torch.optim.SGD(gate.parameters(), lr=args.regularizer_lr, momentum=train.MOMENTUM)
    return lambda: train.prometar_step(args, learner, teacher, gate, optimizer, gate_optimizer, images, labels)


def plain_path():
    """The path every official codebase takes, for the same-run ratio: 77-token text everywhere (no truncation after
    the last end-of-text token), the math attention kernel everywhere, fp32 (and no caches: the timed steps use
    none)."""
    prompts.TRUNCATE_TEXT = False
    full = clip_model.CLIP.encode_text_embeddings
    clip_model.CLIP.encode_text_embeddings = lambda self, *a, **k: full(self, *a, **{**k, "truncate": False})
    return meta.second_order_attention(True)  # sdpa_kernel(SDPBackend.MATH)


def evaluation_step(case: str, model, backbone: str = "ViT-B/16"):
    """One test batch (100 images, DTD's 47 classes) through a trained-prompt learner, no gradients: CoOp through its
    image encoder, CoOp from cached image features (train.py's evaluation of a frozen-image method), IVLP."""
    method = case.split("_")[1]
    args = train.parse_args(["--method", method, "--dataset", "dtd", "--backbone", backbone])
    learner = train.learner_for(args, model, "dtd", [f"class {i}" for i in range(DTD_CLASSES)]).eval()
    size, device = model.visual.input_resolution, model.positional_embedding.device
    images = torch.randn(EVAL_BATCH, 3, size, size, device=device)
    if case.endswith("cached"):
        with torch.no_grad():
            features = model.encode_image(images)  # computed once, before the timing
        return lambda: learner.classify(features)
    return lambda: learner(images)


def run_case(case: str, repeats: int, precision: str = "fp32", plain: bool = False, compile_: bool = False,
             backbone: str = "ViT-B/16") -> dict:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CUDA when present, as train.py
    if device == "cuda":  # this case's own peak (the GPU check runs many cases in one process)
        torch.cuda.reset_peak_memory_stats()
    model = clip_model.CLIP(**VIT_B16).to(device).eval() if backbone == "ViT-B/16" else \
        clip_model.load(backbone, device=device)
    if compile_:  # as train.py --compile; the warm-up iteration (not timed) compiles
        model.visual.forward = torch.compile(model.visual.forward)
        model.transformer.forward = torch.compile(model.transformer.forward)
    attention = plain_path() if plain else contextlib.nullcontext()
    if case in CASES["methods"]:
        step = training_step(case, model, "fp32" if plain else precision, backbone)
    elif case in CASES["eval"]:
        step = evaluation_step(case, model, backbone)
    elif case == "learner":  # IVLP's forward, no gradients: prompted image encoder and the 24 class prompts' text
        args = train.parse_args(["--method", "ivlp", "--dataset", "dtd", "--backbone", backbone])
        learner = train.learner_for(args, model, "dtd", [f"class {i}" for i in range(BASE_CLASSES)])
        size = model.visual.input_resolution
        images = torch.randn(BATCH, 3, size, size, device=device)  # (B, 3, R, R)
        step = lambda: learner(images)
    elif case == "image":
        size = model.visual.input_resolution
        images = torch.randn(BATCH, 3, size, size, device=device)  # (B, 3, R, R)
        step = lambda: model.encode_image(images)
    else:
        text = clip_model.tokenize([f"a photo of a class{i} texture." for i in range(DTD_CLASSES)],
                                   context_length=model.context_length).to(device)  # (N, L)
        step = lambda: model.encode_text(text, truncate=case == "text_truncated")
    times = []
    with torch.set_grad_enabled(case in CASES["methods"]), attention:
        for _ in range(repeats + 1):
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    if device == "cuda":  # on a GPU the figure that matters is the device's
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    seconds = statistics.median(times[1:])
    images = EVAL_BATCH if case in CASES["eval"] else BATCH
    return {"case": case, "seconds": seconds, "images_per_second": images / seconds, "peak_rss_mb": peak_mb,
            "threads": torch.get_num_threads(), "precision": "fp32" if plain else precision, "plain": plain,
            "compiled": compile_}


TESTBED_METHODS = ("zeroshot", "coop", "cocoop", "ivlp", "maple", "promptsrc", "prometar", "metaprompt")
TESTBED_SEEDS = tuple(range(1, 11))  # 10 seeds: enough for a paired 95% interval to resolve 1-2 point differences
TESTBED_BASELINES = ("ivlp", "promptsrc")  # the prompts ProMetaR trains; its regularizer without the meta-learning
DG_SHOTS = (1, 5)  # MetaPrompt's DG table: 1 and 5 shots per class and source domain


TESTBED_THREADS = 1  # torch threads of every testbed run, whatever --jobs: the results do not depend on it


POLL_SECONDS = 0.5  # how often train_in_parallel looks for a finished run


def train_command(argv) -> list:
    """The train.py command line of one run of a grid or of the testbed (resumable, one log line per epoch)."""
    return ["python", "train.py", *argv, "--no-progress", "--resume"]


def train_in_parallel(runs, jobs: int, threads: int = TESTBED_THREADS, devices=None, keep_going: bool = False,
                      logs=None) -> list:
    """Run train.py argument lists (each with its --output-dir), `jobs` at a time, each in a process of its own with
    `threads` torch threads, starting the next as soon as any one finishes; a run whose results.json exists is
    skipped, an interrupted one resumes from its checkpoint (--resume). `devices`: GPU ids, one run on each at a time
    (CUDA_VISIBLE_DEVICES), jobs = their number. The testbed's small models gain nothing from a second thread (CoOp:
    the same seconds with one or two), and the thread count can move a result by float noise (ProMetaR's double
    backward sums in another order with two threads), so the testbed fixes it to one: every --jobs gives the same
    table. A failed run stops the others and raises its last error line; keep_going=True lets the others finish and
    returns the failures instead, [(argv, error line, log file)], the logs kept in `logs` (default: a temporary
    folder, with the runs' output discarded)."""
    todo = [argv for argv in runs if not os.path.exists(os.path.join(argv[argv.index("--output-dir") + 1],
                                                                     "results.json"))]
    slots = [str(d) for d in devices] if devices else [None] * jobs
    running, failures = [], []  # (argv, process, its log file: a pipe nobody reads could fill and stall the run, slot)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(logs or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        while todo or running:
            while todo and len(running) < len(slots):
                argv = todo.pop(0)
                slot = next(s for s in slots if s not in {r[3] for r in running}) if devices else None
                log = folder / (run_name(argv) + ".log")
                env = {**os.environ, "OMP_NUM_THREADS": str(threads),
                       **({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {})}
                with open(log, "w") as out:  # the process writes to its own copy of the file
                    process = subprocess.Popen([sys.executable, *train_command(argv)[1:]], env=env,
                                               cwd=os.path.dirname(os.path.abspath(__file__)),
                                               stdout=out if logs else subprocess.DEVNULL, stderr=out)
                running.append((argv, process, log, slot))
            finished = [run for run in running if run[1].poll() is not None]
            if not finished:
                time.sleep(POLL_SECONDS)
            for run in finished:
                running.remove(run)
                argv, process, log, _ = run
                if not process.returncode:
                    continue
                lines = Path(log).read_text().strip().splitlines()
                why = lines[-1] if lines else f"exit status {process.returncode}"
                if keep_going:
                    failures.append((argv, why, str(log)))
                    continue
                for other in running:
                    other[1].kill()
                    other[1].wait()
                raise RuntimeError(f"train.py {' '.join(argv)} failed: {why}")
    return failures


def run_name(argv) -> str:
    """A file name for a run's log: its output folder's path, flattened."""
    return argv[argv.index("--output-dir") + 1].strip("/").replace("/", "_")


GRID_SEEDS = (1, 2, 3)  # the papers' seeds
GRID_DATASETS = {"base2new": evaluation.DATASET_ORDER, "fewshot": evaluation.DATASET_ORDER,
                 "cross_dataset": ("imagenet",), "domain_generalization": ("imagenet",),
                 "multi_source_dg": ("pacs", "vlcs", "office_home", "domainnet")}  # --datasets all, per protocol


def grid_runs(methods, datasets, seeds, shots, protocol: str, root: str, output: str, extra=()) -> list:
    """train.py argument lists of a grid (methods x datasets x shots x seeds, one protocol), each checked by train.py's
    own parser and written where train.py would write it, under `output` instead of output/ (multi-source DG: every
    held-out domain in turn, --target-domain all). `extra`: more train.py flags, the same for every run."""
    runs = []
    for dataset, method, k, seed in itertools.product(datasets, methods, shots, seeds):
        argv = ["--method", method, "--dataset", dataset, "--root", root, "--protocol", protocol, "--shots", str(k),
                "--seed", str(seed), *(["--target-domain", "all"] if protocol == "multi_source_dg" else []), *extra]
        default = Path(train.parse_args(argv).output_dir)  # output/<protocol>/<dataset>/<method>/shots_K/seed_S[/all]
        runs.append([*argv, "--output-dir", str(Path(output) / default.relative_to("output"))])
    return runs


def slurm_array(runs, logs: str) -> str:
    """A SLURM batch script running `runs` as a job array, one array task (one GPU) per run, each task the command
    line the local runner uses (train_command: resumable, so a requeued task continues)."""
    lines = ["#!/bin/bash", "#SBATCH --job-name=prompt-grid", f"#SBATCH --array=0-{len(runs) - 1}",
             "#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=8", f"#SBATCH --output={logs}/%A_%a.log",
             f"cd {shlex.quote(os.path.dirname(os.path.abspath(__file__)))}", "RUNS=("]
    lines += [f"  {shlex.quote(shlex.join(train_command(argv)))}" for argv in runs]
    lines += [")", 'eval "${RUNS[$SLURM_ARRAY_TASK_ID]}"']
    return "\n".join(lines) + "\n"


def run_grid(runs, protocol: str, output: str, jobs: int) -> tuple:
    """Every run of a grid, `jobs` at a time (on CUDA: one per visible GPU), the others going on past a failure;
    returns eval.py's tables of the protocol's folder and the failures (error line and log file each)."""
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else None
    threads = max(1, (os.cpu_count() or 1) // (len(gpus) if gpus else jobs))
    failures = train_in_parallel(runs, jobs, threads=threads, devices=gpus, keep_going=True,
                                 logs=os.path.join(output, "logs"))
    folder = Path(output) / protocol
    if not any(folder.rglob("results.json")):  # every run failed
        return "", failures
    with contextlib.redirect_stdout(io.StringIO()) as tables:
        evaluation.main(["table", "--output", str(folder)])
    return tables.getvalue().strip(), failures


def testbed_runs(seeds, root: str, output: str, dg_shots=DG_SHOTS) -> list:
    """train.py argument lists of every testbed run: base-to-new on world, then DG on world_styles (every style held
    out in turn), seed after seed, so that an interrupted call has whole seeds."""
    runs = [["--method", method, "--seed", str(seed), "--root", root, "--dataset", "world",
             "--output-dir", f"{output}/base2new/world/{method}/shots_16/seed_{seed}"]
            for seed in seeds for method in TESTBED_METHODS]
    runs += [["--method", method, "--seed", str(seed), "--root", root, "--dataset", "world_styles", "--target-domain",
              "all", "--shots", str(shots),
              "--output-dir", f"{output}/multi_source_dg/world_styles/{method}/shots_{shots}/seed_{seed}"]
             for seed in seeds for shots in dg_shots for method in TESTBED_METHODS]
    return runs


def prepare_testbed(root: str, output: str) -> tuple:
    """Both testbed datasets written once, before parallel runs read them; root and output made absolute (the runs'
    working directory is this file's)."""
    root, output = os.path.abspath(root), os.path.abspath(output)
    testbed.ensure_dataset("world", root)
    testbed.ensure_dataset("world_styles", root)
    return root, output


def run_testbed(seeds, root: str, output: str, dg_shots=DG_SHOTS, jobs: int = 1) -> str:
    """Every testbed run (testbed_runs), then eval.py's two tables and the paired differences to each of
    TESTBED_BASELINES (over TESTBED_METHODS: the GRAM runs of `run_gram_testbed` share the tree and have tables of
    their own)."""
    root, output = prepare_testbed(root, output)
    train_in_parallel(testbed_runs(seeds, root, output, dg_shots), jobs)
    b2n = {m: r for m, r in evaluation.collect(f"{output}/base2new").items() if m in TESTBED_METHODS}
    dg = {key: r for key, r in evaluation.collect_dg(f"{output}/multi_source_dg").items() if key[0] in TESTBED_METHODS}
    tables = [evaluation.markdown_table(b2n)]
    tables += [evaluation.difference_table(b2n, baseline) for baseline in TESTBED_BASELINES]
    tables += [evaluation.dg_table(dg)]
    tables += [evaluation.dg_difference_table(dg, baseline) for baseline in TESTBED_BASELINES]
    return "\n\n".join(tables)


GRAM_TESTBED_STEPS = {"coop": 1000, "ivlp": 400}  # outer steps: each meta-training within 10 minutes on 2 cores
GRAM_TESTBED_CLUSTERS = ("--gram-k-text", "24", "--gram-k-image", "2")  # 10,000 pairs of 24 base combinations
GRAM_SEEDS = TESTBED_SEEDS
GRAM_SHOTS = {"base2new": (1, 4, 16), "multi_source_dg": DG_SHOTS}
# the 2 x 2 design (train.py --gram-parts; neither half is the method itself) and GRAM with an identity-start
# regulator (its own meta-training, --gram-regulator identity): base-to-new; DG runs the method and +gram only
GRAM_VARIANTS = {"+gram": ("default", []), "+gram-init": ("default", ["--gram-parts", "init"]),
                 "+gram-reg": ("default", ["--gram-parts", "regulator"]), "+gram-identity": ("identity", [])}
GRAM_REGULATORS = ("default", "identity")  # meta-trainings per base: --gram-regulator supmer, identity


def gram_runs(seeds, root: str, output: str, files: dict, dg_shots=GRAM_SHOTS["multi_source_dg"]) -> list:
    """train.py argument lists of CoOp and IVLP, each alone and in every GRAM_VARIANTS form (files[base][regulator]:
    its gram.pt), base-to-new at 1, 4 and 16 shots, and the method alone and with GRAM in DG at `dg_shots`, seed
    after seed. Those without GRAM at 16 shots base-to-new and in DG are testbed_runs' own (the same folders):
    whichever command comes first runs them."""
    runs = []
    for seed in seeds:
        for base in GRAM_TESTBED_STEPS:
            variants = {base: []} | {base + suffix: ["--gram", files[base][regulator], *flags]
                                     for suffix, (regulator, flags) in GRAM_VARIANTS.items()}
            for name, extra in variants.items():
                common = ["--method", base, "--seed", str(seed), "--root", root, *extra]
                runs += [[*common, "--dataset", "world", "--shots", str(k),
                          "--output-dir", f"{output}/base2new/world/{name}/shots_{k}/seed_{seed}"]
                         for k in GRAM_SHOTS["base2new"]]
                runs += [[*common, "--dataset", "world_styles", "--target-domain", "all", "--shots", str(k),
                          "--output-dir", f"{output}/multi_source_dg/world_styles/{name}/shots_{k}/seed_{seed}"]
                         for k in dg_shots if name in (base, f"{base}+gram")]
    return runs


def run_gram_testbed(seeds, root: str, output: str, jobs: int = 1, dg_shots=GRAM_SHOTS["multi_source_dg"]) -> str:
    """GRAM on the testbed: meta-train on pairs (in this process; SUPMER's regulator and the identity-start one), then
    CoOp / IVLP alone and with each part of the file (train_in_parallel); the tables and GRAM's paired
    differences."""
    root, output = prepare_testbed(root, output)
    pairs = os.path.join(root, "pairs", "pairs.csv")
    if not os.path.exists(pairs):
        testbed.write_pairs(os.path.join(root, "pairs"), 10_000)
    files = {}
    for base, steps in GRAM_TESTBED_STEPS.items():
        for regulator in GRAM_REGULATORS:
            out = f"{output}/gram/{base}" + ("" if regulator == "default" else f"-{regulator}")
            files.setdefault(base, {})[regulator] = f"{out}/gram.pt"
            if not os.path.exists(f"{out}/gram.pt"):
                kind = ["--gram-regulator", "identity"] if regulator == "identity" else []
                train.run(train.parse_args(["--method", "gram", "--pairs", pairs, "--base", base, "--gram-steps",
                                            str(steps), *GRAM_TESTBED_CLUSTERS, *kind, "--output-dir", out,
                                            "--no-progress", "--resume"]))
    train_in_parallel(gram_runs(seeds, root, output, files, dg_shots), jobs)
    names = {base + suffix for base in GRAM_TESTBED_STEPS for suffix in ("", *GRAM_VARIANTS)}
    dg = {key: r for key, r in evaluation.collect_dg(f"{output}/multi_source_dg").items() if key[0] in names}
    return "\n\n".join([gram_base2new_table(f"{output}/base2new", names), evaluation.dg_table(dg),
                         gram_difference_table(f"{output}/base2new", dg)])


def gram_base2new_table(output: str, names) -> str:
    """Base-to-new per method (of `names`) and shots: base / new / HM, mean ± std over seeds."""
    lines = ["| method | shots | seeds | base | new | HM |", "|---|---|---|---|---|---|"]
    for folder in sorted(Path(output, "world").glob("*/shots_*"), key=lambda f: (f.parent.name, int(f.name[6:]))):
        if folder.parent.name not in names:  # the testbed's other methods share the tree: not read
            continue
        results = [json.loads(p.read_text()) for p in sorted(folder.glob("seed_*/results.json"))]
        if not results:
            continue
        (base, base_sd), (new, new_sd) = (evaluation.seed_mean(results, s) for s in ("base", "new"))
        lines.append(f"| {folder.parent.name} | {folder.name.split('_')[1]} | {len(results)} | {base:.2f} ± "
                     f"{base_sd:.2f} | {new:.2f} ± {new_sd:.2f} | {evaluation.data.harmonic_mean(base, new):.2f} |")
    return "\n".join(lines)


def gram_difference_table(b2n_output: str, dg: dict) -> str:
    """GRAM's paired differences: each method with its GRAM file minus the same method without, same shots and seed
    (eval.py's paired_difference), base-to-new (base / new / HM) and DG (the average over held-out styles)."""
    runs = evaluation.collect(b2n_output)
    lines = [evaluation.DIFFERENCE_LEGEND.format(baseline="the method without GRAM",
                                                 pct=round(100 * evaluation.CONFIDENCE)) + ":", "",
             "| difference | protocol | shots | seeds | base | new | HM or DG average |", "|---|---|---|---|---|---|---|"]
    for base in GRAM_TESTBED_STEPS:
        for suffix, shots in itertools.product(GRAM_VARIANTS, GRAM_SHOTS["base2new"]):
            with_gram, without = (runs.get(evaluation.row_name(m, f"shots_{shots}"), {}).get("world")
                                  for m in (base + suffix, base))
            if not (with_gram and without):
                continue
            mine, theirs = (evaluation.base2new_by_seed({"world": r}, ["world"]) for r in (with_gram, without))
            cells = [evaluation.paired_difference({s: v[k] for s, v in mine.items()},
                                                  {s: v[k] for s, v in theirs.items()}) for k in ("base", "new", "HM")]
            lines.append(f"| {base}{suffix} - {base} | base-to-new | {shots} | {evaluation.seeds_cell(cells[2])} | "
                         + " | ".join(evaluation.difference_cell(c) for c in cells) + " |")
        if not any(method == base for method, _, _ in dg):  # no DG runs without GRAM: nothing to pair with
            continue
        lines += [f"| {base}+gram - {base} | DG | {d['shots']} | {evaluation.seeds_cell(d)} | | | "
                  f"{evaluation.difference_cell(d)} |"
                  for d in evaluation.dg_differences(dg, base) if d["method"] == f"{base}+gram"]
    return "\n".join(lines)


# --- `benchmark.py gpu`: the CUDA path in one script (issue #29) ---------------------------------------------------
GPU_METHODS = ("zeroshot", "coop", "cocoop", "ivlp", "maple", "promptsrc", "prometar", "metaprompt")
GPU_PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_RUN_SLACK = 2.0  # accuracy points: the default run on CUDA against the CPU's (8 epochs of few-shot training
# turn last-bit differences into a few flipped test images; the README's two CPUs differ by 0.17)
TORCHRUN_TOLERANCE = (1e-4, 1e-5)  # (rtol, atol) of 2 processes' prompts against one's (summation order)
QUICK = {"tests": "promptsrc_step or (resume_equals_uninterrupted_run and not prometar and not metaprompt)",
         "methods": ("zeroshot", "coop"), "seeds": (1, 2), "train": ("--epochs", "1")}  # the CPU mode, CI-sized


def timed(name: str, fn) -> dict:
    """Run one check: {"check", "ok", "seconds", **what fn returns} (an exception is a failed check, its line kept)."""
    start = time.perf_counter()
    try:
        result = {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 - a failed check is reported, and the others still run
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"check": name, **result, "seconds": round(time.perf_counter() - start, 1)}


def gpu_tests(device: str, selection: str | None) -> dict:
    """The tests marked `device` (pytest -m device) with TEST_DEVICE=device; ok when all pass."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_all.py", "-m", "device",
               *(["-k", selection] if selection else [])]
    done = subprocess.run(command, check=False, capture_output=True, text=True,
                          env={**os.environ, "TEST_DEVICE": device}, cwd=os.path.dirname(os.path.abspath(__file__)))
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    if done.returncode:
        raise RuntimeError(f"{summary}\n{done.stdout[-3000:]}")
    return {"summary": summary}


def testbed_run(method: str, seed: int, root: str, output: str, extra=()) -> list:
    """train.py arguments of one base-to-new testbed run."""
    return ["--method", method, "--seed", str(seed), "--root", root, "--dataset", "world", *extra,
            "--output-dir", f"{output}/base2new/world/{method}/shots_16/seed_{seed}"]


def gpu_default_runs(device: str, methods, root: str, output: str, extra) -> dict:
    """One testbed run per method on `device` (in parallel), and ProMetaR's (or the first method's) also on the CPU:
    its base / new / HM on both, within DEFAULT_RUN_SLACK points."""
    runs = [testbed_run(m, 1, root, f"{output}/{device}", [*extra, "--device", device]) for m in methods]
    reference = "prometar" if "prometar" in methods else methods[-1]
    runs.append(testbed_run(reference, 1, root, f"{output}/cpu", [*extra, "--device", "cpu"]))
    train_in_parallel(runs, jobs=len(runs), threads=max(1, (os.cpu_count() or 1) // len(runs)))
    read = lambda where, m: json.loads(Path(f"{output}/{where}/base2new/world/{m}/shots_16/seed_1/results.json")
                                       .read_text())
    results = {m: read(device, m)["splits"] for m in methods}
    ours, cpu = read(device, reference), read("cpu", reference)
    gaps = {k: abs(ours["splits"][s]["accuracy"] - cpu["splits"][s]["accuracy"]) for k, s in
            (("base", "base"), ("new", "new"))}
    gaps["hm"] = abs(ours["hm"] - cpu["hm"])
    if max(gaps.values()) > DEFAULT_RUN_SLACK:
        raise RuntimeError(f"{reference} on {device} is {gaps} points from the CPU's (allowed {DEFAULT_RUN_SLACK})")
    return {"reference": reference, "gaps_to_cpu": gaps,
            "wall_seconds": {m: read(device, m)["wall_time_s"] for m in methods},
            "accuracy": {m: {k: v["accuracy"] for k, v in r.items()} for m, r in results.items()}}


def gpu_iterations(backbone: str, precisions, repeats: int) -> dict:
    """Every method's iteration (batch 4, 24 classes) and evaluation (100 images) in each precision, in this
    process: seconds, images/s, peak memory (device memory on CUDA)."""
    rows = [run_case(case, repeats, precision, backbone=backbone) for precision in precisions
            for case in CASES["methods"]]
    rows += [run_case(case, repeats, "fp32", backbone=backbone) for case in CASES["eval"]]
    return {"rows": rows}


def gpu_testbed_table(methods, seeds, root: str, output: str, extra) -> dict:
    """The testbed's base-to-new table over `seeds`, the runs in parallel on the one device (one a core)."""
    runs = [testbed_run(m, seed, root, output, extra) for seed in seeds for m in methods]
    train_in_parallel(runs, jobs=min(len(runs), os.cpu_count() or 1), threads=1)  # a core each feeds the GPU
    return {"table": evaluation.markdown_table(evaluation.collect(f"{output}/base2new"))}


def gpu_torchrun(device: str, method: str, root: str, output: str, extra) -> dict:
    """One testbed run under torchrun with 2 processes (on one GPU they share it through gloo) against one process:
    the same prompts within TORCHRUN_TOLERANCE."""
    common = ["--method", method, "--root", root, "--dataset", "world", "--device", device, "--no-progress", *extra]
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", "2"])):
        done = subprocess.run([sys.executable, *launcher, "train.py", *common, "--output-dir", f"{output}/{name}"],
                              check=False, capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        if done.returncode:
            raise RuntimeError(f"{name} process(es): {done.stderr.strip().splitlines()[-1:]}")
    one, two = (torch.load(f"{output}/{r}/prompts.pt", weights_only=True, map_location="cpu") for r in ("one", "two"))
    rtol, atol = TORCHRUN_TOLERANCE
    for name, value in one["prompts"].items():
        torch.testing.assert_close(two["prompts"][name], value, rtol=rtol, atol=atol)
    return {"method": method, "world_size": two["config"]["world_size"]}


def gpu_check(report: str, quick: bool, root: str) -> int:
    """`benchmark.py gpu`: every check of the CUDA path (on a machine without a GPU, the same on the CPU), one report
    (report.md, report.json); exit status 1 when a check failed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(report).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = os.path.abspath(root)
    testbed.ensure_dataset("world", root)
    methods, seeds = (QUICK["methods"], QUICK["seeds"]) if quick else (GPU_METHODS, TESTBED_SEEDS)
    extra = QUICK["train"] if quick else ()
    backbone = train.TESTBED_CHECKPOINT if quick else "ViT-B/16"  # quick: the testbed's small CLIP (3 layers)
    checks = [timed("tests", lambda: gpu_tests(device, QUICK["tests"] if quick else None)),
              timed("default runs", lambda: gpu_default_runs(device, methods, root, str(out / "default"), extra)),
              timed("iterations", lambda: gpu_iterations(backbone, GPU_PRECISIONS, 2 if quick else 10)),
              timed("testbed table", lambda: gpu_testbed_table(methods, seeds, root, str(out / "testbed"),
                                                               [*extra, "--device", device])),
              timed("torchrun", lambda: gpu_torchrun(device, methods[-1] if quick else "prometar", root,
                                                     str(out / "torchrun"), extra))]
    facts = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
             "cores": os.cpu_count(), "quick": quick, "backbone": backbone}
    (out / "report.json").write_text(json.dumps({"facts": facts, "checks": checks}, indent=2))
    (out / "report.md").write_text(gpu_report_markdown(facts, checks))
    print(gpu_report_markdown(facts, checks))
    return 0 if all(c["ok"] for c in checks) else 1


def gpu_report_markdown(facts: dict, checks) -> str:
    """report.md: one line per check, then the iteration table and the testbed table."""
    title = f"# CUDA path check: {facts['device']}, torch {facts['torch']}, {facts['cores']} cores"
    lines = [title + (" (quick)" if facts["quick"] else ""), "", "| check | ok | seconds | detail |", "|---|---|---|---|"]
    for c in checks:
        detail = c.get("error") or c.get("summary") or c.get("gaps_to_cpu") or ""
        lines.append(f"| {c['check']} | {'yes' if c['ok'] else 'FAILED'} | {c['seconds']} | {detail} |")
    for c in checks:
        if c.get("rows"):
            lines += ["", f"Iterations and evaluation at {facts['backbone']}: seconds, images/s, peak memory (MB)", "",
                      "| case | precision | seconds | images/s | peak MB |", "|---|---|---|---|---|"]
            lines += [f"| {r['case']} | {r['precision']} | {r['seconds']:.4f} | {r['images_per_second']:.1f} | "
                      f"{r['peak_rss_mb']:.0f} |" for r in c["rows"]]
        if c.get("table"):
            lines += ["", "Testbed base-to-new:", "", c["table"]]
    return "\n".join(lines) + "\n"


SUBCOMMANDS = """what:
  clip      CLIP ViT-B/16 image and text forwards: seconds, peak memory (a few minutes on a CPU)
  methods   one training iteration of CoOp, CoCoOp, IVLP, MaPLe, PromptSRC, ProMetaR, MetaPrompt at ViT-B/16, 24 classes
            (ProMetaR's iteration alone takes seconds to tens of seconds on a CPU; about 10 minutes in all)
  eval      one test batch of 100 images through CoOp, CoOp from cached features, IVLP: images/s
  testbed   the README's testbed tables: every method, 10 seeds, base-to-new and multi-source DG, through train.py.
            Runs for HOURS: about 3.5 hours on 2 CPU cores (--jobs 2); resumable, finished runs are kept
  gram      GRAM's testbed comparison: meta-training, then CoOp and IVLP with and without it, 10 seeds.
            Runs for HOURS on a CPU; resumable like testbed
  grid      any grid of train.py runs: --methods x --datasets x --shots x --seeds, one --protocol, --jobs at a time
            (on CUDA one run per visible GPU), finished runs skipped, failures reported, then eval.py's tables;
            --slurm FILE writes it as a SLURM job array instead. Real datasets at ViT-B/16: hours to days
  gpu       the CUDA path in one script: the device tests (TEST_DEVICE=cuda), one testbed run per method (ProMetaR's
            against the CPU's), every iteration at ViT-B/16 in fp32 / bf16 / fp16 and evaluation, the testbed's
            10-seed base-to-new table at once on the GPU, torchrun with 2 processes; --report DIR gets report.md and
            report.json, exit 1 when a check fails (about 8 minutes on one GPU). Without a GPU it runs on the CPU;
            --quick is its CI-sized form (the testbed's small CLIP, 2 methods, 2 seeds, 1 epoch)
"""


def main():
    parser = data.ArgumentParser(description=__doc__.splitlines()[0], epilog=SUBCOMMANDS,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=[*CASES, "testbed", "gram", "grid", "gpu"], help="what to measure or run (below)")
    parser.add_argument("--methods", nargs="+", default=["prometar"], help="grid: train.py methods")
    parser.add_argument("--datasets", nargs="+", default=["world"], help="grid: datasets, or all (the protocol's)")
    parser.add_argument("--shots", nargs="+", default=["16"], help="grid: shots per class (train.py --shots)")
    parser.add_argument("--protocol", default="base2new", choices=train.PROTOCOLS, help="grid: the protocol")
    parser.add_argument("--train-args", default="", help='grid: more train.py flags for every run, one string, '
                        'e.g. "--precision bf16"')
    parser.add_argument("--slurm", default=None, metavar="FILE", help="grid: write the grid as a SLURM job array to "
                        "FILE (sbatch FILE) instead of running it here")
    parser.add_argument("--case", choices=[c for cases in CASES.values() for c in cases] + ["learner"],
                        help="run one case in this process (used internally)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=list(train.PRECISIONS),
                        help="methods: autocast dtype of the training step (train.py --precision)")
    parser.add_argument("--plain", action="store_true", help="also time the plain path (77-token text, math attention, "
                        "fp32) of every case in the same run, and print the ratio")
    parser.add_argument("--plain-case", action="store_true", help=argparse.SUPPRESS)  # one case, plain (internal)
    parser.add_argument("--json", action="store_true", help="one JSON line per case instead of the table")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoders (train.py --compile)")
    parser.add_argument("--backbone", default="ViT-B/16", help="ViT-B/16 (random weights: the speed does not depend "
                        "on them) or a CLIP checkpoint file")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"testbed and gram seeds (default {TESTBED_SEEDS[0]}-{TESTBED_SEEDS[-1]})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="testbed, gram: train.py runs at a time, each with its share of the cores (default: one a core)")
    parser.add_argument("--dg-shots", type=int, nargs="*", default=list(DG_SHOTS),
                        help="testbed, gram: DG shots (none: no DG runs)")
    parser.add_argument("--root", default="data", help="testbed: where the world dataset is written")
    parser.add_argument("--output", default=None, help="where runs are written (testbed, gram: output/testbed; grid: "
                        "output)")
    parser.add_argument("--report", default="gpu_report", help="gpu: the report's folder")
    parser.add_argument("--quick", action="store_true", help="gpu: the CI-sized form (the testbed's small CLIP, 2 methods, 2 seeds, 1 epoch)")
    args = parser.parse_args()
    if args.what == "gpu":
        return gpu_check(args.report, args.quick, args.root)
    if args.what in ("testbed", "gram") and args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give at least 1 run at a time")
    if args.what == "grid":
        return grid_main(args)
    args.output = args.output or "output/testbed"
    if args.what == "testbed":
        print(run_testbed(args.seeds or TESTBED_SEEDS, args.root, args.output, args.dg_shots, args.jobs))
        return
    if args.what == "gram":
        print(run_gram_testbed(args.seeds or GRAM_SEEDS, args.root, args.output, args.jobs, args.dg_shots))
        return
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats, args.precision, args.plain_case, args.compile,
                                  args.backbone)))
        return
    run = lambda case, plain=False: json.loads(subprocess.run(
        [sys.executable, __file__, args.what, "--case", case, "--repeats", str(args.repeats), "--precision",
         args.precision, "--backbone", args.backbone] + (["--plain-case"] if plain else [])
        + (["--compile"] if args.compile and not plain else []), check=True, capture_output=True, text=True).stdout)
    unit = None
    if args.what == "methods":  # the units of the goal: image forwards of batch 4, timed in this run
        unit, learner = (run(case) for case in REFERENCE_CASES)
        if args.json:
            print("\n".join(json.dumps(r) for r in (unit, learner)))
        else:
            print(f"one image forward of batch {BATCH} (no gradients): {unit['seconds']:.3f} s; one IVLP learner "
                  f"forward (prompted images and the text of {BASE_CLASSES} class prompts): {learner['seconds']:.3f} s "
                  f"= {learner['seconds'] / unit['seconds']:.2f} image forwards\n")
    header = f"| {args.backbone}, {torch.get_num_threads()} threads, {args.precision} | seconds | images/s | peak RSS (MB) |"
    header += " image forwards |" if unit else ""
    if args.plain:
        header += " plain path: seconds | peak RSS (MB) | speed-up |"
    if not args.json:
        print(header + "\n" + "|---" * (header.count("|") - 1) + "|")
    for case in CASES[args.what]:
        results = [run(case, plain) for plain in ((False, True) if args.plain else (False,))]
        if unit:
            for r in results:
                r["image_forwards"] = r["seconds"] / unit["seconds"]
        if args.json:
            print("\n".join(json.dumps(r) for r in results))
            continue
        fast = results[0]
        row = f"| {case} | {fast['seconds']:.3f} | {fast['images_per_second']:.2f} | {fast['peak_rss_mb']:.0f} |"
        row += f" {fast['image_forwards']:.1f} |" if unit else ""
        if args.plain:
            plain = results[1]
            row += f" {plain['seconds']:.3f} | {plain['peak_rss_mb']:.0f} | {plain['seconds'] / fast['seconds']:.2f}x |"
        print(row)


def grid_main(args) -> int:
    """`benchmark.py grid`: the grid's runs here (or its SLURM array), then its tables and its failures."""
    datasets = GRID_DATASETS[args.protocol] if args.datasets == ["all"] else args.datasets
    output = os.path.abspath(args.output or "output")
    runs = grid_runs(args.methods, datasets, args.seeds or GRID_SEEDS, args.shots, args.protocol,
                     os.path.abspath(args.root), output, shlex.split(args.train_args))
    if args.slurm:  # SLURM does not make the folder of its --output files
        os.makedirs(os.path.join(output, "logs"), exist_ok=True)
        Path(args.slurm).write_text(slurm_array(runs, os.path.join(output, "logs")))
        print(f"wrote {len(runs)} runs as a SLURM job array to {args.slurm}: sbatch {args.slurm}")
        return 0
    for name in set(datasets) & set(testbed.DATASETS):  # made once, before parallel runs read them
        testbed.ensure_dataset(name, os.path.abspath(args.root))
    tables, failures = run_grid(runs, args.protocol, output, args.jobs)
    print(tables)
    for argv, why, log in failures:
        print(f"failed: train.py {shlex.join(argv)}: {why} (log: {log})", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:  # a testbed run failed: its error line
        sys.exit(f"error: {e}")
