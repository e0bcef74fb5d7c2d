/* SPDX-License-Identifier: PostgreSQL */
/*
 * The manager on the caller's loop, no pool thread (cfg.manager_thread = false): the pool's
 * connects, rollbacks and maintenance run inside pgr_pool_run, called whenever pgr_pool_fd
 * is readable. Here the loop is poll(2); an epoll or io_uring loop works the same way. The
 * loop never blocks on the pool: it tries a checkout, and when none is idle yet (the first
 * connect is in progress) it waits for the pool's fd instead.
 *
 *   loop_manager CONNINFO
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>

#include <pgring.h>

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s CONNINFO\n", argv[0]);
		return 2;
	}
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = argv[1];
	cfg.max_size = 1;
	cfg.manager_thread = false;
	pgr_pool *pool;
	int rc = pgr_pool_create(&cfg, &pool);
	if (rc < 0) {
		fprintf(stderr, "pgr_pool_create: %s\n", pgr_strerror(rc));
		return 1;
	}
	struct pollfd pfd = {.fd = pgr_pool_fd(pool), .events = POLLIN};
	int queries = 0, turns = 0;
	while (queries < 5 && turns++ < 1000) {
		pgr_conn *c;
		rc = pgr_try_acquire(pool, &c);
		if (rc == 0) {
			/* A transaction left open: the release hands it to the manager to roll
			 * back, which happens in the pgr_pool_run calls below, on this thread. */
			PQclear(PQexec(pgr_conn_pg(c), "begin"));
			PGresult *r = PQexec(pgr_conn_pg(c), "select txid_current()");
			if (PQresultStatus(r) == PGRES_TUPLES_OK)
				printf("query %d in transaction %s\n", ++queries,
				       PQgetvalue(r, 0, 0));
			PQclear(r);
			pgr_release(c);
		} else if (rc != -EAGAIN) {
			fprintf(stderr, "acquire: %s\n", pgr_strerror(rc));
			break;
		}
		/* Wait for the manager to have work (its 10 ms tick at the latest), then run it. */
		if (poll(&pfd, 1, 100) > 0)
			pgr_pool_run(pool);
	}
	pgr_stats st;
	pgr_pool_stats(pool, &st);
	printf("%d queries, %llu rollbacks run on this thread\n", queries,
	       (unsigned long long)st.rollbacks);
	pgr_pool_destroy(pool); /* runs the manager itself while it closes the connection */
	return queries == 5 && st.rollbacks >= 4 ? 0 : 1;
}
