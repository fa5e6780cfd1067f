#!/usr/bin/env bash
# The issue-5 rows of BENCHMARKS.md, measured in one run on the same servers:
#   (a) one hive instance on SQLite;
#   (b) one instance on Postgres + Redis;
#   (c) three instances on Postgres + Redis (one runs the pool, two forward to it);
# each by `benches/cluster.rs` (release build, real `hive up` and `hive node --driver sim`
# processes), then the raw baselines of scripts/bench-baselines.sh on the same Postgres and
# Redis, and a table of the ratios.
# Usage: scripts/bench-cluster.sh [extra cluster args, e.g. --cycles 4000 --vms 200]
# Environment: PG_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres),
#              REDIS_URL (default redis://127.0.0.1:6379/9: a db number this script flushes).
set -euo pipefail
cd "$(dirname "$0")/.."
pg="${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
redis="${REDIS_URL:-redis://127.0.0.1:6379/9}"
redis_port="$(sed -n 's|^redis://[^/]*:\([0-9]*\).*|\1|p' <<<"$redis")"
out="$(mktemp -d)"
db=""
cleanup() {
    [ -n "$db" ] && psql -q "$pg" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
    redis-cli -u "$redis" FLUSHDB >/dev/null 2>&1 || true
}
trap 'cleanup; rm -rf "$out"' EXIT

# One release build, then the binary itself (cargo would print its own lines between rows).
bin="$(cargo bench --bench cluster --no-run 2>&1 | tee /dev/stderr | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)"
[ -x "$bin" ] || { echo "no cluster bench binary found" >&2; exit 1; }

# The machine may be shared (builds, other tests): before each row, wait (up to 10 min) until it
# has been under 15 % busy for 3 s in a row, so that the rows compete with as little as possible.
wait_idle() {
    local quiet=0 deadline=$((SECONDS + 600)) a b
    while [ $quiet -lt 3 ] && [ $SECONDS -lt $deadline ]; do
        a=($(head -1 /proc/stat))
        sleep 1
        b=($(head -1 /proc/stat))
        local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) all=0 i
        for i in 1 2 3 4 5 6 7 8; do all=$((all + b[i] - a[i])); done
        if [ $((idle * 100)) -ge $((all * 85)) ]; then quiet=$((quiet + 1)); else quiet=0; fi
    done
    [ $quiet -ge 3 ] || echo "warning: the machine did not go idle; this row competes with other work" >&2
}

# row <name> <cluster args…>: a fresh database and an empty Redis db for each Postgres row.
row() {
    local name="$1"
    shift
    local args=("$@")
    if [[ " ${args[*]} " == *" postgres "* ]]; then
        db="hive_bench_$$_$RANDOM"
        psql -q "$pg" -c "CREATE DATABASE $db" >/dev/null
        redis-cli -u "$redis" FLUSHDB >/dev/null
        args+=(--database-url "${pg%/*}/$db" --redis-url "$redis")
    fi
    wait_idle
    echo "== row $name: cluster ${args[*]}" >&2
    # A row that fails (a cycle failed, a VM held twice) is reported, and the others still run.
    "$bin" --bench "${args[@]}" | tee "$out/$name" || failed+=" $name"
    cleanup
    db=""
}
failed=""
row a --instances 1 --database sqlite "$@"
row b --instances 1 --database postgres "$@"
row c --instances 3 --database postgres "$@"
wait_idle
scripts/bench-baselines.sh "$pg" "$redis_port" | tee "$out/baselines"

field() { sed -n "s/^RESULT .*$2=\([0-9.]*\).*/\1/p" "$out/$1"; }
pgb="$(sed -n 's/^postgres .*: \([0-9.]*\)$/\1/p' "$out/baselines")"
rdb="$(sed -n 's/^redis .*: \([0-9.]*\)$/\1/p' "$out/baselines")"
echo
echo "| row | setup | cycles/s | p50 / p99 lock-to-assigned (ms) | vs raw Postgres claim loop | vs raw Redis SET NX |"
echo "|---|---|---|---|---|---|"
for r in a b c; do
    case $r in
        a) setup="one instance, SQLite" ;;
        b) setup="one instance, Postgres + Redis" ;;
        c) setup="three instances, Postgres + Redis" ;;
    esac
    awk -v r="$r" -v s="$setup" -v c="$(field $r cycles_per_s)" -v p50="$(field $r p50_ms)" -v p99="$(field $r p99_ms)" \
        -v pg="$pgb" -v rd="$rdb" 'BEGIN { printf "| (%s) | %s | %.1f | %s / %s | %.3f | %.4f |\n", r, s, c, p50, p99, c / pg, c / rd }'
done
echo "| | raw Postgres claim + release, FOR UPDATE SKIP LOCKED (pgbench, 8 clients) | $pgb | | | |"
echo "| | raw Redis SET NX PX (redis-benchmark, 8 clients) | $rdb ops/s | | | |"
awk -v b="$(field b cycles_per_s)" -v c="$(field c cycles_per_s)" -v a="$(field a cycles_per_s)" \
    'BEGIN { printf "\n(b)/(a) = %.2f   (c)/(b) = %.2f\n", b / a, c / b }'
if [ -n "$failed" ]; then
    echo "FAILED rows:$failed (see their output above)" >&2
    exit 1
fi
