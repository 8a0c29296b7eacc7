"""What occlusion augmentation costs a training epoch (CPU), as a ratio against the same epoch without it.

  occlusion cost = train_one_epoch time with augment.occlusion 0.5 / the same epoch with 0
"""
import dataclasses
import time

from trainers.config import AugmentConfig, from_dict
from trainers.data.dataset import prepare_data
from trainers.data.split import TRAIN
from trainers.models import build_model
from trainers.train import build_loop, seed_everything, train_one_epoch


def test_occlusion_cost_per_epoch(tmp_path, tiny_trial):
    # The demo's ViT at 32 px on ~1,680 training images (2,400 drawn), batch 32, balance copies included.
    raw = tiny_trial(tmp_path, data={"synthetic": {"n_images": 2400, "draw_size": 64}},
                     model={"vit": {"patch_size": 8, "hidden_size": 96, "num_hidden_layers": 4,
                                    "num_attention_heads": 4, "intermediate_size": 192}},
                     train={"batch_size": 32, "num_threads": 0, "device": "cpu"})
    cfg = from_dict(raw)
    data = prepare_data(cfg.data, cfg.model.image_size)
    seconds = {}
    for occlusion in (0.0, 0.5) * 3:      # interleaved: a busy machine slows both alike
        trial = dataclasses.replace(cfg, augment=AugmentConfig(occlusion=occlusion))
        seed_everything(0)
        loop = build_loop(trial, data, build_model(trial.model, len(data.classes)))
        t0 = time.perf_counter()
        train_one_epoch(loop, 1)
        seconds.setdefault(occlusion, []).append(time.perf_counter() - t0)
    off, on = min(seconds[0.0]), min(seconds[0.5])
    rows = len(loop.plan[0])
    print(f"\nocclusion cost     {on / off:.3f}x   (epoch {on:.2f}s with augment.occlusion 0.5 vs {off:.2f}s "
          f"without, {rows} rows of {len(data.indices(TRAIN))} training images)   goal <= 1.20")
