"""Condition maps for ControlNet: edges, soft edges, body pose, or a map uploaded as-is.

Every extractor returns a :class:`ConditionResult` whose ``extractor`` names what actually ran, so a fallback is
never mistaken for the real annotator. Annotator weights (HED, PiDiNet, OpenPose) come from a local folder
(argument ``annotators`` or ``$HYPERREAL_ANNOTATORS``) or the hub repo ``lllyasviel/Annotators``; with
``HF_HUB_OFFLINE=1`` only the local cache is looked at.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from huggingface_hub import hf_hub_download

from ...errors import HyperrealError
from ... import sources
from ...sources import is_hub_id

ANNOTATORS_ENV = "HYPERREAL_ANNOTATORS"
ANNOTATORS_HUB = "lllyasviel/Annotators"
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")
_MODE_ALIASES = {"resize": "just resize", "crop": "crop and resize", "fill": "resize and fill",
                 "pad": "resize and fill", "resize and fill (pad)": "resize and fill"}
# detectors see at least this many pixels on the short side (as controlnet-aux's default detect_resolution),
# so a 64-pixel generation still gets a pose or edges found on a usable image
DETECT_RESOLUTION = 512

# OpenPose body drawing, copied from controlnet_aux/open_pose/util.py (draw_bodypose): the openpose ControlNets
# were trained on exactly these limbs (1-based keypoint pairs) and RGB colours; limbs are drawn at 60% colour.
LIMB_SEQ = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
            [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18]]
COLORS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
          [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
          [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
# OpenPose's 18 keypoints (nose, neck, R shoulder/elbow/wrist, L shoulder/elbow/wrist, R hip/knee/ankle,
# L hip/knee/ankle, R eye, L eye, R ear, L ear) as BlazePose landmark indices; the neck has no BlazePose landmark
BLAZEPOSE_TO_OPENPOSE = [0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7]


@dataclass
class ConditionResult:
    image: Image.Image  # RGB, the generation size
    extractor: str  # what actually ran, e.g. "hed" or "sobel-fallback"
    note: str  # one line for the UI: settings, weights source, why a fallback ran, polarity fixes


def resize_mode_of(name: str) -> str:
    mode = " ".join(str(name).lower().replace("_", " ").split())
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in RESIZE_MODES:
        raise HyperrealError(f"Unknown resize mode {name!r}; use one of: {', '.join(RESIZE_MODES)}.")
    return mode


def _plan(src_w, src_h, width, height, mode):
    """(box of the source to use, size of the map's content, offset of the content on the canvas)."""
    if mode == "crop and resize":
        s = max(width / src_w, height / src_h)
        cw, ch = width / s, height / s
        left, top = (src_w - cw) / 2, (src_h - ch) / 2
        return (left, top, left + cw, top + ch), (width, height), (0, 0)
    if mode == "resize and fill":
        s = min(width / src_w, height / src_h)
        cw, ch = max(1, round(src_w * s)), max(1, round(src_h * s))
        return (0, 0, src_w, src_h), (cw, ch), ((width - cw) // 2, (height - ch) // 2)
    return (0, 0, src_w, src_h), (width, height), (0, 0)


def _resize(arr: np.ndarray, size) -> np.ndarray:
    if (arr.shape[1], arr.shape[0]) == tuple(size):
        return arr
    shrink = size[0] * size[1] < arr.shape[0] * arr.shape[1]
    return cv2.resize(arr, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class Extractor:
    """Fits the input to the generation size, runs :meth:`extract` and pads with black where the mode says."""

    name = ""
    label = ""
    detect_resolution = DETECT_RESOLUTION

    def __call__(self, image, width: int, height: int, resize_mode: str = "just resize") -> ConditionResult:
        if image is None:
            raise HyperrealError(f"{self.label}: no image given; upload a picture first.")
        width, height = int(width), int(height)
        if width < 1 or height < 1:
            raise HyperrealError(f"The condition map needs a positive size, not {width}x{height}.")
        mode = resize_mode_of(resize_mode)
        img = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).convert("RGB")
        box, (cw, ch), (ox, oy) = _plan(*img.size, width, height, mode)
        src_short = min(box[2] - box[0], box[3] - box[1])
        # detectors work at >= DETECT_RESOLUTION (but no finer than the source), the map is shrunk afterwards
        k = max(1.0, min(self.detect_resolution, src_short) / min(cw, ch))
        fitted = img.resize((round(cw * k), round(ch * k)), Image.Resampling.LANCZOS, box=box)
        arr, extractor, note = self.extract(np.asarray(fitted))
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        # black is "no condition here" for every map kind, so padding adds no edges or limbs
        canvas = np.zeros((height, width, 3), np.uint8)
        canvas[oy:oy + ch, ox:ox + cw] = _resize(arr.astype(np.uint8), (cw, ch))
        return ConditionResult(Image.fromarray(canvas), extractor, note)

    def extract(self, rgb: np.ndarray) -> tuple[np.ndarray, str, str]:
        raise NotImplementedError


class CannyMap(Extractor):
    name, label = "canny", "Canny edges"

    def __init__(self, low: int = 100, high: int = 200):
        if not 0 <= low <= high:
            raise HyperrealError(f"Canny thresholds need 0 <= low <= high; got low={low}, high={high}.")
        self.low, self.high = int(low), int(high)

    def extract(self, rgb):
        # on RGB as controlnet-aux's CannyDetector does (cv2 takes the strongest channel's gradient)
        return cv2.Canny(rgb, self.low, self.high), "canny", f"cv2 Canny, thresholds {self.low}/{self.high}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def find_weights(filename: str, annotators: str | None = None) -> tuple[str | None, str]:
    """(path of an annotator weights file or None, where it came from or why it is missing). Never raises."""
    source = str(annotators or os.environ.get(ANNOTATORS_ENV) or ANNOTATORS_HUB)
    if os.path.exists(source) or not is_hub_id(source):
        path = os.path.join(os.path.expanduser(source), filename)
        if os.path.isfile(path):
            return path, f"weights from {source}"
        return None, f"no {filename} in folder {source}"
    try:
        path = sources.with_deadline(lambda: hf_hub_download(source, filename, local_files_only=_offline()),
                                     f"{filename} from {source}")
        return path, f"weights from {source}"
    except Exception as err:
        why = ("not in the local cache and HF_HUB_OFFLINE=1" if _offline()
               else str(err) if isinstance(err, HyperrealError) else type(err).__name__)
        return None, f"{filename} could not be had from {source} ({why})"


@functools.lru_cache(maxsize=4)
def _load_annotator(kind: str, path: str):
    # controlnet_aux is imported only here: importing it loads every annotator module (seconds, and noisy)
    folder, filename = os.path.split(path)
    if kind == "hed":
        from controlnet_aux.hed import HEDdetector

        return HEDdetector.from_pretrained(folder, filename=filename)
    if kind == "pidinet":
        from controlnet_aux.pidi import PidiNetDetector

        return PidiNetDetector.from_pretrained(folder, filename=filename)
    # body only: OpenposeDetector.from_pretrained would also fetch the hand and face models (~300 MB) unused here
    from controlnet_aux.open_pose import Body, OpenposeDetector

    return OpenposeDetector(Body(path))


def sobel_soft_edges(rgb: np.ndarray) -> np.ndarray:
    """Weight-free stand-in for HED: gradient magnitude averaged over three blur scales, 0-255."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    acc = np.zeros_like(gray)
    for sigma in (1.0, 2.0, 4.0):
        b = cv2.GaussianBlur(gray, (0, 0), sigma)
        mag = cv2.magnitude(cv2.Sobel(b, cv2.CV_32F, 1, 0), cv2.Sobel(b, cv2.CV_32F, 0, 1))
        acc += mag / (np.percentile(mag, 99) + 1e-6)
    return (np.clip(acc / 3, 0, 1) * 255).astype(np.uint8)


class SoftEdgeMap(Extractor):
    name, label = "softedge", "Soft edges (HED / PiDiNet)"
    FILES = {"hed": "ControlNetHED.pth", "pidinet": "table5_pidinet.pth"}

    def __init__(self, model: str = "hed", annotators: str | None = None):
        if model not in self.FILES:
            raise HyperrealError(f"Unknown soft-edge model {model!r}; use one of: {', '.join(self.FILES)}.")
        self.model, self.annotators = model, annotators

    def extract(self, rgb):
        path, where = find_weights(self.FILES[self.model], self.annotators)
        if path:
            try:
                det = _load_annotator(self.model, path)
                side = min(rgb.shape[:2])
                out = det(rgb, detect_resolution=side, image_resolution=side, output_type="np")
                return _resize(out, (rgb.shape[1], rgb.shape[0])), self.model, f"{self.model.upper()}, {where}"
            except Exception as err:  # a corrupt or wrong file: say so and still give a map
                where = f"{path} would not load ({type(err).__name__}: {err})"
        return (sobel_soft_edges(rgb), "sobel-fallback",
                f"FALLBACK: Sobel soft edges, not {self.model.upper()}: {where}. Put {self.FILES[self.model]} in "
                f"a folder and set {ANNOTATORS_ENV} to it for the real annotator.")


def draw_openpose(people: list, width: int, height: int) -> np.ndarray:
    """OpenPose body skeletons (18 keypoints, normalised (x, y) or None each) on black, as draw_bodypose."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for kps in people:
        for (a, b), color in zip(LIMB_SEQ, COLORS):
            p, q = kps[a - 1], kps[b - 1]
            if p is None or q is None:
                continue
            xs, ys = np.array([p[0], q[0]]) * width, np.array([p[1], q[1]]) * height
            length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            poly = cv2.ellipse2Poly((int(xs.mean()), int(ys.mean())), (int(length / 2), 4), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, poly, [int(c * 0.6) for c in color])
        for kp, color in zip(kps, COLORS):
            if kp is not None:
                cv2.circle(canvas, (int(kp[0] * width), int(kp[1] * height)), 4, color, thickness=-1)
    return canvas


def mediapipe_people(rgb: np.ndarray, min_visibility: float = 0.5) -> list:
    """At most one person (BlazePose finds one) as 18 OpenPose keypoints; the neck is the shoulders' midpoint."""
    import mediapipe as mp  # optional (requirements-pose.txt), and slow to import

    # one graph per call: mediapipe graphs are not safe to share between Gradio's worker threads.
    # model_complexity=1 is the "full" model the 0.10.14 wheel ships (0 and 2 would be downloaded)
    with mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1) as pose:
        found = pose.process(np.ascontiguousarray(rgb)).pose_landmarks
    if found is None:
        return []
    lm = found.landmark
    seen = [(p.x, p.y) if p.visibility >= min_visibility and 0 <= p.x <= 1 and 0 <= p.y <= 1 else None for p in lm]
    kps = [seen[i] if i is not None else None for i in BLAZEPOSE_TO_OPENPOSE]
    if kps[2] and kps[5]:
        kps[1] = ((kps[2][0] + kps[5][0]) / 2, (kps[2][1] + kps[5][1]) / 2)
    return [kps]


def openpose_people(detector, rgb: np.ndarray) -> list:
    return [[(k.x, k.y) if k is not None else None for k in pose.body.keypoints]
            for pose in detector.detect_poses(rgb)]


class PoseMap(Extractor):
    name, label = "pose", "Body pose (OpenPose)"

    def __init__(self, annotators: str | None = None):
        self.annotators = annotators

    def extract(self, rgb):
        path, where = find_weights("body_pose_model.pth", self.annotators)
        if path:
            people, extractor, note = openpose_people(_load_annotator("openpose", path), rgb), "openpose", \
                f"OpenPose body, {where}"
        else:
            try:
                import mediapipe  # noqa: F401  (optional: see requirements.txt)
            except ImportError:
                raise HyperrealError(
                    f"No pose detector is available: {where}, and mediapipe is not installed. Set {ANNOTATORS_ENV} "
                    f"to a folder holding body_pose_model.pth (from {ANNOTATORS_HUB}), or install mediapipe==0.10.14, "
                    "or upload a ready pose map as an uploaded map.") from None
            people, extractor = mediapipe_people(rgb), "mediapipe"
            note = f"MediaPipe BlazePose mapped to OpenPose's 18 keypoints (one person at most); {where}"
        # at least one limb to draw: otherwise the map would be blank and the ControlNet would be told nothing
        people = [p for p in people if sum(k is not None for k in p) >= 2 and any(
            p[a - 1] is not None and p[b - 1] is not None for a, b in LIMB_SEQ)]
        if not people:
            raise HyperrealError(f"No person found in the image ({extractor}), so the pose map would be blank. Use "
                                 "a photo where a body (or head and shoulders) is clearly visible, or upload a pose "
                                 "map as an uploaded map.")
        return draw_openpose(people, rgb.shape[1], rgb.shape[0]), extractor, f"{note}; {len(people)} person(s)"


class UploadedMap(Extractor):
    """A ready map (edges, pose, depth...) used as-is; black-on-white line maps are flipped to white-on-black."""

    name, label = "uploaded", "Uploaded map (as-is)"
    detect_resolution = 0  # nothing to detect: resize straight to the content size

    def __init__(self, polarity: str = "auto"):
        if polarity not in ("auto", "keep", "invert"):
            raise HyperrealError(f"polarity must be auto, keep or invert, not {polarity!r}.")
        self.polarity = polarity

    @staticmethod
    def looks_inverted(rgb: np.ndarray) -> bool:
        """Bright border and bright majority: lines drawn dark on a light background."""
        gray = rgb.astype(np.float32).mean(axis=-1)
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        return bool(np.median(border) > 127 and np.median(gray) > 127)

    def extract(self, rgb):
        if int(rgb.max()) - int(rgb.min()) < 16:
            raise HyperrealError("The uploaded map is one flat colour, so it would condition on nothing. Upload an "
                                 "edge, pose or depth map, or pick an extractor to make one from a photo.")
        flip = self.polarity == "invert" or (self.polarity == "auto" and self.looks_inverted(rgb))
        if flip:
            why = "as asked" if self.polarity == "invert" else "it looked like dark lines on a light background"
            return 255 - rgb, "uploaded", f"uploaded map, inverted to white-on-black ({why})"
        return rgb.copy(), "uploaded", "uploaded map, used as-is (polarity " + (
            "not checked)" if self.polarity == "keep" else "checked: already light on dark)")


EXTRACTORS = {cls.name: cls for cls in (CannyMap, SoftEdgeMap, PoseMap, UploadedMap)}


def make_condition(kind: str, image, width: int, height: int, resize_mode: str = "just resize",
                   **params) -> ConditionResult:
    """``EXTRACTORS[kind](**params)(image, width, height, resize_mode)``, with errors a person can act on."""
    if kind not in EXTRACTORS:
        raise HyperrealError(f"Unknown condition kind {kind!r}; use one of: {', '.join(EXTRACTORS)}.")
    try:
        extractor = EXTRACTORS[kind](**params)
    except TypeError as err:
        raise HyperrealError(f"Bad settings for {kind}: {err}") from None
    return extractor(image, width, height, resize_mode)


# --- what training and generation jobs ask for --------------------------------------------------------------

def extractor_params(kind: str, canny_low: int = 100, canny_high: int = 200, softedge_model: str = "hed",
                     annotators: str | None = None) -> dict:
    """The settings :func:`make_condition` takes for an extractor kind."""
    if kind == "canny":
        return {"low": canny_low, "high": canny_high}
    if kind == "softedge":
        return {"model": softedge_model, "annotators": annotators}
    if kind == "pose":
        return {"annotators": annotators}
    return {}


def condition_map(kind: str, image: Image.Image, width: int, height: int, resize_mode: str = "just resize",
                  **params) -> Image.Image:
    """One condition map (RGB, white-on-black for edges) through :func:`make_condition`."""
    if kind in ("none", "given", "uploaded"):
        return make_condition("uploaded", image, width, height, resize_mode,
                              polarity=params.get("polarity", "auto")).image
    return make_condition(kind, image, width, height, resize_mode, **params).image
