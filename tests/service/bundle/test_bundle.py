import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from service.bundle.format import (
    ENCODER,
    FORMAT_VERSION,
    INDEX,
    ITEM_EMBEDDINGS,
    MANIFEST,
    REQUIRED_FILES,
    BundleError,
    complete_versions,
    latest_version,
    publish,
    republish,
)
from service.bundle.load import load_bundle


@pytest.fixture
def copy_of(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle's model store, safe to damage."""
    root = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_bundle, root / "1")
    return root


def test_loads_and_serves_shapes(tiny_bundle):
    b = load_bundle(tiny_bundle)
    m = b.manifest
    assert m.version == 1 and m.name == "tiny" and m.format_version == FORMAT_VERSION
    assert set(m.files) == set(REQUIRED_FILES)
    interests = b.encode(np.zeros((3, m.maxlen), dtype=np.int64))
    assert interests.shape == (3, m.interests, m.dim) and interests.dtype == np.float32
    scores, rows = b.search(interests[0], 5)
    assert rows.shape == (m.interests, 5) and rows.max() < m.item_count
    assert len(b.item_ids) == m.item_count == len(b.popularity)


def test_truncated_file_is_refused_naming_it(copy_of):
    target = copy_of / "1" / ENCODER
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"encoder.onnx: 100 bytes, manifest says \d+"):
        load_bundle(copy_of / "1")


def test_tampered_file_is_refused_naming_it(copy_of):
    target = copy_of / "1" / ITEM_EMBEDDINGS
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="item_embeddings.npy: checksum mismatch"):
        load_bundle(copy_of / "1")


def test_missing_file_and_broken_manifest_are_named(copy_of):
    (copy_of / "1" / INDEX).unlink()
    with pytest.raises(BundleError, match="items.faiss: missing"):
        load_bundle(copy_of / "1")
    (copy_of / "1" / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        load_bundle(copy_of / "1")
    (copy_of / "1" / MANIFEST).write_text(json.dumps({"format_version": 1}))
    with pytest.raises(BundleError, match="manifest.json: invalid manifest"):
        load_bundle(copy_of / "1")


def test_half_written_version_is_never_the_newest(copy_of):
    half = copy_of / "2"
    shutil.copytree(copy_of / "1", half)
    (half / MANIFEST).unlink()  # the manifest is written last: this one never finished
    (copy_of / ".staging-abc").mkdir()
    assert complete_versions(copy_of) == [1]
    assert latest_version(copy_of) == 1


def test_publish_takes_the_next_version_and_cleans_up_on_failure(copy_of, tiny_bundle):
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    keep = {k: v for k, v in manifest.items()
            if k not in ("files", "version", "name", "created", "format_version")}

    (copy_of / "2").mkdir()  # an abandoned, incomplete version still reserves its number
    path = republish(tiny_bundle, copy_of.parent, "tiny", {"note": "copy"})
    assert path == copy_of / "3" and load_bundle(path).version == 3
    assert load_bundle(path).manifest.extra["note"] == "copy"

    def fail(staging):
        (staging / ENCODER).write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        publish(copy_of.parent, "tiny", fail, keep)
    assert sorted(p.name for p in copy_of.iterdir()) == ["1", "2", "3"]

    with pytest.raises(BundleError, match="missing encoder.onnx"):
        publish(copy_of.parent, "tiny", lambda staging: None, keep)


def test_bundle_module_does_not_import_torch():
    code = ("import sys, service.bundle.load, service.serving.recommender, service.app; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_bundle_format_is_light():
    """The format module is what the trainer's encoders and the service's settings import: it
    must not pull in numpy, FAISS or onnxruntime."""
    code = ("import sys, service.bundle.format; "
            "print(sorted(m for m in ('numpy', 'faiss', 'onnxruntime', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_field_postings_outside_the_catalogue_are_refused_naming_them(copy_of):
    """items.json's filter postings are checked at load (verify=False: a bundle published by
    a faulty exporter has matching checksums)."""
    from service.bundle.format import ITEMS

    path = copy_of / "1" / ITEMS
    items = json.loads(path.read_text())
    assert items["fields"]["category"]  # the tiny bundle carries its categories
    items["fields"]["category"]["topic-0"].append(10**6)
    path.write_text(json.dumps(items))
    with pytest.raises(BundleError, match="items.json: field 'category' value 'topic-0' lists "
                                          "rows outside the catalogue"):
        load_bundle(copy_of / "1", verify=False)
    items["fields"] = {"category": ["not", "postings"]}
    path.write_text(json.dumps(items))
    with pytest.raises(BundleError, match="items.json: unreadable id map"):
        load_bundle(copy_of / "1", verify=False)
