"""The shipped model: the promoted version takes encoded photos (pyfunc), is served by `mlflow models serve`,
and labels folders of files with `predict`.

One tiny ViT is trained and promoted once for the module, in a temporary sqlite store, exactly as a
sweep logs and `make promote` registers it. Its accuracy does not matter here: these tests check the
interface (what comes out for which input), not what the network learned.
"""
import base64
import csv
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image
from skimage import data as skdata

from orchestrator.__main__ import main
from orchestrator.results.registry import promote
from orchestrator.sweep.runner import child_run_tags
from orchestrator.sweep.spec import load_spec
from trainers.config import DEFAULT_CLASSES, DataConfig, from_dict
from trainers.data.dataset import prepare_data
from trainers.data.images import decode_image_bytes
from trainers.photo_model import PhotoModel, PhotoModelError, PhotoSettings, check_pickle_free
from trainers.run import run_trial
from trainers.tracking import global_tracking_uri, open_parent_run

REPO = Path(__file__).resolve().parents[1]
CHAMPION = "models:/fer-vit@champion"


def encoded(array: np.ndarray, kind: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, kind)
    return buffer.getvalue()


def astronaut_jpeg() -> bytes:
    """scikit-image's astronaut (Eileen Collins, 512 x 512): one frontal face, about x 170-280, y 60-180."""
    return encoded(skdata.astronaut())


def no_face_png() -> bytes:
    """A smooth colour gradient: nothing MTCNN could take for a face."""
    ramp = np.linspace(0, 255, 300, dtype=np.uint8)
    return encoded(np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, ::-1]), axis=-1), "PNG")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with (almost) no pixel data: Pillow opens it, never decodes it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, tiny_trial):
    """(folder, spec path, tracking URI) of a sweep 'ship' whose one tiny ViT run is the champion."""
    tmp = tmp_path_factory.mktemp("ship")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    spec_path = tmp / "ship.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "ship", "data": {"source": "synthetic", "cache_dir": str(tmp / "cache"),
                                 "synthetic": {"n_images": 240, "draw_size": 32}},
        "experiments": {"baseline": {"grid": {"optim.lr": [1e-3]}}}}))
    cwd = os.getcwd()
    os.chdir(tmp)       # a new store roots its Default experiment under the working directory
    try:
        client = MlflowClient(uri)
        parent = open_parent_run(client, "ship")
        raw = tiny_trial(tmp, train={"epochs": 1, "num_threads": 1})
        raw["tracking"].update(uri=uri, experiment="ship", parent_run_id=parent, run_name="vit",
                               tags=child_run_tags("ship", "baseline", 0))
        run_trial(from_dict(raw))
        promote(load_spec(str(spec_path)), client)
    finally:
        os.chdir(cwd)
    return tmp, str(spec_path), uri


@pytest.fixture(scope="module")
def champion(shipped):
    import mlflow.pyfunc

    with global_tracking_uri(shipped[2]):
        return mlflow.pyfunc.load_model(CHAMPION)


def test_the_champion_labels_a_photo_of_a_face_and_says_when_it_finds_none(champion):
    out = champion.predict([astronaut_jpeg(), no_face_png()])
    face, plain = out.to_dict("records")
    probabilities = [face[f"p_{c}"] for c in DEFAULT_CLASSES]
    assert face["label"] in DEFAULT_CLASSES and face["label"] == DEFAULT_CLASSES[int(np.argmax(probabilities))]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)
    assert face["face_found"] is True and face["error"] is None
    # The box is in the sent photo's pixels (the photo is decoded at 256 px for a 32 px model).
    assert 140 < face["face_x0"] < 200 < 260 < face["face_x1"] < 320
    assert 30 < face["face_y0"] < 100 < 150 < face["face_y1"] < 220
    # No face: still labelled (from the centre crop, as training crops), but flagged, and no box.
    assert plain["face_found"] is False and plain["label"] in DEFAULT_CLASSES and plain["face_x0"] is None


