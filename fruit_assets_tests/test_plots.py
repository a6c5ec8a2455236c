"""The PNG plots for the Dagster UI (fruit_assets.pipeline.plots): sizes, edge cases, embedding and storage."""

import io
import uuid

import numpy as np
import pytest
from dagster import AssetKey
from PIL import Image

from fruit_assets import storage
from fruit_assets.pipeline import plots
from fruit_assets.storage.resource import Storage
from fruit_assets_dev.demo_data import demo_labels, generate_demo_set
from fruit_assets_tests.support import TEST_BUCKET

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def open_png(data: bytes) -> Image.Image:
    assert isinstance(data, bytes) and data.startswith(PNG_SIGNATURE)
    Image.open(io.BytesIO(data)).verify()  # complete and not corrupt
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def assert_plot(data: bytes) -> Image.Image:
    image = open_png(data)
    assert image.size == (600, 400)
    assert len(data) < 200_000  # small enough to embed in metadata
    assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # not blank
    return image


def spectrum(k: int, total: float = 0.94) -> np.ndarray:
    values = 1.0 / np.arange(1, k + 1)
    return values / values.sum() * total


@pytest.mark.parametrize(
    ("variance", "k", "target"),
    [
        (spectrum(50), 50, 0.95),  # the default config
        (np.array([0.7]), 1, 0.95),  # k=1
        (spectrum(10), 4, None),  # no target; spectrum longer than k
        (spectrum(3), 5, 0.5),  # k beyond the spectrum
        (spectrum(256, 0.99), 180, 0.95),  # many components
    ],
)
def test_explained_variance_plot(variance, k, target):
    assert_plot(plots.explained_variance_plot(variance, k, target))


@pytest.mark.parametrize(("variance", "k"), [(np.array([]), 1), (np.array([0.5, np.nan]), 1), (spectrum(3), 0)])
def test_explained_variance_plot_rejects_bad_input(variance, k):
    with pytest.raises(ValueError):
        plots.explained_variance_plot(variance, k, 0.95)


def labelled_points(labels: int, per_label: int = 3, dims: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    names = [name for name in demo_labels(labels) for _ in range(per_label)]
    centres = np.repeat(rng.normal(size=(labels, dims)) * 4, per_label, axis=0)
    return centres + rng.normal(size=(len(names), dims)), names


@pytest.mark.parametrize("labels", [1, 24, 60, 150])
def test_pca_scatter_plot(labels):
    points, names = labelled_points(labels)
    assert_plot(plots.pca_scatter_plot(points, names))


def test_pca_scatter_plot_with_one_component_and_no_points():
    points, names = labelled_points(5, dims=1)
    assert_plot(plots.pca_scatter_plot(points, names))  # k=1: (n, 1)
    assert_plot(plots.pca_scatter_plot(points[:, 0], names))  # k=1: (n,)
    open_png(plots.pca_scatter_plot(np.zeros((0, 2)), []))


def test_pca_scatter_plot_checks_lengths():
    with pytest.raises(ValueError, match="3 points but 2 labels"):
        plots.pca_scatter_plot(np.zeros((3, 2)), ["a", "b"])


def test_label_colors_are_distinct():
    for count in (1, 10, 20, 24, 60, 150):
        colors = plots.label_colors(count)
        assert len(colors) == count
        assert len({tuple(np.round(color, 3)) for color in colors}) == count


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sheet_images")
    return [(path.parent.name, path.read_bytes()) for path in generate_demo_set(root, labels=5, images_per_label=4)]


def cell_pixels(sheet: Image.Image, row: int, column: int, thumb: int = 64) -> np.ndarray:
    left = plots.SHEET_PAD + plots.SHEET_LABEL_WIDTH + column * (thumb + plots.SHEET_PAD)
    top = plots.SHEET_PAD + row * (thumb + plots.SHEET_PAD)
    return np.asarray(sheet.convert("RGB"))[top : top + thumb, left : left + thumb]


def test_contact_sheet_has_a_row_per_label(demo_files):
    sheet = open_png(plots.contact_sheet(demo_files, per_label=3, thumb=64))
    assert sheet.size == plots.contact_sheet_size(labels=5, per_label=3, thumb=64)
    assert sheet.height == plots.SHEET_PAD + 5 * (64 + plots.SHEET_PAD)
    for row in range(5):
        for column in range(3):  # 4 images per label, 3 shown
            cell = cell_pixels(sheet, row, column)
            assert (cell < 200).any(axis=2).mean() > 0.05, f"row {row} column {column} looks empty"
    label_column = np.asarray(sheet.convert("L"))[:, : plots.SHEET_LABEL_WIDTH]
    assert (label_column < 128).any()  # the label names are drawn


def test_contact_sheet_rows_are_sorted_by_label_and_keep_input_order():
    def solid(color):
        buffer = io.BytesIO()
        Image.new("RGB", (30, 20), color).save(buffer, format="PNG")
        return buffer.getvalue()

    red, green, blue = solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))
    sheet = open_png(plots.contact_sheet([("b", blue), ("a", red), ("b", green)], per_label=2, thumb=32))
    assert sheet.size == plots.contact_sheet_size(2, per_label=2, thumb=32)
    centre = lambda row, column: tuple(cell_pixels(sheet, row, column, thumb=32)[16, 16])  # noqa: E731
    assert centre(0, 0) == (255, 0, 0)  # row "a"
    assert centre(0, 1) == plots.SHEET_BACKGROUND  # "a" has one image
    assert centre(1, 0) == (0, 0, 255) and centre(1, 1) == (0, 255, 0)  # row "b", in input order


