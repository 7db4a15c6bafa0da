"""avd.tokens: hashing, the tokens file, the Token wrapper and the sender's token sources."""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import re
import stat
from pathlib import Path

import pytest

from avd import cli
from avd.errors import ConfigError
from avd.tokens import (
    SENDER_ID_RE,
    Token,
    TokenStore,
    add_token,
    hash_token,
    new_token,
    read_sender_token,
    removed_or_changed,
    validate_sender_id,
)

from .conftest import small_tmpfs

CAM1_TOKEN = "cam1-token-" + "a" * 40
CAM2_TOKEN = "cam2-token-" + "b" * 40


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- tokens and hashes ---------------------------------------------------------------------


def test_new_tokens_are_43_urlsafe_characters_and_distinct() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)


def test_hash_format_and_known_value() -> None:
    assert hash_token("abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", hash_token(new_token()))


@pytest.mark.parametrize("sender_id", ["a", "cam1", "Kitchen.Cam_2-b", "9" + "x" * 63])
def test_valid_sender_ids(sender_id: str) -> None:
    assert validate_sender_id(sender_id) == sender_id
    assert re.match(SENDER_ID_RE, sender_id)


@pytest.mark.parametrize(
    "sender_id", ["", "-cam", ".cam", "_cam", "a" * 65, "cam 1", "cam1\n", "cam/1", "câm"]
)
def test_invalid_sender_ids(sender_id: str) -> None:
    with pytest.raises(ValueError, match="1 to 64 characters"):
        validate_sender_id(sender_id)


# --- TokenStore.verify -----------------------------------------------------------------------


@pytest.fixture
def store() -> TokenStore:
    return TokenStore.from_tokens({"cam1": CAM1_TOKEN, "cam2": CAM2_TOKEN})


def test_a_token_is_valid_for_its_own_sender(store: TokenStore) -> None:
    assert store.verify("cam1", CAM1_TOKEN)
    assert store.verify("cam1", CAM1_TOKEN.encode())
    assert store.verify("cam2", CAM2_TOKEN)


def test_another_senders_token_is_refused(store: TokenStore) -> None:
    assert not store.verify("cam1", CAM2_TOKEN)
    assert not store.verify("cam2", CAM1_TOKEN.encode())


@pytest.mark.parametrize("token", ["", CAM1_TOKEN[:-1], CAM1_TOKEN + " ", CAM1_TOKEN.upper()])
def test_wrong_tokens_are_refused(store: TokenStore, token: str) -> None:
    assert not store.verify("cam1", token)


def test_unknown_sender_is_refused_even_with_a_known_token(store: TokenStore) -> None:
    assert not store.verify("cam3", CAM1_TOKEN)
    assert not store.verify("", CAM1_TOKEN)


def test_unknown_sender_is_refused_even_with_the_dummy_digests_preimage(store: TokenStore) -> None:
    # The dummy digest stands in for unknown ids; matching it must never be enough.
    assert not store.verify("cam3", b"avd: no sender has this digest")


