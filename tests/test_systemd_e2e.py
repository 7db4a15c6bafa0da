"""Both daemons as real systemd services: installed, started, logged, stopped, restarted.

A real systemd boots as PID 1 in a container (tests/nspawn.py) on the host's own /usr.
Inside, deploy/install.sh installs avd as an operator would (a virtualenv from Debian's
/usr/bin/python3 at /opt/avd with its dependencies from the package index the host's pip
is configured for, the units, /etc/avd/*.env from the examples), then ``avd certs init``
and ``avd token new`` make the secrets the units load as credentials.

The container shares the host's network: pip reaches its index, and the tests read the
receiver's metrics on 127.0.0.1 directly. The ports are picked free on the host.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from avd.fdlimit import files_needed
from avd.logs import LogEvent
from tests.conftest import metric, scrape, wait_until
from tests.nspawn import Bind, Container, booted, unavailable_reason

REPO = Path(__file__).resolve().parent.parent
SOURCE = "/srv/avd-src"  # the checkout inside; outside /tmp, which the units cannot see
AVD = "/opt/avd/bin/avd"
RESTART_SEC = 2.0  # the units' RestartSec
WRONG_TOKEN = "x" * 43

_unavailable = unavailable_reason()
pytestmark = [
    pytest.mark.systemd,
    pytest.mark.timeout(600),
    pytest.mark.skipif(_unavailable is not None, reason=_unavailable or ""),
]


@dataclass
class Installed:
    container: Container
    token: str
    video_port: int
    audio_port: int
    metrics_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def frames_received(self, stream: str) -> float:
        try:
            samples = scrape(self.metrics_url)
        except OSError:
            return 0.0
        return metric(samples, "avd_frames_received_total", sender="cam1", stream=stream)


# ---- setting up -------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports free on the host's loopback now (the container shares it)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def pip_config_files() -> list[Path]:
    home = Path(os.environ.get("HOME", "/root"))
    candidates = [Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf")]
    candidates += [home / ".config/pip/pip.conf", home / ".pip/pip.conf"]
    if os.environ.get("PIP_CONFIG_FILE"):
        candidates.append(Path(os.environ["PIP_CONFIG_FILE"]))
    return [path for path in candidates if path.is_file()]


def pip_binds() -> list[Bind]:
    """The host's pip configuration, and the local indexes and wheel folders it names."""
    configs = pip_config_files()
    text = "\n".join(path.read_text(errors="replace") for path in configs)
    text += "\n" + "\n".join(v for k, v in os.environ.items() if k.startswith("PIP_"))
    named = {Path(p) for p in re.findall(r"(?:file://)?(/[^\s'\",;]+)", text)}
    # A local index's pages (.../simple/) link to files beside them: bind the whole index.
    named = {p.parent if p.name == "simple" else p for p in named}
    local = {p for p in named if p.exists() and not p.is_relative_to("/usr") and p != Path("/")}
    ssl = [Path("/etc/ssl")] if Path("/etc/ssl").is_dir() else []
    return [Bind(path) for path in sorted(set(configs) | local | set(ssl))]


def pip_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("PIP_")}


def container_binds() -> list[Bind]:
    # Missing from the container's nearly empty /etc: the accounts (root, and the audio and
    # video groups the units' SupplementaryGroups= name) and localhost.
    binds = [Bind(Path(p)) for p in ("/etc/passwd", "/etc/group", "/etc/hosts")]
    return [*binds, Bind(REPO, SOURCE), *pip_binds()]


def write(container: Container, path: str, text: str, mode: int) -> None:
    target = container.host_path(path)
    target.write_text(text)
    target.chmod(mode)


def install(container: Container) -> None:
    result = container.run(f"{SOURCE}/deploy/install.sh", env=pip_environment(), timeout=480)
    assert "ran systemctl daemon-reload" in result.stdout, result.stdout + result.stderr
    container.run(AVD, "certs", "init", "--dir", "/etc/avd", "--hosts", "127.0.0.1,localhost")


def new_token(container: Container) -> str:
    made = container.run(
        AVD, "token", "new", "--sender-id", "cam1", "--tokens-file", "/etc/avd/tokens"
    )
    token = made.stdout.strip()
    assert len(token) >= 32
    # Hashes only, re-read by the receiver's dynamic user: made readable (no chmod needed).
    assert stat.S_IMODE(container.host_path("/etc/avd/tokens").stat().st_mode) == 0o644
    write(container, "/etc/avd/sender.token", token + "\n", 0o600)
    return token


