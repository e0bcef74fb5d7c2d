/* SPDX-License-Identifier: PostgreSQL */
/*
 * How many connects the pool has in flight and how often it tries, seen from the other end of
 * the wire: max_connecting bounds the connects at once, a failing server is probed one connect
 * at a time, and the probes follow the backoff schedule (doubling, equal jitter, capped).
 */
#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pool.h" /* PGR__TICK_MS */
#include "testutil.h"

/*
 * A listener that accepts every connection and never says a word, counting the connections
 * open on its side: a connect in flight is one open socket here until the pool gives up on it
 * and closes it. The count lags the pool by at most one 2 ms poll.
 */
struct mute {
	int lfd, port;
	pthread_t th;
	_Atomic bool stop;
	_Atomic int open, max_open, accepted;
};

static void *mute_main(void *arg)
{
	struct mute *m = arg;
	enum {
		MAXFD = 64
	};
	struct pollfd fds[MAXFD + 1];
	int n = 1;
	fds[0] = (struct pollfd){.fd = m->lfd, .events = POLLIN};
	while (!atomic_load(&m->stop)) {
		if (poll(fds, (nfds_t)n, 2) <= 0)
			continue;
		/* Backwards, so that moving the last entry into a closed one's place is safe. */
		for (int i = n - 1; i >= 1; i--) {
			if (!fds[i].revents)
				continue;
			char buf[512];
			ssize_t r = recv(fds[i].fd, buf, sizeof(buf), MSG_DONTWAIT);
			if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
				close(fds[i].fd);
				fds[i] = fds[--n];
				atomic_fetch_sub(&m->open, 1);
			}
		}
		if (fds[0].revents & POLLIN) {
			int fd = accept4(m->lfd, NULL, NULL, SOCK_CLOEXEC);
			if (fd >= 0 && n <= MAXFD) {
				fds[n++] = (struct pollfd){.fd = fd, .events = POLLIN};
				atomic_fetch_add(&m->accepted, 1);
				int o = atomic_fetch_add(&m->open, 1) + 1;
				int mx = atomic_load(&m->max_open);
				while (o > mx &&
				       !atomic_compare_exchange_weak(&m->max_open, &mx, o))
					;
			} else if (fd >= 0) {
				close(fd);
			}
		}
	}
	for (int i = 1; i < n; i++)
		close(fds[i].fd);
	return NULL;
}

static void mute_start(struct mute *m)
{
	memset(m, 0, sizeof(*m));
	m->lfd = tu_silent_listener(&m->port);
	cr_assert_eq(pthread_create(&m->th, NULL, mute_main, m), 0);
}

static void mute_stop(struct mute *m)
{
	atomic_store(&m->stop, true);
	pthread_join(m->th, NULL);
	close(m->lfd);
}

/* Callers that keep asking while the server fails: each arrival pokes the manager. */
struct asker {
	pgr_pool *p;
	_Atomic bool stop;
	int calls;
};

static void *asker_main(void *arg)
{
	struct asker *a = arg;
	while (!atomic_load(&a->stop)) {
		pgr_conn *c;
		if (pgr_acquire(a->p, 20, &c) == 0)
			pgr_release(c);
		a->calls++;
	}
	return NULL;
}

