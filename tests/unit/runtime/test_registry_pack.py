"""Packing a model directory for the registry: the same files give the same bytes,
links are packed as what they point at, and a directory no runtime could load is
refused before anything is sent."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from relayrl_runtime import errors, registry
from relayrl_runtime.inference import model


def test_the_same_files_pack_to_the_same_bytes(models: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(models["onnx"], copy)
    first = registry.pack(copy)
    time.sleep(1.1)  # gzip and tar both keep times, to the second
    for path in copy.iterdir():
        os.utime(path)
    assert registry.pack(copy) == first
    assert registry.digest_of(first) == registry.digest_of(registry.pack(copy))


def test_a_linked_graph_is_packed_as_its_content(models: dict[str, Path], tmp_path: Path) -> None:
    linked = tmp_path / "linked"
    linked.mkdir()
    meta = model.read_metadata(models["onnx"])
    for path in models["onnx"].iterdir():
        if path.name == meta.graph_file():
            (linked / path.name).symlink_to(path)
        else:
            shutil.copy(path, linked / path.name)
    with tarfile.open(fileobj=io.BytesIO(registry.pack(linked)), mode="r:gz") as tar:
        graph = tar.getmember(meta.graph_file())
        assert graph.isfile()
        assert graph.size == (models["onnx"] / meta.graph_file()).stat().st_size
    # And it unpacks into a directory a runtime loads from.
    out = registry.unpack(registry.pack(linked), tmp_path / "out")
    assert model.read_metadata(out).version == meta.version


def test_a_directory_without_its_graph_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(models["onnx"], broken)
    (broken / model.read_metadata(broken).graph_file()).unlink()
    with pytest.raises(errors.ModelMetadataError, match=r"file: expected 'model\.onnx'"):
        registry.pack(broken)


@pytest.mark.parametrize(
    ("bucket", "name", "field"),
    [
        ("my.models", "cp", "--bucket"),
        ("models", "team/cp", "--name"),
        ("models", "cart pole", "--name"),
        ("models", "cp@v2", "--name"),
    ],
)
def test_names_the_registry_cannot_take_are_refused(bucket: str, name: str, field: str) -> None:
    with pytest.raises(errors.InvalidArgumentError, match=f"^{field}: expected"):
        registry.check_names(bucket, name)
    registry.check_names("models", "cart-pole_v.2")
