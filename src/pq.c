/* SPDX-License-Identifier: PostgreSQL */
/*
 * The libpq engine (pq.h). Stateless beyond struct pgr__pq: the caller owns the waiting.
 */
#include <poll.h>

#include <openssl/ssl.h>

#include "pq.h"

/*
 * libpq reads at most one TLS record per call, and only its own waits look at what OpenSSL
 * buffered. When OpenSSL already holds decrypted bytes the socket may never become readable
 * again for them, so a poll armed now could wait forever: read again instead.
 */
bool pgr__tls_pending(PGconn *pg)
{
	if (!PQsslInUse(pg))
		return false;
	SSL *ssl = PQsslStruct(pg, "OpenSSL");
	return ssl && SSL_has_pending(ssl);
}

bool pgr__pq_send_simple(PGconn *pg, const char *sql)
{
	/* A holder may have switched the connection to blocking mode; pgring's drivers never block.
	 */
	return PQsetnonblocking(pg, 1) == 0 && PQsendQuery(pg, sql) == 1;
}

short pgr__pq_events(enum pgr__pq_want w)
{
	return w == PGR__PQ_RW ? (POLLIN | POLLOUT) : POLLIN;
}

static enum pgr__pq_want read_results(struct pgr__pq *x)
{
	PGconn *pg = x->pg;
	for (;;) {
		if (!PQconsumeInput(pg))
			return PGR__PQ_ERROR;
		while (!PQisBusy(pg)) {
			PGresult *r = PQgetResult(pg);
			if (!r) {
				if (!x->pipeline)
					return PGR__PQ_DONE;
				x->stmt++; /* end of one statement's results */
				continue;
			}
			if (x->pipeline && PQresultStatus(r) == PGRES_PIPELINE_SYNC) {
				PQclear(r);
				if (x->extra_syncs) {
					x->extra_syncs--; /* the end of a group; more follow */
					continue;
				}
				/* The last sync is not followed by NULL: it ends the pipeline. */
				bool ok = x->stmt == x->nstmt && PQexitPipelineMode(pg) == 1;
				return ok ? PGR__PQ_DONE : PGR__PQ_ERROR;
			}
			x->sink(x, x->pipeline ? x->stmt : 0, r);
		}
		if (!pgr__tls_pending(pg))
			return PGR__PQ_READ;
	}
}

enum pgr__pq_want pgr__pq_step(struct pgr__pq *x, int revents)
{
	if (revents & (POLLERR | POLLNVAL)) {
		/* Let libpq see the error itself: a read reports it with the server's words. */
		if (!PQconsumeInput(x->pg))
			return PGR__PQ_ERROR;
	}
	int f = PQflush(x->pg);
	if (f < 0)
		return PGR__PQ_ERROR;
	if (f == 1) {
		/* Still sending. Read what came meanwhile: a server blocked on its own send
		 * would otherwise never read ours (libpq's PQflush contract). */
		if ((revents & POLLIN) && !PQconsumeInput(x->pg))
			return PGR__PQ_ERROR;
		return PGR__PQ_RW;
	}
	return read_results(x);
}

/*
 * Stream mode (pgr_loop_exec): the connection stays in pipeline mode and every statement ends
 * in its own sync point, so statements are independent and results are read as they come.
 * x->syncs counts the sync points sent and not read yet; nothing is read past the last one
 * (in pipeline mode libpq answers NULL forever once its queue is empty).
 */
enum pgr__pq_want pgr__pq_stream_step(struct pgr__pq *x, int revents)
{
	PGconn *pg = x->pg;
	if ((revents & (POLLERR | POLLNVAL)) && !PQconsumeInput(pg))
		return PGR__PQ_ERROR;
	int f = PQflush(pg);
	if (f < 0)
		return PGR__PQ_ERROR;
	if (f == 1) {
		if ((revents & POLLIN) && !PQconsumeInput(pg))
			return PGR__PQ_ERROR;
		return PGR__PQ_RW;
	}
	for (;;) {
		if (!PQconsumeInput(pg))
			return PGR__PQ_ERROR;
		int nulls = 0;
		while (x->syncs && !PQisBusy(pg)) {
			PGresult *r = PQgetResult(pg);
			if (!r) {
				/* One NULL ends a statement's results; a run of them means libpq
				 * has nothing queued for us, i.e. the connection failed under it.
				 */
				if (PQstatus(pg) == CONNECTION_BAD || ++nulls > 2)
					return PGR__PQ_ERROR;
				x->sink(x, -1, NULL);
				continue;
			}
			nulls = 0;
			if (PQresultStatus(r) == PGRES_PIPELINE_SYNC)
				x->syncs--;
			x->sink(x, 0, r);
		}
		if (!x->syncs)
			return PQstatus(pg) == CONNECTION_BAD ? PGR__PQ_ERROR : PGR__PQ_DONE;
		if (!pgr__tls_pending(pg))
			return PGR__PQ_READ;
	}
}
