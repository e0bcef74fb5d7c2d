/* SPDX-License-Identifier: PostgreSQL */
#include "testutil.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

const char *tu_env(const char *name)
{
	const char *v = getenv(name);
	if (!v || !*v)
		cr_assert_fail("%s is not set: run the suite through ./run.sh test, which starts a "
		               "throwaway PostgreSQL server",
		               name);
	return v;
}

const char *tu_conninfo(void)
{
	return tu_env("PGR_TEST_CONNINFO");
}

char *tu_conninfo_app(const char *base, const char *app)
{
	size_t n = strlen(base) + strlen(app) + 32;
	char *s = malloc(n);
	cr_assert(s);
	snprintf(s, n, "%s application_name=%s", base, app);
	return s;
}

PGconn *tu_admin(void)
{
	PGconn *c = PQconnectdb(tu_conninfo());
	cr_assert(PQstatus(c) == CONNECTION_OK, "admin connection failed: %s", PQerrorMessage(c));
	return c;
}

long tu_query_long(PGconn *c, const char *sql)
{
	PGresult *r = PQexec(c, sql);
	cr_assert(PQresultStatus(r) == PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(c));
	long v = atol(PQgetvalue(r, 0, 0));
	PQclear(r);
	return v;
}

void tu_exec(PGconn *c, const char *sql)
{
	PGresult *r = PQexec(c, sql);
	ExecStatusType st = PQresultStatus(r);
	cr_assert(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK, "%s: %s", sql,
	          PQerrorMessage(c));
	PQclear(r);
}

long tu_count_app(PGconn *admin, const char *app)
{
	char sql[256];
	snprintf(sql, sizeof(sql),
	         "select count(*) from pg_stat_activity where application_name = '%s'", app);
	return tu_query_long(admin, sql);
}

int64_t tu_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void tu_sleep_ms(int64_t ms)
{
	struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static int bound_socket(int *port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert(fd >= 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	cr_assert(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
	socklen_t len = sizeof(a);
	cr_assert(getsockname(fd, (struct sockaddr *)&a, &len) == 0);
	*port = ntohs(a.sin_port);
	return fd;
}

int tu_dead_port(void)
{
	int port;
	int fd = bound_socket(&port);
	close(fd); /* bound, never listened: connects to it are refused */
	return port;
}

int tu_silent_listener(int *port)
{
	int fd = bound_socket(port);
	cr_assert(listen(fd, 64) == 0);
	return fd;
}

void tu_server_ctl(const char *what)
{
	char cmd[1024];
	snprintf(cmd, sizeof(cmd), "'%s' %s '%s' >/dev/null 2>&1", tu_env("PGR_TEST_CTL"), what,
	         tu_env("PGR_TEST_CTL_DIR"));
	int rc = system(cmd);
	cr_assert(rc == 0, "%s failed (%d)", cmd, rc);
}

void tu_events_init(struct tu_events *e)
{
	memset(e, 0, sizeof(*e));
	pthread_mutex_init(&e->lock, NULL);
}

void tu_events_cb(const pgr_event *ev, void *user_data)
{
	struct tu_events *e = user_data;
	pthread_mutex_lock(&e->lock);
	if ((unsigned)ev->type < 16)
		e->count[ev->type]++;
	if (e->n < TU_MAX_MSGS) {
		e->type[e->n] = ev->type;
		snprintf(e->msg[e->n], sizeof(e->msg[0]), "%s", ev->message ? ev->message : "");
		snprintf(e->field[e->n], sizeof(e->field[0]), "%s", ev->field ? ev->field : "");
		snprintf(e->file[e->n], sizeof(e->file[0]), "%s", ev->file ? ev->file : "");
		e->line[e->n] = ev->line;
		e->n++;
	}
	pthread_mutex_unlock(&e->lock);
}

int tu_events_count(struct tu_events *e, enum pgr_event_type t)
{
	pthread_mutex_lock(&e->lock);
	int n = e->count[t];
	pthread_mutex_unlock(&e->lock);
	return n;
}

int tu_events_find(struct tu_events *e, enum pgr_event_type t, const char *needle)
{
	pthread_mutex_lock(&e->lock);
	int found = -1;
	for (int i = 0; i < e->n && found < 0; i++)
		if (e->type[i] == t && (!needle || strstr(e->msg[i], needle)))
			found = i;
	pthread_mutex_unlock(&e->lock);
	return found;
}

pgr_pool *tu_pool(pgr_config *cfg)
{
	pgr_pool *p = NULL;
	int rc = pgr_pool_create(cfg, &p);
	cr_assert(rc == 0, "pgr_pool_create: %s", pgr_strerror(rc));
	uint32_t want = cfg->min_idle;
	bool ok = TU_WAIT_UNTIL(tu_stats(p).idle >= want, 10000);
	char err[512] = "";
	if (!ok)
		pgr_pool_last_error(p, err, sizeof(err));
	cr_assert(ok, "pool did not reach %u idle connections (idle=%u): %s", want,
	          tu_stats(p).idle, err);
	return p;
}
