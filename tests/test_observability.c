/* SPDX-License-Identifier: PostgreSQL */
/* Observability against the real server: leaks, events, histograms, Prometheus. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

static pgr_pool *obs_pool(struct tu_events *ev, uint32_t size, int64_t leak_ms, const char *name)
{
	tu_events_init(ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.name = name;
	cfg.min_idle = cfg.max_size = size;
	cfg.leak_threshold_ms = leak_ms;
	cfg.on_event = tu_events_cb;
	cfg.user_data = ev;
	return tu_pool(&cfg);
}

Test(observability, leak_is_reported_once_with_acquiring_file_and_line, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = obs_pool(&ev, 1, 100, "leak");
	pgr_conn *c;
	int line = __LINE__ + 1;
	cr_assert_eq(PGR_ACQUIRE(p, 1000, &c), 0);
	cr_assert(TU_WAIT_UNTIL(tu_events_count(&ev, PGR_EV_LEAK_SUSPECTED) == 1, 3000),
	          "no leak report");
	int i = tu_events_find(&ev, PGR_EV_LEAK_SUSPECTED, NULL);
	cr_assert(strstr(ev.file[i], "test_observability.c"), "file=%s", ev.file[i]);
	cr_assert_eq(ev.line[i], line);
	cr_assert(strstr(ev.msg[i], "leak_is_reported_once"), "function missing: %s", ev.msg[i]);
	/* The held time: at least the threshold; the manager looks once per 10 ms tick with a
	 * coarse clock that lags by up to a tick, and may itself be a few 4 ms quanta late. */
	const char *h = strstr(ev.msg[i], "held for ");
	cr_assert(h, "no held time in the report: %s", ev.msg[i]);
	long long held = atoll(h + strlen("held for "));
	cr_assert(held >= 100 && held <= 100 + 2 * 10 + 40, "reported held %lld ms: %s", held,
	          ev.msg[i]);
	/* Once per checkout, however long it is held. */
	tu_sleep_ms(300);
	cr_assert_eq(tu_events_count(&ev, PGR_EV_LEAK_SUSPECTED), 1);
	cr_assert_eq(tu_stats(p).leaks, 1);
	pgr_release(c);
	pgr_pool_destroy(p);
}

/* Once per checkout: the same connection leaked by the next checkout is reported again, and a
 * short checkout in between is not. */
Test(observability, each_checkout_that_leaks_is_reported, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = obs_pool(&ev, 1, 100, "leak2");
	for (int round = 1; round <= 2; round++) {
		pgr_conn *c;
		cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
		cr_assert(TU_WAIT_UNTIL(tu_events_count(&ev, PGR_EV_LEAK_SUSPECTED) == round, 3000),
		          "checkout %d: %d leak reports", round,
		          tu_events_count(&ev, PGR_EV_LEAK_SUSPECTED));
		pgr_release(c);
		cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
		pgr_release(c);
	}
	tu_sleep_ms(300);
	cr_assert_eq(tu_events_count(&ev, PGR_EV_LEAK_SUSPECTED), 2);
	cr_assert_eq(tu_stats(p).leaks, 2);
	pgr_pool_destroy(p);
}

Test(observability, no_leak_report_below_threshold, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = obs_pool(&ev, 1, 400, "noleak");
	for (int i = 0; i < 10; i++) {
		pgr_conn *c;
		cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
		tu_sleep_ms(20);
		pgr_release(c);
	}
	tu_sleep_ms(500);
	cr_assert_eq(tu_events_count(&ev, PGR_EV_LEAK_SUSPECTED), 0);
	cr_assert_eq(tu_stats(p).leaks, 0);
	pgr_pool_destroy(p);
}

Test(observability, exhausted_fires_only_when_a_caller_must_wait, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = obs_pool(&ev, 2, 0, "exh");
	pgr_conn *a, *b, *x;
	cr_assert_eq(pgr_acquire(p, 1000, &a), 0);
	cr_assert_eq(pgr_acquire(p, 1000, &b), 0);
	cr_assert_eq(tu_events_count(&ev, PGR_EV_POOL_EXHAUSTED), 0, "fired with no one waiting");
	cr_assert_eq(pgr_acquire(p, 50, &x), -ETIMEDOUT);
	cr_assert_eq(tu_events_count(&ev, PGR_EV_POOL_EXHAUSTED), 1);
	cr_assert_eq(tu_events_count(&ev, PGR_EV_WAITER_REJECTED), 0);
	/* try_acquire never waits, so it never reports exhaustion. */
	cr_assert_eq(pgr_try_acquire(p, &x), -EAGAIN);
	cr_assert_eq(tu_events_count(&ev, PGR_EV_POOL_EXHAUSTED), 1);
	pgr_release(a);
	pgr_release(b);
	pgr_pool_destroy(p);
}

