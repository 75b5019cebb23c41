import socket
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from hyperreal.methods.controlnet import conditions as C
from hyperreal.methods.controlnet.conditions import (COLORS, EXTRACTORS, RESIZE_MODES, CannyMap, PoseMap, SoftEdgeMap, UploadedMap,
                                  draw_openpose, make_condition, resize_mode_of)
from hyperreal.errors import HyperrealError

NO_HUB_REPO = "hyperreal-tests/no-such-annotators"  # a hub id that is never in the local cache


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network at all: a silent download attempt fails the test instead of passing slowly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(C.ANNOTATORS_ENV, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def arr(result):
    assert result.image.mode == "RGB"
    return np.asarray(result.image)


def gradient(gray):
    g = cv2.GaussianBlur(gray.astype(np.float32), (0, 0), 1.0)
    return cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))


def colour_centroid(a, rgb):
    ys, xs = np.nonzero((a == rgb).all(axis=-1))
    assert len(xs), f"no pixel of colour {rgb}"
    return xs.mean(), ys.mean()


# --- Canny ----------------------------------------------------------------------------------------------------------

def test_canny_edges_sit_where_the_photo_has_edges():
    photo = data.camera()
    r = CannyMap()(photo, 512, 512)
    assert r.extractor == "canny" and "100/200" in r.note
    m = arr(r)
    assert set(np.unique(m)) == {0, 255}, "a Canny map is white lines on black"
    edges = m[..., 0] > 0
    assert 0.01 < edges.mean() < 0.3
    grad = gradient(photo)
    assert grad[edges].mean() > 3 * grad[~edges].mean()


def test_lower_canny_thresholds_give_more_edges():
    photo = data.coffee()
    counts = [(arr(CannyMap(lo, hi)(photo, 384, 256)) > 0).sum() for lo, hi in [(50, 100), (100, 200), (200, 400)]]
    assert counts[0] > counts[1] > counts[2] > 0


def test_canny_rejects_crossed_thresholds():
    with pytest.raises(HyperrealError, match="low <= high"):
        CannyMap(200, 100)


# --- resize modes ---------------------------------------------------------------------------------------------------

def ramp(w=300, h=100):
    """Brightness = x position, so the output shows which part of the source landed where."""
    row = np.linspace(0, 255, w).astype(np.uint8)
    return Image.fromarray(np.tile(row, (h, 1)))


def test_mode_names_and_aliases():
    assert [resize_mode_of(m) for m in ("Just Resize", "crop_and_resize", "pad", "Resize and Fill")] == [
        "just resize", "crop and resize", "resize and fill", "resize and fill"]
    with pytest.raises(HyperrealError, match="Unknown resize mode"):
        resize_mode_of("stretch")


def test_just_resize_keeps_the_whole_image_stretched():
    m = arr(UploadedMap("keep")(ramp(), 100, 100, "just resize"))[..., 0].astype(int)
    assert m.shape == (100, 100)
    assert m[:, 0].max() < 10 and m[:, -1].min() > 245 and (m[0] == m[-1]).all()


def test_crop_and_resize_fills_with_the_centre():
    m = arr(UploadedMap("keep")(ramp(), 100, 100, "crop and resize"))[..., 0].astype(int)
    assert m.shape == (100, 100)
    assert abs(m[:, 0].mean() - 85) < 8 and abs(m[:, -1].mean() - 170) < 8  # the middle third of a 3:1 source
    assert m.min() > 60, "crop must not leave borders"


def test_resize_and_fill_keeps_everything_and_pads_black():
    m = arr(UploadedMap("keep")(ramp(), 100, 100, "resize and fill"))[..., 0].astype(int)
    assert m.shape == (100, 100)
    assert m[:30].max() == 0 and m[-30:].max() == 0  # 100x33 content centred, black above and below
    assert m[50, 0] < 10 and m[50, -1] > 245  # ...and the whole width of the source is there


def test_modes_on_a_photo_map_geometry():
    photo = data.astronaut()  # square
    pad = arr(CannyMap()(photo, 320, 192, "resize and fill"))
    assert pad[:, :64].max() == 0 and pad[:, -64:].max() == 0 and pad[:, 64:-64].mean() > 5
    for mode in ("crop and resize", "just resize"):
        m = arr(CannyMap()(photo, 320, 192, mode))
        assert m[:, :32].max() > 0 and m[:, -32:].max() > 0, f"{mode} must fill the whole width"


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("kind", ["canny", "softedge", "uploaded"])
def test_every_map_has_the_generation_size(kind, mode):
    r = make_condition(kind, data.coffee(), 200, 136, mode)
    assert r.image.size == (200, 136) and r.image.mode == "RGB"


