/* SPDX-License-Identifier: PostgreSQL */
/*
 * Stress of the waiter FIFO with both kinds of waiters: io_uring loops (pgr_loop_acquire,
 * IORING_OP_FUTEX_WAIT) and blocking threads (pgr_acquire) competing for a few placeholder
 * connections, for seconds. Checks that no connection is ever held twice, none is lost, every
 * async acquire completes exactly once, and the loops drain.
 *
 * Churn phases use deadlines of 1-3 ms, so waiters of both kinds cancel all the time.
 * Liveness phases use deadlines of seconds and short holds: there ANY timeout is a failure (a
 * lost wake-up of a thread or of a ring cannot pass for an ordinary timeout), both kinds of
 * waiter must have waited and been served, and the longest wait is bounded.
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

#include "placeholder.h"
#include "pool.h"

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t now_ms(void)
{
	return now_ns() / 1000000;
}

/* Deadline of a liveness phase: far beyond any fair wait, so a timeout means a lost wake-up. */
#define LIVENESS_DEADLINE_MS 5000
/*
 * Longest wait allowed in a liveness phase. FIFO hand-off bounds a wait by the holds queued
 * ahead of it (at most loops * 3 + threads waiters for a few connections); each hold is a few
 * hundred loop iterations, but a holder, or a loop that must reap its grant CQE, can lose its
 * CPU for a scheduler quantum (about 4 ms here, several times that under TSan) to each of the
 * other runnable threads. 1 s is far above that and far below the 5 s a lost wake-up costs.
 */
#define MAX_WAIT_MS 1000

struct shared {
	pgr_pool *p;
	_Atomic int holder[PGR__MAX_CONNS];
	_Atomic uint64_t double_holds, acquires, timeouts, errors, release_errors;
	_Atomic uint64_t async_waited; /* async acquires served after the call returned */
	_Atomic int64_t max_wait_ns;
	int64_t until_ms;
	bool liveness;
};

static void note_wait(struct shared *s, int64_t waited)
{
	int64_t seen = atomic_load(&s->max_wait_ns);
	while (waited > seen && !atomic_compare_exchange_weak(&s->max_wait_ns, &seen, waited))
		;
}

static void hold(struct shared *s, pgr_conn *c, int who, unsigned *seed)
{
	uint32_t id = pgr_conn_id(c);
	if (atomic_exchange(&s->holder[id], who) != 0)
		atomic_fetch_add(&s->double_holds, 1);
	atomic_fetch_add(&s->acquires, 1);
	if (s->liveness) {
		/* Held ~20 us: long enough that loops and threads contend even when a sanitizer
		 * slows every other step (the phase asserts that each kind of waiter waited). */
		struct timespec t0, t1;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		do
			clock_gettime(CLOCK_MONOTONIC, &t1);
		while ((t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec) < 20000);
	} else {
		for (volatile int i = rand_r(seed) % 300; i > 0; i--)
			;
	}
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
		int64_t t0 = now_ns();
		int rc = pgr_acquire(
		    b->s->p, b->s->liveness ? LIVENESS_DEADLINE_MS : 1 + rand_r(&seed) % 3, &c);
		note_wait(b->s, now_ns() - t0);
		if (rc == -ETIMEDOUT) {
			atomic_fetch_add(&b->s->timeouts, 1);
			continue;
		}
		if (rc) {
			atomic_fetch_add(&b->s->errors, 1);
			continue;
		}
		hold(b->s, c, 1000 + b->id, &seed);
		if (pgr_release(c) != 0)
			atomic_fetch_add(&b->s->release_errors, 1);
	}
	return NULL;
}

/* ---- loop threads ---- */

struct lthread;
struct req {
	struct lthread *t;
	int64_t t0_ns;
	bool busy;
};

