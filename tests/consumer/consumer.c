/* SPDX-License-Identifier: PostgreSQL */
/*
 * Built against the installed pgring (CMake package or pkg-config) and run with a conninfo:
 * checks that the library it runs against is at least the header's version, then checks out a
 * connection and runs one query. Exit status 0 only if all of it worked.
 */
#include <stdio.h>

#include <pgring.h>

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s CONNINFO\n", argv[0]);
		return 2;
	}
	if (pgr_version() < PGRING_VERSION_NUMBER) {
		fprintf(stderr, "library %s is older than the header %s\n", pgr_version_string(),
		        PGRING_VERSION_STRING);
		return 1;
	}
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = argv[1];
	cfg.max_size = 1;
	pgr_pool *pool;
	int rc = pgr_pool_create(&cfg, &pool);
	if (rc < 0) {
		fprintf(stderr, "pgr_pool_create: %s\n", pgr_strerror(rc));
		return 1;
	}
	pgr_conn *conn;
	rc = pgr_acquire(pool, 10000, &conn);
	if (rc < 0) {
		char why[512];
		pgr_pool_last_error(pool, why, sizeof(why));
		fprintf(stderr, "pgr_acquire: %s: %s\n", pgr_strerror(rc), why);
		pgr_pool_destroy(pool);
		return 1;
	}
	PGresult *res = PQexec(pgr_conn_pg(conn), "select 41 + 1");
	int ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
	printf("pgring %s (header %s): select 41 + 1 = %s\n", pgr_version_string(),
	       PGRING_VERSION_STRING, ok ? PQgetvalue(res, 0, 0) : "(failed)");
	PQclear(res);
	ok = ok && pgr_release(conn) == 0;
	pgr_pool_destroy(pool);
	return ok ? 0 : 1;
}
