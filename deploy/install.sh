#!/usr/bin/env bash
# Install (or remove) the avd daemons as systemd services.
#
#   deploy/install.sh [--prefix /opt/avd] [--from <source dir or wheel>] [--no-venv]
#                     [--no-restart]
#   deploy/install.sh --uninstall [--prefix /opt/avd]
#
# Install: a virtualenv in the prefix with avd pip-installed into it, the two units in
# /etc/systemd/system, and /etc/avd/{sender,receiver}.env from the examples -- only where
# none exists yet: an operator's configuration is never overwritten. Running it again
# upgrades avd and the units and changes nothing else; the services already running are
# restarted onto the new version (unless --no-restart), as a package upgrade does.
# Uninstall: stops and removes the units and the prefix; keeps /etc/avd (configuration,
# tokens, keys) and /var/lib/avd (recordings).
#
# Environment:
#   AVD_INSTALL_ROOT  prefix of every path written (like DESTDIR), for tests and staging.
#                     The venv's scripts name their interpreter by its full path, so a venv
#                     staged there runs only at that same path.
#   AVD_PYTHON        interpreter for the venv (default /usr/bin/python3: the distribution's,
#                     readable by the services' dynamic users, unlike one under /root).
#   AVD_PIP_ARGS      extra arguments for `pip install` (e.g. --no-deps, --no-index).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly HERE DEFAULT_PREFIX=/opt/avd
ROOT="${AVD_INSTALL_ROOT:-}"
ROOT="${ROOT%/}"
PREFIX="$DEFAULT_PREFIX"
SOURCE="$(dirname "$HERE")"
ACTION=install
WITH_VENV=1
RESTART=1
ROLES=(sender receiver)

usage() {
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
    exit "${1:-0}"
}

# Scratch space for the build copy and staged units, removed however the script ends.
WORK="$(mktemp -d)"
readonly WORK
trap 'rm -rf "$WORK"' EXIT

say() { printf 'avd-install: %s\n' "$*"; }
die() { printf 'avd-install: error: %s\n' "$*" >&2; exit 1; }

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX="${2%/}"; shift ;;
            --from) [ $# -ge 2 ] || die "--from needs a directory or a wheel"; SOURCE="$2"; shift ;;
            --uninstall) ACTION=uninstall ;;
            --no-venv) WITH_VENV=0 ;;
            --no-restart) RESTART=0 ;;
            -h|--help) usage 0 ;;
            *) printf 'avd-install: unknown argument: %s\n' "$1" >&2; usage 2 >&2 ;;
        esac
        shift
    done
    case "$PREFIX" in
        /?*) ;;
        *) die "--prefix must be an absolute path other than /: $PREFIX" ;;
    esac
}

# systemd is the init system of this machine (sd_booted(3) tests the same directory), and
# we are installing into the live system rather than into $AVD_INSTALL_ROOT.
systemd_running() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

check_source() {
    if [ -d "$SOURCE" ]; then
        [ -f "$SOURCE/pyproject.toml" ] && [ -d "$SOURCE/avd" ] && return 0
        die "--from: $SOURCE is not an avd source tree (no pyproject.toml and avd/)"
    fi
    case "$SOURCE" in
        *.whl) [ -f "$SOURCE" ] || die "--from: no such wheel: $SOURCE" ;;
        *) die "--from: neither a source directory nor a wheel: $SOURCE" ;;
    esac
}

# What pip needs to build avd's dependencies with the distribution's Python: PyAudio has no
# Linux wheel and compiles against portaudio.h. Checked by file, not by dpkg, so that a
# system whose /usr has them by other means is left alone; what is missing is installed
# with apt-get where there is one, or named.
install_build_deps() {
    local python="${AVD_PYTHON:-/usr/bin/python3}" venv="$ROOT$PREFIX" include compiler missing=()
    # Nothing to build: pip installs no dependency, or PyAudio is in the venv already.
    case " ${AVD_PIP_ARGS:-} " in *" --no-deps "*) return 0 ;; esac
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import pyaudio' 2>/dev/null; then
        return 0
    fi
    include="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    # The compiler this Python builds extensions with (x86_64-linux-gnu-gcc on Debian).
    compiler="$("$python" -c 'import sysconfig; print((sysconfig.get_config_var("CC") or "cc").split()[0])')"
    "$python" -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
    [ -f "$include/Python.h" ] || missing+=(python3-dev)
    [ -f /usr/include/portaudio.h ] || missing+=(portaudio19-dev)
    command -v "$compiler" >/dev/null || missing+=(gcc)
    [ ${#missing[@]} -gt 0 ] || return 0
    if [ -z "$ROOT" ] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]} (to build PyAudio in the virtualenv)"
        # A fresh image has no package lists yet.
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
            || die "apt-get could not install ${missing[*]}"
    else
        die "missing ${missing[*]} (Debian's names): install them, then run this again"
    fi
}

