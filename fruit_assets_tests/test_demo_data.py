import itertools
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fruit_assets
from fruit_assets_dev.demo_data import (
    DEFAULT_IMAGES_PER_LABEL,
    DEFAULT_LABELS,
    demo_labels,
    generate_demo_set,
    main,
)


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> tuple[pathlib.Path, list[pathlib.Path]]:
    root = tmp_path_factory.mktemp("default")
    return root, generate_demo_set(root)


def test_small_set_layout(tmp_path):
    paths = generate_demo_set(tmp_path, labels=5, images_per_label=2)
    labels = demo_labels(5)
    assert paths == [tmp_path / label / f"r0_{n}.jpg" for label in labels for n in range(2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(labels)
    for p in paths:
        with Image.open(p) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (100, 100))
            a = np.asarray(img)
        for corner in (a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]):
            assert corner.min() >= 240, f"{p}: corner {corner} is not white"


def test_default_sizes(default_set):
    root, paths = default_set
    assert len(paths) == DEFAULT_LABELS * DEFAULT_IMAGES_PER_LABEL == 72
    assert len([d for d in root.iterdir() if d.is_dir()]) == DEFAULT_LABELS
    assert all(p.is_file() for p in paths)


def test_same_arguments_give_identical_bytes(tmp_path):
    a = _files_after(tmp_path / "a", labels=4, images_per_label=2, seed=7)
    b = _files_after(tmp_path / "b", labels=4, images_per_label=2, seed=7)
    assert a == b and len(a) == 8
    assert _files_after(tmp_path / "c", labels=4, images_per_label=2, seed=8) != a


def _files_after(root: pathlib.Path, **kwargs) -> dict[str, bytes]:
    generate_demo_set(root, **kwargs)
    return _files(root)


def test_more_images_or_labels_keep_the_first_ones(tmp_path):
    small = _files_after(tmp_path / "small", labels=3, images_per_label=2)
    big = _files_after(tmp_path / "big", labels=5, images_per_label=4)
    assert len(big) == 20
    assert {k: big[k] for k in small} == small


def test_rerun_overwrites_identically_and_keeps_other_files(tmp_path):
    first = _files_after(tmp_path, labels=2, images_per_label=2)
    other = tmp_path / demo_labels(1)[0] / "keep.txt"
    other.write_text("mine")
    (tmp_path / demo_labels(1)[0] / "r0_0.jpg").write_bytes(b"stale")
    assert _files_after(tmp_path, labels=2, images_per_label=2) == first
    assert other.read_text() == "mine"


def _features(path: pathlib.Path) -> np.ndarray:
    """Mean colour of the fruit pixels and the fruit's area in % of the image."""
    a = np.asarray(Image.open(path), dtype=np.float64)
    fruit = (a < 200).any(axis=-1)
    return np.r_[a[fruit].mean(axis=0), 100 * fruit.mean()]


def test_labels_look_different(default_set):
    _, paths = default_set
    feats = np.array([_features(p) for p in paths]).reshape(DEFAULT_LABELS, DEFAULT_IMAGES_PER_LABEL, 4)
    centroids = feats.mean(axis=1)
    names = demo_labels(DEFAULT_LABELS)
    for i, j in itertools.combinations(range(DEFAULT_LABELS), 2):
        colour = np.linalg.norm(centroids[i, :3] - centroids[j, :3])
        area = abs(centroids[i, 3] - centroids[j, 3])
        assert colour >= 20 or area >= 10, f"{names[i]} vs {names[j]}: colour {colour:.1f}, area {area:.1f}"
    # Jitter stays small: every image is closest to its own label's centroid.
    dists = np.linalg.norm(feats[:, :, None, :] - centroids[None, None], axis=-1)
    assert (dists.argmin(axis=-1) == np.arange(DEFAULT_LABELS)[:, None]).all()


def test_images_within_a_label_differ(default_set):
    _, paths = default_set
    for i in range(DEFAULT_LABELS):
        label_paths = paths[i * DEFAULT_IMAGES_PER_LABEL : (i + 1) * DEFAULT_IMAGES_PER_LABEL]
        blobs = {p.read_bytes() for p in label_paths}
        assert len(blobs) == DEFAULT_IMAGES_PER_LABEL


def test_label_names():
    names = demo_labels(500)
    assert len(set(names)) == 500
    assert names[:DEFAULT_LABELS] == demo_labels(DEFAULT_LABELS)
    assert {"Apple Red", "Banana", "Grape Blue"} <= set(names[:DEFAULT_LABELS])
    assert names[DEFAULT_LABELS] == "Apple Red 2"
    assert all(n == n.strip() and "/" not in n for n in names)
    assert demo_labels(0) == []
    with pytest.raises(ValueError):
        demo_labels(-1)


def test_extra_labels_render(tmp_path):
    paths = generate_demo_set(tmp_path, labels=DEFAULT_LABELS + 3, images_per_label=1)
    assert [p.parent.name for p in paths[-3:]] == demo_labels(DEFAULT_LABELS + 3)[-3:]
    assert Image.open(paths[-1]).size == (100, 100)


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--labels", "3", "--images-per-label", "2", "--seed", "1"]) == 0
    assert len(list(tmp_path.rglob("r0_*.jpg"))) == 6
    out = capsys.readouterr().out
    assert "6 images" in out and str(tmp_path) in out


def test_cli_as_module(tmp_path):
    repo = pathlib.Path(fruit_assets.__file__).resolve().parent.parent
    out = tmp_path / "set"
    proc = subprocess.run(
        [sys.executable, "-m", "fruit_assets_dev.demo_data", "--out", str(out), "--labels", "2",
         "--images-per-label", "1"],
        cwd=repo, capture_output=True, text=True, check=True,
    )
    assert "2 images" in proc.stdout
    assert len(list(out.rglob("r0_0.jpg"))) == 2