Test(observability, histograms_count_every_checkout_connect_and_return, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = obs_pool(&ev, 2, 0, "hist");
	for (int i = 0; i < 20; i++) {
		pgr_conn *c;
		cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
		if (i == 0)
			tu_sleep_ms(100);
		pgr_release(c);
	}
	pgr_hist_summary h;
	pgr_pool_histogram(p, PGR_HIST_ACQUIRE_WAIT, &h);
	cr_assert_eq(h.count, 20);
	pgr_pool_histogram(p, PGR_HIST_HOLD, &h);
	cr_assert_eq(h.count, 20);
	/* One hold of >= 100 ms, timed on the pool's coarse clock (10 ms ticks, later under load).
	 */
	cr_assert_geq(h.max_ns, 50000000ull, "max hold %llu ns", (unsigned long long)h.max_ns);
	pgr_pool_histogram(p, PGR_HIST_CONNECT, &h);
	cr_assert_eq(h.count, 2);
	cr_assert_gt(h.p50_ns, 10000, "a real connect takes more than 10 us");
	cr_assert_leq(h.p50_ns, h.max_ns);
	pgr_pool_destroy(p);
}

static uint64_t metric(const char *text, const char *name)
{
	const char *at = text;
	size_t n = strlen(name);
	while ((at = strstr(at, name)) != NULL) {
		if ((at == text || at[-1] == '\n') && at[n] == ' ')
			return strtoull(at + n + 1, NULL, 10);
		at += n;
	}
	cr_assert_fail("metric %s not found in exposition", name);
	return 0;
}

Test(observability, prometheus_matches_stats_and_passes_promtool, .timeout = 60)
{
	struct tu_events ev;
	pgr_pool *p = obs_pool(&ev, 2, 0, "prom_t");
	pgr_conn *a, *b, *x;
	for (int i = 0; i < 5; i++) {
		cr_assert_eq(pgr_acquire(p, 1000, &a), 0);
		pgr_release(a);
	}
	cr_assert_eq(pgr_acquire(p, 1000, &a), 0);
	cr_assert_eq(pgr_acquire(p, 1000, &b), 0);
	cr_assert_eq(pgr_acquire(p, 20, &x), -ETIMEDOUT);
	pgr_discard(b);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).closes == 1, 3000));
	/* The manager restores min_idle: let that reconnect finish so counters stand still. */
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).size == 2 && tu_stats(p).connecting == 0, 5000));
	size_t need = pgr_pool_prometheus(p, NULL, 0);
	cr_assert_gt(need, 100);
	char *buf = malloc(need + 1);
	cr_assert_eq(pgr_pool_prometheus(p, buf, need + 1), need);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.acquires, 7);
	cr_assert_eq(s.timeouts, 1);
	cr_assert_eq(metric(buf, "pgring_acquires_total{pool=\"prom_t\"}"), s.acquires);
	cr_assert_eq(metric(buf, "pgring_acquire_timeouts_total{pool=\"prom_t\"}"), s.timeouts);
	cr_assert_eq(metric(buf, "pgring_closes_total{pool=\"prom_t\",reason=\"discarded\"}"), 1);
	cr_assert_eq(metric(buf, "pgring_max_size{pool=\"prom_t\"}"), 2);
	cr_assert_eq(metric(buf, "pgring_acquire_wait_seconds_count{pool=\"prom_t\"}"), 7);
	cr_assert_eq(metric(buf, "pgring_connects_total{pool=\"prom_t\",result=\"ok\"}"),
	             s.connects_ok);
	char path[] = "/tmp/pgr_prom_XXXXXX";
	int fd = mkstemp(path);
	cr_assert_geq(fd, 0);
	cr_assert_eq(write(fd, buf, need), (ssize_t)need);
	close(fd);
	char cmd[256];
	snprintf(cmd, sizeof(cmd), "promtool check metrics < %s 2>&1", path);
	FILE *f = popen(cmd, "r");
	cr_assert(f);
	char out[4096] = "";
	size_t got = fread(out, 1, sizeof(out) - 1, f);
	out[got] = 0;
	int rc = pclose(f);
	unlink(path);
	cr_assert_eq(rc, 0, "promtool failed (is the prometheus package installed?): %s", out);
	cr_assert_eq(got, 0, "promtool lint: %s", out);
	pgr_release(a);
	free(buf);
	pgr_pool_destroy(p);
}
