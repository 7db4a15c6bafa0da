"""The systemd units, the env examples and deploy/install.sh.

Units are checked by systemd's own tools: ``systemd-analyze verify`` must print nothing
(it only warns, exit 0, on an unknown key) and ``systemd-analyze security --offline=true``
must rate each unit at an exposure of 2.0 or less. ``verify`` insists that ExecStart exists,
so it runs with ``--root`` on a tree that holds the host's own system units, our unit and an
executable at /opt/avd/bin/avd-<role>: a stub shell script in one test, the real
pip-installed console script in the install test.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from avd.config import CommonSettings, ReceiverSettings, SenderSettings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
INSTALL = DEPLOY / "install.sh"
ROLES = ("sender", "receiver")
SETTINGS: dict[str, type[CommonSettings]] = {
    "sender": SenderSettings,
    "receiver": ReceiverSettings,
}
SYSTEM_UNITS = Path("/usr/lib/systemd/system")

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_path(role: str) -> Path:
    return DEPLOY / "systemd" / f"avd-{role}.service"


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; keys may repeat."""
    section, found = "", []
    for line in path.read_text().splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.append((section, key, value))
    return found


def values(role: str, key: str) -> list[str]:
    return [v for section, k, v in directives(unit_path(role)) if k == key]


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",  # verify also loads units from the working directory
    )


def make_verify_root(root: Path) -> None:
    """The host's system units under ``root``, so that --root finds sysinit.target & co.,
    and the host's kill (procps), which the receiver's ExecReload= runs."""
    target = root / SYSTEM_UNITS.relative_to("/")
    if not target.exists():
        shutil.copytree(SYSTEM_UNITS, target, symlinks=True)
    kill = root / "bin/kill"
    if not kill.exists():
        kill.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2("/bin/kill", kill)


def verify(root: Path, role: str) -> str:
    result = analyze("verify", "--man=no", f"--root={root}", f"avd-{role}.service")
    return result.stdout + result.stderr + ("" if result.returncode == 0 else "(failed)")


