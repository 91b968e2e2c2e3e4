#!/usr/bin/env bash
# Issue 9's measurement: the release service on PostgreSQL (a fresh schema), 12 s of normal
# load plus dropped requests, then: connections idle in a transaction, PostgreSQL's
# "already a transaction in progress" warnings during the run, the orders by status.
# Run from the workspace root after `cargo build --release -p order-service`, under the
# build lock: flock /tmp/cf-cargo.lock bash examples/order-service/scripts/dropped_requests.sh
set -u
PG=${PG:-postgres://postgres@127.0.0.1:5432/test}
LOG=${PGLOG:-/var/log/postgresql/postgresql-15-main.log}
HERE=$(dirname "$0")
SCHEMA=order_service_drop_$(date +%s)
psql -q "$PG" -c "CREATE SCHEMA $SCHEMA"
LOGSTART=$(wc -l < "$LOG")
DATABASE_URL="$PG?options%5Bsearch_path%5D=$SCHEMA" target/release/order-service --addr 127.0.0.1:3997 \
    > /tmp/order-service-drop.log 2>&1 &
SVC=$!
for _ in $(seq 1 50); do grep -q "listening on" /tmp/order-service-drop.log && break; sleep 0.2; done
python3 "$HERE/dropped_requests.py" 3997 12
sleep 2
echo "connections idle in a transaction: $(psql -At "$PG" -c "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'")"
echo "'already a transaction in progress' warnings: $(tail -n +$((LOGSTART + 1)) "$LOG" | grep -c 'already a transaction in progress')"
kill -TERM $SVC
wait $SVC
echo "service exit status: $?"
echo "orders by status (status | count | confirmed once | confirmed more than once):"
psql -At "$PG" -c "SELECT status, count(*), sum(CASE WHEN confirmation_sent = 1 THEN 1 ELSE 0 END),
    sum(CASE WHEN confirmation_sent > 1 THEN 1 ELSE 0 END) FROM $SCHEMA.orders GROUP BY status ORDER BY status"
echo "undelivered outbox rows: $(psql -At "$PG" -c "SELECT count(*) FROM $SCHEMA.outbox WHERE delivered = 0")"
psql -q "$PG" -c "DROP SCHEMA $SCHEMA CASCADE" 2>/dev/null
