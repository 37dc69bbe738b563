"""Your own images: image folders (PNG exact, JPEG, grey/RGBA/palette), the resize + centre crop,
zips (and the archives they refuse), .npz (and pickles it refuses), open_data's splits; written
from real CIFAR-10 test images."""
import zipfile

import numpy as np
import pytest
from PIL import Image

from netquant.data import DataError, ImageSet, Splits, load_images, open_data
from netquant.data import folder as folder_mod
from netquant.data.imageset import crop_box, resized_dims

CLASSES3 = ("cat", "dog", "ship")   # CIFAR-10 labels 3, 5, 8


def _pick(cifar, per_class=3):
    """The first ``per_class`` test images of each of CLASSES3, as (images, CIFAR labels)."""
    idx = np.concatenate([np.flatnonzero(cifar.test.labels == cifar.test.class_names.index(c))[:per_class]
                          for c in CLASSES3])
    return cifar.test.images[idx], cifar.test.labels[idx]


def _write(root, images, labels, names, fmt="png", **save):
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / names[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:03d}.{fmt}", **save)


@pytest.fixture
def png_folder(cifar, tmp_path):
    images, labels = _pick(cifar)
    _write(tmp_path / "imgs", images, labels, cifar.test.class_names)
    return tmp_path / "imgs", images, np.repeat([0, 1, 2], 3)


def test_png_folder_reads_back_exactly(png_folder):
    root, images, labels = png_folder
    (root / "README.txt").write_text("not an image")
    (root / "dog" / ".DS_Store").write_bytes(b"\0")
    s = load_images(root)
    assert isinstance(s, ImageSet) and s.class_names == CLASSES3 and s.shape == (3, 32, 32)
    assert np.array_equal(s.images, images) and np.array_equal(s.labels, labels)   # PNG: every pixel
    assert s.source == f"image folder {root}: 9 images, 3 classes, 1 other files ignored, 1 hidden files ignored"
    assert s.take([0, 4], "two").class_names == CLASSES3


def test_class_names_give_the_model_order(png_folder):
    root, images, labels = png_folder
    order = ("ship", "truck", "cat", "dog")   # the model's order; truck has no folder here
    s = load_images(root, class_names=order)
    assert s.class_names == order and s.labels.tolist() == [2, 2, 2, 3, 3, 3, 0, 0, 0]
    assert "3 classes of 4" in s.source
    with pytest.raises(DataError, match=r"class folder\(s\) dog not among the 2 class names given"):
        load_images(root, class_names=("cat", "ship"))


def test_jpeg_grey_rgba_and_palette_become_rgb(cifar, tmp_path):
    images, labels = _pick(cifar, 1)
    root = tmp_path / "mixed"
    _write(root, images, labels, cifar.test.class_names, fmt="jpg", quality=95)
    rgb = images[0].transpose(1, 2, 0)
    Image.fromarray(rgb).convert("L").save(root / "cat" / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), "RGBA").save(root / "dog" / "rgba.png")
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(root / "ship" / "palette.png")
    s = load_images(root)
    assert s.images.shape == (6, 3, 32, 32) and s.labels.tolist() == [0, 0, 1, 1, 2, 2]
    jpeg, grey, rgba, palette = s.images[0], s.images[1], s.images[3], s.images[5]
    assert np.abs(jpeg.astype(int) - images[0]).mean() < 4           # JPEG q95: close, not exact
    g = np.asarray(Image.fromarray(rgb).convert("L"))
    assert all(np.array_equal(grey[c], g) for c in range(3))          # grey -> R = G = B
    assert np.array_equal(rgba, images[0])                            # alpha dropped
    assert np.array_equal(palette, np.asarray(pal.convert("RGB")).transpose(2, 0, 1))


