/* SPDX-License-Identifier: PostgreSQL */
/*
 * Stress of the waiter FIFO with both kinds of waiters: io_uring loops (pgr_loop_acquire,
 * IORING_OP_FUTEX_WAIT) and blocking threads (pgr_acquire) competing for a few placeholder
 * connections with short deadlines, for seconds. Checks that no connection is ever held
 * twice, none is lost, every async acquire completes exactly once, and the loops drain.
 * Plain program so that it runs under ThreadSanitizer; prints "N passed, N failed".
 */
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pool.h"

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

struct shared {
	pgr_pool *p;
	_Atomic int holder[PGR__MAX_CONNS];
	_Atomic uint64_t double_holds, acquires, timeouts, errors;
	int64_t until_ms;
};

static void hold(struct shared *s, pgr_conn *c, int who, unsigned *seed)
{
	uint32_t id = pgr_conn_id(c);
	if (atomic_exchange(&s->holder[id], who) != 0)
		atomic_fetch_add(&s->double_holds, 1);
	atomic_fetch_add(&s->acquires, 1);
	for (volatile int i = rand_r(seed) % 300; i > 0; i--)
		;
	atomic_store(&s->holder[id], 0);
}

/* ---- blocking threads ---- */

struct bthread {
	struct shared *s;
	int id;
};

static void *blocking_main(void *a)
{
	struct bthread *b = a;
	unsigned seed = (unsigned)b->id * 31u + 7;
	while (now_ms() < b->s->until_ms) {
		pgr_conn *c;
		int rc = pgr_acquire(b->s->p, 1 + rand_r(&seed) % 3, &c);
		if (rc == -ETIMEDOUT) {
			atomic_fetch_add(&b->s->timeouts, 1);
			continue;
		}
		if (rc) {
			atomic_fetch_add(&b->s->errors, 1);
			continue;
		}
		hold(b->s, c, 1000 + b->id, &seed);
		pgr_release(c);
	}
	return NULL;
}

/* ---- loop threads ---- */

struct lthread {
	struct shared *s;
	int id;
	struct io_uring ring;
	pgr_loop *loop;
	int outstanding;
	uint64_t completions, started;
	unsigned seed;
	bool failed;
};

static void on_acquired(pgr_loop *l, int err, pgr_conn *c, void *arg)
{
	struct lthread *t = arg;
	t->outstanding--;
	t->completions++;
	if (err == -ETIMEDOUT) {
		atomic_fetch_add(&t->s->timeouts, 1);
		return;
	}
	if (err) {
		atomic_fetch_add(&t->s->errors, 1);
		return;
	}
	hold(t->s, c, 2000 + t->id, &t->seed);
	pgr_loop_release(l, c);
}

static void *loop_main(void *a)
{
	struct lthread *t = a;
	if (io_uring_queue_init(64, &t->ring, 0) != 0 ||
	    pgr_loop_create(t->s->p, &t->ring, 64, &t->loop) != 0) {
		t->failed = true;
		return NULL;
	}
	for (;;) {
		bool running = now_ms() < t->s->until_ms;
		/* At most 3 starts a turn: an acquire that completes at once does not count as
		 * outstanding, and an unbounded loop here would never see the clock run out. */
		for (int k = 0; running && k < 3 && t->outstanding < 3; k++) {
			t->outstanding++;
			t->started++;
			int rc =
			    pgr_loop_acquire(t->loop, 1 + rand_r(&t->seed) % 3, on_acquired, t);
			if (rc) { /* cb not called */
				t->outstanding--;
				t->started--;
				if (rc != -EBUSY)
					atomic_fetch_add(&t->s->errors, 1);
				break;
			}
		}
		if (!running && t->outstanding == 0)
			break;
		if (!running && now_ms() > t->s->until_ms + 5000) {
			t->failed = true; /* an acquire never completed: fail, do not hang */
			break;
		}
		struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = 2000000};
		struct io_uring_cqe *cqe;
		io_uring_submit_and_wait_timeout(&t->ring, &cqe, 1, &ts, NULL);
		unsigned head, n = 0;
		io_uring_for_each_cqe (&t->ring, head, cqe) {
			if (!pgr_loop_handle_cqe(t->loop, cqe))
				t->failed = true; /* nothing but pgring's SQEs on this ring */
			n++;
		}
		io_uring_cq_advance(&t->ring, n);
	}
	int64_t dl = now_ms() + 5000;
	while (pgr_loop_destroy(t->loop) == -EBUSY) {
		if (now_ms() > dl) {
			t->failed = true;
			return NULL;
		}
		struct io_uring_cqe *cqe;
		struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = 2000000};
		io_uring_submit_and_wait_timeout(&t->ring, &cqe, 1, &ts, NULL);
		unsigned head, n = 0;
		io_uring_for_each_cqe (&t->ring, head, cqe) {
			pgr_loop_handle_cqe(t->loop, cqe);
			n++;
		}
		io_uring_cq_advance(&t->ring, n);
	}
	io_uring_queue_exit(&t->ring);
	return NULL;
}