struct lthread {
	struct req req[3];
	bool in_call; /* inside pgr_loop_acquire: a callback now is an immediate checkout */
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
	struct req *rq = arg;
	struct lthread *t = rq->t;
	rq->busy = false;
	note_wait(t->s, now_ns() - rq->t0_ns);
	/* Served after a wait, as the pool's waits count (a timeout is not one). */
	if (!t->in_call && err == 0)
		atomic_fetch_add(&t->s->async_waited, 1);
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
	if (pgr_loop_release(l, c) != 0)
		atomic_fetch_add(&t->s->release_errors, 1);
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
			struct req *rq = &t->req[0];
			while (rq->busy)
				rq++; /* outstanding < 3: one of the three is free */
			*rq = (struct req){.t = t, .t0_ns = now_ns(), .busy = true};
			t->outstanding++;
			t->started++;
			t->in_call = true;
			int rc = pgr_loop_acquire(t->loop,
			                          t->s->liveness ? LIVENESS_DEADLINE_MS
			                                         : 1 + rand_r(&t->seed) % 3,
			                          on_acquired, rq);
			t->in_call = false;
			if (rc) { /* cb not called */
				rq->busy = false;
				t->outstanding--;
				t->started--;
				if (rc != -EBUSY)
					atomic_fetch_add(&t->s->errors, 1);
				break;
			}
		}
		if (!running && t->outstanding == 0)
			break;
		if (!running && now_ms() > t->s->until_ms + LIVENESS_DEADLINE_MS + 5000) {
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

static int run(int loops, int blocking, uint32_t conns, int seconds, bool liveness)
{
	static struct shared s;
	memset(&s, 0, sizeof(s));
	s.liveness = liveness;
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
	int64_t max_wait_ms = atomic_load(&s.max_wait_ns) / 1000000;
	uint64_t async_waited = atomic_load(&s.async_waited);
	printf("%s: %d loops + %d threads, %u connections, %d s: %llu checkouts (%llu async "
	       "completions, %llu after a wait), %llu timeouts, %llu waits, %llu handoffs, longest "
	       "wait %lld ms\n",
	       liveness ? "liveness" : "churn", loops, blocking, conns, seconds,
	       (unsigned long long)s.acquires, (unsigned long long)async_done,
	       (unsigned long long)async_waited, (unsigned long long)s.timeouts,
	       (unsigned long long)st.waits, (unsigned long long)st.handoffs,
	       (long long)max_wait_ms);
	if (liveness && s.timeouts) {
		fprintf(stderr, "FAIL: %llu timeouts with %d ms deadlines: a lost wake-up\n",
		        (unsigned long long)s.timeouts, LIVENESS_DEADLINE_MS);
		bad = 1;
	}
	/*
	 * Each kind of waiter present must have queued, and been served. Not asked of a churn
	 * phase with loops alone: a loop holds only inside its callback, so loops barely overlap.
	 */
	if ((liveness || blocking) && (st.waits == 0 || (loops && async_waited == 0) ||
	                               (blocking && st.waits <= async_waited))) {
		fprintf(stderr,
		        "FAIL: contended, yet %llu waits (%llu async), %llu handoffs: a kind of "
		        "waiter never waited\n",
		        (unsigned long long)st.waits, (unsigned long long)async_waited,
		        (unsigned long long)st.handoffs);
		bad = 1;
	}
	if (liveness && max_wait_ms >= MAX_WAIT_MS) {
		fprintf(stderr, "FAIL: a caller waited %lld ms (bound %d ms)\n",
		        (long long)max_wait_ms, MAX_WAIT_MS);
		bad = 1;
	}
	if (s.release_errors) {
		fprintf(stderr, "FAIL: %llu releases failed\n",
		        (unsigned long long)s.release_errors);
		bad = 1;
	}
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
		bool liveness;
	} cases[] = {{2, 3, 2, 3, false}, {4, 0, 1, 2, false}, {1, 6, 3, 2, false},
	             {2, 3, 2, 2, true},  {4, 0, 1, 1, true},  {1, 6, 3, 1, true}};
	int n = (int)(sizeof(cases) / sizeof(cases[0])), failed = 0;
	for (int i = 0; i < n; i++)
		failed += run(cases[i].loops, cases[i].blocking, cases[i].conns, cases[i].seconds,
		              cases[i].liveness);
	printf("%d passed, %d failed\n", n - failed, failed);
	return failed ? 1 : 0;
}
