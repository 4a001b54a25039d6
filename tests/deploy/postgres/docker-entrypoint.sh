#!/usr/bin/env bash
# What deploy/compose.yaml relies on from the official postgres image's entrypoint, no more:
# - POSTGRES_USER (default postgres), POSTGRES_PASSWORD (required), POSTGRES_DB (default the user);
# - on the first start (an empty PGDATA): initdb, password authentication for TCP clients, the
#   database, then every /docker-entrypoint-initdb.d/*.sql and *.sh, against a server that
#   listens on its Unix socket only (so a TCP health check stays unhealthy until all that is done);
# - PGDATA (a volume) is kept as it is on every later start;
# - runs as root only to fix the data directory's owner, then as the postgres user;
# - PGPORT and `postgres -c name=value ...` arguments reach the server.
set -Eeuo pipefail
shopt -s nullglob

if [ "${1:0:1}" = "-" ]; then
    set -- postgres "$@"
fi

if [ "$1" = "postgres" ] && [ "$(id -u)" = "0" ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ "$1" = "postgres" ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?the database is not initialised and POSTGRES_PASSWORD is not set}"
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") --auth-local=trust \
        --auth-host=scram-sha-256 ${POSTGRES_INITDB_ARGS:-} >/dev/null
    # initdb's pg_hba.conf lets TCP in from loopback only; other containers connect over TCP too.
    printf '\nhost all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"

    pg_ctl --pgdata="$PGDATA" --wait --silent \
        -o "-c listen_addresses='' -p ${PGPORT:-5432}" start
    psql=(psql -v ON_ERROR_STOP=1 --username="$user" --no-password --no-psqlrc --port="${PGPORT:-5432}")
    if [ "$db" != "postgres" ]; then
        "${psql[@]}" --dbname=postgres --set db="$db" <<<'CREATE DATABASE :"db";' >/dev/null
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
            *.sh)  echo "running $f"; . "$f" ;;
            *.sql) echo "running $f"; "${psql[@]}" --dbname="$db" -f "$f" ;;
            *)     echo "ignoring $f" ;;
        esac
    done
    pg_ctl --pgdata="$PGDATA" --wait --silent -m fast stop
    echo "PostgreSQL init process complete; ready for start up."
fi

exec "$@"