def test_each_bad_image_gets_its_own_error_and_the_good_ones_in_the_batch_are_still_labelled(champion):
    jpeg = astronaut_jpeg()
    payloads = [b"", b"a text file, not a photo", jpeg[:600], png_header_only(10_000, 10_000), jpeg,
                base64.b64encode(jpeg).decode()]          # base64 text (as JSON carries it) works too
    rows = champion.predict(payloads).to_dict("records")
    reasons = [(row["error"] or "").split(":")[0] for row in rows]
    assert reasons == ["empty", "not_an_image", "truncated", "too_large", "", ""]
    assert "10000 x 10000 pixels is over 50 MP" in rows[3]["error"]
    for row in rows[:4]:
        assert row["label"] is None and row["face_found"] is None and row["p_happiness"] is None
    assert rows[4]["label"] == rows[5]["label"] and rows[4]["face_found"] and rows[5]["face_found"]


@pytest.mark.parametrize("align", ["none", "mtcnn"])
def test_a_photo_is_cropped_exactly_as_the_training_cache_stores_the_same_file(tmp_path, align):
    """One code path: the face the model crops from a photo's bytes is, byte for byte, the aligned image
    that preparing a dataset holding that photo stored for training."""
    root = tmp_path / "faces"
    (root / "happiness").mkdir(parents=True)
    (root / "happiness" / "astronaut.jpg").write_bytes(astronaut_jpeg())
    cfg = DataConfig(source="imagefolder", root=str(root), classes=("happiness",), align=align,
                     align_margin=0.15, cache_dir=str(tmp_path / "cache"), split=(1.0, 0.0, 0.0))
    trained = prepare_data(cfg, 64).images[0]
    settings = PhotoSettings.of_trial(from_dict({"data": {"source": "imagefolder", "root": str(root), "align": align,
                                                          "align_margin": 0.15}, "model": {"image_size": 64}}),
                                      ("happiness",))
    model = PhotoModel(network=None, settings=settings, device="cpu")     # crop() never runs the network
    rgb, _ = decode_image_bytes(astronaut_jpeg(), settings.decode_side)
    served = model.crop([rgb])[0]
    assert np.array_equal(served.image, trained) and served.face is not None


def test_the_logged_model_carries_the_trials_photo_settings(shipped):
    folder, spec, uri = shipped
    client = MlflowClient(uri)
    with global_tracking_uri(uri):
        from mlflow.models import get_model_info
        info = get_model_info(CHAMPION)
    run = client.get_run(info.run_id)
    path = client.download_artifacts(info.run_id, "config.yaml", str(folder))
    trial = from_dict(yaml.safe_load(Path(path).read_text()))
    with global_tracking_uri(uri):
        import mlflow.artifacts
        saved = mlflow.artifacts.download_artifacts(f"{CHAMPION}/data/photo.json", dst_path=str(folder))
    assert PhotoSettings.from_json(Path(saved).read_text()) == PhotoSettings.of_trial(trial, DEFAULT_CLASSES)
    assert (trial.data.align, trial.model.image_size) == ("none", 32) and run.data.tags["model_id"] == info.model_id
    assert info.flavors["python_function"]["loader_module"] == "trainers.photo_model"
    assert "pytorch" in info.flavors                      # the bare network stays loadable for production


def test_base64_is_read_in_the_forms_senders_write_it(champion):
    jpeg = astronaut_jpeg()
    standard = base64.b64encode(jpeg).decode()
    forms = [f"data:image/jpeg;base64,{standard}", base64.urlsafe_b64encode(jpeg).decode().rstrip("="),
             base64.encodebytes(jpeg).decode(), "hello"]     # 5 letters: no base64 is 1 more than 4k long
    rows = champion.predict(forms).to_dict("records")
    assert all(row["face_found"] is True for row in rows[:3])
    assert rows[3]["label"] is None and "neither an image nor the base64 of one" in rows[3]["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_until_up(port: int, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stdout.read()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the server did not answer /ping within {seconds} s")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_mlflow_serves_the_champion_photos_in_labels_out_and_stops_with_its_pid(shipped, clean_env):
    folder, spec, uri = shipped
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "orchestrator", "serve", spec, "--tracking-uri", uri,
                               "--port", str(port)], cwd=folder, env=clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until_up(port, server)
        status, answer = post(port, json.dumps({"inputs": [base64.b64encode(astronaut_jpeg()).decode()]}).encode())
        assert status == 200
        (row,) = answer["predictions"]
        assert row["label"] in DEFAULT_CLASSES and row["face_found"] is True and row["error"] is None
        assert sum(row[f"p_{c}"] for c in DEFAULT_CLASSES) == pytest.approx(1.0, abs=1e-6)
        # The dataframe_split form, with one garbage image beside a good one: an error field for it alone.
        split = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"garbage bytes").decode()],
                                                                    [base64.b64encode(no_face_png()).decode()]]}}
        status, answer = post(port, json.dumps(split).encode())
        garbage, plain = answer["predictions"]
        assert status == 200 and garbage["error"].startswith("not_an_image") and garbage["label"] is None
        assert plain["face_found"] is False and plain["error"] is None
        status, answer = post(port, b"")                  # an empty body: HTTP 400 and a message
        assert status == 400 and "Invalid input" in answer["message"]
    finally:
        server.send_signal(signal.SIGTERM)                # the serve command's PID, nothing else
        server.wait(timeout=30)
    deadline = time.monotonic() + 20
    while group_alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(server.pid), "the uvicorn worker outlived the serve command"


