#!/usr/bin/env bash
# Issue 9's measurement: the release service on PostgreSQL (a fresh schema, so roles of its
# own), 12 s of normal load plus dropped requests, then: connections idle in a transaction,
# PostgreSQL's "already a transaction in progress" warnings during the run, the orders by
# status, the undelivered outbox rows.
#
# The server is shared (other test runs write to the same log), so the run's sessions are told
# apart by name: the service names each connection after its role (application_name = the
# application role for the tenant pool, the owner role for the admin pool). For the length of
# the run, log_line_prefix gets %a (ALTER SYSTEM + pg_reload_conf, restored on exit) so every
# log line names its session's application; warnings are counted in total and for this run.
#
# Run from the workspace root after `cargo build --release -p order-service`, under the
# build lock: flock /tmp/cf-cargo.lock bash examples/order-service/scripts/dropped_requests.sh
set -u
PG=${PG:-postgres://postgres@127.0.0.1:5432/test}
LOG=${PGLOG:-/var/log/postgresql/postgresql-15-main.log}
SECONDS_OF_LOAD=${SECONDS_OF_LOAD:-12}
HERE=$(dirname "$0")
SCHEMA=order_service_drop_$(date +%s)
DB=$(psql -At "$PG" -c "SELECT current_database()")
APP_ROLE=${DB}_${SCHEMA}_app
OWNER_ROLE=${DB}_${SCHEMA}_owner

OLD_PREFIX=$(psql -At "$PG" -c "SELECT setting FROM pg_settings WHERE name = 'log_line_prefix'")
OLD_FILE=$(psql -At "$PG" -c "SELECT coalesce(sourcefile, '') FROM pg_settings WHERE name = 'log_line_prefix'")
restore_prefix() {
    # Set by ALTER SYSTEM before (postgresql.auto.conf): put that value back; else remove ours.
    if [[ "$OLD_FILE" != *postgresql.auto.conf ]]; then
        psql -q "$PG" -c "ALTER SYSTEM RESET log_line_prefix"
    else
        psql -q "$PG" -c "ALTER SYSTEM SET log_line_prefix = '${OLD_PREFIX//\'/\'\'}'"
    fi
    psql -Atq "$PG" -c "SELECT pg_reload_conf()" > /dev/null
}
trap restore_prefix EXIT
psql -q "$PG" -c "ALTER SYSTEM SET log_line_prefix = '%m [%p] %q%u@%d app=%a '"
psql -Atq "$PG" -c "SELECT pg_reload_conf()" > /dev/null
sleep 1

psql -q "$PG" -c "CREATE SCHEMA $SCHEMA"
LOGSTART=$(wc -l < "$LOG")
DATABASE_URL="$PG?options%5Bsearch_path%5D=$SCHEMA" target/release/order-service --addr 127.0.0.1:3997 \
    > /tmp/order-service-drop.log 2>&1 &
SVC=$!
for _ in $(seq 1 100); do grep -q "listening" /tmp/order-service-drop.log && break; sleep 0.2; done
python3 "$HERE/dropped_requests.py" 3997 "$SECONDS_OF_LOAD"
sleep 2
echo "roles: $APP_ROLE (serves), $OWNER_ROLE (admin pool)"
echo "this run's connections idle in a transaction: $(psql -At "$PG" -c "SELECT count(*) FROM pg_stat_activity
    WHERE state LIKE 'idle in transaction%' AND application_name IN ('$APP_ROLE', '$OWNER_ROLE')")"
echo "all connections idle in a transaction (whole server): $(psql -At "$PG" -c "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'")"
kill -TERM $SVC
wait $SVC
echo "service exit status: $?"
RUNLOG=$(tail -n +$((LOGSTART + 1)) "$LOG")
echo "'already a transaction in progress' warnings, whole server during the run: $(grep -c 'already a transaction in progress' <<< "$RUNLOG")"
echo "  of them from this run's sessions: $(grep 'already a transaction in progress' <<< "$RUNLOG" | grep -cE "app=($APP_ROLE|$OWNER_ROLE) ")"
echo "  by application: $(grep 'already a transaction in progress' <<< "$RUNLOG" | grep -oE 'app=[^ ]*' | sort | uniq -c | sort -rn | head -5 | tr '\n' ';')"
echo "this run's log lines of level WARNING or ERROR: $(grep -E "app=($APP_ROLE|$OWNER_ROLE) " <<< "$RUNLOG" | grep -cE '(WARNING|ERROR):')"
echo "orders by status (status | count | confirmed once | confirmed more than once):"
psql -At "$PG" -c "SELECT status, count(*), sum(CASE WHEN confirmation_sent = 1 THEN 1 ELSE 0 END),
    sum(CASE WHEN confirmation_sent > 1 THEN 1 ELSE 0 END) FROM $SCHEMA.orders GROUP BY status ORDER BY status"
echo "undelivered outbox rows: $(psql -At "$PG" -c "SELECT count(*) FROM $SCHEMA.outbox WHERE delivered = 0")"
psql -q "$PG" -c "DROP SCHEMA $SCHEMA CASCADE" 2>/dev/null
for role in "$APP_ROLE" "$OWNER_ROLE"; do
    psql -q "$PG" -c "DROP OWNED BY \"$role\"" -c "DROP ROLE \"$role\"" 2>/dev/null
done