def run_install(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "AVD_INSTALL_ROOT": str(root), **env}
    return subprocess.run(
        [str(INSTALL), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
        check=False,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("role", ROLES)
def test_service_contract(role: str) -> None:
    assert values(role, "Type") == ["notify"]
    assert values(role, "NotifyAccess") == ["main"]
    assert values(role, "WatchdogSec") == ["30"]
    assert values(role, "Restart") == ["on-failure"]
    assert values(role, "RestartSec") == ["2"]
    assert "78" in values(role, "RestartPreventExitStatus")[0].split()
    assert values(role, "TimeoutStopSec") == ["10"]
    assert values(role, "ExecStart") == [f"/opt/avd/bin/avd-{role}"]
    assert values(role, "EnvironmentFile") == [f"/etc/avd/{role}.env"]
    assert values(role, "DynamicUser") == ["yes"]
    assert values(role, "CapabilityBoundingSet") == [""]
    # Secrets come as credentials, never from the environment.
    for environment in values(role, "Environment"):
        assert "TOKEN" not in environment


def test_secrets_are_credentials() -> None:
    assert values("sender", "LoadCredential") == ["token:/etc/avd/sender.token"]
    assert values("receiver", "LoadCredential") == ["receiver.key:/etc/avd/receiver.key"]
    assert "AVD_TLS_KEY=%d/receiver.key" in values("receiver", "Environment")
    assert "AVD_RECORD_DIR=%S/avd/recordings" in values("receiver", "Environment")


@pytest.mark.parametrize("role", ROLES)
def test_unit_environment_names_real_settings(role: str) -> None:
    for environment in values(role, "Environment"):
        name = environment.partition("=")[0]
        assert name.removeprefix("AVD_").lower() in SETTINGS[role].model_fields, name


@pytest.mark.parametrize("role", ROLES)
def test_every_hardening_line_has_a_reason(role: str) -> None:
    """Each directive after the hardening marker sits in a block opened by a comment."""
    lines = unit_path(role).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# --- Hardening"))
    previous = lines[start]
    for line in lines[start + 1 :]:
        if line.startswith("["):
            break
        if line and not line.startswith("#"):
            assert previous.startswith("#") or "=" in previous, f"no reason above {line!r}"
        if not line:
            assert not previous or previous.startswith("#"), "blank line inside a block"
        previous = line


@needs_analyze
@pytest.mark.parametrize("role", ROLES)
def test_verify_prints_nothing(tmp_path: Path, role: str) -> None:
    make_verify_root(tmp_path)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(unit_path(role), tmp_path / "etc/systemd/system")
    # The one thing verify checks about ExecStart is that it is an executable file.
    stub = tmp_path / f"opt/avd/bin/avd-{role}"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    assert verify(tmp_path, role) == ""


@needs_analyze
def test_verify_would_complain(tmp_path: Path) -> None:
    """The empty output above means something: verify does report these mistakes."""
    make_verify_root(tmp_path)
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    text = unit_path("sender").read_text()
    (units / "avd-sender.service").write_text(text.replace("[Service]", "[Service]\nBogus=1"))
    assert "Bogus" in verify(tmp_path, "sender")  # unknown key (and no ExecStart binary)
    assert "/opt/avd/bin/avd-sender" in verify(tmp_path, "sender")


@needs_analyze
@pytest.mark.parametrize("role", ROLES)
def test_security_exposure(role: str) -> None:
    path = str(unit_path(role))
    result = analyze("security", "--offline=true", "--threshold=20", "--no-pager", path)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for avd-\w+\.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= 2.0


@pytest.mark.parametrize("role", ROLES)
def test_env_examples_name_real_settings_and_no_secret(role: str) -> None:
    text = (DEPLOY / f"{role}.env.example").read_text()
    names = re.findall(r"^#?(AVD_[A-Z0-9_]+)=", text, flags=re.MULTILINE)
    assert len(names) >= 5
    for name in names:
        assert name.removeprefix("AVD_").lower() in SETTINGS[role].model_fields, name
    set_names = re.findall(r"^(AVD_[A-Z0-9_]+)=", text, flags=re.MULTILINE)
    assert not {"AVD_TOKEN", "AVD_TLS_KEY"} & set(set_names)


def test_install_without_venv_is_idempotent(tmp_path: Path) -> None:
    first = run_install(tmp_path, "--no-venv")
    assert first.returncode == 0, first.stderr
    etc = tmp_path / "etc"
    for role in ROLES:
        unit = etc / f"systemd/system/avd-{role}.service"
        env = etc / f"avd/{role}.env"
        assert unit.read_text() == unit_path(role).read_text()
        assert mode(unit) == 0o644
        assert env.read_text() == (DEPLOY / f"{role}.env.example").read_text()
        assert mode(env) == 0o640
        assert f"created {env}" in first.stdout
    assert mode(etc / "avd") == 0o755
    assert "AVD_INSTALL_ROOT is set: no systemctl daemon-reload" in first.stdout
    assert not (tmp_path / "opt").exists()

    edited = etc / "avd/sender.env"
    edited.write_text("AVD_RECEIVER_HOST=mine.example\n")
    edited.chmod(0o600)
    second = run_install(tmp_path, "--no-venv")
    assert second.returncode == 0, second.stderr
    assert edited.read_text() == "AVD_RECEIVER_HOST=mine.example\n"
    assert mode(edited) == 0o600
    assert f"kept {edited}" in second.stdout
    assert "unchanged" in second.stdout


def test_install_with_another_prefix_rewrites_exec_start(tmp_path: Path) -> None:
    result = run_install(tmp_path, "--no-venv", "--prefix", "/srv/avd")
    assert result.returncode == 0, result.stderr
    unit = (tmp_path / "etc/systemd/system/avd-receiver.service").read_text()
    assert "ExecStart=/srv/avd/bin/avd-receiver\n" in unit
    assert "/opt/avd" not in unit


def test_uninstall_keeps_configuration(tmp_path: Path) -> None:
    assert run_install(tmp_path, "--no-venv").returncode == 0
    venv = tmp_path / "opt/avd"
    venv.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    result = run_install(tmp_path, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "etc/systemd/system/avd-sender.service").exists()
    assert not (tmp_path / "etc/systemd/system/avd-receiver.service").exists()
    assert not venv.exists()
    assert (tmp_path / "etc/avd/sender.env").exists()
    assert "kept" in result.stdout
    assert "recordings" in result.stdout
    again = run_install(tmp_path, "--uninstall")
    assert again.returncode == 0, again.stderr


def test_uninstall_refuses_a_prefix_that_is_not_a_venv(tmp_path: Path) -> None:
    data = tmp_path / "srv/data"
    data.mkdir(parents=True)
    (data / "precious").write_text("keep me")
    result = run_install(tmp_path, "--uninstall", "--prefix", "/srv/data")
    assert result.returncode != 0
    assert "not a virtualenv" in result.stderr
    assert (data / "precious").read_text() == "keep me"


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["--prefix"],
        ["--prefix", "relative"],
        ["--from", "/nonexistent/avd-0.1.0-py3-none-any.whl"],
        ["--from", str(DEPLOY)],  # a directory, but not a source tree
    ],
)
def test_install_refuses_bad_arguments(tmp_path: Path, args: list[str]) -> None:
    result = run_install(tmp_path, *args)
    assert result.returncode != 0
    assert result.stderr
    assert not (tmp_path / "etc").exists()
    assert not (tmp_path / "opt").exists()


