#!/bin/sh
# initdb on first start (password auth for the network, the user and database
# named in the environment), then run the server as postgres.
set -eu
bin=/usr/lib/postgresql/15/bin
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
mkdir -p "$PGDATA" && chown postgres:postgres "$PGDATA" && chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=${POSTGRES_PASSWORD_FILE:?POSTGRES_PASSWORD_FILE is required}
    cp "$pwfile" /tmp/pw && chown postgres /tmp/pw
    setpriv --reuid=postgres --regid=postgres --init-groups \
        "$bin/initdb" -D "$PGDATA" -U "$user" --pwfile=/tmp/pw --auth-local=scram-sha-256 --auth-host=scram-sha-256 >/dev/null
    rm -f /tmp/pw
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    setpriv --reuid=postgres --regid=postgres --init-groups "$bin/pg_ctl" -D "$PGDATA" -w -o "-c listen_addresses=''" start >/dev/null
    if [ "$db" != postgres ]; then
        PGPASSWORD=$(cat "$pwfile") setpriv --reuid=postgres --regid=postgres --init-groups \
            "$bin/psql" -h /var/run/postgresql -U "$user" -d postgres -v ON_ERROR_STOP=1 -q \
            -c "CREATE DATABASE \"$db\""
    fi
    setpriv --reuid=postgres --regid=postgres --init-groups "$bin/pg_ctl" -D "$PGDATA" -w stop >/dev/null
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups "$bin/postgres" -D "$PGDATA" -c listen_addresses='*'
