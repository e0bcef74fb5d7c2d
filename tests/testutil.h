/* SPDX-License-Identifier: PostgreSQL */
/*
 * Test helpers: the throwaway server's conninfo (from ./run.sh test), a direct admin
 * connection for looking at the server's side (pg_stat_activity), an event recorder, and
 * deadline-based polling. Tests never skip: without a server they fail and say why.
 */
#ifndef PGR_TESTUTIL_H
#define PGR_TESTUTIL_H

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "pgring.h"

const char *tu_conninfo(void);
const char *tu_env(const char *name);
/* conninfo with application_name=app appended (static buffer per call site is not safe: malloc'd)
 */
char *tu_conninfo_app(const char *base, const char *app);
PGconn *tu_admin(void);
long tu_query_long(PGconn *c, const char *sql);
void tu_exec(PGconn *c, const char *sql);
long tu_count_app(PGconn *admin, const char *app);
int64_t tu_now_ms(void);
void tu_sleep_ms(int64_t ms);
/* A loopback TCP port with nothing listening on it. */
int tu_dead_port(void);
/* A listener that completes TCP handshakes (kernel backlog) but never says a word. */
int tu_silent_listener(int *port);
/* Run the cluster control script: "server-stop" / "server-start". */
void tu_server_ctl(const char *what);

/* Event recorder. */
#define TU_MAX_MSGS 256
struct tu_events {
	pthread_mutex_t lock;
	int count[16];
	int n;
	enum pgr_event_type type[TU_MAX_MSGS];
	char msg[TU_MAX_MSGS][512];
	char field[TU_MAX_MSGS][64];
	char file[TU_MAX_MSGS][256];
	int line[TU_MAX_MSGS];
};
void tu_events_init(struct tu_events *e);
void tu_events_cb(const pgr_event *ev, void *user_data);
int tu_events_count(struct tu_events *e, enum pgr_event_type t);
/* Index of the first event of type t whose message contains needle, or -1. */
int tu_events_find(struct tu_events *e, enum pgr_event_type t, const char *needle);

/* Pool from cfg; waits (up to 10 s) until min_idle connections are idle. */
pgr_pool *tu_pool(pgr_config *cfg);

/* Poll cond every 2 ms until true or timeout_ms passes; evaluates to the final cond. */
#define TU_WAIT_UNTIL(cond, timeout_ms)                                                            \
	({                                                                                         \
		int64_t tu_dl_ = tu_now_ms() + (timeout_ms);                                       \
		bool tu_ok_;                                                                       \
		while (!(tu_ok_ = (cond)) && tu_now_ms() < tu_dl_)                                 \
			tu_sleep_ms(2);                                                            \
		tu_ok_;                                                                            \
	})

static inline pgr_stats tu_stats(pgr_pool *p)
{
	pgr_stats s;
	pgr_pool_stats(p, &s);
	return s;
}

#endif