Test(connect, connects_in_flight_never_exceed_max_connecting_and_one_while_failing, .timeout = 60)
{
	enum {
		MAXC = 2,
		CONNECT_MS = 600
	};
	struct mute m;
	mute_start(&m);
	char ci[256];
	snprintf(ci, sizeof(ci), "host=127.0.0.1 port=%d user=x dbname=x sslmode=disable", m.port);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = cfg.max_size = 6; /* wants six at once */
	cfg.max_connecting = MAXC;
	cfg.connect_timeout_ms = CONNECT_MS; /* each connect hangs this long, then fails */
	cfg.backoff_min_ms = 40;
	cfg.backoff_max_ms = 80;
	pgr_pool *p;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);

	/* Before the first connect can time out: exactly max_connecting in flight, never more. */
	int64_t t0 = tu_now_ms();
	uint32_t gauge_max = 0;
	while (tu_now_ms() < t0 + CONNECT_MS - 150) {
		uint32_t g = tu_stats(p).connecting;
		gauge_max = g > gauge_max ? g : gauge_max;
		tu_sleep_ms(2);
	}
	cr_assert_eq(atomic_load(&m.max_open), MAXC, "%d connects in flight at once, bound %d",
	             atomic_load(&m.max_open), MAXC);
	cr_assert_eq(atomic_load(&m.accepted), MAXC);
	cr_assert_eq(gauge_max, MAXC, "connecting gauge peaked at %u", gauge_max);

	/* Once they failed: one probe at a time, even with callers asking all along. */
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).connects_failed >= MAXC, 5000));
	cr_assert(TU_WAIT_UNTIL(atomic_load(&m.open) <= 1, 1000));
	atomic_store(&m.max_open, atomic_load(&m.open));
	int accepted0 = atomic_load(&m.accepted);
	struct asker a[2] = {{.p = p}, {.p = p}};
	pthread_t th[2];
	for (int i = 0; i < 2; i++)
		cr_assert_eq(pthread_create(&th[i], NULL, asker_main, &a[i]), 0);
	gauge_max = 0;
	t0 = tu_now_ms();
	while (tu_now_ms() < t0 + 3 * CONNECT_MS) {
		uint32_t g = tu_stats(p).connecting;
		gauge_max = g > gauge_max ? g : gauge_max;
		tu_sleep_ms(2);
	}
	for (int i = 0; i < 2; i++) {
		atomic_store(&a[i].stop, true);
		pthread_join(th[i], NULL);
		cr_assert_gt(a[i].calls, 10);
	}
	cr_assert_eq(atomic_load(&m.max_open), 1,
	             "%d connects in flight at once against a failing server",
	             atomic_load(&m.max_open));
	cr_assert_leq(gauge_max, 1, "connecting gauge at %u while failing", gauge_max);
	/* It kept probing: each probe lasts CONNECT_MS plus a backoff of at most 80 ms. */
	cr_assert_geq(atomic_load(&m.accepted) - accepted0, 2, "only %d probes in %d ms",
	              atomic_load(&m.accepted) - accepted0, 3 * CONNECT_MS);
	pgr_pool_destroy(p);
	mute_stop(&m);
}

/* Times of the CONNECT_FAILED events: against a refusing port, the time of each attempt. */
struct attempts {
	pthread_mutex_t lock;
	int n;
	int64_t t_ms[64];
};

static void on_attempt(const pgr_event *ev, void *ud)
{
	struct attempts *a = ud;
	if (ev->type != PGR_EV_CONNECT_FAILED)
		return;
	int64_t now = tu_now_ms();
	pthread_mutex_lock(&a->lock);
	if (a->n < 64)
		a->t_ms[a->n++] = now;
	pthread_mutex_unlock(&a->lock);
}

Test(connect, failed_connects_back_off_doubling_with_equal_jitter_up_to_the_cap, .timeout = 60)
{
	enum {
		MIN = 100,
		MAX = 400,
		GAPS = 6
	};
	char ci[256];
	snprintf(ci, sizeof(ci), "host=127.0.0.1 port=%d user=x dbname=x sslmode=disable",
	         tu_dead_port());
	struct attempts at = {.n = 0};
	pthread_mutex_init(&at.lock, NULL);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = cfg.max_size = 1;
	cfg.backoff_min_ms = MIN;
	cfg.backoff_max_ms = MAX;
	cfg.on_event = on_attempt;
	cfg.user_data = &at;
	pgr_pool *p;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
	cr_assert(TU_WAIT_UNTIL(({
		                        pthread_mutex_lock(&at.lock);
		                        int n = at.n;
		                        pthread_mutex_unlock(&at.lock);
		                        n > GAPS;
	                        }),
	                        10000),
	          "fewer than %d attempts in 10 s", GAPS + 1);
	pgr_pool_destroy(p);

	/*
	 * After the k-th failure in a row the delay is drawn from [b/2, b], b = MIN doubling up
	 * to MAX (100, 200, 400, 400, ...). The manager reads the coarse clock, which lags real
	 * time by up to one tick (10 ms) both when it sets the delay and when it checks it: a gap
	 * may look one tick shorter; it may also come late by the manager's wake-up (a few 4 ms
	 * scheduler quanta on a busy 2-CPU machine, 40 ms leaves room for ten). A refused connect
	 * fails within the same round, so the attempt and its event are one instant.
	 */
	int64_t b = MIN;
	for (int k = 0; k < GAPS; k++) {
		int64_t gap = at.t_ms[k + 1] - at.t_ms[k];
		cr_log_info("gap %d: %lld ms (backoff %lld)", k + 1, (long long)gap, (long long)b);
		cr_assert_geq(gap, b / 2 - PGR__TICK_MS, "gap %d: %lld ms, backoff %lld ms", k + 1,
		              (long long)gap, (long long)b);
		cr_assert_leq(gap, b + PGR__TICK_MS + 40, "gap %d: %lld ms, backoff %lld ms", k + 1,
		              (long long)gap, (long long)b);
		b = b * 2 > MAX ? MAX : b * 2;
	}
	pthread_mutex_destroy(&at.lock);
}