static int run(int loops, int blocking, uint32_t conns, int seconds)
{
	static struct shared s;
	memset(&s, 0, sizeof(s));
	pgr_config cfg;
	pgr__fake_config(&cfg, conns);
	if (pgr__pool_create_fake(&cfg, &s.p) != 0) {
		fprintf(stderr, "cannot create the pool\n");
		return 1;
	}
	s.until_ms = now_ms() + seconds * 1000;
	pthread_t lt[8], bt[8];
	static struct lthread L[8];
	struct bthread B[8];
	for (int i = 0; i < loops; i++) {
		memset(&L[i], 0, sizeof(L[i]));
		L[i].s = &s;
		L[i].id = i;
		L[i].seed = (unsigned)i + 99;
		pthread_create(&lt[i], NULL, loop_main, &L[i]);
	}
	for (int i = 0; i < blocking; i++) {
		B[i] = (struct bthread){.s = &s, .id = i};
		pthread_create(&bt[i], NULL, blocking_main, &B[i]);
	}
	int bad = 0;
	uint64_t async_done = 0;
	for (int i = 0; i < loops; i++) {
		pthread_join(lt[i], NULL);
		if (L[i].failed || L[i].completions != L[i].started) {
			fprintf(stderr, "FAIL: loop %d: failed=%d started=%llu completed=%llu\n", i,
			        L[i].failed, (unsigned long long)L[i].started,
			        (unsigned long long)L[i].completions);
			bad = 1;
		}
		async_done += L[i].completions;
	}
	for (int i = 0; i < blocking; i++)
		pthread_join(bt[i], NULL);
	pgr_stats st;
	pgr_pool_stats(s.p, &st);
	printf("%d loops + %d threads, %u connections, %d s: %llu checkouts (%llu async "
	       "completions), %llu timeouts, %llu handoffs\n",
	       loops, blocking, conns, seconds, (unsigned long long)s.acquires,
	       (unsigned long long)async_done, (unsigned long long)s.timeouts,
	       (unsigned long long)st.handoffs);
	if (s.double_holds || s.errors) {
		fprintf(stderr, "FAIL: %llu double holds, %llu errors\n",
		        (unsigned long long)s.double_holds, (unsigned long long)s.errors);
		bad = 1;
	}
	if (st.idle != conns || st.in_use || st.waiting) {
		fprintf(stderr, "FAIL: idle=%u in_use=%u waiting=%u\n", st.idle, st.in_use,
		        st.waiting);
		bad = 1;
	}
	if (s.acquires < 500) {
		fprintf(stderr, "FAIL: only %llu checkouts\n", (unsigned long long)s.acquires);
		bad = 1;
	}
	pgr_pool_destroy(s.p);
	return bad;
}

int main(void)
{
	struct {
		int loops, blocking;
		uint32_t conns;
		int seconds;
	} cases[] = {{2, 3, 2, 3}, {4, 0, 1, 2}, {1, 6, 3, 2}};
	int n = (int)(sizeof(cases) / sizeof(cases[0])), failed = 0;
	for (int i = 0; i < n; i++)
		failed += run(cases[i].loops, cases[i].blocking, cases[i].conns, cases[i].seconds);
	printf("%d passed, %d failed\n", n - failed, failed);
	return failed ? 1 : 0;
}
