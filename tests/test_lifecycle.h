/* SPDX-License-Identifier: PostgreSQL */
/*
 * Helpers shared by the test_lifecycle*.c suites: an event recorder that keeps what the
 * lifecycle tests need (slot, close reason, when), pools tagged with an application_name so
 * the server side can be looked at through pg_stat_activity, and backend-pid helpers.
 *
 * Everything here is static inline: each suite is its own binary and uses a subset.
 */
#ifndef PGR_TEST_LIFECYCLE_H
#define PGR_TEST_LIFECYCLE_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* ---- event recorder with slot, reason and time ---- */

#define LC_MAX_EVENTS 4096

struct lc_ev {
	enum pgr_event_type type;
	uint32_t conn_id;
	int64_t t_ms; /* CLOCK_MONOTONIC, as tu_now_ms() */
	char reason[24];
	char msg[384];
};

struct lc_events {
	pthread_mutex_t lock;
	int n;
	int dropped;
	struct lc_ev ev[LC_MAX_EVENTS];
};

static inline struct lc_events *lc_events_new(void)
{
	struct lc_events *e = calloc(1, sizeof(*e));
	cr_assert(e);
	pthread_mutex_init(&e->lock, NULL);
	return e;
}

static inline void lc_events_free(struct lc_events *e)
{
	pthread_mutex_destroy(&e->lock);
	free(e);
}

static inline void lc_events_cb(const pgr_event *ev, void *user_data)
{
	struct lc_events *e = user_data;
	int64_t now = tu_now_ms();
	pthread_mutex_lock(&e->lock);
	if (e->n < LC_MAX_EVENTS) {
		struct lc_ev *x = &e->ev[e->n++];
		x->type = ev->type;
		x->conn_id = ev->conn_id;
		x->t_ms = now;
		snprintf(x->reason, sizeof(x->reason), "%s", ev->reason ? ev->reason : "");
		snprintf(x->msg, sizeof(x->msg), "%s", ev->message ? ev->message : "");
	} else {
		e->dropped++;
	}
	pthread_mutex_unlock(&e->lock);
}

/* Events of type t (and reason, when not NULL) for slot id (or any slot: UINT32_MAX). */
static inline int lc_events_count(struct lc_events *e, enum pgr_event_type t, const char *reason,
                                  uint32_t id)
{
	int k = 0;
	pthread_mutex_lock(&e->lock);
	for (int i = 0; i < e->n; i++) {
		struct lc_ev *x = &e->ev[i];
		if (x->type == t && (!reason || !strcmp(x->reason, reason)) &&
		    (id == UINT32_MAX || x->conn_id == id))
			k++;
	}
	pthread_mutex_unlock(&e->lock);
	return k;
}

/* Copy of the first event matching (t, reason, id) at or after index from; false if none. */
static inline bool lc_events_first(struct lc_events *e, enum pgr_event_type t, const char *reason,
                                   uint32_t id, int from, struct lc_ev *out, int *at)
{
	bool found = false;
	pthread_mutex_lock(&e->lock);
	for (int i = from; i < e->n && !found; i++) {
		struct lc_ev *x = &e->ev[i];
		if (x->type == t && (!reason || !strcmp(x->reason, reason)) &&
		    (id == UINT32_MAX || x->conn_id == id)) {
			*out = *x;
			if (at)
				*at = i;
			found = true;
		}
	}
	pthread_mutex_unlock(&e->lock);
	return found;
}

/* True when some event of type t has needle in its message. */
static inline bool lc_events_find_msg(struct lc_events *e, enum pgr_event_type t,
                                      const char *needle)
{
	bool found = false;
	pthread_mutex_lock(&e->lock);
	for (int i = 0; i < e->n && !found; i++)
		found = e->ev[i].type == t && strstr(e->ev[i].msg, needle) != NULL;
	pthread_mutex_unlock(&e->lock);
	return found;
}

static inline int lc_events_n(struct lc_events *e)
{
	pthread_mutex_lock(&e->lock);
	int n = e->n;
	pthread_mutex_unlock(&e->lock);
	return n;
}

/* ---- pools ---- */

/*
 * cfg with defaults, conninfo = base + application_name=app (so pg_stat_activity can tell this
 * pool's backends from everyone else's), events into ev when given. *conninfo must be freed
 * by the caller after pgr_pool_create (the pool copies it).
 */
static inline void lc_config(pgr_config *cfg, const char *base, const char *app,
                             struct lc_events *ev, char **conninfo)
{
	pgr_config_init(cfg);
	*conninfo = tu_conninfo_app(base, app);
	cfg->conninfo = *conninfo;
	cfg->name = app;
	if (ev) {
		cfg->on_event = lc_events_cb;
		cfg->user_data = ev;
	}
}

/* ---- server side ---- */

#define LC_MAX_PIDS 64

/* Backend pids of application_name app, ascending; returns how many. */
static inline int lc_app_pids(PGconn *admin, const char *app, int *pids, int max)
{
	char sql[256];
	snprintf(sql, sizeof(sql),
	         "select pid from pg_stat_activity where application_name = '%s' order by pid",
	         app);
	PGresult *r = PQexec(admin, sql);
	cr_assert(PQresultStatus(r) == PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(admin));
	int n = PQntuples(r);
	for (int i = 0; i < n && i < max; i++)
		pids[i] = atoi(PQgetvalue(r, i, 0));
	PQclear(r);
	return n < max ? n : max;
}

static inline bool lc_pid_alive(PGconn *admin, int pid)
{
	char sql[128];
	snprintf(sql, sizeof(sql), "select count(*) from pg_stat_activity where pid = %d", pid);
	return tu_query_long(admin, sql) > 0;
}

static inline void lc_terminate(PGconn *admin, int pid)
{
	char sql[128];
	snprintf(sql, sizeof(sql), "select pg_terminate_backend(%d)", pid);
	PGresult *r = PQexec(admin, sql);
	cr_assert(PQresultStatus(r) == PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(admin));
	PQclear(r);
}

static inline bool lc_in(const int *set, int n, int v)
{
	for (int i = 0; i < n; i++)
		if (set[i] == v)
			return true;
	return false;
}

/* Run sql on a checked-out connection; true when it succeeded. */
static inline bool lc_ok(PGconn *c, const char *sql)
{
	PGresult *r = PQexec(c, sql);
	ExecStatusType st = PQresultStatus(r);
	PQclear(r);
	return st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
}

/* SQLSTATE of running sql, "" when it succeeded; copied into buf. */
static inline const char *lc_sqlstate(PGconn *c, const char *sql, char *buf, size_t len)
{
	PGresult *r = PQexec(c, sql);
	const char *ss = PQresultErrorField(r, PG_DIAG_SQLSTATE);
	snprintf(buf, len, "%s", ss ? ss : "");
	PQclear(r);
	return buf;
}

#endif