install_venv() {
    local venv="$ROOT$PREFIX" python="${AVD_PYTHON:-/usr/bin/python3}"
    if [ -x "$venv/bin/python" ]; then
        say "kept the virtualenv $venv"
    else
        "$python" -m venv "$venv"
        say "created the virtualenv $venv ($("$venv/bin/python" --version))"
    fi
    local target="$SOURCE"
    if [ -d "$SOURCE" ]; then
        # Build from a copy of what the build reads: pip builds in the tree it is given
        # and would leave build/ (and need write access) in the operator's checkout.
        target="$WORK/src"
        mkdir "$target"
        cp -R "$SOURCE/pyproject.toml" "$SOURCE/avd" "$target/"
        for extra in README.md LICENSE; do
            [ ! -f "$SOURCE/$extra" ] || cp "$SOURCE/$extra" "$target/"
        done
        find "$target" -name __pycache__ -prune -exec rm -rf {} +
    fi
    # shellcheck disable=SC2086  # AVD_PIP_ARGS is a list of words on purpose
    "$venv/bin/python" -m pip install --quiet --upgrade ${AVD_PIP_ARGS:-} "$target"
    for role in "${ROLES[@]}"; do
        [ -x "$venv/bin/avd-$role" ] || die "pip did not install $venv/bin/avd-$role"
    done
    say "installed avd from $SOURCE into $venv"
}

install_units() {
    local dir="$ROOT/etc/systemd/system" unit staged="$WORK/unit"
    mkdir -p "$dir"
    for role in "${ROLES[@]}"; do
        unit="$dir/avd-$role.service"
        # The units name /opt/avd; another prefix is written into the installed copy.
        sed "s#$DEFAULT_PREFIX/#$PREFIX/#g" "$HERE/systemd/avd-$role.service" >"$staged"
        if [ -f "$unit" ] && cmp -s "$staged" "$unit"; then
            say "unchanged $unit"
        else
            install -m 0644 "$staged" "$unit"
            say "installed $unit"
        fi
    done
}

install_config() {
    local dir="$ROOT/etc/avd" env
    # 0755: the services' dynamic users read the public certificates and the tokens file
    # here; secrets are each 0600 and reach the services as credentials.
    install -d -m 0755 "$dir"
    for role in "${ROLES[@]}"; do
        env="$dir/$role.env"
        if [ -e "$env" ]; then
            say "kept $env (an existing configuration is never overwritten)"
        else
            install -m 0640 "$HERE/$role.env.example" "$env"
            say "created $env from $role.env.example: edit it before starting avd-$role"
        fi
    done
}

reload_systemd() {
    if [ -n "$ROOT" ]; then
        say "AVD_INSTALL_ROOT is set: no systemctl daemon-reload"
    elif systemd_running; then
        systemctl daemon-reload
        say "ran systemctl daemon-reload"
    else
        say "systemd is not running: no systemctl daemon-reload"
    fi
}

# A running daemon would otherwise go on with the old code, and import new modules into it
# the first time it needs one (Python imports lazily): restart what runs, start nothing.
restart_running() {
    local role
    systemd_running || return 0
    for role in "${ROLES[@]}"; do
        systemctl is-active --quiet "avd-$role.service" || continue
        if [ "$RESTART" -eq 0 ]; then
            say "avd-$role.service runs the previous version until restarted (--no-restart)"
        elif systemctl restart "avd-$role.service"; then
            say "restarted avd-$role.service onto the new version"
        else
            die "avd-$role.service did not start again: journalctl -u avd-$role.service"
        fi
    done
}

do_install() {
    [ -n "$ROOT" ] || [ "$(id -u)" -eq 0 ] || die "run as root (or set AVD_INSTALL_ROOT)"
    if [ "$WITH_VENV" -eq 1 ]; then
        check_source
        install_build_deps
        install_venv
    else
        say "--no-venv: left $ROOT$PREFIX alone"
    fi
    install_units
    install_config
    reload_systemd
    restart_running
    say "next: put secrets in /etc/avd (sender.token, receiver.key: mode 0600), then"
    say "      systemctl enable --now avd-receiver.service (or avd-sender.service)"
}

do_uninstall() {
    [ -n "$ROOT" ] || [ "$(id -u)" -eq 0 ] || die "run as root (or set AVD_INSTALL_ROOT)"
    local unit venv="$ROOT$PREFIX"
    for role in "${ROLES[@]}"; do
        unit="$ROOT/etc/systemd/system/avd-$role.service"
        if systemd_running; then
            systemctl disable --now "avd-$role.service" 2>/dev/null || true
        fi
        if [ -e "$unit" ]; then
            rm -f "$unit"
            say "removed $unit"
        fi
    done
    reload_systemd
    if [ -e "$venv" ]; then
        # Only a directory that is a virtualenv: a mistyped --prefix must not erase data.
        [ -f "$venv/pyvenv.cfg" ] || die "$venv is not a virtualenv: not removing it"
        rm -rf "$venv"
        say "removed $venv"
    fi
    say "kept $ROOT/etc/avd (configuration, tokens, keys) and $ROOT/var/lib/avd (recordings):"
    say "remove them by hand if they are no longer wanted"
}

parse_args "$@"
umask 022
"do_$ACTION"
