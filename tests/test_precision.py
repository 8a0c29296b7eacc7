"""train.precision (bf16 weights with fp32 master weights) and model.compile: blocks, checked on CPU."""
import shutil

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from trainers.config import ConfigError, config_hash, from_dict
from trainers.data.dataset import prepare_data
from trainers.models import build_model, compile_model
from trainers.precision import MasterWeightOptimizer, autocast, cast_to_bf16
from trainers.run import run_trial
from trainers.tracking import global_tracking_uri
from trainers.train import Checkpoint, run_training, seed_everything

CPU = torch.device("cpu")
OPTIMIZERS = {"adam": lambda params: torch.optim.Adam(params, lr=1e-3),
              "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9)}


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 4))


def train_steps(optimizer_name: str, weights: str, steps: int = 30) -> list[torch.Tensor]:
    """The same net on the same seeded batches; weights fp32 (plain), bf16 (a plain torch optimizer on bf16
    weights) or master (MasterWeightOptimizer). Returns the weights the optimizer holds, as fp32."""
    net, build = small_net(), OPTIMIZERS[optimizer_name]
    if weights == "master":
        optimizer = MasterWeightOptimizer(net, build)      # casts the net to bf16, keeps its fp32 weights
    else:
        optimizer = build(list((cast_to_bf16(net) if weights == "bf16" else net).parameters()))
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 4, generator=gen)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen)
        with autocast(CPU, "fp32" if weights == "fp32" else "bf16"):
            loss = nn.functional.cross_entropy(net(x).float(), (x @ teacher).argmax(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach().float() for group in optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_master_weights_track_an_fp32_run_where_a_bf16_optimizer_drifts(optimizer_name):
    start = [p.detach().clone() for p in small_net().parameters()]
    reference = train_steps(optimizer_name, "fp32")
    path = torch.cat([(r - s).flatten() for r, s in zip(reference, start)]).norm()

    def drift(weights):
        return float(torch.cat([(w - r).flatten() for w, r in zip(weights, reference)]).norm() / path)

    # The master run differs from the fp32 one only by its bf16 forward and backward: weights and activations
    # rounded to 2^-9 relative, so each gradient is off by ~0.4%, and so is each update, summed in fp32 on the
    # master: 30 steps end 0.1% (sgd) and 0.6% (adam: its first step, lr x sign(g), flips on near-zero
    # gradients) of the distance travelled apart. A bf16 optimizer also rounds every update onto bf16's grid
    # and loses those below half a spacing: 6% (sgd) and 18% (adam) apart.
    assert drift(train_steps(optimizer_name, "master")) < 0.03
    assert drift(train_steps(optimizer_name, "bf16")) > 0.03


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_updates_below_bf16_resolution_accumulate_on_the_master_weight(optimizer_name):
    def hundred_steps(wrapped: bool) -> tuple[nn.Linear, list[torch.Tensor]]:
        layer = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            layer.weight.fill_(1.0)
        build = {"sgd": lambda p: torch.optim.SGD(p, lr=1e-3), "adam": lambda p: torch.optim.Adam(p, lr=1e-3)}
        optimizer = (MasterWeightOptimizer(layer, build[optimizer_name]) if wrapped
                     else build[optimizer_name](list(cast_to_bf16(layer).parameters())))
        for _ in range(100):      # gradient 1: each step moves the weight by 1e-3 (both optimizers here)
            optimizer.zero_grad()
            layer(torch.ones(1, 1, dtype=torch.bfloat16)).sum().backward()
            optimizer.step()
        return layer, optimizer.param_groups[0]["params"]

    # bf16 holds 0.99609375 and 1.0 around 1 - 1e-3: a plain optimizer on bf16 weights rounds each step back to 1.
    naive, _ = hundred_steps(wrapped=False)
    assert naive.weight.item() == 1.0
    layer, masters = hundred_steps(wrapped=True)
    assert masters[0].dtype == torch.float32 and masters[0].item() == pytest.approx(0.9, abs=1e-4)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.weight.item() == torch.tensor(0.9).to(torch.bfloat16).item()    # the master, rounded


def test_bf16_keeps_norm_layers_and_batchnorm_statistics_in_fp32_and_trains_resnet50():
    torch.manual_seed(0)
    model = build_model(from_dict({"model": {"name": "resnet50", "image_size": 32}}).model, 6)
    optimizer = MasterWeightOptimizer(model, OPTIMIZERS["adam"])
    assert model.backbone.conv1.weight.dtype == model.backbone.fc.weight.dtype == torch.bfloat16
    bn = model.backbone.bn1
    assert {bn.weight.dtype, bn.running_mean.dtype, bn.running_var.dtype} == {torch.float32}
    with autocast(CPU, "bf16"):
        loss = nn.functional.cross_entropy(model(torch.rand(2, 3, 32, 32)).float(), torch.arange(2))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and bn.running_var.dtype == torch.float32


class CrashAt:
    """An observer that crashes the trial once the given epoch is logged (its checkpoint is the one before)."""

    def __init__(self, epoch: int | None):
        self.epoch = epoch

    def on_epoch(self, epoch, values):
        if epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_a_bf16_trial_resumed_from_its_checkpoint_matches_one_never_stopped(tmp_path, tiny_trial):
    cfg = from_dict(tiny_trial(tmp_path, train={"epochs": 2, "precision": "bf16"},
                               data={"synthetic": {"n_images": 120, "draw_size": 32}}))
    data = prepare_data(cfg.data, cfg.model.image_size)

    def initial_model():
        seed_everything(cfg.train.seed)       # as run_trial does: the initial weights come from the seed
        return build_model(cfg.model, 6)
    straight_model = initial_model()
    straight = run_training(cfg, data, straight_model, Checkpoint(tmp_path / "straight"))

    resumed_ckpt = Checkpoint(tmp_path / "resumed")
    with pytest.raises(RuntimeError):
        run_training(cfg, data, initial_model(), resumed_ckpt, CrashAt(2))
    saved = resumed_ckpt.load()        # weights_only=True, as a resuming trial reads it
    assert saved["epoch"] == 1
    assert {w.dtype for w in saved["optimizer"]["master_weights"]} == {torch.float32}
    assert saved["model"]["backbone.classifier.weight"].dtype == torch.bfloat16
    resumed_model = initial_model()
    resumed = run_training(cfg, data, resumed_model, resumed_ckpt)

    def without_time(history):
        return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]
    assert without_time(resumed.history) == without_time(straight.history)
    assert resumed.test["macro_f1"] == straight.test["macro_f1"]
    for (name, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert {p.dtype for p in resumed_model.parameters()} == {torch.float32}     # released to fp32


def test_a_bf16_trial_logs_an_fp32_model(tmp_path, tiny_trial):
    cfg = from_dict(tiny_trial(tmp_path, train={"epochs": 1, "precision": "bf16"},
                               data={"synthetic": {"n_images": 120, "draw_size": 32}}))
    outcome = run_trial(cfg)
    assert outcome.status == "finished"
    model_id = MlflowClient(cfg.tracking.uri).get_run(outcome.run_id).data.tags["model_id"]
    with global_tracking_uri(cfg.tracking.uri):     # restored after: later tests must not inherit this store
        network = mlflow.pytorch.load_model(f"models:/{model_id}")
    floats = [t for t in network.state_dict().values() if t.is_floating_point()]
    assert floats and {t.dtype for t in floats} == {torch.float32}
    logits = network(torch.rand(3, 3, 32, 32))      # production feeds fp32 images
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def _cpp_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        return shutil.which(get_cpp_compiler())
    except Exception:      # no compiler configured, or a torch without this helper
        return None


@pytest.mark.skipif(_cpp_compiler() is None, reason="inductor compiles CPU kernels with a C++ compiler; none found")
def test_compiled_blocks_give_the_eager_forward_with_one_graph_for_every_layer():
    import torch._dynamo
    from torch._dynamo.utils import counters

    raw = {"model": {"name": "vit", "image_size": 16, "compile": "blocks",
                     "vit": {"patch_size": 8, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 1,
                             "intermediate_size": 32}}}
    cfg = from_dict(raw)
    torch.manual_seed(0)
    model = build_model(cfg.model, 6).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        counters.clear()
        compiled = compile_model(model, cfg.model.compile)
        assert compiled is model        # compiled in place: checkpoints and the export see the same module
        out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1      # one graph, reused by both layers
    torch._dynamo.reset()


@pytest.mark.parametrize(("section", "value", "says"), [
    ({"train": {"precision": "fp16"}}, "fp16", "train.precision must be one of auto, autocast, bf16, fp32"),
    ({"model": {"compile": "yes"}}, "yes", "model.compile must be one of false, true, blocks"),
    ({"model": {"compile": 1}}, "1", "model.compile must be one of false, true, blocks"),
])
def test_bad_precision_or_compile_values_are_refused_in_one_line(section, value, says):
    with pytest.raises(ConfigError) as err:
        from_dict(section)
    assert says in str(err.value) and value in str(err.value) and "\n" not in str(err.value)


def test_only_a_precision_that_changes_results_changes_the_config_hash():
    default = config_hash(from_dict({}))
    assert default == "96a85a117792"        # the defaults' hash before train.precision existed
    assert config_hash(from_dict({"train": {"precision": "autocast"}})) == default
    assert config_hash(from_dict({"model": {"compile": False}})) == default
    assert len({default, config_hash(from_dict({"train": {"precision": "bf16"}})),
                config_hash(from_dict({"train": {"precision": "fp32"}}))}) == 3