def test_predict_writes_one_row_per_file_and_an_error_for_each_bad_one(shipped, capsys):
    folder, spec, uri = shipped
    photos = folder / "photos"
    (photos / "more").mkdir(parents=True)
    (photos / "astronaut.jpg").write_bytes(astronaut_jpeg())
    (photos / "more" / "gradient.png").write_bytes(no_face_png())
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "notes.txt").write_text("not a photo")
    (photos / "cut.jpg").write_bytes(astronaut_jpeg()[:600])
    (photos / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")     # hidden: skipped
    os.mkfifo(photos / "pipe.jpg")                           # never opened: it would block a read
    out = folder / "labels.csv"
    status = main(["predict", spec, str(photos), "--tracking-uri", uri, "--out", str(out)])
    assert status == 1                                        # some files were not images
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert sorted(rows) == ["astronaut.jpg", "cut.jpg", "empty.jpg", "gradient.png", "notes.txt", "pipe.jpg"]
    assert list(next(iter(rows.values())))[:3] == ["path", "label", "p_anger"]
    assert rows["astronaut.jpg"]["face_found"] == "True" and rows["astronaut.jpg"]["error"] == ""
    assert rows["gradient.png"]["face_found"] == "False" and rows["gradient.png"]["label"] in DEFAULT_CLASSES
    for name, reason in (("empty.jpg", "empty"), ("notes.txt", "not_an_image"), ("cut.jpg", "truncated"),
                         ("pipe.jpg", "unreadable")):
        assert rows[name]["error"].startswith(reason) and rows[name]["label"] == ""
    printed = capsys.readouterr().out
    assert "6 file(s) read" in printed and "2 labelled (1 of them with no face found" in printed
    assert "4 not usable" in printed


def test_predict_takes_photos_without_a_spec_and_a_model_by_its_registry_uri(shipped, tmp_path, monkeypatch,
                                                                                capsys):
    folder, spec, uri = shipped
    monkeypatch.chdir(tmp_path)                            # no sweeps/demo.yaml here: --model needs no spec
    (tmp_path / "a.jpg").write_bytes(astronaut_jpeg())
    (tmp_path / "b.png").write_bytes(no_face_png())
    assert main(["predict", "a.jpg", "b.png", "--model", "models:/fer-vit/1", "--tracking-uri", uri]) == 0
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [r["path"] for r in rows] == ["a.jpg", "b.png"] and [r["face_found"] for r in rows] == ["True", "False"]
    assert main(["predict", spec, "--tracking-uri", uri]) == 2     # a spec and no photo: one line
    assert "no photo given after the spec" in capsys.readouterr().err
    assert main(["predict", "a.jpg", "--model", "runs:/abc/model", "--tracking-uri", uri]) == 2
    assert "expected models:/<name>/<version>" in capsys.readouterr().err


def test_predict_without_a_store_or_a_champion_says_to_promote_first_in_one_line(shipped, tmp_path, capsys):
    spec = tmp_path / "none.yaml"
    spec.write_text(yaml.safe_dump({"name": "none", "experiments": {"a": {"grid": {"optim.lr": [1e-3]}}},
                                    "promote": {"name": "fer-none"}}))
    (tmp_path / "a.jpg").write_bytes(astronaut_jpeg())
    missing = tmp_path / "mlruns" / "mlflow.db"
    status = main(["predict", str(spec), str(tmp_path / "a.jpg"), "--tracking-uri", f"sqlite:///{missing}"])
    err = capsys.readouterr().err
    assert status == 2 and "no MLflow store" in err and "make promote" in err and len(err.splitlines()) == 1
    assert not missing.exists()                            # reading created nothing
    status = main(["predict", str(spec), str(tmp_path / "a.jpg"), "--tracking-uri", shipped[2]])
    err = capsys.readouterr().err
    assert status == 2 and "models:/fer-none@champion" in err and "make promote" in err
    assert len(err.splitlines()) == 1


def test_a_network_archive_holding_pickles_is_refused_before_torch_reads_it(tmp_path):
    import torch

    program = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    clean = tmp_path / "clean.pt2"
    torch.export.save(program, clean)
    check_pickle_free(clean)
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            content = src.read(item)
            if item.filename.endswith("weights_config.json"):
                config = json.loads(content)
                for meta in config["config"].values():
                    meta["use_pickle"] = True
                content = json.dumps(config).encode()
            dst.writestr(item, content)
    with pytest.raises(PhotoModelError, match="as a pickle"):
        check_pickle_free(tampered)


def log_bare_network(client: MlflowClient, run_id: str, classes: int) -> str:
    """The run's model as trials logged it before models took photos: mlflow.pytorch, a tensor signature."""
    import mlflow.pytorch
    from mlflow.models.signature import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from trainers.config import ModelConfig, ViTArchConfig
    from trainers.models import build_model

    network = build_model(ModelConfig(name="vit", image_size=32, vit=ViTArchConfig(8, 32, 2, 2, 64)), classes).eval()
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, 32, 32), "images")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), "logits")]))
    experiment = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment, name="model", source_run_id=run_id)
    with global_tracking_uri(client.tracking_uri):
        info = mlflow.pytorch.log_model(network, name="model", signature=signature, run_id=run_id,
                                        model_id=logged.model_id, serialization_format="pt2",
                                        input_example=np.zeros((2, 3, 32, 32), np.float32))
    client.set_tag(run_id, "model_id", info.model_id)
    return info.model_id


