"""The study's sweep end to end on one GPU, MTCNN alignment on the GPU, and the demo's small trials packed.

    python tests/bench/gpu_sweep.py                   # on a CUDA machine: all of it in about 7 minutes
    python tests/bench/gpu_sweep.py --json out.json   # also write the figures as JSON
    python tests/bench/gpu_sweep.py --budget 300      # start no stage past 300 s; a running sweep is stopped there
    python tests/bench/gpu_sweep.py --skip-demo --images 2000
    python tests/bench/gpu_sweep.py --smoke           # tiny sizes on whatever device there is: checks the script

Everything is written under one temporary folder (its own mlruns/, data caches, checkpoints, library
caches), removed at the end. The stages, in this order (the least needed last, so a short budget cuts it):

1. Alignment (issue 19, item 3): the project's MtcnnAligner on synthetic photos drawn at 256 px, aligned in
   chunks of ALIGN_CHUNK as preparation aligns them: images/s of detection alone and of detection + warp
   (goal >= 500), and how long the study's 43,239 + 26,124 images would take at that rate.
2. The demo packed (item 4): sweeps/demo.yaml, its data prepared once (`prepare`), then
   `sweep --gpus 0 --trials-per-gpu N` (N: demo.yaml's execution.trials_per_gpu, else 6). Goal: prepare +
   sweep <= 90 s.
3. The study (item 2): sweeps/paper.yaml's grid (15 unique trials, 47 epochs) on synthetic faces at 224 px,
   aligned with MTCNN on the GPU, ViT-B/16 and ResNet-50 from random weights (pretrained: null, nothing is
   downloaded), through `python -m orchestrator prepare` and `sweep --gpus 0`. Prints the sweep's wall time W,
   the trials' training time T (time/train_seconds: their epochs, validation included), W / T (goal <= 1.10),
   the per-trial fixed costs from the time/ metrics each run logs, and the study extrapolated to its 55,000
   training images per epoch:
       W_55k = W + sum over trials i of (55,000 / n_i - 1) x (train_i - warmup_i + test_i)
   n_i: trial i's training images per epoch (data/n_train_balanced); warmup_i: its first epoch's excess over
   its later epochs (compilation, autotuning), which does not grow with the data; validation and the test
   pass grow with it as training does. Everything else is a cost per trial or per sweep and stays.
   Goal: W_55k <= 20 min.
   How many images: as many as make the plan's own estimate of the 15 trials' training (orchestrator/sweep/
   plan.py: trial_flop at GPU_FLOPS, 100 TFLOP/s) come to --train-seconds (60 s): 1,700 images, 1,190 of
   them for training (before class balancing). The project has measured ViT-B/16 at ~2,700 images/s on an
   H200 (~290 TFLOP/s), so training itself likely takes about a third of that; the rest of the sweep is its
   fixed costs, which do not depend on the image count (the extrapolation separates the two).
4. The demo unpacked: as stage 2 with --trials-per-gpu 1, for the comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

STUDY_IMAGES_PER_EPOCH = 55_000
STUDY_IMAGES_TO_ALIGN = 43_239 + 26_124      # the study's dataset (30,267 / 8,648 / 4,324) and production set
GOALS = {"ratio": 1.10, "study_minutes": 20.0, "align_images_per_s": 500.0, "demo_packed_seconds": 90.0}
DEFAULT_PACKED = 6          # demo slots per GPU when demo.yaml does not set trials_per_gpu
STOP_GRACE_S = 30           # a sweep past the budget gets Ctrl-C, then this long to close its runs


@dataclass
class Budget:
    """When the whole run should end: a stage that would start with less than it needs left is skipped."""
    deadline: float

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def allows(self, stage: str, needs: float) -> bool:
        if self.left() >= needs:
            return True
        print(f"\n{stage}: skipped, {max(self.left(), 0):.0f} s of the budget left (needs ~{needs:.0f} s)")
        return False


# --- running the orchestrator -----------------------------------------------------------------

def orchestrate(folder: Path, args: list[str], timeout: float) -> dict:
    """`python -m orchestrator ARGS` in folder (its stores are folder/mlruns), timed; its output to a log there.
    Past timeout it is interrupted as Ctrl-C would (trials hand back cleanly), then killed."""
    log = folder / f"{args[0]}.log"
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=folder, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
    seconds = time.perf_counter() - started
    if code not in (0, 1):
        tail = log.read_text(errors="replace")[-1500:]
        print(f"  `{' '.join(args[:1])}` {'ran past the budget' if code is None else f'exited {code}'}:\n{tail}")
    return {"seconds": seconds, "exit": code}


def write_spec(folder: Path, raw: dict) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def slot_args(gpu: bool, per_gpu: int) -> list[str]:
    """One GPU (the figures are per GPU) with per_gpu slots; on CPU the spec's jobs rule."""
    return [*one_gpu(), "--trials-per-gpu", str(per_gpu)] if gpu else ["--trials-per-gpu", str(per_gpu)]