def configure(container: Container, video_port: int, audio_port: int, metrics_port: int) -> None:
    """The installed examples, with the lines an operator of this test machine would change."""
    ports = f"AVD_VIDEO_PORT={video_port}\nAVD_AUDIO_PORT={audio_port}\n"
    receiver = f"AVD_BIND=127.0.0.1\n{ports}AVD_METRICS_ADDR=127.0.0.1:{metrics_port}\n"
    receiver += "AVD_PLAYBACK=none\n"  # no sound card in the container
    sender = f"AVD_RECEIVER_HOST=127.0.0.1\n{ports}"
    sender += "AVD_VIDEO_SOURCE=test\nAVD_AUDIO_SOURCE=test\n"
    for role, overrides in (("receiver", receiver), ("sender", sender)):
        path = f"/etc/avd/{role}.env"
        example = container.host_path(path).read_text()
        write(container, path, f"{example}\n# the test's settings\n{overrides}", 0o640)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    workdir = tmp_path_factory.mktemp("systemd-e2e")
    with booted(container_binds(), workdir) as container:
        install(container)
        token = new_token(container)
        video_port, audio_port, metrics_port = free_ports(3)
        configure(container, video_port, audio_port, metrics_port)
        container.systemctl("enable", "avd-receiver", "avd-sender")  # kept loaded when stopped
        yield Installed(container, token, video_port, audio_port, metrics_port)


@pytest.fixture
def services(installed: Installed) -> Iterator[Installed]:
    """Each test starts from both services stopped, and leaves them so."""
    yield installed
    installed.container.systemctl("stop", "avd-sender", "avd-receiver", timeout=60, check=False)
    installed.container.systemctl("reset-failed", "avd-sender", "avd-receiver", check=False)


# ---- helpers ----------------------------------------------------------------------------


def status(container: Container, unit: str) -> str:
    return container.show(unit, "StatusText")["StatusText"]


def entries_of_run(container: Container, unit: str, invocation: str) -> list[dict[str, str]]:
    """What the daemon itself wrote during one run (systemd's own lines about it excluded)."""
    entries = container.journal("-u", unit)
    return [e for e in entries if e.get("_SYSTEMD_INVOCATION_ID") == invocation]


def with_id(entries: list[dict[str, str]], event: LogEvent) -> list[dict[str, str]]:
    return [e for e in entries if e.get("MESSAGE_ID") == event.message_id]


def recent_logs(container: Container) -> str:
    """For failure messages: what both services and systemd said lately."""
    shown = container.run("journalctl", "--no-pager", "-n", "60", "-o", "short-monotonic",
                          "-u", "avd-receiver", "-u", "avd-sender", check=False)  # fmt: skip
    return shown.stdout + shown.stderr


def wait_streaming(setup: Installed) -> None:
    try:
        wait_until(lambda: setup.frames_received("video") > 20, timeout=30)
        wait_until(lambda: setup.frames_received("audio") > 20, timeout=30)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: no frames at {setup.metrics_url}\n" + recent_logs(setup.container)
        ) from None