# --- uploaded maps and polarity -------------------------------------------------------------------------------------

def test_inverted_uploaded_map_is_detected_and_fixed():
    lines = arr(CannyMap()(data.camera(), 256, 256))
    r = UploadedMap()(Image.fromarray(255 - lines), 256, 256)
    assert r.extractor == "uploaded" and "inverted" in r.note
    assert np.abs(arr(r).astype(int) - lines).mean() < 1


def test_white_on_black_maps_are_left_alone():
    lines = arr(CannyMap()(data.camera(), 256, 256))
    r = UploadedMap()(Image.fromarray(lines), 256, 256)
    assert "inverted" not in r.note and "already light on dark" in r.note
    assert np.abs(arr(r).astype(int) - lines).mean() < 1
    pose = draw_openpose([[(0.5, 0.2), (0.5, 0.35), (0.4, 0.35), (0.35, 0.5), None, (0.6, 0.35)] + [None] * 12],
                         256, 256)
    assert "inverted" not in UploadedMap()(Image.fromarray(pose), 256, 256).note


def test_polarity_keep_and_invert():
    lines = arr(CannyMap()(data.camera(), 128, 128))
    assert np.array_equal(arr(UploadedMap("keep")(255 - lines, 128, 128)), 255 - lines)
    assert np.array_equal(arr(UploadedMap("invert")(lines, 128, 128)), 255 - lines)


def test_flat_uploaded_map_is_refused():
    with pytest.raises(HyperrealError, match="one flat colour"):
        UploadedMap()(Image.new("RGB", (64, 64), "white"), 64, 64)


# --- soft edges -----------------------------------------------------------------------------------------------------

def test_soft_edge_fallback_runs_offline_and_says_so(monkeypatch):
    monkeypatch.setenv(C.ANNOTATORS_ENV, NO_HUB_REPO)
    photo = data.camera()
    r = SoftEdgeMap()(photo, 256, 256)
    assert r.extractor == "sobel-fallback"
    assert r.note.startswith("FALLBACK") and NO_HUB_REPO in r.note and "HF_HUB_OFFLINE" in r.note
    m = arr(r)[..., 0]
    assert len(np.unique(m)) > 50, "soft edges are graded, not binary"
    edges = arr(CannyMap()(photo, 256, 256))[..., 0] > 0
    assert m[edges].mean() > 2 * m[~edges].mean()


@pytest.mark.parametrize("model, filename", [("hed", "ControlNetHED.pth"), ("pidinet", "table5_pidinet.pth")])
def test_soft_edge_weights_missing_from_folder(tmp_path, monkeypatch, model, filename):
    r = SoftEdgeMap(model, annotators=str(tmp_path))(data.coffee(), 128, 96)
    assert r.extractor == "sobel-fallback" and f"no {filename} in folder {tmp_path}" in r.note
    monkeypatch.setenv(C.ANNOTATORS_ENV, str(tmp_path / "nowhere"))
    assert "nowhere" in SoftEdgeMap(model)(data.coffee(), 128, 96).note


def test_soft_edge_uses_hed_when_weights_are_there(tmp_path):
    torch = pytest.importorskip("torch")
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)  # random weights: this checks the wiring, not HED's quality
    torch.save(ControlNetHED_Apache2().state_dict(), tmp_path / "ControlNetHED.pth")
    small = Image.fromarray(data.camera()).resize((96, 96))
    r = SoftEdgeMap("hed", annotators=str(tmp_path))(small, 80, 64)
    assert r.extractor == "hed" and "fallback" not in r.note.lower() and str(tmp_path) in r.note
    assert r.image.size == (80, 64)


def test_unreadable_weights_fall_back_and_say_why(tmp_path):
    (tmp_path / "ControlNetHED.pth").write_bytes(b"not a checkpoint")
    r = SoftEdgeMap(annotators=str(tmp_path))(data.coffee(), 96, 64)
    assert r.extractor == "sobel-fallback" and "would not load" in r.note


# --- pose -----------------------------------------------------------------------------------------------------------

LIMB_COLOURS = {tuple(int(c * 0.6) for c in col) for col in COLORS}
ALL_POSE_COLOURS = LIMB_COLOURS | {tuple(col) for col in COLORS} | {(0, 0, 0)}