def one_gpu() -> list[str]:
    """--gpus with the first GPU the orchestrator sees (CUDA_VISIBLE_DEVICES's first entry when it is set)."""
    from orchestrator.sweep.executor import visible_gpus

    return ["--gpus", str((visible_gpus() or [0])[0])]


# --- reading the runs back --------------------------------------------------------------------

def trial_rows(folder: Path, sweep: str) -> list[dict]:
    """Each trial run of the sweep: status, images per epoch, its time/ metrics and per-epoch seconds."""
    from mlflow import MlflowClient

    from orchestrator.results.runs import child_runs

    client = MlflowClient(tracking_uri(folder))
    rows = []
    for run in child_runs(client, sweep):
        metrics = run.data.metrics
        history = sorted(client.get_metric_history(run.info.run_id, "time/epoch_seconds"), key=lambda m: m.step)
        epochs = [m.value for m in history]
        times = {k.removeprefix("time/"): v for k, v in metrics.items() if k.startswith("time/")}
        rows.append({**times, "name": run.info.run_name, "status": run.data.tags.get("status", ""),
                     "images_per_epoch": metrics.get("data/n_train_balanced", metrics.get("data/n_train", 0.0)),
                     "epoch_seconds": epochs, "warmup_seconds": warmup(epochs),
                     "run_seconds": ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000})
    return rows


def tracking_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


def warmup(epochs: list[float]) -> float:
    """The first epoch's excess over the later ones' mean (compilation, autotuning, the allocator); 0 with one."""
    return max(0.0, epochs[0] - statistics.mean(epochs[1:])) if len(epochs) > 1 else 0.0


# Per-trial fixed costs, by the time/ metric each run logs (trainers/run.py, trainers/tracking.py).
FIXED_COSTS = [("data load (reused within a trainer)", "load_seconds"), ("model build", "build_seconds"),
               ("first-epoch warm-up (compile, autotune)", "warmup_seconds"),
               ("checkpoints (host copy, waits)", "checkpoint_seconds"), ("test pass", "test_seconds"),
               ("model export and upload", "model_log_seconds"), ("figures (wait after the export)", "figures_seconds"),
               ("other MLflow logging", "other_mlflow_seconds"), ("rest of the trial (loop setup, ...)", "rest_seconds")]


def with_derived(row: dict) -> dict:
    """The row with the MLflow time outside figures, and the trial's time no metric accounts for."""
    other = row.get("mlflow_seconds", 0.0) - row.get("figures_seconds", 0.0)
    named = sum(row.get(key, 0.0) for _, key in FIXED_COSTS[:-2] if key != "warmup_seconds")
    rest = row.get("trial_seconds", 0.0) - named - other - row.get("train_seconds", 0.0)
    return {**row, "other_mlflow_seconds": other, "rest_seconds": max(rest, 0.0)}


# --- stage 1: alignment -----------------------------------------------------------------------

def measure_alignment(folder: Path, count: int, size: int) -> dict:
    """MtcnnAligner on count synthetic photos drawn at 256 px, in preparation's chunks, after a warm-up chunk."""
    import numpy as np
    from PIL import Image

    from trainers.config import DataConfig, SyntheticConfig
    from trainers.data.align import MtcnnAligner, detector_device
    from trainers.data.aligning import ALIGN_CHUNK
    from trainers.data.synthetic import write_synthetic

    root = write_synthetic(folder / "align-cache", SyntheticConfig(n_images=count, draw_size=256), DataConfig().classes)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(root.glob("*/*.png"))]
    aligner = MtcnnAligner(size, DataConfig().align_margin)
    aligner.align(photos[:ALIGN_CHUNK])         # loads MTCNN; the first CUDA calls pick their kernels
    chunks = [photos[i:i + ALIGN_CHUNK] for i in range(0, len(photos), ALIGN_CHUNK)]
    started = time.perf_counter()
    faces = [face for chunk in chunks for face in aligner.detect_faces(chunk)]
    detect = time.perf_counter() - started
    started = time.perf_counter()
    aligned = [face for chunk in chunks for face in aligner.align(chunk)]
    both = time.perf_counter() - started
    out = {"device": detector_device(), "images": len(photos), "photo_px": 256, "output_px": size,
           "detect_images_per_s": len(photos) / detect, "align_images_per_s": len(photos) / both,
           "faces_found": sum(f is not None for f in faces) / len(faces),
           "fallbacks": sum(a.fallback for a in aligned) / len(aligned)}
    out["study_prepare_minutes"] = STUDY_IMAGES_TO_ALIGN / out["align_images_per_s"] / 60
    print(f"\nalignment ({out['device']}): {len(photos)} synthetic photos at 256 px -> {size} px, faces found in "
          f"{out['faces_found']:.0%}\n  detection alone     {out['detect_images_per_s']:8.0f} images/s\n"
          f"  detection + warp    {out['align_images_per_s']:8.0f} images/s   goal >= "
          f"{GOALS['align_images_per_s']:.0f}; the study's {STUDY_IMAGES_TO_ALIGN:,} images in "
          f"{out['study_prepare_minutes']:.1f} min")
    return out


