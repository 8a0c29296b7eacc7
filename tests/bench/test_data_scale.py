"""Preparing data at scale: peak memory at two dataset sizes, cache bytes against the images' own bytes,
and MTCNN alignment with one and two worker processes.

Goals: the larger set's peak RSS <= 1.25x the smaller one's (8x the images; each the lower of two
preparations from scratch, as a peak moves by up to 5 MB from one run to the next); the aligned cache <= 1.1x
the raw uint8 bytes of its images; two worker processes align >= 1.6x the images per second of one (2 cores);
alignment in this process alone (torch's threads on every core, the path on a GPU or one core) is shown too.
Run with `python -m pytest -q -s tests/bench/test_data_scale.py`. FER_BENCH_SCALE="4000,32000" sets the
two sizes (synthetic faces at 112 px, drawn first and not timed); FER_BENCH_ALIGN_FACES the photos aligned.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_alignment_speed import shifted_faces
from trainers.config import from_dict
from trainers.data import align
from trainers.data.dataset import prepare_data

SIZES = [int(n) for n in os.environ.get("FER_BENCH_SCALE", "4000,32000").split(",")]
# Enough photos that the workers' start (~5 s: each imports torch and builds MTCNN) weighs little.
ALIGN_FACES = int(os.environ.get("FER_BENCH_ALIGN_FACES", "1024"))

PREPARE = textwrap.dedent('''
    import json, re, sys, time
    from trainers.config import from_dict
    from trainers.data.dataset import prepare_data
    from trainers.data.synthetic import write_synthetic

    def peak_rss_mb():
        # VmHWM: this process's own high-water mark. getrusage's ru_maxrss would also count the parent's
        # memory, which a vfork()ed child carries across exec on Linux.
        status = open("/proc/self/status").read()
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024

    if __name__ == "__main__":
        n, cache, draw_only = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "draw"
        cfg = from_dict({"data": {"source": "synthetic", "cache_dir": cache,
                                  "synthetic": {"n_images": n, "draw_size": 112}}}).data
        if draw_only:
            write_synthetic(cache, cfg.synthetic, cfg.classes)
            sys.exit(0)
        started = time.perf_counter()
        data = prepare_data(cfg, 112)
        print(json.dumps({"seconds": time.perf_counter() - started, "images": len(data.images),
                          "raw_bytes": int(data.images.nbytes),
                          "peak_rss_mb": peak_rss_mb()}))
''')


def prepare_in_child(script: Path, n: int, cache: Path, mode: str) -> dict:
    done = subprocess.run([sys.executable, str(script), str(n), str(cache), mode], capture_output=True, text=True,
                          check=True)
    return {} if mode == "draw" else __import__("json").loads(done.stdout.strip().splitlines()[-1])


def test_peak_memory_and_cache_bytes_do_not_grow_with_the_dataset(tmp_path):
    script = tmp_path / "prepare.py"
    script.write_text(PREPARE)
    runs = []
    for n in SIZES:
        cache = tmp_path / f"cache{n}"
        prepare_in_child(script, n, cache, "draw")
        peaks = []
        for _ in range(2):      # from scratch each time: no digests, no aligned set
            for folder in ("aligned", "digests"):
                shutil.rmtree(cache / folder, ignore_errors=True)
            run = prepare_in_child(script, n, cache, "prepare")
            peaks.append(run["peak_rss_mb"])
        run["peak_rss_mb"] = min(peaks)
        run["cache_bytes"] = sum(p.stat().st_size for p in (cache / "aligned").rglob("*") if p.is_file())
        runs.append(run)
        print(f"\nprepare {n} synthetic faces at 112 px: {run['seconds']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB "
              f"(of {', '.join(f'{p:.0f}' for p in peaks)}), images {run['raw_bytes'] / 2**20:.0f} MB, aligned cache "
              f"{run['cache_bytes'] / 2**20:.0f} MB")
    small, large = runs[0], runs[-1]
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    stored = large["cache_bytes"] / large["raw_bytes"]
    print(f"peak RSS {SIZES[-1]} / {SIZES[0]} images: {ratio:.2f}x   goal <= 1.25x")
    print(f"aligned cache / raw image bytes: {stored:.3f}   goal <= 1.1")
    assert ratio <= 1.25 and stored <= 1.1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_two_worker_processes_align_about_twice_as_fast_as_one(tmp_path, monkeypatch):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: nothing to share out")
    monkeypatch.setattr(align, "detector_device", lambda: "cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")          # the spawned workers too: a CPU figure
    root = tmp_path / "photos"
    for i, face in enumerate(shifted_faces(ALIGN_FACES, 256)):
        folder = root / ("anger" if i % 2 else "happiness")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(face).save(folder / f"{i:04d}.jpg", quality=92)
    rates = {}
    for workers in (0, 1, 2):
        cfg = from_dict({"data": {"source": "imagefolder", "root": str(root), "classes": ["anger", "happiness"],
                                  "align": "mtcnn", "cache_dir": str(tmp_path / f"cache{workers}")}}).data
        started = time.perf_counter()
        data = prepare_data(cfg, 112, workers=workers)
        rates[workers] = ALIGN_FACES / (time.perf_counter() - started)
        assert data.report.decoded == ALIGN_FACES
        who = f"{workers} worker process{'es' * (workers > 1)}" if workers else "this process, torch threads"
        print(f"\nalign {ALIGN_FACES} 256-px photos, {who}: {rates[workers]:.1f} images/s")
    speedup = rates[2] / rates[1]
    print(f"2 workers / 1: {speedup:.2f}x   goal >= 1.6x   (2 workers / this process alone: {rates[2] / rates[0]:.2f}x)")
    assert speedup >= 1.6