def test_draw_openpose_uses_the_openpose_colours():
    kps = [None] * 18
    kps[1], kps[2] = (0.5, 0.5), (0.25, 0.5)  # neck, right shoulder: limb 0 (red at 60%)
    m = draw_openpose([kps], 200, 100)
    assert tuple(m[50, 75]) == (153, 0, 0)  # middle of the limb
    assert tuple(m[50, 100]) == (255, 85, 0) and tuple(m[50, 50]) == (255, 170, 0)  # keypoints: full colour
    assert {tuple(c) for c in m.reshape(-1, 3)} <= ALL_POSE_COLOURS


def test_pose_on_astronaut_draws_an_openpose_skeleton(tmp_path):
    pytest.importorskip("mediapipe")
    r = PoseMap(annotators=str(tmp_path))(data.astronaut(), 512, 512)  # empty folder: the offline path
    assert r.extractor == "mediapipe" and "1 person" in r.note and "body_pose_model.pth" in r.note
    m = arr(r)
    assert 0.002 < (m.max(-1) > 0).mean() < 0.2
    assert {tuple(c) for c in m.reshape(-1, 3)} <= ALL_POSE_COLOURS, "only OpenPose colours, no blending"
    assert (m == (153, 0, 0)).all(-1).sum() > 50, "neck-to-right-shoulder limb"
    nose, r_sh, l_sh = (colour_centroid(m, c) for c in ((255, 0, 0), (255, 170, 0), (85, 255, 0)))
    assert r_sh[0] < nose[0] < l_sh[0], "she faces the camera: her right shoulder is on the image's left"
    assert nose[1] < min(r_sh[1], l_sh[1]) and nose[1] < 256


@pytest.mark.parametrize("picture", ["coffee", "blank"])
def test_no_person_is_an_error_not_a_blank_map(tmp_path, picture):
    pytest.importorskip("mediapipe")
    img = data.coffee() if picture == "coffee" else np.zeros((256, 256, 3), np.uint8)
    with pytest.raises(HyperrealError, match="No person found"):
        PoseMap(annotators=str(tmp_path))(img, 256, 256)


def test_no_pose_detector_at_all_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # import mediapipe -> ImportError
    with pytest.raises(HyperrealError) as e:
        make_condition("pose", data.astronaut(), 256, 256, annotators=str(tmp_path))
    msg = str(e.value)
    assert "No pose detector" in msg and "mediapipe" in msg and C.ANNOTATORS_ENV in msg


def fake_openpose(people):
    Kp = SimpleNamespace
    poses = [SimpleNamespace(body=SimpleNamespace(keypoints=[Kp(x=p[0], y=p[1]) if p else None for p in kps]))
             for kps in people]
    return SimpleNamespace(detect_poses=lambda rgb: poses)


def test_openpose_path_when_body_weights_are_there(tmp_path, monkeypatch):
    (tmp_path / "body_pose_model.pth").write_bytes(b"")
    kps = [(0.5, 0.2), (0.5, 0.35), (0.4, 0.35), (0.35, 0.5), None, (0.6, 0.35)] + [None] * 12
    monkeypatch.setattr(C, "_load_annotator", lambda kind, path: fake_openpose([kps]))
    r = PoseMap(annotators=str(tmp_path))(data.astronaut(), 256, 256)
    assert r.extractor == "openpose" and str(tmp_path) in r.note
    assert (arr(r) == (153, 0, 0)).all(-1).sum() > 20
    monkeypatch.setattr(C, "_load_annotator", lambda kind, path: fake_openpose([]))
    with pytest.raises(HyperrealError, match=r"No person found.*openpose"):
        PoseMap(annotators=str(tmp_path))(data.astronaut(), 256, 256)


# --- registry -------------------------------------------------------------------------------------------------------

def test_registry_and_make_condition():
    assert set(EXTRACTORS) == {"canny", "softedge", "pose", "uploaded"}
    assert all(cls.name == key and cls.label for key, cls in EXTRACTORS.items())
    r = make_condition("canny", data.camera(), 128, 64, "crop and resize", low=50, high=150)
    assert r.image.size == (128, 64) and "50/150" in r.note
    with pytest.raises(HyperrealError, match="Unknown condition kind 'depth'.*canny"):
        make_condition("depth", data.camera(), 64, 64)
    with pytest.raises(HyperrealError, match="Bad settings for canny"):
        make_condition("canny", data.camera(), 64, 64, treshold=3)
    with pytest.raises(HyperrealError, match="no image"):
        make_condition("canny", None, 64, 64)
