"""Where runs live: a local folder or any pyarrow filesystem URI (`s3://bucket/prefix`),
which a multi-node cluster needs so that every node reaches the checkpoints. The driver,
the tracking, the doctor and Tune's experiments read and write through these helpers."""

from __future__ import annotations

from pathlib import Path


def storage_filesystem(storage: str):
    """(pyarrow filesystem, path) for a local folder or a URI such as s3://bucket/prefix."""
    import pyarrow.fs

    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), str(Path(storage).expanduser().resolve())


def storage_path(storage: str) -> str:
    """What Ray's RunConfig(storage_path=...) takes: an absolute folder, or the URI itself."""
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def path_exists(filesystem, path: str) -> bool:
    import pyarrow.fs

    return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_text(filesystem, path: str) -> str:
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(filesystem, path: str, text: str) -> None:
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())


def is_local(filesystem) -> bool:
    import pyarrow.fs

    return isinstance(filesystem, pyarrow.fs.LocalFileSystem)


def local_copy(location: str, folder: str) -> str:
    """A local path of the file at `location` (a path or URI): the file itself where it is
    local, else a copy of it in `folder`."""
    filesystem, path = storage_filesystem(location)
    if is_local(filesystem):
        return path
    target = Path(folder) / Path(path).name
    with filesystem.open_input_stream(path) as stream, open(target, "wb") as file:
        while chunk := stream.read(1 << 24):
            file.write(chunk)
    return str(target)


def copy_file(source: str, target: str) -> None:
    """Copy one file from `source` to `target`, each a local path or a URI (up to s3:// or back);
    the target's folder is made where missing."""
    import posixpath

    import pyarrow.fs

    source_filesystem, source_path = storage_filesystem(source)
    target_filesystem, target_path = storage_filesystem(target)
    target_filesystem.create_dir(posixpath.dirname(target_path), recursive=True)
    pyarrow.fs.copy_files(
        source_path,
        target_path,
        source_filesystem=source_filesystem,
        destination_filesystem=target_filesystem,
    )