def test_promote_registers_a_champion_logged_before_models_took_photos_again_so_it_can_be_served(tmp_path,
                                                                                                tiny_trial):
    import mlflow

    from orchestrator.results.serving import ServingError, shipped_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec_path = tmp_path / "old.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "old", "experiments": {"baseline": {"grid": {"optim.lr": [1e-3]}}}}))
    spec = load_spec(str(spec_path))
    client = MlflowClient(uri)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        raw = tiny_trial(tmp_path, train={"epochs": 1, "num_threads": 1}, tracking={"log_model": False})
        raw["tracking"].update(uri=uri, experiment="old", parent_run_id=open_parent_run(client, "old"),
                               run_name="vit", tags=child_run_tags("old", "baseline", 0))
        run_id = run_trial(from_dict(raw)).run_id
        bare = log_bare_network(client, run_id, len(DEFAULT_CLASSES))
        with global_tracking_uri(uri):             # registered and crowned the way promote did before
            old = mlflow.register_model(f"models:/{bare}", "fer-vit", tags={"source_run_id": run_id})
        client.set_registered_model_alias("fer-vit", "champion", old.version)
        with pytest.raises(ServingError, match="takes tensors, not photos.*make promote"):
            shipped_model(client, None, spec.promote)
        result = promote(spec, client)
    finally:
        os.chdir(cwd)
    assert result.champion_changed and result.version == 2 and "registered again to take photos" in result.message
    assert client.get_run(run_id).data.tags["model_id"] != bare     # the run's model is now the photo model
    shipped = shipped_model(client, None, spec.promote)
    with global_tracking_uri(uri):
        import mlflow.pyfunc
        (row,) = mlflow.pyfunc.load_model(shipped.uri).predict([astronaut_jpeg()]).to_dict("records")
    assert row["face_found"] is True and row["label"] in DEFAULT_CLASSES
    assert promote(spec, client).version == 2                      # once: the next promote finds it