def assert_clean_stop(container: Container, unit: str) -> None:
    container.systemctl("stop", unit, timeout=60)
    shown = container.show(unit, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    # ExecMainCode 1 is CLD_EXITED: it exited by itself (2 would be killed by a signal).
    expected = {"ActiveState": "inactive", "Result": "success"}
    assert shown == {**expected, "ExecMainCode": "1", "ExecMainStatus": "0"}, shown


def soft_open_files(container: Container, pid: str) -> int:
    limits = container.run("cat", f"/proc/{pid}/limits").stdout
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    return int(line.split()[3])


def assert_open_files_for_max_connections(container: Container) -> None:
    """systemd starts a service with a soft limit of 1024 open files: the receiver raised
    its own for AVD_MAX_CONNECTIONS (1024: 4160), the unit's syscall filter (~@resources)
    notwithstanding, before its recording process started, which inherits it."""
    pid = container.show("avd-receiver", "MainPID")["MainPID"]
    children = container.run("cat", f"/proc/{pid}/task/{pid}/children").stdout.split()
    assert children, "no recording process under the receiver"
    wanted = files_needed(1024)
    assert {p: soft_open_files(container, p) for p in (pid, *children)} == dict.fromkeys(
        (pid, *children), wanted
    )


def watchdog_ping_time(container: Container, unit: str) -> int:
    return int(container.show(unit, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])


def run_avd_checks(c: Container) -> None:
    """``avd check`` as the README gives it. For the sender, a wrong token is refused (one
    auth failure for the log), the real one (the unit's credential file) passes."""
    receiver = c.run(AVD, "check", "receiver", "--env-file", "/etc/avd/receiver.env",
                     env={"AVD_TLS_KEY": "/etc/avd/receiver.key"}, check=False)  # fmt: skip
    assert receiver.returncode == 0, receiver.stdout
    # A tokens file only root can read: fine for root's check, fatal for the unit's user.
    tokens = c.host_path("/etc/avd/tokens")
    tokens.chmod(0o600)
    try:
        unreadable = c.run(AVD, "check", "receiver", "--env-file", "/etc/avd/receiver.env",
                           env={"AVD_TLS_KEY": "/etc/avd/receiver.key"}, check=False)  # fmt: skip
    finally:
        tokens.chmod(0o644)
    assert unreadable.returncode == 1, unreadable.stdout
    assert (
        "ERROR    AVD_TOKENS_FILE: /etc/avd/tokens is not readable by others (mode 0600): the "
        "avd-receiver unit's transient user cannot read it -> chmod 644 /etc/avd/tokens"
    ) in unreadable.stdout
    check = (AVD, "check", "sender", "--env-file", "/etc/avd/sender.env")
    wrong = c.run(*check, env={"AVD_TOKEN": WRONG_TOKEN}, check=False)
    assert wrong.returncode == 1, wrong.stdout
    assert "the receiver refused sender 'cam1'" in wrong.stdout
    right = c.run(*check, env={"AVD_TOKEN_FILE": "/etc/avd/sender.token"}, check=False)
    assert right.returncode == 0, right.stdout
    assert "accepted sender 'cam1'" in right.stdout


def assert_quiet_and_native(entries: list[dict[str, str]]) -> None:
    """A healthy run writes only through the native protocol (no stray stderr lines from
    JACK, OpenCV...) and nothing at error level."""
    assert {e["_TRANSPORT"] for e in entries} == {"journal"}
    assert all(int(e["PRIORITY"]) > 3 for e in entries)


def assert_connection_log(entries: list[dict[str, str]]) -> None:
    """cam1's two streams opened and closed with every field; the one auth failure."""
    opened = [e for e in with_id(entries, LogEvent.CONNECTION_OPENED) if e["SENDER_ID"] == "cam1"]
    assert {e["STREAM"] for e in opened} >= {"video", "audio"}
    for entry in opened:
        assert entry["PRIORITY"] == "6"
        assert re.fullmatch(r"127\.0\.0\.1:\d+", entry["PEER"])
        assert entry["TLS_VERSION"] == "TLSv1.3"
        assert entry["TLS_CIPHER"].startswith("TLS_")
    peers = {e["PEER"] for e in opened}
    # The probe of `avd check` also opened and closed a connection: not one with frames.
    closed = [
        e for e in with_id(entries, LogEvent.CONNECTION_CLOSED)
        if e["PEER"] in peers and int(e["FRAMES_IN"]) > 20
    ]  # fmt: skip
    assert {e["STREAM"] for e in closed} == {"video", "audio"}, closed
    for entry in closed:
        assert entry["PRIORITY"] == "6"
        assert entry["CLOSE_REASON"] == "bye"
        assert int(entry["BYTES_IN"]) > int(entry["FRAMES_IN"])
        assert float(entry["DURATION_S"]) > 0.5
    failed = with_id(entries, LogEvent.AUTH_FAILED)
    assert [(e["PRIORITY"], e["CLAIMED_SENDER_ID"]) for e in failed] == [("4", "cam1")], failed
    assert_quiet_and_native(entries)


def assert_operator_queries(c: Container, token: str) -> None:
    """The README's journalctl commands find what they promise; no token anywhere."""
    by_sender = c.journal("-u", "avd-receiver", "SENDER_ID=cam1")
    assert {e["MESSAGE_ID"] for e in by_sender} >= {
        LogEvent.CONNECTION_OPENED.message_id,
        LogEvent.CONNECTION_CLOSED.message_id,
    }
    by_id = c.journal("-u", "avd-receiver", f"MESSAGE_ID={LogEvent.AUTH_FAILED.message_id}")
    assert len(by_id) == 1
    assert by_id[0]["MESSAGE"].startswith("authentication failed peer=127.0.0.1:")
    everything = c.run("journalctl", "--no-pager", "-o", "json").stdout
    assert token not in everything
    assert WRONG_TOKEN not in everything


# ---- the tests --------------------------------------------------------------------------


def test_services_start_stream_log_and_stop(services: Installed) -> None:
    c = services.container
    # Type=notify: start returns once READY=1 arrived, so the receiver already listens.
    c.systemctl("start", "avd-receiver", "avd-sender", timeout=60)
    for unit in ("avd-receiver", "avd-sender"):
        assert c.show(unit, "ActiveState")["ActiveState"] == "active"
    with socket.create_connection(("127.0.0.1", services.video_port), timeout=5):
        pass
    wait_streaming(services)
    assert_open_files_for_max_connections(c)
    wait_until(lambda: status(c, "avd-receiver") == "1 sender(s): cam1", timeout=15)
    ports = f"{services.video_port}/{services.audio_port}"
    wait_until(lambda: f"streaming video+audio to 127.0.0.1:{ports}" in status(c, "avd-sender"))
    # Watchdog pings reach systemd (NotifyAccess=main accepts them): their time moves on.
    first = watchdog_ping_time(c, "avd-sender")
    wait_until(lambda: watchdog_ping_time(c, "avd-sender") > first, timeout=20)
    run_avd_checks(c)

    units = ("avd-receiver", "avd-sender")
    invocations = {unit: c.show(unit, "InvocationID")["InvocationID"] for unit in units}
    assert_clean_stop(c, "avd-sender")  # first, so the receiver logs the sender's goodbye
    assert_clean_stop(c, "avd-receiver")

    assert_connection_log(entries_of_run(c, "avd-receiver", invocations["avd-receiver"]))
    sender_log = entries_of_run(c, "avd-sender", invocations["avd-sender"])
    started = with_id(sender_log, LogEvent.STREAM_STARTED)
    assert sorted((e["STREAM"], e["PRIORITY"]) for e in started) == [("audio", "6"), ("video", "6")]
    assert_quiet_and_native(sender_log)
    assert_operator_queries(c, services.token)

    # The recording went to the StateDirectory, the one place the receiver may write.
    found = c.run("find", "/var/lib/avd/recordings/", "-type", "f", "-size", "+1k")
    assert found.stdout.strip(), "no recording in /var/lib/avd/recordings"


def test_killed_receiver_is_restarted_and_the_sender_streams_again(services: Installed) -> None:
    c = services.container
    c.systemctl("start", "avd-receiver", "avd-sender", timeout=60)
    wait_streaming(services)
    before = c.show("avd-receiver", "MainPID", "NRestarts")
    sender_before = c.show("avd-sender", "MainPID", "NRestarts")

    c.systemctl("kill", "-s", "KILL", "avd-receiver")

    def restarted() -> bool:
        now = c.show("avd-receiver", "MainPID", "NRestarts", "ActiveState")
        return (
            now["ActiveState"] == "active"
            and now["MainPID"] not in ("0", before["MainPID"])
            and int(now["NRestarts"]) == int(before["NRestarts"]) + 1
        )

    wait_until(restarted, timeout=RESTART_SEC + 20)
    # A new receiver process: its counters start at zero, so these frames are new ones.
    wait_streaming(services)
    assert c.show("avd-sender", "MainPID", "NRestarts") == sender_before


def test_installing_again_restarts_what_runs_onto_the_new_version(services: Installed) -> None:
    """An upgrade is install.sh run again. A daemon left running would go on with the old
    code and import new modules into it the first time it needed one: what runs is
    restarted, what is stopped stays stopped, and the configuration is kept."""
    c = services.container
    c.systemctl("start", "avd-receiver", timeout=60)
    before = c.show("avd-receiver", "MainPID")["MainPID"]
    config = c.host_path("/etc/avd/receiver.env").read_text()

    result = c.run(f"{SOURCE}/deploy/install.sh", env=pip_environment(), timeout=480)

    assert "restarted avd-receiver.service onto the new version" in result.stdout, result.stdout
    assert "restarted avd-sender" not in result.stdout
    now = c.show("avd-receiver", "MainPID", "ActiveState")
    assert now["ActiveState"] == "active"
    assert now["MainPID"] not in ("0", before)
    assert c.show("avd-sender", "ActiveState")["ActiveState"] == "inactive"
    assert c.host_path("/etc/avd/receiver.env").read_text() == config
    c.systemctl("start", "avd-sender", timeout=60)
    wait_streaming(services)

    result = c.run(
        f"{SOURCE}/deploy/install.sh", "--no-venv", "--no-restart", env=pip_environment()
    )
    assert "avd-receiver.service runs the previous version until restarted" in result.stdout
    assert c.show("avd-receiver", "MainPID")["MainPID"] == now["MainPID"]


@pytest.mark.parametrize(
    ("unit", "line", "said"),
    [
        ("avd-sender", "AVD_FPS=0", ["AVD_FPS"]),
        # Outside its StateDirectory the unit may not write (ProtectSystem=strict): said at
        # start, with the way out, rather than at the first sender's first frame.
        (
            "avd-receiver",
            "AVD_RECORD_DIR=/srv/avd-recordings",
            ["AVD_RECORD_DIR: cannot record to /srv/avd-recordings", "ReadWritePaths="],
        ),
    ],
)
def test_bad_setting_fails_once_without_a_restart_loop(
    services: Installed, unit: str, line: str, said: list[str]
) -> None:
    c = services.container
    path = f"/etc/avd/{unit.removeprefix('avd-')}.env"
    good = c.host_path(path).read_text()
    before = int(c.show(unit, "NRestarts")["NRestarts"])
    write(c, path, f"{good}{line}\n", 0o640)
    try:
        result = c.systemctl("start", unit, timeout=60, check=False)
        assert result.returncode != 0
        # Longer than RestartSec: a restart, if systemd scheduled one, would have happened.
        time.sleep(RESTART_SEC + 1.5)
        shown = c.show(unit, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert shown["ActiveState"] == "failed", shown
        assert shown["Result"] == "exit-code"
        assert shown["ExecMainStatus"] == "78"  # EX_CONFIG, in RestartPreventExitStatus=
        assert int(shown["NRestarts"]) == before
        invocation = c.show(unit, "InvocationID")["InvocationID"]
        messages = [e["MESSAGE"] for e in entries_of_run(c, unit, invocation)]
        for fragment in said:
            assert any(fragment in m for m in messages), messages
    finally:
        write(c, path, good, 0o640)


def served_certificate(setup: Installed) -> bytes:
    """The DER certificate the running receiver presents, checked against the sender's CA."""
    context = ssl.create_default_context(cafile=str(setup.container.host_path("/etc/avd/ca.crt")))
    with (
        socket.create_connection(("127.0.0.1", setup.video_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_reload_reads_the_tokens_file_again_without_a_restart(services: Installed) -> None:
    c = services.container
    c.systemctl("start", "avd-receiver", "avd-sender", timeout=60)
    wait_streaming(services)
    pid = c.show("avd-receiver", "MainPID")["MainPID"]
    invocation = c.show("avd-receiver", "InvocationID")["InvocationID"]
    c.systemctl("reload", "avd-receiver", timeout=30)  # not applicable without ExecReload=
    reloaded = with_id(entries_of_run(c, "avd-receiver", invocation), LogEvent.CONFIG_RELOADED)
    assert [e["MESSAGE"] for e in reloaded] == ["tokens reloaded: 1 senders, 0 revoked"]
    assert c.show("avd-receiver", "MainPID", "ActiveState") == {
        "MainPID": pid,
        "ActiveState": "active",
    }
    before = services.frames_received("video")
    wait_until(lambda: services.frames_received("video") > before + 20, timeout=15)


def test_renewed_certificates_keep_senders_trusting_the_receiver(services: Installed) -> None:
    """The README's renewal: `avd certs renew` from the same CA, a receiver restart, and the
    sender, which kept its ca.crt, streams again to the new certificate."""
    c = services.container
    c.systemctl("start", "avd-receiver", "avd-sender", timeout=60)
    wait_streaming(services)
    before = served_certificate(services)
    ca_before = c.host_path("/etc/avd/ca.crt").read_bytes()
    c.run(AVD, "certs", "renew", "--dir", "/etc/avd", "--days", "400")
    assert c.host_path("/etc/avd/ca.crt").read_bytes() == ca_before
    c.systemctl("restart", "avd-receiver", timeout=60)
    wait_streaming(services)  # a new receiver's counters: these frames came after the restart
    after = served_certificate(services)
    renewed = x509.load_pem_x509_certificate(c.host_path("/etc/avd/receiver.crt").read_bytes())
    assert after != before
    assert after == renewed.public_bytes(serialization.Encoding.DER)