def test_unknown_ids_cost_one_hash_and_one_digest_comparison(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real_compare_digest = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real_compare_digest(a, b)

    monkeypatch.setattr("avd.tokens.hmac.compare_digest", spy)
    store.verify("cam1", "wrong")
    store.verify("nobody", "wrong")
    assert calls == [(32, 32), (32, 32)]


def test_store_queries(store: TokenStore) -> None:
    assert store.sender_ids() == frozenset({"cam1", "cam2"})
    assert len(store) == 2
    assert store == TokenStore({"cam1": hash_token(CAM1_TOKEN), "cam2": hash_token(CAM2_TOKEN)})
    assert store != TokenStore.from_tokens({"cam1": CAM1_TOKEN})
    assert repr(store) == "TokenStore(2 senders)"


def test_removed_or_changed_lists_ids_whose_sessions_must_close(store: TokenStore) -> None:
    new = TokenStore.from_tokens({"cam1": CAM1_TOKEN, "cam2": "reissued" * 5, "cam3": "n" * 43})
    assert removed_or_changed(store, new) == {"cam2"}
    assert removed_or_changed(store, TokenStore.from_tokens({"cam2": CAM2_TOKEN})) == {"cam1"}
    assert removed_or_changed(store, store) == set()
    assert removed_or_changed(TokenStore({}), store) == set()


# --- the tokens file -------------------------------------------------------------------------


def test_load_reads_ids_and_hashes_skipping_blanks_and_comments(tmp_path: Path) -> None:
    upper = hash_token(CAM2_TOKEN).upper().replace("SHA256:", "sha256:")
    path = write(
        tmp_path / "tokens",
        f"# avd tokens\n\ncam1 {hash_token(CAM1_TOKEN)}\n   # indented comment\n"
        f"  cam2\t{upper}  \n",
    )
    store = TokenStore.load(path)
    assert store.sender_ids() == {"cam1", "cam2"}
    assert store.verify("cam1", CAM1_TOKEN)
    assert store.verify("cam2", CAM2_TOKEN)


def test_load_of_a_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    with pytest.raises(ConfigError, match=re.escape(f"tokens file {path} does not exist")):
        TokenStore.load(path)


def test_load_of_an_unreadable_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"cannot read tokens file {tmp_path}")):
        TokenStore.load(tmp_path)  # a directory: reading fails whoever runs the test


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("cam1", "found 1 fields"),
        (f"cam1 {hash_token('x')} extra", "found 3 fields"),
        (f"-cam1 {hash_token('x')}", "not a valid sender id"),
        ("cam1 sha256:1234", "is not sha256:<64 hex digits>"),
        ("cam1 md5:" + "0" * 64, "is not sha256:<64 hex digits>"),
        (f"cam2 {hash_token('x')}", "'cam2' already has a line (2)"),
    ],
)
def test_load_errors_name_path_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path / "tokens", f"# header\ncam2 {hash_token('y')}\n\n{line}\n")
    with pytest.raises(ConfigError) as raised:
        TokenStore.load(path)
    assert str(raised.value).startswith(f"{path}:4: ")
    assert problem in str(raised.value)


@pytest.mark.parametrize(
    "pasted", ["{token}", "cam1 {token}", "{hash} {token}", "cam1 {token} {hash}"]
)
def test_a_token_pasted_into_the_tokens_file_is_not_echoed(tmp_path: Path, pasted: str) -> None:
    token = new_token()
    text = pasted.format(token=token, hash=hash_token(token))
    path = write(tmp_path / "tokens", text + "\n")
    with pytest.raises(ConfigError) as raised:
        TokenStore.load(path)
    assert f"{path}:1" in str(raised.value)
    assert token not in str(raised.value)


