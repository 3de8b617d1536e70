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

from relayrl_runtime import cli, errors, registry
from relayrl_runtime.inference import model


def test_the_same_files_pack_to_the_same_bytes(models: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(models["onnx"], copy)
    first = registry.pack(copy)[0]
    time.sleep(1.1)  # gzip and tar both keep times, to the second
    for path in copy.iterdir():
        os.utime(path)
    assert registry.pack(copy)[0] == first
    assert registry.digest_of(first) == registry.digest_of(registry.pack(copy)[0])


def test_a_linked_graph_is_packed_as_its_content(models: dict[str, Path], tmp_path: Path) -> None:
    linked = tmp_path / "linked"
    linked.mkdir()
    meta = model.read_metadata(models["onnx"])
    for path in models["onnx"].iterdir():
        if path.name == meta.graph_file():
            (linked / path.name).symlink_to(path)
        else:
            shutil.copy(path, linked / path.name)
    with tarfile.open(fileobj=io.BytesIO(registry.pack(linked)[0]), mode="r:gz") as tar:
        graph = tar.getmember(meta.graph_file())
        assert graph.isfile()
        assert graph.size == (models["onnx"] / meta.graph_file()).stat().st_size
    # And it unpacks into a directory a runtime loads from.
    out = registry.unpack(registry.pack(linked)[0], tmp_path / "out")
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


def _write_version(directory: Path, version: int, graph: bytes) -> None:
    """What a trainer does: the graph first, the metadata last."""
    meta = model.read_metadata(directory)
    (directory / meta.graph_file()).write_bytes(graph)
    model.write_metadata(directory, meta.model_copy(update={"version": version}))


def _archived(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_a_directory_written_while_it_is_read_is_read_again(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer writing the next version while `model push` reads: the object must not
    be labelled with one version and hold another's files."""
    directory = tmp_path / "m"
    shutil.copytree(models["onnx"], directory)
    meta = model.read_metadata(directory)
    new_graph = (directory / meta.graph_file()).read_bytes() + b"v2"  # packed, not loaded
    real_read = Path.read_bytes
    writes = []

    def read_bytes(self: Path) -> bytes:
        data = real_read(self)
        if self.name == meta.graph_file() and not writes:
            writes.append(self)
            time.sleep(0.01)  # a new modification time, whatever the clock's step
            _write_version(directory, meta.version + 1, new_graph)
        return data

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    data, packed = registry.pack(directory)
    assert writes  # the trainer did write in the middle of the first read
    assert packed.version == meta.version + 1
    archived = _archived(data)
    assert model.parse_metadata(archived[model.METADATA_FILE], "archive").version == packed.version
    assert archived[meta.graph_file()] == new_graph


def test_a_directory_that_keeps_changing_is_refused(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "m"
    shutil.copytree(models["onnx"], directory)
    graph = directory / model.read_metadata(directory).graph_file()
    real_read = Path.read_bytes
    touched = iter(range(1, 1000))

    def read_bytes(self: Path) -> bytes:
        if self == graph:
            stamp = next(touched) * 1_000_000_000
            os.utime(graph, ns=(stamp, stamp))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(registry, "PACK_RETRY_SECONDS", 0.0)
    with pytest.raises(
        errors.ModelMetadataError, match=r"files changed while they were read, 5 times"
    ):
        registry.pack(directory)


def test_push_refuses_a_model_that_does_not_load_before_connecting(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated graph would become the newest version, and every pod that starts on
    it would exit: `model push` loads it first, as a runtime would."""
    broken = tmp_path / "broken"
    shutil.copytree(models["onnx"], broken)
    graph = broken / model.read_metadata(broken).graph_file()
    graph.write_bytes(graph.read_bytes()[:200])
    # Nothing listens there: a push that got past the check would say so.
    argv = ["model", "push", str(broken), "--nats", "nats://127.0.0.1:9", "--bucket", "b"]
    argv += ["--name", "cp", "--connect-timeout", "0.5"]
    assert cli.main(argv) == 2
    said = capsys.readouterr().err
    assert "not pushed; --no-check pushes without loading it here" in said
    assert "not reachable" not in said
    assert cli.main([*argv, "--no-check"]) == 2
    assert "not reachable within 0.5s" in capsys.readouterr().err


def test_a_file_renamed_away_while_the_directory_is_read_is_read_again(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer's atomic write (a temporary file renamed over the graph) landing between
    the listing and the read: the directory changed, and is read again."""
    directory = tmp_path / "m"
    shutil.copytree(models["onnx"], directory)
    graph = directory / model.read_metadata(directory).graph_file()
    new_graph = graph.read_bytes() + b"v2"
    (directory / "model.onnx.tmp").write_bytes(new_graph)
    real_read = Path.read_bytes
    monkeypatch.setattr(registry, "PACK_RETRY_SECONDS", 0.0)

    def read_bytes(self: Path) -> bytes:
        if self.name == "model.onnx.tmp":
            os.replace(self, graph)  # gone now: the read below fails
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    data, _ = registry.pack(directory)
    archived = _archived(data)
    assert archived[graph.name] == new_graph
    assert "model.onnx.tmp" not in archived
