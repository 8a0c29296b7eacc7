"""The shipped model: encoded photos in, expressions out, through the preprocessing the network trained on.

A trial's logged model (trainers/tracking.py) holds the exported network (torch.export,
``data/model.pt2``) and ``data/photo.json``, the data settings it was trained with. Its
python_function flavor names this module, so ``mlflow.pyfunc.load_model``, ``mlflow models serve``
and ``python -m orchestrator predict`` all run PhotoModel: decode (trainers/data/images.py), find
the face and crop as training did (trainers/data/align.py), then the network. The mlflow.pytorch
flavor of the same files still gives the bare network (production uses it).

Nothing here unpickles: the archive is checked before torch.export reads it.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import re
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from trainers.config import SOURCES_WITH_FACE_BOXES
from trainers.data.align import Aligned, MtcnnAligner, build_aligner, detector_device
from trainers.data.aligning import crop_to_box
from trainers.data.images import ImageSkipped, decode_image_bytes, decode_side
from trainers.errors import UserError

SETTINGS_FILE = "photo.json"
NETWORK_FILE = "model.pt2"          # where mlflow.pytorch's pt2 format keeps the exported program

# A served photo over this many pixels is refused, per image: 50 MP is beyond a 48 MP phone camera, and a
# PNG of that size decodes to 150 MB before it is shrunk (a JPEG is decoded at 1/8 scale and costs little).
SERVE_MAX_PIXELS = 50_000_000
# An encoded image over this many bytes is refused before decoding (a 50 MP PNG is ~60-100 MB).
SERVE_MAX_BYTES = 100_000_000
# Base64 text as senders write it: standard or URL-safe alphabet, wrapped in lines, with or without padding,
# possibly as a data URL (data:image/jpeg;base64,...).
_BASE64_TEXT = re.compile(rb"(?:data:[\w/+.-]*;base64,)?[A-Za-z0-9+/=_\-\s]+")
# Photos decoded, cropped and run through the network at once, so a request of any length holds at most
# this many decoded photos (64 at the 896 px a 224 px model decodes to: ~150 MB) and float faces (64 x 3 x
# 224 x 224 float32: 38 MB).
CHUNK = 64


class PhotoModelError(UserError, ValueError):
    """A logged model that cannot serve photos (no settings, a pickled archive); the message says why."""


@dataclass(frozen=True)
class PhotoSettings:
    """What a trained network needs of a photo, as its trial's data and model sections said."""
    classes: tuple[str, ...]
    image_size: int
    align: str                  # none | mtcnn: how training cropped the face
    margin: float
    model: str                  # vit | resnet50, for the reader
    decode_side: int            # the long side photos are decoded at (images.decode_side when logged)
    crop_to_face: bool          # align none on a source with annotated face boxes: training cropped to them

    @classmethod
    def of_trial(cls, cfg, classes: tuple[str, ...]) -> PhotoSettings:
        """The settings of a TrialConfig (classes: the prepared data's, in label order)."""
        d = cfg.data
        return cls(tuple(classes), cfg.model.image_size, d.align, d.align_margin, cfg.model.name,
                   decode_side(cfg.model.image_size), d.align == "none" and d.source in SOURCES_WITH_FACE_BOXES)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> PhotoSettings:
        raw = json.loads(text)
        size = int(raw["image_size"])
        return cls(tuple(raw["classes"]), size, raw["align"], float(raw["margin"]), raw.get("model", ""),
                   int(raw.get("decode_side", decode_side(size))), bool(raw.get("crop_to_face", False)))


def output_columns(classes: tuple[str, ...]) -> list[str]:
    """The columns of a prediction, in order: label, one probability per class, the face, and any error."""
    return ["label", *(f"p_{c}" for c in classes), "face_found", "face_x0", "face_y0", "face_x1", "face_y1",
            "error"]