# --- stages 2 and 4: the demo -----------------------------------------------------------------

def demo_spec(folder: Path, smoke: bool) -> dict:
    """sweeps/demo.yaml with its data cache in folder (shared by both runs); smoke: 240 images, 1 epoch, 2 trials."""
    import yaml

    raw = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())
    raw["data"]["cache_dir"] = raw["production"]["cache_dir"] = str(folder / "cache")
    raw["defaults"]["train"]["checkpoint_dir"] = str(folder / "checkpoints")
    if smoke:
        raw["data"]["synthetic"]["n_images"], raw["production"]["synthetic"]["n_images"] = 240, 120
        raw["experiments"] = {"baseline": raw["experiments"]["baseline"]}
        raw["production"]["evaluate"] = ["champion"]
        raw["defaults"]["train"].update(epochs=1, batch_size=64)     # ResNet-50's steps cost ~2 s each on CPU
    return raw


def prepare_demo(folder: Path, raw: dict, budget: Budget) -> dict:
    """The demo's data, drawn and cached once for both runs."""
    drawn = draw_faces(raw["data"], raw["production"])
    done = orchestrate(folder, ["prepare", str(write_spec(folder, raw))], budget.left())
    print(f"\nthe demo: data drawn in {drawn:.0f} s (setup), prepared in {done['seconds']:.0f} s")
    return {**done, "draw_seconds": drawn}


def run_demo(folder: Path, raw: dict, per_gpu: int, gpu: bool, budget: Budget) -> dict:
    """One demo sweep in its own stores (the data cache is shared); its wall time and trials."""
    run_folder = folder / f"per-gpu-{per_gpu}"
    spec = write_spec(run_folder, raw)
    done = orchestrate(run_folder, ["sweep", str(spec), "--tracking-uri", tracking_uri(run_folder),
                                    *slot_args(gpu, per_gpu)], budget.left())
    rows = trial_rows(run_folder, raw["name"])
    train = sum(r.get("train_seconds", 0.0) for r in rows)
    finished = sum(r["status"] == "finished" for r in rows)
    stopped = " (stopped at the budget: a lower bound)" if done["exit"] is None else ""
    print(f"  trials_per_gpu {per_gpu}: sweep {done['seconds']:.0f} s wall{stopped}, {finished}/{len(rows)} trials "
          f"finished, their training {train:.0f} s")
    return {**done, "trials_per_gpu": per_gpu, "trials": len(rows), "finished": finished, "train_seconds": train}


# --- stage 3: the study -----------------------------------------------------------------------

