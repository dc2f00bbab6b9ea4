#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for the journal tests.
#
#   eval "$(.ci/pg.sh start)"   # prints: export SYNCD_TEST_PG_URL=postgresql://USER@127.0.0.1:PORT/syncd_test
#   python -m pytest tests/test_journal.py tests/test_journal_postgres.py
#   .ci/pg.sh stop              # immediate shutdown, deletes the cluster
#
# The cluster lives in a temp dir (trust auth, listens on 127.0.0.1 only, unix
# socket inside the temp dir, fsync off unless SYNCD_PG_DURABLE=1). PostgreSQL refuses to run as root, so
# under root the cluster runs as a system user ($SYNCD_PG_USER, default syncdci,
# created with useradd if missing; falls back to nobody).
#
# Environment:
#   PG_BINDIR          PostgreSQL bin dir (default: newest /usr/lib/postgresql/*/bin, else pg_config --bindir)
#   SYNCD_PG_USER      user that runs the cluster when invoked as root (default syncdci)
#   SYNCD_PG_TMP       parent of the temp dir (default /tmp)
#   SYNCD_PG_DURABLE   1 keeps fsync, synchronous_commit and full_page_writes on (benchmarks)
#   SYNCD_PG_STATE     state file (default: /tmp/syncd-pg-<uid>-<checkout hash>.state)
# Only the export line goes to stdout; everything else goes to stderr.
set -euo pipefail

die() { echo "pg.sh: $*" >&2; exit 1; }
log() { echo "pg.sh: $*" >&2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${SYNCD_PG_STATE:-/tmp/syncd-pg-$(id -u)-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1).state}
DB=syncd_test

find_bindir() {
    local dir=${PG_BINDIR:-}
    if [[ -z $dir ]]; then
        dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
    fi
    if [[ -z $dir ]] && command -v pg_config >/dev/null 2>&1; then
        dir=$(pg_config --bindir 2>/dev/null || true)
    fi
    [[ -n $dir ]] || die "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin and pg_config --bindir); install postgresql or set PG_BINDIR"
    local b
    for b in initdb pg_ctl postgres psql; do
        [[ -x $dir/$b ]] || die "$dir/$b is missing or not executable (PostgreSQL server binaries incomplete; set PG_BINDIR)"
    done
    echo "$dir"
}

# Run a command as the cluster user (a no-op wrapper when not root).
as_user() {
    if [[ $(id -u) -ne 0 ]]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$RUN_USER" -- "$@"
    elif command -v setpriv >/dev/null 2>&1; then
        setpriv --reuid="$RUN_USER" --regid="$(id -g "$RUN_USER")" --init-groups -- "$@"
    else
        su -s /bin/sh "$RUN_USER" -c "$(printf '%q ' "$@")"
    fi
}

pick_user() {
    if [[ $(id -u) -ne 0 ]]; then
        RUN_USER=$(id -un)
        return
    fi
    RUN_USER=${SYNCD_PG_USER:-syncdci}
    if ! id -u "$RUN_USER" >/dev/null 2>&1; then
        if command -v useradd >/dev/null 2>&1 \
            && useradd -r -m -d "/var/lib/$RUN_USER" -s /usr/sbin/nologin "$RUN_USER" >/dev/null 2>&1; then
            log "created system user $RUN_USER"
        elif id -u nobody >/dev/null 2>&1; then
            log "cannot create user $RUN_USER; running the cluster as nobody"
            RUN_USER=nobody
        else
            die "running as root and no unprivileged user to run PostgreSQL (useradd failed, no 'nobody')"
        fi
    fi
}

free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
    else
        echo $((20000 + RANDOM % 40000))
    fi
}

# 0 when the state file names a cluster whose postmaster is alive.
running() {
    [[ -f $STATE ]] || return 1
    local dir pid
    dir=$(head -1 "$STATE")
    [[ -n $dir && -f $dir/data/postmaster.pid ]] || return 1
    pid=$(head -1 "$dir/data/postmaster.pid")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

cmd_start() {
    local bindir
    bindir=$(find_bindir)
    if running; then
        local dir
        dir=$(head -1 "$STATE")
        log "reusing running cluster in $dir"
        echo "export SYNCD_TEST_PG_URL=$(cat "$dir/url")"
        return
    fi
    [[ -f $STATE ]] && cmd_stop >/dev/null 2>&1 || true
    pick_user

    local parent=${SYNCD_PG_TMP:-/tmp}
    local dir
    dir=$(mktemp -d "$parent/syncd-pg.XXXXXX") || die "cannot create a temp dir under $parent"
    # From here on a failure removes the half-made cluster.
    trap 'rc=$?; if [[ $rc -ne 0 ]]; then [[ -f "$dir/server.log" ]] && tail -20 "$dir/server.log" >&2; as_user "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$dir"; rm -f "$STATE"; fi' EXIT
    chmod 700 "$dir"
    [[ $(id -u) -eq 0 ]] && chown "$RUN_USER:" "$dir"
    cd "$dir"   # the cluster user may not be able to read the caller's cwd

    log "initdb in $dir as $RUN_USER ($bindir)"
    as_user "$bindir/initdb" -D "$dir/data" -A trust -U "$RUN_USER" -E UTF8 --no-locale -N \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }

    local port="" attempt
    for attempt in 1 2 3 4 5; do
        port=$(free_port)
        # Settings are appended to postgresql.conf; a later line wins, so a retry just re-appends.
        as_user tee -a "$dir/data/postgresql.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 200
EOF
        if [[ ${SYNCD_PG_DURABLE:-0} != 1 ]]; then  # tests: durability off for speed; benchmarks keep it on
            as_user tee -a "$dir/data/postgresql.conf" >/dev/null <<EOF
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
        fi
        if as_user "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null 2>&1; then
            break
        fi
        port=""
        log "start on port attempt $attempt failed; retrying"
    done
    [[ -n $port ]] || die "pg_ctl start failed (server log tail follows, if any)"

    as_user "$bindir/psql" -X -q -h "$dir" -p "$port" -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE DATABASE $DB" >/dev/null || die "cannot create database $DB"

    local url="postgresql://$RUN_USER@127.0.0.1:$port/$DB"
    echo "$url" >"$dir/url"
    echo "$dir" >"$STATE"
    trap - EXIT
    log "PostgreSQL $("$bindir/postgres" -V | awk '{print $3}') running on 127.0.0.1:$port (state $STATE)"
    echo "export SYNCD_TEST_PG_URL=$url"
}

cmd_stop() {
    if [[ ! -f $STATE ]]; then
        log "no cluster recorded in $STATE; nothing to stop"
        return 0
    fi
    local dir
    dir=$(head -1 "$STATE")
    [[ $dir == */syncd-pg.* && -d $dir ]] || { log "state file names no cluster dir ($dir); removing it"; rm -f "$STATE"; return 0; }
    local pid=""
    [[ -f $dir/data/postmaster.pid ]] && pid=$(head -1 "$dir/data/postmaster.pid")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        local bindir owner
        bindir=$(find_bindir)
        owner=$(stat -c %U "$dir/data")
        RUN_USER=$owner
        (cd "$dir" && as_user "$bindir/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null 2>&1) || true
        local i
        for i in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "postmaster $pid did not stop; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
        kill -0 "$pid" 2>/dev/null && die "postmaster $pid is still running; $dir kept"
    fi
    rm -rf "$dir"
    rm -f "$STATE"
    log "stopped and removed $dir"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
