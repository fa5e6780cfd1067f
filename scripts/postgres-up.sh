#!/usr/bin/env bash
# Makes the machine's Postgres (Debian's postgresql package) answer on 127.0.0.1:5432 as user
# `postgres` without a password, which is what the store tests and system tests expect
# (they create and drop their own `hive_t_<random>` databases). Idempotent: creates the `main`
# cluster if there is none, starts it if stopped, and adds a trust rule for 127.0.0.1 only if
# the server refuses a password-less login. Needs root the first time.
set -euo pipefail
url=postgres://postgres@127.0.0.1:5432/postgres

ver="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)"
if [ -z "$ver" ]; then
    ver="$(ls /usr/lib/postgresql | sort -V | tail -n1)"
    pg_createcluster "$ver" main >/dev/null
fi
if ! pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start
fi

answers() { psql "$url" -Atqc 'SELECT 1' >/dev/null 2>&1; }
for _ in $(seq 1 50); do
    answers && break
    # A password prompt means the server is up but wants credentials: allow loopback.
    if psql "$url" -Atqc 'SELECT 1' 2>&1 </dev/null | grep -q 'password'; then
        hba="/etc/postgresql/$ver/main/pg_hba.conf"
        if ! grep -q '^host all postgres 127.0.0.1/32 trust' "$hba"; then
            sed -i '1i host all postgres 127.0.0.1/32 trust  # guaca-hive tests (scripts/postgres-up.sh)' "$hba"
            pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
        fi
    fi
    sleep 0.2
done
if ! answers; then
    echo "postgres-up: Postgres $ver does not answer at $url" >&2
    exit 1
fi
echo "$url"
