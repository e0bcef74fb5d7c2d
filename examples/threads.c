/* SPDX-License-Identifier: PostgreSQL */
/*
 * Blocking checkout from threads: eight threads share a pool of four connections; each checks
 * one out, runs a query and returns it, 100 times. The pool parks the threads that find it
 * busy and hands each returned connection to the one that waited longest.
 *
 *   threads CONNINFO
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <pgring.h>

#define THREADS 8
#define ROUNDS  100

static pgr_pool *pool;

static void *worker(void *arg)
{
	long id = (long)arg, sum = 0;
	for (int i = 0; i < ROUNDS; i++) {
		pgr_conn *c;
		/* PGR_ACQUIRE records this line: a leak report would name it. */
		int rc = PGR_ACQUIRE(pool, 5000, &c);
		if (rc < 0) {
			fprintf(stderr, "thread %ld: acquire: %s\n", id, pgr_strerror(rc));
			return (void *)-1L;
		}
		const char *params[1] = {"1"};
		PGresult *r =
		    PQexecParams(pgr_conn_pg(c), "select $1::int", 1, NULL, params, NULL, NULL, 0);
		if (PQresultStatus(r) == PGRES_TUPLES_OK)
			sum += atol(PQgetvalue(r, 0, 0));
		PQclear(r);
		pgr_release(c);
	}
	return (void *)sum;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s CONNINFO\n", argv[0]);
		return 2;
	}
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = argv[1];
	cfg.max_size = 4;
	int rc = pgr_pool_create(&cfg, &pool);
	if (rc < 0) {
		fprintf(stderr, "pgr_pool_create: %s\n", pgr_strerror(rc));
		return 1;
	}
	pthread_t t[THREADS];
	for (long i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, worker, (void *)i);
	long total = 0;
	int failed = 0;
	for (int i = 0; i < THREADS; i++) {
		void *ret;
		pthread_join(t[i], &ret);
		if ((long)ret < 0)
			failed = 1;
		else
			total += (long)ret;
	}
	pgr_stats st;
	pgr_pool_stats(pool, &st);
	printf("%ld queries on %u connections: %llu checkouts, %llu waited, %llu handed off\n",
	       total, st.size, (unsigned long long)st.acquires, (unsigned long long)st.waits,
	       (unsigned long long)st.handoffs);
	pgr_pool_destroy(pool);
	return failed || total != THREADS * ROUNDS;
}