def paper_spec(folder: Path, images: int, smoke: bool) -> dict:
    """sweeps/paper.yaml on synthetic faces (align mtcnn), both models from random weights, stores in folder."""
    import yaml

    raw = yaml.safe_load((REPO / "sweeps" / "paper.yaml").read_text())
    size = 32 if smoke else 224
    raw["data"] = {"source": "synthetic", "synthetic": {"n_images": images, "draw_size": size}, "align": "mtcnn",
                   "cache_dir": str(folder / "cache")}
    for model in raw["models"].values():
        model.update(pretrained=None, image_size=size)
    raw["defaults"]["train"]["checkpoint_dir"] = str(folder / "checkpoints")
    if smoke:     # a 2-layer ViT, 1 epoch, the baseline's two trials
        raw["models"]["vit"]["vit"] = {"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "intermediate_size": 64}
        raw["defaults"]["train"].update(epochs=1, batch_size=64)
        raw["experiments"] = {"baseline": raw["experiments"]["baseline"]}
    return raw


def images_for(raw: dict, folder: Path, train_seconds: float) -> int:
    """Images that make the plan's estimate of the trials' training (trial_flop at GPU_FLOPS) train_seconds."""
    from orchestrator.sweep.plan import GPU_FLOPS, trial_flop
    from orchestrator.sweep.spec import load_spec

    spec = load_spec(write_spec(folder, raw))
    per_image = sum(trial_flop(t.config, 1) for t in spec.plan) / GPU_FLOPS     # seconds per dataset image
    return max(100, round(train_seconds / per_image / 100) * 100)


def draw_faces(*sections: dict) -> float:
    """Draw the synthetic sets of these data sections before `prepare` does, with a thread per core (see main):
    drawing is this bench's setup, not what it measures; the seeds are the same, so the sets are too."""
    from trainers.config import DataConfig, SyntheticConfig
    from trainers.data.synthetic import write_synthetic

    started = time.perf_counter()
    for section in sections:
        write_synthetic(section["cache_dir"], SyntheticConfig(**section["synthetic"]), DataConfig().classes)
    return time.perf_counter() - started


def run_paper(folder: Path, args: argparse.Namespace, gpu: bool, budget: Budget) -> dict:
    """Stage 3: the study's grid drawn, prepared (`prepare`), swept (`sweep`), and read back from MLflow."""
    images = args.images or (120 if args.smoke else
                             images_for(paper_spec(folder, 100, args.smoke), folder, args.train_seconds))
    raw = paper_spec(folder, images, args.smoke)
    spec = write_spec(folder, raw)
    print(f"\nthe study's grid: {images:,} synthetic faces at {raw['models']['vit']['image_size']} px, align mtcnn")
    drawn = draw_faces(raw["data"])
    prepared = orchestrate(folder, ["prepare", str(spec)], budget.left())
    print(f"  drawn in {drawn:.0f} s (setup); prepared (MTCNN, cache) in {prepared['seconds']:.0f} s: "
          f"{images / prepared['seconds']:.0f} images/s through `prepare`, process start included")
    done = orchestrate(folder, ["sweep", str(spec), "--tracking-uri", tracking_uri(folder),
                                *(one_gpu() if gpu else ["--jobs", "1"])], budget.left())
    rows = [with_derived(r) for r in trial_rows(folder, raw["name"])]
    if done["exit"] is None:
        print(f"  stopped at the budget after {done['seconds']:.0f} s: the figures below cover the trials that ended")
    return {"images": images, "draw_seconds": drawn, "prepare_seconds": prepared["seconds"], **done,
            **paper_figures(done["seconds"], rows), "trials": rows}


def paper_figures(wall: float, rows: list[dict]) -> dict:
    """W / T, the fixed costs per trial, and the 55k-image extrapolation (see the module's docstring)."""
    train = sum(r.get("train_seconds", 0.0) for r in rows)
    grows = sum((STUDY_IMAGES_PER_EPOCH / r["images_per_epoch"] - 1)
                * (r.get("train_seconds", 0.0) - r["warmup_seconds"] + r.get("test_seconds", 0.0))
                for r in rows if r["images_per_epoch"])
    fixed = {key: statistics.mean(r.get(key, 0.0) for r in rows) if rows else 0.0 for _, key in FIXED_COSTS}
    outside = wall - sum(r.get("trial_seconds", r["run_seconds"]) for r in rows)
    out = {"finished": sum(r["status"] == "finished" for r in rows), "train_seconds": train,
           "ratio": wall / train if train else None, "fixed_per_trial": fixed, "outside_trials_seconds": outside,
           "study_minutes": (wall + grows) / 60,
           "study_formula": "W + sum_i (55,000 / n_i - 1) x (train_i - warmup_i + test_i)"}
    print_paper(wall, rows, out)
    return out


def print_paper(wall: float, rows: list[dict], out: dict) -> None:
    print(f"  sweep: {out['finished']}/{len(rows)} trials finished in {wall:.0f} s wall; their training "
          f"{out['train_seconds']:.0f} s")
    if out["ratio"] is not None:
        print(f"  wall / training = {out['ratio']:.2f}   goal <= {GOALS['ratio']:.2f}")
    print("  fixed costs per trial (mean over trials, seconds):")
    for label, key in FIXED_COSTS:
        print(f"    {label:42s} {out['fixed_per_trial'][key]:7.2f}")
    print(f"  outside the trials (orchestrator start, data check, ledger, report): {out['outside_trials_seconds']:.0f} s")
    print(f"  the study at {STUDY_IMAGES_PER_EPOCH:,} training images per epoch: ~{out['study_minutes']:.1f} min on "
          f"this device   goal <= {GOALS['study_minutes']:.0f} min")
    print(f"    = W + sum_i ({STUDY_IMAGES_PER_EPOCH:,} / n_i - 1) x (train_i - warmup_i + test_i), n_i = "
          f"{sorted({round(r['images_per_epoch']) for r in rows})} images per epoch here")


# --- the whole run ----------------------------------------------------------------------------

def process_start() -> float:
    """What a trainer process pays once (per slot, not per trial): the interpreter, its imports, a CUDA context."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, trainers.run; torch.zeros(1, device='cuda' if "
                    "torch.cuda.is_available() else 'cpu')"], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - started


def device_line() -> dict:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "cores": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    budget = Budget(time.perf_counter() + args.budget)
    json_path, here = Path(args.json).resolve() if args.json else None, os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fer-gpu-sweep-") as tmp:
        folder = Path(tmp)
        os.chdir(folder)          # library caches and anything relative land here, never in the checkout
        from trainers.process.side_files import keep_side_files_local
        keep_side_files_local()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        from trainers.data import synthetic
        synthetic.DRAW_THREADS = os.cpu_count() or 1    # this process draws the sets; a trainer would use 4

        gpu = torch.cuda.is_available()
        report: dict = {**device_line(), "budget_s": args.budget, "smoke": args.smoke, "goals": GOALS,
                        "process_start_seconds": process_start()}
        print(f"{report['device']}, torch {report['torch']}, {report['cores']} cores; a trainer process starts in "
              f"{report['process_start_seconds']:.1f} s (once per slot)")
        if not args.skip_align and budget.allows("alignment", 20):
            report["align"] = measure_alignment(folder, 60 if args.smoke else args.align_images, 224)
        demo: dict = {}
        demo_folder, demo_raw = folder / "demo", demo_spec(folder / "demo", args.smoke)
        if not args.skip_demo and budget.allows("the demo packed", 40):
            demo["prepare"] = prepare_demo(demo_folder, demo_raw, budget)
            demo[f"per_gpu_{args.packed}"] = run_demo(demo_folder, demo_raw, args.packed, gpu, budget)
        if not args.skip_sweep and budget.allows("the study's grid", 90):
            report["paper"] = run_paper(folder / "paper", args, gpu, budget)
        if "prepare" in demo and not gpu:
            print("\nthe demo unpacked: skipped, on CPU trials_per_gpu is ignored (the same run again)")
        elif "prepare" in demo and budget.allows("the demo unpacked", 60):
            demo["per_gpu_1"] = run_demo(demo_folder, demo_raw, 1, gpu, budget)
        report["demo"] = summarise_demo(demo, args.packed)
        report["total_seconds"] = args.budget - budget.left()
        os.chdir(here)
    print(f"\ntotal {report['total_seconds']:.0f} s")
    if json_path:
        json_path.write_text(json.dumps(report, indent=2, default=str))
    return 0


def summarise_demo(demo: dict, packed: int) -> dict:
    """Prepare + packed sweep (what `make sweep` waits for) against the unpacked sweep."""
    if not demo:
        return demo
    prepare = demo.get("prepare", {}).get("seconds", 0.0)
    runs = {k: v for k, v in demo.items() if k.startswith("per_gpu_")}
    print(f"\nthe demo: data prepared in {prepare:.0f} s; " + "; ".join(
        f"trials_per_gpu {v['trials_per_gpu']}: {v['seconds']:.0f} s" for v in runs.values()))
    if f"per_gpu_{packed}" in runs:
        whole = prepare + runs[f"per_gpu_{packed}"]["seconds"]
        demo["packed_with_prepare_seconds"] = whole
        print(f"  packed, data preparation included: {whole:.0f} s   goal <= {GOALS['demo_packed_seconds']:.0f} s")
    return demo


def default_packed() -> int:
    import yaml

    packed = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text()).get("execution", {}).get("trials_per_gpu", 1)
    return packed if packed > 1 else DEFAULT_PACKED


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the script (1-3 min on 2 cores)")
    parser.add_argument("--budget", type=float, default=420, help="seconds for everything (default %(default)s)")
    parser.add_argument("--train-seconds", type=float, default=60,
                        help="the plan's estimate of the study's training, which sizes its images (default %(default)s)")
    parser.add_argument("--images", type=int, help="the study's synthetic images (default: from --train-seconds)")
    parser.add_argument("--align-images", type=int, default=512, help="photos aligned in stage 1 (default %(default)s)")
    parser.add_argument("--packed", type=int, default=default_packed(), help="the demo's packed trials_per_gpu")
    for stage in ("align", "demo", "sweep"):
        parser.add_argument(f"--skip-{stage}", action="store_true", help=f"skip the {stage} stage")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
