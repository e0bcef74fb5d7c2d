/* SPDX-License-Identifier: PostgreSQL */
/*
 * Runtimes: one manager for many pools, tickless. Against the real server: an idle pool costs
 * no wake-ups, due work still happens on time, pools on one runtime are isolated from each
 * other's faults and drains, and a runtime without a thread is driven through one fd.
 */
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pool.h"
#include "testutil.h"

static uint64_t rounds(pgr_runtime *rt)
{
	return atomic_load(&rt->wakeups);
}

static int thread_count(void)
{
	DIR *d = opendir("/proc/self/task");
	cr_assert_not_null(d);
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL)
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

static void base(pgr_config *cfg, const char *conninfo, uint32_t size, uint32_t min_idle)
{
	pgr_config_init(cfg);
	cfg->conninfo = conninfo;
	cfg->max_size = size;
	cfg->min_idle = min_idle;
	cfg->max_lifetime_ms = 0;
	cfg->idle_timeout_ms = 0;
}

Test(runtime, an_idle_pool_does_not_wake_between_due_events, .timeout = 30)
{
	pgr_config cfg;
	base(&cfg, tu_conninfo(), 4, 2);
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
	cr_assert_eq(pgr_release(c), 0);
	/* The hot-path clock ticks while checkouts read it, then stops: 10 ticks of 10 ms. */
	tu_sleep_ms(300);
	uint64_t r0 = rounds(p->rt);
	tu_sleep_ms(1000);
	uint64_t woke = rounds(p->rt) - r0;
	cr_assert_eq(woke, 0, "an idle pool with nothing due woke %lu times in 1 s",
	             (unsigned long)woke);
	/* And it serves at once, the clock resumes on the first read. */
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
	cr_assert_lt(tu_now_ms() - t0, 20);
	cr_assert_eq(pgr_release(c), 0);
	pgr_pool_destroy(p);
}

struct closes {
	pthread_mutex_t lock;
	int n;
	int64_t at[16];
	char reason[16][32];
};

static void on_close(const pgr_event *ev, void *arg)
{
	struct closes *cl = arg;
	if (ev->type != PGR_EV_CONN_CLOSED)
		return;
	pthread_mutex_lock(&cl->lock);
	if (cl->n < 16) {
		cl->at[cl->n] = tu_now_ms();
		snprintf(cl->reason[cl->n], sizeof(cl->reason[0]), "%s", ev->reason);
		cl->n++;
	}
	pthread_mutex_unlock(&cl->lock);
}

/*
 * The manager sleeps until the deadline itself: a lifetime or an idle timeout fires within the
 * coarse clock's step (4 ms at HZ=250) plus a wake-up and the close (a cancel round trip), for
 * which 60 ms is ample on a loaded 2-CPU machine, and never early.
 */
#define DUE_SLACK_MS 60
/* Returns are stamped with the hot path's clock, which lags real time by up to one tick
 * (10 ms) plus the coarse clock's step (4 ms): an idle time can look that much longer. */
#define STAMP_SLACK_MS 15

Test(runtime, a_tickless_pool_still_closes_by_lifetime_on_time, .timeout = 30)
{
	struct closes cl = {.lock = PTHREAD_MUTEX_INITIALIZER};
	pgr_config cfg;
	base(&cfg, tu_conninfo(), 1, 0);
	cfg.max_lifetime_ms = 400;
	cfg.on_event = on_close;
	cfg.user_data = &cl;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	int64_t born = tu_now_ms(); /* the connection is at most a few ms older */
	cr_assert_eq(pgr_release(c), 0);
	cr_assert(TU_WAIT_UNTIL(cl.n >= 1, 2000), "never closed by lifetime");
	cr_assert_str_eq(cl.reason[0], "max_lifetime");
	int64_t age = cl.at[0] - born;
	cr_assert_geq(age, 400 - 20, "closed early: %ld ms", (long)age);
	cr_assert_leq(age, 400 + DUE_SLACK_MS, "closed late: %ld ms", (long)age);
	pgr_pool_destroy(p);
}

