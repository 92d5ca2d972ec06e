#!/bin/sh
# First start: a cluster with one role and database `kernelpool`, its password from
# POSTGRES_PASSWORD (or the file POSTGRES_PASSWORD_FILE), reachable from the compose network with
# scram-sha-256. Then the server, as the postgres user, in the foreground ('fast' stop on SIGINT).
set -eu
bin=/usr/lib/postgresql/15/bin
password=${POSTGRES_PASSWORD:-}
if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then password=$(cat "$POSTGRES_PASSWORD_FILE"); fi
mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "$password" ]; then
        echo "kernelpool-postgres: set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) for the first start" >&2
        exit 2
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$password" > "$pwfile"
    chown postgres "$pwfile"
    runuser -u postgres -- "$bin/initdb" -D "$PGDATA" -U kernelpool --pwfile="$pwfile" \
        --auth-local=scram-sha-256 --auth-host=scram-sha-256
    rm -f "$pwfile"
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    runuser -u postgres -- "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start
    runuser -u postgres -- env PGPASSWORD="$password" "$bin/createdb" -h /run/postgresql -U kernelpool kernelpool
    runuser -u postgres -- "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop
fi
exec runuser -u postgres -- "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c max_connections=200