@needs_analyze
def test_install_with_venv_then_verify_and_uninstall(tmp_path: Path) -> None:
    """The real path: a venv from the system Python, avd pip-installed from this checkout.

    --no-deps keeps it to seconds and off the network (the daemons' dependencies are not
    needed to see that the package, its console scripts and the units fit together).
    """
    had_build_dir = (REPO / "build").exists()
    result = run_install(tmp_path, AVD_PIP_ARGS="--no-deps")
    assert result.returncode == 0, result.stdout + result.stderr
    venv = tmp_path / "opt/avd"
    for role in ROLES:
        assert os.access(venv / f"bin/avd-{role}", os.X_OK)
    probe = [str(venv / "bin/python"), "-c", "import avd.logs, avd.systemd; print(avd.__file__)"]
    where = subprocess.run(probe, capture_output=True, text=True, check=True, cwd="/")
    assert where.stdout.startswith(str(venv))  # the installed copy, not this checkout
    assert (REPO / "build").exists() == had_build_dir  # built from a copy, checkout untouched

    make_verify_root(tmp_path)
    # verify looks for ExecStart inside --root: it finds the installed console scripts.
    for role in ROLES:
        assert verify(tmp_path, role) == ""

    assert "kept the virtualenv" in run_install(tmp_path, AVD_PIP_ARGS="--no-deps").stdout
    assert run_install(tmp_path, "--uninstall").returncode == 0
    assert not venv.exists()


def test_install_names_the_build_packages_it_lacks_and_writes_nothing(tmp_path: Path) -> None:
    """A Python without ensurepip (Debian's without python3-venv) and no apt-get to run
    (a staging root): named, in Debian's words, before anything is written."""
    python = tmp_path / "bin/python3"
    python.parent.mkdir()
    python.write_text(
        '#!/bin/sh\n[ "$2" = "import ensurepip" ] && exit 1\nexec /usr/bin/python3 "$@"\n'
    )
    python.chmod(0o755)
    root = tmp_path / "root"
    result = run_install(root, AVD_PYTHON=str(python))
    assert result.returncode == 1
    # python3-venv, and whatever else this host lacks to build PyAudio.
    assert re.search(
        r"missing (\S+ )*python3-venv( \S+)* \(Debian's names\): install", result.stderr
    )
    assert not root.exists()
