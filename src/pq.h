/* SPDX-License-Identifier: PostgreSQL */
/*
 * The libpq engine: one implementation of send / flush / consume / isBusy / results and the
 * OpenSSL pending-bytes check, as steps that say what to wait for. The manager (ping, rollback,
 * reset on its ring) and pgr_loop (queries, pipelines, pre-pings and rollbacks on the caller's
 * ring) both drive it; it knows nothing about io_uring, so a test can drive it with poll(2).
 *
 * Contract of a step: call pgr__pq_step after the statement(s) were sent and whenever the
 * socket reported the events the previous step asked for (revents; 0 on the first call). It
 * returns WANT_READ or WANT_RW (arm a one-shot poll for POLLIN, or POLLIN|POLLOUT, on the fd
 * PQsocket returns now), DONE (every result was handed to sink, the connection is idle again)
 * or ERROR (the connection failed; what it says is in PQerrorMessage).
 */
#ifndef PGR_PQ_H
#define PGR_PQ_H

#include <stdbool.h>
#include <stdint.h>

#include <libpq-fe.h>

enum pgr__pq_want {
	PGR__PQ_DONE = 0,
	PGR__PQ_READ,
	PGR__PQ_RW, /* still sending: wait for either, the server may need us to read first */
	PGR__PQ_ERROR,
};

struct pgr__pq {
	PGconn *pg;
	/* Receives every result (and owns it). stmt: the statement it belongs to (0 outside a
	 * pipeline). */
	void (*sink)(struct pgr__pq *x, int stmt, PGresult *r);
	uint8_t pipeline;    /* results end with PGRES_PIPELINE_SYNC, then pipeline mode is left */
	uint8_t nstmt;       /* pipeline: statements sent */
	uint8_t stmt;        /* pipeline: the statement whose results are being read */
	uint8_t extra_syncs; /* pipeline: sync points before the last one (each ends a group of
	                        statements that an error in another group must not abort) */
	uint32_t syncs;      /* stream mode: sync points sent and not read yet */
};

/* Send one statement (no parameters: ping "", ROLLBACK, reset_sql) the nonblocking way. */
bool pgr__pq_send_simple(PGconn *pg, const char *sql);
enum pgr__pq_want pgr__pq_step(struct pgr__pq *x, int revents);
/* Stream mode (pgr_loop_exec): pipeline mode kept on, one sync point per statement. sink gets
 * every result (stmt 0, PGRES_PIPELINE_SYNC included, and owns it) and a NULL with stmt -1 at
 * the end of each statement's results. DONE: every sync point sent was read. */
enum pgr__pq_want pgr__pq_stream_step(struct pgr__pq *x, int revents);
/* poll(2) events for a want. */
short pgr__pq_events(enum pgr__pq_want w);

/* True when OpenSSL holds decrypted bytes that would never make the socket readable. */
bool pgr__tls_pending(PGconn *pg);

#endif