class PhotoModel:
    """Encoded images (bytes, or base64 text) -> one row per image: label, p_<class>, face_found, face box, error."""

    def __init__(self, network, settings: PhotoSettings, device):
        self.network = network
        self.settings = settings
        self.device = device
        if settings.align == "mtcnn":
            self.aligner = MtcnnAligner(settings.image_size, settings.margin, device=str(device))
            self.finder = self.aligner
        else:
            # align: none trained on centre crops and gets them here too; the face is still looked for,
            # so that face_found and the box say whether the photo shows one.
            self.aligner = build_aligner(settings.align, settings.image_size, settings.margin)
            self.finder = MtcnnAligner(settings.image_size, settings.margin, device=str(device))

    def predict(self, model_input, params=None):
        """A list of encoded images (or a DataFrame of them: its ``image`` column, or its only one) -> a
        DataFrame with one row per image, in order."""
        import pandas as pd

        images = _payloads(model_input)
        rows = []
        for start in range(0, len(images), CHUNK):
            rows.extend(self.predict_chunk(images[start:start + CHUNK]))
        frame = pd.DataFrame(rows, columns=output_columns(self.settings.classes))
        return frame.astype(object).where(frame.notna(), None)     # JSON null, not NaN, where nothing was found

    def predict_chunk(self, images: list) -> list[dict]:
        """Rows for up to CHUNK images: decoded, cropped and labelled together (batched detection and network)."""
        rows = [dict.fromkeys(output_columns(self.settings.classes)) for _ in images]
        decoded: list[tuple[int, np.ndarray, int]] = []
        for i, payload in enumerate(images):
            try:
                rgb, full_side = decode_image_bytes(_as_bytes(payload), self.settings.decode_side, SERVE_MAX_PIXELS)
            except ImageSkipped as skip:
                rows[i]["error"] = str(skip)
                continue
            decoded.append((i, rgb, full_side))
        if decoded:
            faces = self.crop([rgb for _, rgb, _ in decoded])
            probs = self.probabilities(np.stack([f.image for f in faces]))
            for (i, rgb, full_side), face, p in zip(decoded, faces, probs):
                rows[i].update(self.describe(face, p, rgb.shape[:2], full_side / max(rgb.shape[:2])))
        return rows

    def crop(self, images: list[np.ndarray]) -> list[Aligned]:
        """Each image cropped as training cropped it, with the face found in it (None when there is none)."""
        if self.finder is self.aligner:
            return self.aligner.align(images)       # MTCNN alignment: its detection is the face found
        faces = self.finder.detect_faces(images)
        if self.settings.crop_to_face:              # training cropped to the annotated box, then centred
            images = [rgb if f is None else crop_to_box(rgb, _xywh(f.box), (rgb.shape[1], rgb.shape[0]),
                                                        self.aligner.box_context)
                      for rgb, f in zip(images, faces)]
        return [replace(a, face=f) for a, f in zip(self.aligner.align(images), faces)]

    def probabilities(self, faces_u8: np.ndarray) -> np.ndarray:
        """N x S x S x 3 uint8 faces -> N x classes softmax probabilities (float64), in float32 on any device."""
        import torch

        from trainers.train import to_float_images

        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(faces_u8)).to(self.device)
            logits = self.network(to_float_images(batch))
            return torch.softmax(logits.float(), dim=1).double().cpu().numpy()

    def describe(self, face: Aligned, probs: np.ndarray, shape: tuple[int, int], scale: float) -> dict:
        """One image's row: the label, the probabilities, and the face box (clipped to the decoded image of
        height x width ``shape``) in the sent photo's upright pixels."""
        row = {"label": self.settings.classes[int(np.argmax(probs))],
               **{f"p_{c}": float(p) for c, p in zip(self.settings.classes, probs)},
               "face_found": face.face is not None}
        if face.face is not None:
            height, width = shape
            x0, y0, x1, y1 = np.clip(face.face.box, 0, [width, height, width, height]) * scale
            row.update(face_x0=round(float(x0), 1), face_y0=round(float(y0), 1), face_x1=round(float(x1), 1),
                       face_y1=round(float(y1), 1))
        return row


