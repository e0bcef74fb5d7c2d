/* SPDX-License-Identifier: PostgreSQL */
/*
 * The async API on the caller's own io_uring ring: ten requests, each an acquire, a query and
 * a release, all in flight at once on one thread over two connections. pgring prepares its
 * SQEs on the ring; the program submits, reaps, and hands pgring the CQEs it owns.
 *
 *   async_ring CONNINFO
 */
#include <errno.h>
#include <liburing.h>
#include <stdio.h>

#include <pgring.h>

#define REQUESTS 10

static int done, failed;

static void on_result(pgr_loop *loop, int err, PGresult *res, void *arg)
{
	pgr_conn *c = arg;
	if (err == 0 && PQresultStatus(res) == PGRES_TUPLES_OK)
		printf("connection %u: %s\n", pgr_conn_id(c), PQgetvalue(res, 0, 0));
	else
		failed++;
	PQclear(res);
	pgr_loop_release(loop, c); /* a rollback, if one were needed, would run on this ring */
	done++;
}

static void on_conn(pgr_loop *loop, int err, pgr_conn *c, void *arg)
{
	if (err < 0) {
		fprintf(stderr, "acquire: %s\n", pgr_strerror(err));
		failed++, done++;
		return;
	}
	const char *params[1] = {arg};
	int rc = pgr_loop_query(loop, c, "select 'request ' || $1", 1, params, 5000, on_result, c);
	if (rc < 0) {
		fprintf(stderr, "query: %s\n", pgr_strerror(rc));
		pgr_loop_release(loop, c);
		failed++, done++;
	}
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
	cfg.max_size = 2;
	pgr_pool *pool;
	struct io_uring ring;
	pgr_loop *loop;
	if (pgr_pool_create(&cfg, &pool) < 0 || io_uring_queue_init(64, &ring, 0) < 0 ||
	    pgr_loop_create(pool, &ring, 0, &loop) < 0)
		return 1;
	static const char *names[REQUESTS] = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};
	for (int i = 0; i < REQUESTS; i++)
		if (pgr_loop_acquire(loop, 5000, on_conn, (void *)names[i]) < 0)
			failed++, done++;
	/* The event loop: submit, wait, give pgring its CQEs (any others would be ours). */
	while (done < REQUESTS || pgr_loop_destroy(loop) == -EBUSY) {
		struct io_uring_cqe *cqe;
		unsigned head, n = 0;
		io_uring_submit_and_wait(&ring, 1);
		io_uring_for_each_cqe (&ring, head, cqe) {
			n++;
			if (!pgr_loop_handle_cqe(loop, cqe))
				fprintf(stderr, "a CQE that is not pgring's\n");
		}
		io_uring_cq_advance(&ring, n);
	}
	io_uring_queue_exit(&ring);
	pgr_pool_destroy(pool);
	printf("%d requests, %d failed\n", REQUESTS, failed);
	return failed != 0;
}