def test_contact_sheet_shows_undecodable_images_as_placeholders(demo_files):
    truncated = demo_files[0][1][:200]
    images = [("Broken", b"not an image"), ("Broken", truncated), ("Broken", b""), *demo_files[:1]]
    sheet = open_png(plots.contact_sheet(images, per_label=3))
    assert sheet.size == plots.contact_sheet_size(2, per_label=3)
    for column in range(3):  # row 1: "Apple Red" sorts first
        cell = cell_pixels(sheet, 1, column)
        assert tuple(cell[5, 30]) == plots.SHEET_PLACEHOLDER


def test_contact_sheet_of_many_labels_and_of_none():
    labels = demo_labels(150)
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100), (200, 30, 30)).save(buffer, format="JPEG")
    sheet = open_png(plots.contact_sheet([(label, buffer.getvalue()) for label in labels], per_label=1, thumb=32))
    assert sheet.size == plots.contact_sheet_size(150, per_label=1, thumb=32)
    assert open_png(plots.contact_sheet([])).size == plots.contact_sheet_size(0)


def test_markdown_image_round_trips():
    png = plots.explained_variance_plot(spectrum(5), 5, 0.95)
    markdown = plots.markdown_image(png, "explained_variance_plot")
    assert markdown.startswith("![explained_variance_plot](data:image/png;base64,")
    assert markdown.endswith(")") and "\n" not in markdown
    assert plots.png_from_markdown(markdown) == png


@pytest.mark.parametrize(
    ("png", "alt"), [(b"GIF89a...", "plot"), (PNG_SIGNATURE, "a [b]"), (PNG_SIGNATURE, "two\nlines")]
)
def test_markdown_image_rejects_bad_input(png, alt):
    with pytest.raises(ValueError):
        plots.markdown_image(png, alt)


def test_plots_are_saved_beside_the_asset_tables(tmp_path):
    store = Storage(base_uri=str(tmp_path))
    png = plots.explained_variance_plot(spectrum(5), 5, 0.95)
    saved = store.save_plot(AssetKey("pca_model"), "explained_variance", png)
    assert saved.path == str(tmp_path / "_plots" / "pca_model" / "explained_variance.png")
    assert (tmp_path / "_plots" / "pca_model" / "explained_variance.png").read_bytes() == png
    assert store.save_plot(AssetKey("pca_model"), "explained_variance", png[:]).path == saved.path  # overwrite


@pytest.mark.parametrize("name", ["../escape", "/abs", ""])
def test_plots_refuse_unsafe_names(tmp_path, name):
    with pytest.raises(storage.StorageConfigError):
        Storage(base_uri=str(tmp_path)).save_plot(AssetKey([name]), "plot", PNG_SIGNATURE)


def test_plots_on_s3(s3):
    uri = f"s3://{TEST_BUCKET}/plots-{uuid.uuid4().hex[:8]}"
    png = plots.pca_scatter_plot(*labelled_points(3))
    saved = Storage(base_uri=uri).save_plot(AssetKey("reduced_features"), "pca_scatter", png)
    assert saved.uri == f"{uri}/_plots/reduced_features/pca_scatter.png"
    with saved.filesystem.open_input_stream(saved.path) as stream:
        assert stream.read() == png