Test(runtime, a_tickless_pool_still_closes_by_idle_timeout_on_time, .timeout = 30)
{
	struct closes cl = {.lock = PTHREAD_MUTEX_INITIALIZER};
	pgr_config cfg;
	base(&cfg, tu_conninfo(), 3, 1);
	cfg.idle_timeout_ms = 300;
	cfg.on_event = on_close;
	cfg.user_data = &cl;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c[3];
	for (int i = 0; i < 3; i++)
		cr_assert_eq(pgr_acquire(p, 5000, &c[i]), 0);
	for (int i = 0; i < 3; i++)
		cr_assert_eq(pgr_release(c[i]), 0);
	int64_t released = tu_now_ms();
	cr_assert(TU_WAIT_UNTIL(cl.n >= 2, 3000), "idle timeout never fired");
	for (int i = 0; i < 2; i++) {
		cr_assert_str_eq(cl.reason[i], "idle_timeout");
		int64_t idle = cl.at[i] - released;
		cr_assert_geq(idle, 300 - STAMP_SLACK_MS, "closed early: %ld ms", (long)idle);
		cr_assert_leq(idle, 300 + DUE_SLACK_MS, "closed late: %ld ms", (long)idle);
	}
	tu_sleep_ms(400);
	cr_assert_eq(cl.n, 2, "min_idle must keep one");
	pgr_pool_destroy(p);
}

Test(runtime, a_tickless_pool_still_sends_keepalives_on_time, .timeout = 30)
{
	pgr_config cfg;
	base(&cfg, tu_conninfo(), 1, 1);
	cfg.keepalive_interval_ms = 200;
	pgr_pool *p = tu_pool(&cfg);
	uint64_t k0 = tu_stats(p).pings;
	tu_sleep_ms(2000);
	uint64_t n = tu_stats(p).pings - k0;
	/*
	 * 2000 ms / 200 ms = 10. Each cycle is the interval plus the ping's round trip and a
	 * wake-up, which on a loaded 2-CPU machine reach tens of ms: at least 7, never more than
	 * one extra at the window's edges. A lost due time shows as 1 or 2.
	 */
	cr_assert(n >= 7 && n <= 11, "%lu keepalives in 2 s at a 200 ms interval",
	          (unsigned long)n);
	pgr_pool_destroy(p);
}

Test(runtime, pools_on_one_runtime_are_isolated_from_a_black_holed_server, .timeout = 30)
{
	pgr_runtime *rt;
	cr_assert_eq(pgr_runtime_create(true, &rt), 0);
	int threads0 = thread_count();
	int port;
	int lfd = tu_silent_listener(&port);
	char bad[256];
	snprintf(bad, sizeof(bad), "host=127.0.0.1 port=%d dbname=x connect_timeout=0", port);
	pgr_config cb;
	base(&cb, bad, 4, 4);
	cb.runtime = rt;
	cb.connect_timeout_ms = 3000;
	pgr_pool *black;
	cr_assert_eq(pgr_pool_create(&cb, &black), 0);
	tu_sleep_ms(100); /* its connects hang in the handshake */
	pgr_config cg;
	base(&cg, tu_conninfo(), 2, 2);
	cg.runtime = rt;
	int64_t t0 = tu_now_ms();
	pgr_pool *good;
	cr_assert_eq(pgr_pool_create(&cg, &good), 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(good).idle == 2, 2000), "the healthy pool did not fill");
	cr_assert_lt(tu_now_ms() - t0, 1000, "filled only after %ld ms", (long)(tu_now_ms() - t0));
	for (int i = 0; i < 50; i++) {
		pgr_conn *c;
		int64_t a = tu_now_ms();
		cr_assert_eq(pgr_acquire(good, 1000, &c), 0);
		cr_assert_lt(tu_now_ms() - a, 100);
		PGresult *r = PQexec(pgr_conn_pg(c), "select 1");
		cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK);
		PQclear(r);
		cr_assert_eq(pgr_release(c), 0);
	}
	cr_assert_eq(tu_stats(black).idle, 0);
	cr_assert_eq(thread_count(), threads0, "pools on a runtime must not start threads");
	cr_assert_eq(pgr_runtime_destroy(rt), -EBUSY, "destroy with pools attached");
	pgr_pool_destroy(black);
	pgr_pool_destroy(good);
	close(lfd);
	cr_assert_eq(pgr_runtime_destroy(rt), 0);
}