def test_non_utf8_tokens_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_bytes(b"cam1 \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        TokenStore.load(path)


def test_bad_hashes_given_directly_are_refused() -> None:
    with pytest.raises(ValueError, match="sha256:"):
        TokenStore({"cam1": "plaintext-token-is-not-a-hash"})
    with pytest.raises(ValueError, match="sender id"):
        TokenStore({"bad id": hash_token("x")})


# --- add_token -------------------------------------------------------------------------------


def test_add_token_creates_the_file_with_mode_0644_and_its_directory_with_0700(
    tmp_path: Path,
) -> None:
    old_umask = os.umask(0)  # a permissive umask must not widen the file
    try:
        path = tmp_path / "etc" / "avd" / "tokens"
        add_token(path, "cam1", CAM1_TOKEN)
    finally:
        os.umask(old_umask)
    assert mode_of(path) == 0o644  # hashes only: the receiver's service user reads it
    assert path.read_text() == f"cam1 {hash_token(CAM1_TOKEN)}\n"
    assert TokenStore.load(path).verify("cam1", CAM1_TOKEN)


def test_add_token_appends_and_reissue_replaces_the_old_line(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens", "# senders\n\ncam0 " + hash_token("zero" * 10) + "\n")
    assert not add_token(path, "cam1", CAM1_TOKEN)
    assert not add_token(path, "cam2", CAM2_TOKEN)
    reissued = new_token()
    assert add_token(path, "cam1", reissued)  # replaced
    lines = path.read_text().splitlines()
    assert lines[:3] == ["# senders", "", "cam0 " + hash_token("zero" * 10)]
    assert lines[3:] == [f"cam1 {hash_token(reissued)}", f"cam2 {hash_token(CAM2_TOKEN)}"]
    store = TokenStore.load(path)
    assert store.verify("cam1", reissued)
    assert not store.verify("cam1", CAM1_TOKEN)  # the re-issued token revoked the old one
    assert store.verify("cam2", CAM2_TOKEN)
    assert [p.name for p in tmp_path.iterdir()] == ["tokens"]  # no temporary files left


def test_add_token_collapses_duplicate_lines_of_the_same_id(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens", f"cam1 {hash_token('a')}\ncam1 {hash_token('b')}\n")
    assert add_token(path, "cam1", CAM1_TOKEN)
    assert path.read_text() == f"cam1 {hash_token(CAM1_TOKEN)}\n"


def test_add_token_keeps_an_existing_mode(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens", "")
    path.chmod(0o640)
    add_token(path, "cam1", CAM1_TOKEN)
    assert mode_of(path) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_add_token_as_root_keeps_the_owner(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens", "")
    os.chown(path, 4242, 4343)
    add_token(path, "cam1", CAM1_TOKEN)
    assert (path.stat().st_uid, path.stat().st_gid) == (4242, 4343)


def test_add_token_refuses_bad_ids_and_short_tokens_without_echoing(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    with pytest.raises(ValueError, match="sender id"):
        add_token(path, "bad id", CAM1_TOKEN)
    with pytest.raises(ValueError, match="shorter than 32") as raised:
        add_token(path, "cam1", "short-secret")
    assert "short-secret" not in str(raised.value)
    assert not path.exists()


# --- Token -----------------------------------------------------------------------------------


def test_token_never_shows_its_value() -> None:
    token = Token(CAM1_TOKEN)
    shown = [
        repr(token),
        str(token),
        f"{token}",
        f"{token!r}",
        "%s %r" % (token, token),  # noqa: UP031  # logging formats this way
        "{}".format(token),  # noqa: UP032
        repr([token]),
        repr({"token": token}),
    ]
    for text in shown:
        assert CAM1_TOKEN not in text
        assert "Token(***)" in text


def test_token_reveals_on_request_and_compares_by_value() -> None:
    token = Token(CAM1_TOKEN)
    assert token.reveal() == CAM1_TOKEN
    assert token.as_bytes() == CAM1_TOKEN.encode()
    assert token == Token(CAM1_TOKEN)
    assert token != Token(CAM2_TOKEN)
    assert token != CAM1_TOKEN  # a Token is not a str


def test_token_is_neither_hashable_nor_picklable() -> None:
    token = Token(CAM1_TOKEN)
    with pytest.raises(TypeError):
        hash(token)
    with pytest.raises(TypeError):
        pickle.dumps(token)


# --- read_sender_token -----------------------------------------------------------------------

FILE_TOKEN = "f" * 43
CRED_TOKEN = "c" * 43
ENV_TOKEN = "e" * 43


@pytest.fixture
def credentials(tmp_path: Path) -> str:
    directory = tmp_path / "credentials"
    directory.mkdir()
    write(directory / "token", CRED_TOKEN + "\n")
    return str(directory)


def test_token_file_comes_first(tmp_path: Path, credentials: str) -> None:
    token_file = write(tmp_path / "token", f"  {FILE_TOKEN}\n")
    token = read_sender_token(
        token_file=token_file, credentials_directory=credentials, token_env=ENV_TOKEN
    )
    assert token.reveal() == FILE_TOKEN


def test_systemd_credential_comes_second(credentials: str) -> None:
    token = read_sender_token(
        token_file=None, credentials_directory=credentials, token_env=ENV_TOKEN
    )
    assert token.reveal() == CRED_TOKEN


def test_environment_comes_last(tmp_path: Path) -> None:
    empty_credentials = str(tmp_path)  # set, but holds no 'token'
    token = read_sender_token(
        token_file=None, credentials_directory=empty_credentials, token_env=f"{ENV_TOKEN}\n"
    )
    assert token.reveal() == ENV_TOKEN
    token = read_sender_token(token_file=None, credentials_directory=None, token_env=ENV_TOKEN)
    assert token.reveal() == ENV_TOKEN


def test_no_token_anywhere() -> None:
    with pytest.raises(ConfigError) as raised:
        read_sender_token(token_file=None, credentials_directory=None, token_env=None)
    assert str(raised.value) == (
        "no token: set AVD_TOKEN_FILE, put a 'token' credential in $CREDENTIALS_DIRECTORY,"
        " or set AVD_TOKEN"
    )


def test_a_broken_token_file_does_not_fall_back_to_the_environment(tmp_path: Path) -> None:
    missing = tmp_path / "missing-token"
    with pytest.raises(ConfigError) as raised:
        read_sender_token(token_file=missing, credentials_directory=None, token_env=ENV_TOKEN)
    assert "AVD_TOKEN_FILE" in str(raised.value)
    assert str(missing) in str(raised.value)


def test_an_unreadable_token_file_names_variable_and_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"cannot read AVD_TOKEN_FILE ({tmp_path})")):
        read_sender_token(token_file=tmp_path, credentials_directory=None, token_env=None)


def test_an_unreadable_credential_names_it(tmp_path: Path) -> None:
    (tmp_path / "token").mkdir()
    with pytest.raises(ConfigError, match=re.escape("$CREDENTIALS_DIRECTORY/token")):
        read_sender_token(token_file=None, credentials_directory=str(tmp_path), token_env=None)


@pytest.mark.parametrize("source", ["file", "credential", "env"])
def test_short_tokens_name_the_source_but_not_the_token(tmp_path: Path, source: str) -> None:
    short = "short-secret-value"
    token_file = write(tmp_path / "token", short) if source == "file" else None
    credentials = None
    if source == "credential":
        (tmp_path / "creds").mkdir()
        write(tmp_path / "creds" / "token", short)
        credentials = str(tmp_path / "creds")
    env = short if source == "env" else None
    with pytest.raises(ConfigError) as raised:
        read_sender_token(token_file=token_file, credentials_directory=credentials, token_env=env)
    message = str(raised.value)
    assert short not in message
    assert "too short (18 characters" in message
    expected_source = {
        "file": f"AVD_TOKEN_FILE ({token_file})",
        "credential": f"$CREDENTIALS_DIRECTORY/token ({tmp_path / 'creds' / 'token'})",
        "env": "AVD_TOKEN",
    }[source]
    assert expected_source in message


@pytest.mark.parametrize("bad", ["x" * 20 + " " + "y" * 20, "é" * 40, "x" * 40 + "\x00"])
def test_tokens_with_spaces_or_non_ascii_are_refused_without_echo(bad: str) -> None:
    with pytest.raises(ConfigError, match="AVD_TOKEN contains") as raised:
        read_sender_token(token_file=None, credentials_directory=None, token_env=bad)
    assert bad not in str(raised.value)


def test_error_chains_carry_no_secret(tmp_path: Path) -> None:
    # A token file with a stray non-UTF-8 byte: the decoder's own message quotes bytes of the
    # token, so it must not ride along as __cause__ or __context__ into a traceback.
    secret = b"\xffsecret-token-bytes-" + b"z" * 30
    path = tmp_path / "token"
    path.write_bytes(secret)
    with pytest.raises(ConfigError) as raised:
        read_sender_token(token_file=path, credentials_directory=None, token_env=None)
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__
    assert "secret-token" not in str(raised.value)


def test_sha256_digest_matches_the_stored_text() -> None:
    digest = hashlib.sha256(CAM1_TOKEN.encode()).hexdigest()
    assert TokenStore({"cam1": f"sha256:{digest}"}).verify("cam1", CAM1_TOKEN)


def test_token_new_on_a_full_disk_leaves_the_tokens_file_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with small_tmpfs(tmp_path / "small", "4k") as disk:  # one page, which the file fills
        tokens = disk / "tokens"
        add_token(tokens, "cam1", CAM1_TOKEN)
        before = tokens.read_bytes()
        argv = ["token", "new", "--sender-id", "cam2", "--tokens-file", str(tokens)]
        assert cli.main(argv) == 1
        captured = capsys.readouterr()
        assert captured.err == (
            f"avd token new: cannot write {tokens}: No space left on device; no file was changed\n"
        )
        assert captured.out == "", "no token is given out that the receiver does not know"
        assert tokens.read_bytes() == before
        assert [p.name for p in disk.iterdir()] == ["tokens"]


def test_token_new_adds_the_hash_and_says_how_a_running_receiver_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens"
    assert cli.main(["token", "new", "--sender-id", "cam9", "--tokens-file", str(tokens)]) == 0
    captured = capsys.readouterr()
    token = captured.out.strip()
    assert TokenStore.load(tokens).verify("cam9", token)
    assert "a running receiver reads it on reload (systemctl reload avd-receiver" in captured.err
    assert captured.err.startswith(f"added the hash of cam9's token to {tokens};")
    assert token not in captured.err
    # The same id again (a typo for a new sender, or a rotation): said, as it revokes one.
    assert cli.main(["token", "new", "--sender-id", "cam9", "--tokens-file", str(tokens)]) == 0
    assert capsys.readouterr().err.startswith(
        f"replaced the hash of cam9's token in {tokens}: its previous token stops working;"
    )
