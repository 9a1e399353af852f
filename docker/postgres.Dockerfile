# PostgreSQL for hosts that reach no registry (CI): Debian's postgresql-15 on a
# local base (docker/make-base-images.sh), with an entrypoint that honours the
# official image's variables (POSTGRES_USER, POSTGRES_DB, POSTGRES_PASSWORD_FILE,
# PGDATA), so docker/compose.yaml works with either. Production uses the
# official image (BASTION_POSTGRES_IMAGE, default postgres:16-bookworm).
ARG BASE_IMAGE=bastion-postgres-base:bookworm
FROM ${BASE_IMAGE}
# The official image's postgres uid, so one secret file's owner fits both.
RUN usermod -u 999 postgres && groupmod -g 999 postgres \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
 && ln -s /usr/lib/postgresql/15/bin/pg_isready /usr/local/bin/pg_isready
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PGDATA=/var/lib/postgresql/data
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]