struct server {
	pgr_pool *p;
	atomic_bool stop;
	atomic_int errors;
	atomic_long ok;
};

static void *serve(void *arg)
{
	struct server *s = arg;
	while (!atomic_load(&s->stop)) {
		pgr_conn *c;
		if (pgr_acquire(s->p, 2000, &c) != 0) {
			atomic_fetch_add(&s->errors, 1);
			continue;
		}
		PGresult *r = PQexec(pgr_conn_pg(c), "select 1");
		if (PQresultStatus(r) != PGRES_TUPLES_OK)
			atomic_fetch_add(&s->errors, 1);
		PQclear(r);
		pgr_release(c);
		atomic_fetch_add(&s->ok, 1);
	}
	return NULL;
}

Test(runtime, draining_one_pool_leaves_the_others_serving, .timeout = 60)
{
	pgr_runtime *rt;
	cr_assert_eq(pgr_runtime_create(true, &rt), 0);
	pgr_pool *p[3];
	struct server s[3];
	pthread_t th[3];
	for (int i = 0; i < 3; i++) {
		pgr_config cfg;
		base(&cfg, tu_conninfo(), 2, 2);
		cfg.runtime = rt;
		p[i] = tu_pool(&cfg);
		s[i] = (struct server){.p = p[i]};
		pthread_create(&th[i], NULL, serve, &s[i]);
	}
	tu_sleep_ms(300);
	atomic_store(&s[0].stop, true);
	pthread_join(th[0], NULL);
	cr_assert_eq(pgr_pool_drain(p[0], 2000), 0);
	cr_assert_eq(pgr_pool_destroy(p[0]), 0);
	long before[3] = {0, atomic_load(&s[1].ok), atomic_load(&s[2].ok)};
	tu_sleep_ms(300);
	for (int i = 1; i < 3; i++) {
		cr_assert_gt(atomic_load(&s[i].ok) - before[i], 10, "pool %d stalled", i);
		atomic_store(&s[i].stop, true);
		pthread_join(th[i], NULL);
		cr_assert_eq(atomic_load(&s[i].errors), 0);
		cr_assert_eq(tu_stats(p[i]).closes, 0);
		pgr_pool_destroy(p[i]);
	}
	cr_assert_eq(pgr_runtime_destroy(rt), 0);
}

Test(runtime, a_runtime_without_a_thread_drives_all_its_pools_through_one_fd, .timeout = 30)
{
	int threads0 = thread_count();
	pgr_runtime *rt;
	cr_assert_eq(pgr_runtime_create(false, &rt), 0);
	int fd = pgr_runtime_fd(rt);
	cr_assert_geq(fd, 0);
	pgr_pool *p[2];
	for (int i = 0; i < 2; i++) {
		pgr_config cfg;
		base(&cfg, tu_conninfo(), 2, 2);
		cfg.runtime = rt;
		cr_assert_eq(pgr_pool_create(&cfg, &p[i]), 0);
	}
	int64_t dl = tu_now_ms() + 5000;
	while ((tu_stats(p[0]).idle < 2 || tu_stats(p[1]).idle < 2) && tu_now_ms() < dl) {
		struct pollfd pfd = {.fd = fd, .events = POLLIN};
		if (poll(&pfd, 1, 50) > 0)
			cr_assert_eq(pgr_runtime_run(rt), 0);
	}
	cr_assert_eq(tu_stats(p[0]).idle, 2);
	cr_assert_eq(tu_stats(p[1]).idle, 2);
	cr_assert_eq(thread_count(), threads0, "no thread may start");
	for (int i = 0; i < 2; i++)
		cr_assert_eq(pgr_pool_destroy(p[i]), 0); /* runs the runtime while it waits */
	cr_assert_eq(pgr_runtime_destroy(rt), 0);
	cr_assert_eq(pgr_runtime_destroy(NULL), -EINVAL);
	cr_assert_eq(pgr_runtime_fd(NULL), -EINVAL);
	cr_assert_eq(pgr_runtime_run(NULL), -EINVAL);
}