def test_resize_and_centre_crop_follow_torchvision():
    # torchvision Resize(256) on a 500x375 (W x H) photo: the short side 375 -> 256, the long one
    # int(256 * 500 / 375) = 341; CenterCrop(224): left = int(round((341 - 224) / 2)) = round(58.5) = 58
    assert resized_dims(375, 500, (224, 224), 256) == (256, 341)
    assert crop_box(256, 341, (224, 224)) == (58, 16, 282, 240)
    assert resized_dims(500, 375, (224, 224), 256) == (341, 256)       # portrait
    assert resized_dims(375, 500, (224, 224)) == (224, 298)            # default: just cover the crop
    assert resized_dims(32, 32, (32, 32)) == (32, 32)
    assert resized_dims(40, 100, (20, 60)) == (24, 60)                 # non-square: the width needs more
    with pytest.raises(ValueError, match="at least the crop size"):
        resized_dims(375, 500, (224, 224), 200)


def test_folder_resize_equals_pillow_and_the_array_path(cifar, tmp_path):
    images, labels = _pick(cifar, 1)
    root = tmp_path / "big"
    # 3 photos of 48 (H) x 40 (W): upscaled CIFAR images, not square
    big = np.stack([np.asarray(Image.fromarray(im.transpose(1, 2, 0)).resize((40, 48), Image.BILINEAR))
                    .transpose(2, 0, 1) for im in images])
    _write(root, big, labels, cifar.test.class_names)
    s = load_images(root, size=(24, 24), resize=28)
    # by hand: the short side 40 -> 28, the long 48 -> int(28 * 48 / 40) = 33; crop top round(4.5) = 4
    ref = Image.fromarray(big[0].transpose(1, 2, 0)).resize((28, 33), Image.BILINEAR).crop((2, 4, 26, 28))
    assert np.array_equal(s.images[0], np.asarray(ref).transpose(2, 0, 1))
    assert s.source.endswith("3 images, 3 classes, resized 28 + centre crop 24")
    arr = ImageSet(big, np.arange(3), "arrays").resized((24, 24), 28)
    assert np.array_equal(arr.images, s.images) and arr.source == "arrays, resized 28 + centre crop 24"
    with pytest.raises(DataError, match=r"images differ in size: cat/000.png is 48x40, cat/x.png is 32x32"):
        Image.fromarray(images[0].transpose(1, 2, 0)).save(root / "cat" / "x.png")
        load_images(root)


def test_errors_name_the_file_or_class(png_folder):
    root, _, _ = png_folder
    bad = root / "dog" / "zz_broken.png"
    bad.write_bytes((root / "dog" / "003.png").read_bytes()[:200])   # a truncated PNG
    with pytest.raises(DataError, match=f"{bad}: not a readable PNG or JPEG image"):
        load_images(root)
    bad.write_bytes(b"GIF89a not really")
    with pytest.raises(DataError, match="zz_broken.png: not a readable PNG or JPEG"):
        load_images(root)
    bad.unlink()
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"class folder 'empty' holds no PNG or JPEG images \(1 other files\)"):
        load_images(root)
    (root / "empty" / "notes.txt").unlink()
    (root / "empty").rmdir()
    Image.new("RGB", (32, 32)).save(root / "loose.png")
    with pytest.raises(DataError, match="image files directly in the folder.*expected one sub-folder per class"):
        load_images(root)
    with pytest.raises(DataError, match="no such file or folder"):
        load_images(root / "missing")


def _zip(root, target, prefix="images/", extra=()):
    with zipfile.ZipFile(target, "w") as z:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                z.write(p, prefix + p.relative_to(root).as_posix())
        for name, data in extra:
            z.writestr(name, data)
    return target


def test_zip_reads_like_the_folder_and_refuses_traversal(png_folder, tmp_path):
    root, images, labels = png_folder
    s = load_images(_zip(root, tmp_path / "imgs.zip"))   # a zip of the folder: one top folder
    assert np.array_equal(s.images, images) and np.array_equal(s.labels, labels) and s.class_names == CLASSES3
    assert s.source.startswith(f"zip {tmp_path / 'imgs.zip'}, folder images: 9 images, 3 classes")
    flat = load_images(_zip(root, tmp_path / "flat.zip", prefix=""))
    assert np.array_equal(flat.images, images)
    for evil in ("../evil.png", "images/cat/../../../evil.png", "/etc/evil.png", "C:/evil.png"):
        z = _zip(root, tmp_path / "evil.zip", extra=[(evil, b"x")])
        with pytest.raises(DataError, match="path traversal"):
            load_images(z)


