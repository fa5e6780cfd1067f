#!/usr/bin/env bash
# Raw baselines for the lock/release benchmark, on the same servers the hive uses:
#   - Postgres: a claim/release loop with FOR UPDATE SKIP LOCKED over 30 VM rows (pgbench,
#     8 clients, one claim + one release per pgbench transaction);
#   - Redis: SET NX PX (redis-benchmark, 8 clients), the command a lease or claim is taken with.
# Usage: scripts/bench-baselines.sh [postgres-admin-url] [redis-port]
# Prints one line per baseline: name, operations per second.
set -euo pipefail
pg="${1:-postgres://postgres@127.0.0.1:5432/postgres}"
redis_port="${2:-6379}"
db="hive_baseline_$$"
psql -q "$pg" -c "CREATE DATABASE $db" >/dev/null
trap 'psql -q "$pg" -c "DROP DATABASE IF EXISTS $db" >/dev/null' EXIT
url="${pg%/*}/$db"
psql -q "$url" >/dev/null <<'SQL'
CREATE TABLE claims (vm int PRIMARY KEY, holder int);
INSERT INTO claims SELECT g, NULL FROM generate_series(1, 30) g;
SQL
script="$(mktemp)"
cat > "$script" <<'SQL'
BEGIN;
WITH c AS (SELECT vm FROM claims WHERE holder IS NULL LIMIT 1 FOR UPDATE SKIP LOCKED)
  UPDATE claims SET holder = :client_id FROM c WHERE claims.vm = c.vm;
COMMIT;
UPDATE claims SET holder = NULL WHERE holder = :client_id;
SQL
tps="$(pgbench -n -c 8 -j 2 -T 10 -f "$script" "$url" 2>/dev/null | awk '/^tps/ {print $3; exit}')"
rm -f "$script"
echo "postgres claim+release cycles/s (FOR UPDATE SKIP LOCKED, 8 clients): $tps"
rps="$(redis-benchmark -p "$redis_port" -c 8 -n 200000 -q SET 'hive:bench:__rand_int__' x NX PX 30000 | tr '\r' '\n' | sed -n 's/.*: \([0-9.]*\) requests per second.*/\1/p' | tail -1)"
echo "redis SET NX PX ops/s (8 clients): $rps"
