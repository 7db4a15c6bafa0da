"""``avd check``: each problem one line with its remedy; exit 0 only when all is well."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avd.certs import CertPaths, init_certs
from avd.check import Report, check_audio_device, check_certificate
from avd.errors import DeviceError
from avd.media import pa

from .alsa.alsa_env import CAPTURE_DEVICE, PLAYBACK_DEVICE, AlsaDevices
from .conftest import (
    Credentials,
    Daemon,
    ReceiverHandle,
    metric,
    receiver_env,
    sender_env,
    start_receiver,
    wait_until,
)


def run_check(role: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AVD_")} | env
    return subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; from avd.cli import main; sys.exit(main(['check', '{role}']))",
        ],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def receiver(
    pki: CertPaths, creds: Credentials, tmp_path: Path, daemons: list[Daemon]
) -> ReceiverHandle:
    handle = start_receiver(receiver_env(pki, creds.tokens_file), tmp_path / "receiver.log")
    daemons.append(handle.daemon)
    return handle


def test_a_sound_receiver_configuration_passes(
    pki: CertPaths, creds: Credentials, tmp_path: Path
) -> None:
    env = receiver_env(
        pki, creds.tokens_file, AVD_RECORD_DIR=str(tmp_path / "rec"), AVD_MIN_FREE_GB="0"
    )
    result = run_check("receiver", env)
    assert result.returncode == 0, result.stdout
    assert "2 sender(s): cam1, cam2" in result.stdout
    assert result.stdout.strip().endswith("all is well")


def test_a_hard_limit_of_open_files_too_low_for_the_connections_is_a_warning(
    pki: CertPaths, creds: Credentials
) -> None:
    # As the daemon would say at start, from a shell (or container) whose hard limit is 100.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVD_")}
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100)); "
        "from avd.cli import main; sys.exit(main(['check', 'receiver']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env | receiver_env(pki, creds.tokens_file),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout
    assert (
        "WARNING  open files: AVD_MAX_CONNECTIONS=1024 may need 1088 open files, but this "
        "process may open 100: taking at most 36 connections"
    ) in result.stdout


def test_a_readable_key_is_a_warning_with_its_remedy(
    pki: CertPaths, creds: Credentials, tmp_path: Path
) -> None:
    key = tmp_path / "receiver.key"
    key.write_bytes(pki.receiver_key.read_bytes())
    key.chmod(0o644)
    result = run_check("receiver", receiver_env(pki, creds.tokens_file, AVD_TLS_KEY=str(key)))
    assert result.returncode == 2, result.stdout
    assert f"chmod 600 {key}" in result.stdout


def test_a_misspelt_variable_is_a_warning_with_the_setting_it_may_have_meant(
    pki: CertPaths, creds: Credentials, tmp_path: Path
) -> None:
    env = receiver_env(
        pki, creds.tokens_file, AVD_RECORDING_DIR=str(tmp_path / "rec"), AVD_MIN_FREE_GB="0"
    )
    result = run_check("receiver", env)
    assert result.returncode == 2, result.stdout
    assert (
        "WARNING  AVD_RECORDING_DIR (in the environment) is not an avd setting and is ignored"
        " -> did you mean AVD_RECORD_DIR?"
    ) in result.stdout.splitlines()


def test_the_speaker_is_looked_for_and_one_not_found_is_a_warning(
    pki: CertPaths, creds: Credentials, alsa: AlsaDevices
) -> None:
    # A receiver whose speaker is missing records all the same, but says so only when the
    # first audio arrives: the check says it before.
    base = receiver_env(pki, creds.tokens_file) | alsa.env()
    found = run_check("receiver", base | {"AVD_PLAYBACK": PLAYBACK_DEVICE})
    assert found.returncode == 0, found.stdout
    assert f"ok       AVD_PLAYBACK: '{PLAYBACK_DEVICE}' is the audio device" in found.stdout
    missing = run_check("receiver", base | {"AVD_PLAYBACK": "no-such-speaker"})
    assert missing.returncode == 2, missing.stdout
    assert (
        "WARNING  AVD_PLAYBACK: 'no-such-speaker': no output audio device matches "
        "'no-such-speaker': choose one of: "
    ) in missing.stdout
    assert "-> AVD_PLAYBACK=none for no speaker, or a device avd devices lists" in missing.stdout


def test_portaudio_that_cannot_start_is_a_warning_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> None:
        raise DeviceError("PortAudio cannot start: no ALSA")

    monkeypatch.setattr(pa, "open_pyaudio", broken)
    report = Report()
    check_audio_device(report, "AVD_PLAYBACK: 'default'", "default", input=False, remedy="x")
    assert report.warnings == 1
    assert report.errors == 0


def test_a_bad_setting_is_an_error_naming_it(pki: CertPaths, creds: Credentials) -> None:
    result = run_check("receiver", receiver_env(pki, creds.tokens_file, AVD_VIDEO_PORT="x"))
    assert result.returncode == 1
    assert "AVD_VIDEO_PORT" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_sender_authenticates_without_disturbing_the_running_one(
    pki: CertPaths,
    creds: Credentials,
    tmp_path: Path,
    receiver: ReceiverHandle,
    daemons: list[Daemon],
) -> None:
    env = sender_env(pki, receiver, "cam1", creds.tokens["cam1"], AVD_AUDIO_SOURCE="none")
    daemons.append(Daemon("sender", env, tmp_path / "sender.log"))
    wait_until(lambda: metric(receiver.metrics(), "avd_frames_received_total") > 5)
    result = run_check("sender", env)
    assert result.returncode == 0, result.stdout
    assert "TLSv1.3" in result.stdout
    assert "accepted sender 'cam1'" in result.stdout
    time.sleep(0.5)
    log = receiver.daemon.log_text()
    assert "passed an authentication probe" in log
    assert "replacing" not in log  # the live session was left alone
    assert metric(receiver.metrics(), "avd_connections_active", stream="video") == 1
    assert creds.tokens["cam1"] not in result.stdout + log


def test_a_wrong_token_and_an_absent_receiver_are_errors_with_remedies(
    pki: CertPaths, creds: Credentials, receiver: ReceiverHandle
) -> None:
    wrong = run_check("sender", sender_env(pki, receiver, "cam1", "z" * 43))
    assert wrong.returncode == 1
    assert "refused sender 'cam1'" in wrong.stdout
    assert "tokens file" in wrong.stdout
    down = sender_env(pki, receiver, "cam1", creds.tokens["cam1"], AVD_VIDEO_PORT="1")
    absent = run_check("sender", down)
    assert absent.returncode == 1
    assert "cannot reach the receiver" in absent.stdout
    assert "is avd-receiver running" in absent.stdout


def test_both_streams_ports_are_checked_and_a_refused_token_is_tried_once(
    pki: CertPaths, creds: Credentials, receiver: ReceiverHandle
) -> None:
    # It checked one port only: a wrong AVD_AUDIO_PORT passed as "all is well".
    bad_audio = sender_env(pki, receiver, "cam1", creds.tokens["cam1"], AVD_AUDIO_PORT="1")
    result = run_check("sender", bad_audio)
    assert result.returncode == 1
    assert "accepted sender 'cam1' and its token (video)" in result.stdout
    assert "cannot reach the receiver at 127.0.0.1:1 (audio)" in result.stdout

    # Ports swapped: the token is right, so the receiver says what is not, for each port.
    swapped = {
        "AVD_VIDEO_PORT": str(receiver.audio_port),
        "AVD_AUDIO_PORT": str(receiver.video_port),
    }
    result = run_check("sender", sender_env(pki, receiver, "cam1", creds.tokens["cam1"]) | swapped)
    assert result.returncode == 1
    assert (
        "ERROR    the receiver turned the video stream away: video stream on the audio port "
        "(are AVD_VIDEO_PORT and AVD_AUDIO_PORT swapped?) -> fix the setting it names"
    ) in result.stdout
    assert "turned the audio stream away: audio stream on the video port" in result.stdout

    # A wrong token: both ports reached, one hello refused (each counts toward a lockout).
    before = metric(receiver.metrics(), "avd_auth_failures_total")
    wrong = run_check("sender", sender_env(pki, receiver, "cam1", "z" * 43))
    assert wrong.returncode == 1
    assert f"TLS with 127.0.0.1:{receiver.audio_port} (audio)" in wrong.stdout
    assert wrong.stdout.count("refused sender 'cam1'") == 1
    assert metric(receiver.metrics(), "avd_auth_failures_total") == before + 1


def test_the_senders_camera_and_microphone_are_looked_for(
    pki: CertPaths, creds: Credentials, receiver: ReceiverHandle, alsa: AlsaDevices
) -> None:
    # A missing camera does not stop the sender (it retries it): a warning, said before.
    env = sender_env(pki, receiver, "cam1", creds.tokens["cam1"]) | alsa.env()
    sources = {"AVD_VIDEO_SOURCE": "/dev/video99", "AVD_AUDIO_SOURCE": f"mic:{CAPTURE_DEVICE}"}
    result = run_check("sender", env | sources)
    assert result.returncode == 2, result.stdout
    assert (
        "WARNING  AVD_VIDEO_SOURCE: /dev/video99: no such device -> avd devices lists the "
        "cameras (the sender starts anyway and retries it)"
    ) in result.stdout
    assert f"ok       AVD_AUDIO_SOURCE: 'mic:{CAPTURE_DEVICE}' is the audio device" in result.stdout
    result = run_check("sender", env | {"AVD_AUDIO_SOURCE": "mic:no-such-mic"})
    assert "WARNING  AVD_AUDIO_SOURCE: 'mic:no-such-mic': no input audio device matches" in (
        result.stdout
    )


def test_the_spool_folder_is_tried(
    pki: CertPaths, creds: Credentials, receiver: ReceiverHandle, tmp_path: Path
) -> None:
    # The sender spools in memory when it cannot write there: a warning, said before.
    env = sender_env(pki, receiver, "cam1", creds.tokens["cam1"])
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    result = run_check("sender", env | {"AVD_SPOOL_DIR": str(blocked / "spool")})
    assert result.returncode == 2, result.stdout
    assert (
        f"WARNING  AVD_SPOOL_DIR: {blocked / 'spool'} is not writable -> fix its owner or "
        "permissions (the sender would spool in memory only)"
    ) in result.stdout
    result = run_check("sender", env | {"AVD_SPOOL_DIR": str(tmp_path / "new" / "spool")})
    assert f"ok       AVD_SPOOL_DIR: {tmp_path / 'new' / 'spool'} writable" in result.stdout
    assert not (tmp_path / "new").exists()  # looked at, not made
    assert not list(tmp_path.glob(".avd-check-*"))  # the trial file is gone


def test_a_sender_with_nothing_to_send_is_an_error(
    pki: CertPaths, creds: Credentials, receiver: ReceiverHandle
) -> None:
    env = sender_env(pki, receiver, "cam1", creds.tokens["cam1"])
    result = run_check("sender", env | {"AVD_VIDEO_SOURCE": "none", "AVD_AUDIO_SOURCE": "none"})
    assert result.returncode == 1
    assert "ERROR    AVD_VIDEO_SOURCE and AVD_AUDIO_SOURCE are both none" in result.stdout


def test_an_untrusted_receiver_certificate_says_which_setting_to_change(
    pki: CertPaths, other_pki: CertPaths, creds: Credentials, receiver: ReceiverHandle
) -> None:
    token = creds.tokens["cam1"]
    wrong_ca = run_check(
        "sender", sender_env(pki, receiver, "cam1", token, AVD_TLS_CA=str(other_pki.ca_cert))
    )
    assert wrong_ca.returncode == 1
    assert (
        "certificate not trusted: unable to get local issuer certificate -> is AVD_TLS_CA the "
        "ca.crt of the `avd certs init` that made the receiver's?"
    ) in wrong_ca.stdout
    wrong_name = run_check(
        "sender", sender_env(pki, receiver, "cam1", token, AVD_TLS_SERVER_NAME="wrong.example")
    )
    assert wrong_name.returncode == 1
    assert (
        "-> AVD_RECEIVER_HOST (or AVD_TLS_SERVER_NAME) must be a name or address in the "
        "receiver's certificate: avd certs renew --hosts adds it"
    ) in wrong_name.stdout


def test_a_readable_token_file_is_a_warning_that_calls_it_a_token(
    pki: CertPaths, creds: Credentials, receiver: ReceiverHandle, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(creds.tokens["cam1"] + "\n")
    token_file.chmod(0o644)
    env = sender_env(pki, receiver, "cam1", "", AVD_AUDIO_SOURCE="none")
    env["AVD_TOKEN_FILE"] = str(token_file)
    del env["AVD_TOKEN"]
    result = run_check("sender", env)
    assert result.returncode == 2, result.stdout  # warnings only: it still authenticates
    assert (
        f"WARNING  AVD_TOKEN_FILE: token {token_file} is readable by group and others "
        f"(mode 0644) -> chmod 600 {token_file}\n"
    ) in result.stdout
    assert result.stdout.count("chmod 600") == 1, result.stdout  # one line, the remedy once
    assert "private key" not in result.stdout.split("AVD_TOKEN_FILE")[1]
    assert creds.tokens["cam1"] not in result.stdout


def test_a_client_ca_near_its_end_is_a_warning_as_the_daemon_logs_it(
    pki: CertPaths, creds: Credentials, tmp_path: Path
) -> None:
    soon = init_certs(tmp_path / "soon", ["localhost"], days=10)
    env = receiver_env(pki, creds.tokens_file, AVD_TLS_CLIENT_CA=str(soon.receiver_cert))
    result = run_check("receiver", env)
    assert result.returncode == 2, result.stdout
    (warning,) = [line for line in result.stdout.splitlines() if "expires in" in line]
    assert warning.startswith(f"WARNING  AVD_TLS_CLIENT_CA: {soon.receiver_cert} expires in")


def test_a_certificate_near_its_end_is_a_warning_with_how_to_renew_it(tmp_path: Path) -> None:
    soon = init_certs(tmp_path, ["localhost"], days=10)
    report = Report()
    check_certificate(report, soon.receiver_cert, "AVD_TLS_CERT")
    check_certificate(report, soon.ca_cert, "AVD_TLS_CA")  # ten years: fine
    assert report.exit_code == 2
    (warning,) = [line for line in report.lines if "expires in" in line]
    assert "AVD_TLS_CERT" in warning
    assert "avd certs renew" in warning