def test_zip_limits(png_folder, tmp_path, monkeypatch):
    root, _, _ = png_folder
    z = _zip(root, tmp_path / "imgs.zip")
    monkeypatch.setattr(folder_mod, "ZIP_MAX_MEMBER_BYTES", 100)
    with pytest.raises(DataError, match=r"bytes uncompressed, more than the limit of 100"):
        load_images(z)
    monkeypatch.setattr(folder_mod, "ZIP_MAX_MEMBER_BYTES", 1 << 20)
    monkeypatch.setattr(folder_mod, "ZIP_MAX_MEMBERS", 5)
    with pytest.raises(DataError, match="9 members, more than the limit of 5"):
        load_images(z)
    (tmp_path / "junk.zip").write_bytes(b"PK not a zip")
    with pytest.raises(DataError, match="junk.zip: not a readable zip file"):
        load_images(tmp_path / "junk.zip")


def test_npz_both_layouts_and_no_pickle(cifar, tmp_path):
    images, labels = cifar.test.images[:6], cifar.test.labels[:6]
    np.savez(tmp_path / "nchw.npz", images=images, labels=labels, class_names=np.array(cifar.test.class_names))
    np.savez(tmp_path / "nhwc.npz", images=images.transpose(0, 2, 3, 1), labels=labels.astype(np.int32))
    a, b = load_images(tmp_path / "nchw.npz"), load_images(tmp_path / "nhwc.npz")
    assert np.array_equal(a.images, images) and np.array_equal(b.images, images)
    assert np.array_equal(b.labels, labels) and b.labels.dtype == np.int64
    assert a.class_names == cifar.test.class_names and b.class_names is None
    assert "(NCHW)" in a.source and "(NHWC)" in b.source
    assert load_images(tmp_path / "nhwc.npz", size=(16, 16)).images.shape == (6, 3, 16, 16)
    np.savez(tmp_path / "pickle.npz", images=images, labels=labels,
             class_names=np.array(list(cifar.test.class_names), dtype=object))
    with pytest.raises(DataError, match="pickle.npz: cannot be read without unpickling"):
        load_images(tmp_path / "pickle.npz")
    np.savez(tmp_path / "float.npz", images=images.astype(np.float32), labels=labels)
    with pytest.raises(DataError, match="expected dtype uint8"):
        load_images(tmp_path / "float.npz")
    np.savez(tmp_path / "keys.npz", x=images, y=labels)
    with pytest.raises(DataError, match="expected arrays 'images' and 'labels'.*found x, y"):
        load_images(tmp_path / "keys.npz")


def test_open_data_splits_single_sets_and_cifar(png_folder, cifar, tmp_path):
    root, images, labels = png_folder
    one = open_data(root)
    assert isinstance(one, Splits) and one.train is one.test and len(one.test) == 9
    split = tmp_path / "split"
    _write(split / "train", images, labels, CLASSES3)
    _write(split / "val", images[3:], labels[3:], CLASSES3)          # val has no cat
    d = open_data(split, size=(16, 16))
    assert d.train.class_names == CLASSES3 and d.test.labels.tolist() == [1, 1, 1, 2, 2, 2]   # train's numbering
    assert d.test.images.shape == (6, 3, 16, 16) and "split/val: 6 images, 2 classes of 3, resized 16" in d.test.source
    z = open_data(_zip(split, tmp_path / "split.zip", prefix="data/"))
    assert np.array_equal(z.test.images, images[3:]) and "folder data/val" in z.test.source
    with pytest.raises(DataError, match="holds train/ and val/ splits.*use open_data"):
        load_images(split)
    s = open_data("sample", size=(40, 40))
    assert s.test.images.shape == (1000, 3, 40, 40) and s.test.class_names[3] == "cat"
    assert s.test.source.endswith("resized 40 + centre crop 40")
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        open_data(tmp_path / "nowhere")