def _xywh(box: np.ndarray) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 -> x, y, width, height (crop_to_box's form), in whole pixels."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    return x0, y0, x1 - x0, y1 - y0


def _payloads(model_input) -> list:
    """The encoded images of a DataFrame's ``image`` column (or its only column), a Series, a list or one image."""
    if hasattr(model_input, "columns"):
        if "image" in model_input.columns:
            return list(model_input["image"])
        if len(model_input.columns) == 1:
            return list(model_input.iloc[:, 0])
        raise PhotoModelError(f"expected a column named 'image' of encoded images; got columns "
                              f"{', '.join(map(str, model_input.columns))}")
    if isinstance(model_input, (bytes, bytearray, str)):
        return [model_input]
    return list(model_input)


def _as_bytes(payload) -> bytes:
    """An encoded image as bytes: base64 text (how JSON carries images; MLflow's "inputs" form hands it over
    still encoded, as bytes) is decoded; other bytes are the image. No image file is made of base64's
    alphabet alone (each format has binary magic bytes), so the two cannot be confused."""
    if isinstance(payload, str):
        payload = payload.encode("ascii", errors="replace")
    elif payload is None:
        raise ImageSkipped("empty", "no image")
    elif not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ImageSkipped("not_an_image", f"a {type(payload).__name__}, not encoded image bytes")
    data = bytes(payload)
    if len(data) > SERVE_MAX_BYTES * 4 // 3 + 4:
        raise ImageSkipped("too_large", f"{len(data) / 1e6:.0f} MB is over {SERVE_MAX_BYTES // 1_000_000} MB")
    if data and _BASE64_TEXT.fullmatch(data):
        data = _from_base64(data)
    if len(data) > SERVE_MAX_BYTES:
        raise ImageSkipped("too_large", f"{len(data) / 1e6:.0f} MB is over {SERVE_MAX_BYTES // 1_000_000} MB")
    if not data:
        raise ImageSkipped("empty", "no image bytes (an empty payload, or base64 of nothing)")
    return data


def _from_base64(text: bytes) -> bytes:
    """Base64 in any of the forms _BASE64_TEXT admits -> the bytes it encodes."""
    body = re.sub(rb"\s+", b"", text.split(b",", 1)[1] if text.startswith(b"data:") else text)
    body = body.rstrip(b"=").replace(b"-", b"+").replace(b"_", b"/")
    try:
        return base64.b64decode(body + b"=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ImageSkipped("not_an_image", "text, neither an image nor the base64 of one (send the file's bytes "
                                           "as standard base64)") from None


# --- loading: the python_function flavor's entry point -----------------------------------------------

def check_pickle_free(archive: Path) -> None:
    """Refuse a torch.export archive that would unpickle anything: pickled weights or constants, or sample
    inputs that torch's restricted (weights_only) loader does not accept."""
    import torch

    with zipfile.ZipFile(archive) as z:
        for name in z.namelist():
            if name.endswith(("weights_config.json", "constants_config.json")):
                entries = json.loads(z.read(name)).get("config", {})
                pickled = [key for key, meta in entries.items() if meta.get("use_pickle")]
                if pickled:
                    raise PhotoModelError(f"{archive}: {name} stores {pickled[0]} as a pickle; refusing to load "
                                          "it (export the model again with plain tensors)")
            elif "/sample_inputs/" in name:
                try:
                    torch.load(io.BytesIO(z.read(name)), map_location="cpu", weights_only=True)
                except Exception as err:
                    raise PhotoModelError(f"{archive}: {name} is not plain tensors ({type(err).__name__}); "
                                          "refusing to load it") from None


def load_photo_model(data_path: str | Path, device=None) -> PhotoModel:
    """The PhotoModel in a logged model's data folder (model.pt2 + photo.json), on CUDA when there is one."""
    import torch

    from trainers.models import move_exported

    data_path = Path(data_path)
    settings_file = data_path / SETTINGS_FILE
    if not settings_file.is_file():
        raise PhotoModelError(f"{data_path.parent} has no {SETTINGS_FILE}: it was logged before models took "
                              "photos; `make promote` registers its run again as a photo model")
    settings = PhotoSettings.from_json(settings_file.read_text())
    check_pickle_free(data_path / NETWORK_FILE)
    device = torch.device(device or detector_device())
    network = move_exported(torch.export.load(data_path / NETWORK_FILE).module(), device)
    return PhotoModel(network, settings, device)


def _load_pyfunc(data_path: str, model_config=None) -> PhotoModel:
    """MLflow's loader_module entry point: mlflow.pyfunc.load_model and `mlflow models serve` call it."""
    return load_photo_model(data_path, (model_config or {}).get("device"))
