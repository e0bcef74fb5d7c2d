/* SPDX-License-Identifier: PostgreSQL */
/*
 * The no-lost-wake-up protocol of the checkout core, made deterministic. Placeholder
 * connections (no server, no manager), so every step is under the test's control.
 *
 * The interesting interleaving is a release racing a waiter's arrival: the releaser reads
 * nwaiters == 0, the waiter then queues itself and re-scans the shards (empty), and only then
 * does the releaser set its idle bit. Only the releaser's second look at nwaiters, after the
 * bit is set, can still serve that waiter; without it the waiter sleeps to its deadline with a
 * connection idle. The window is a few nanoseconds wide, so a stress program hits it by luck
 * only. Here the releaser is stopped inside it: with rseq disabled (GLIBC_TUNABLES=
 * glibc.pthread.rseq=0, set by CTest and by scripts/mutants.sh) the core reads its CPU with
 * sched_getcpu(), which this binary defines, between the two reads of nwaiters.
 */
#include <errno.h>
#include <linux/futex.h>
#include <liburing.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "placeholder.h"
#include "pool.h"
#include "testutil.h"

/* ---- a pause point inside the releaser ---- */

enum {
	HOOK_OFF,
	HOOK_ARMED,
	HOOK_PAUSED,
	HOOK_GO
};
static _Atomic int hook_state;
static pthread_t hook_thread;

int sched_getcpu(void)
{
	if (atomic_load(&hook_state) == HOOK_ARMED && pthread_equal(pthread_self(), hook_thread)) {
		atomic_store(&hook_state, HOOK_PAUSED);
		while (atomic_load(&hook_state) != HOOK_GO)
			tu_sleep_ms(1);
	}
	unsigned cpu = 0;
	syscall(SYS_getcpu, &cpu, NULL, NULL);
	return (int)cpu;
}

static pgr_pool *fake_pool(uint32_t conns)
{
	pgr_config cfg;
	pgr__fake_config(&cfg, conns);
	cfg.shards = 1;
	pgr_pool *p = NULL;
	int rc = pgr__pool_create_fake(&cfg, &p);
	cr_assert_eq(rc, 0, "fake pool: %s", pgr_strerror(rc));
	return p;
}

static bool a_waiter_sleeps(pgr_pool *p)
{
	for (uint32_t i = 0; i < p->nwaiter_slots; i++)
		if (atomic_load(&p->waiters[i].state) == PGR__W_SLEEPING)
			return true;
	return false;
}

struct acq {
	pgr_pool *p;
	int64_t timeout_ms;
	int rc;
	int64_t done_ms;
	pgr_conn *c;
};

static void *acquire_main(void *a)
{
	struct acq *q = a;
	q->rc = pgr_acquire(q->p, q->timeout_ms, &q->c);
	q->done_ms = tu_now_ms();
	return NULL;
}

struct rel {
	pgr_pool *p;
	pgr_conn *c;
	int rc;
};

/* A one-connection pool whose connection r holds, for release_main to return. */
static pgr_pool *pool_for_a_paused_release(struct rel *r)
{
	cr_assert_eq(__rseq_size, 0,
	             "run with GLIBC_TUNABLES=glibc.pthread.rseq=0 (CTest sets it): the test "
	             "pauses the releaser in sched_getcpu(), which the core calls only without "
	             "rseq");
	pgr_pool *p = fake_pool(1);
	*r = (struct rel){.p = p};
	cr_assert_eq(pgr_acquire(p, 0, &r->c), 0);
	return p;
}

/* Releases with the pause point armed for this thread only. */
static void *release_main(void *a)
{
	struct rel *r = a;
	hook_thread = pthread_self();
	atomic_store(&hook_state, HOOK_ARMED);
	r->rc = pgr_release(r->c);
	return NULL;
}

/*
 * A delivered wake costs one FUTEX_WAKE and the waiter's trip back onto a CPU: microseconds,
 * plus at most a few scheduler quanta (about 4 ms each) when the 2-CPU machine is busy with
 * other builds. 100 ms covers that with room; a lost wake-up costs the whole 5 s deadline.
 */
#define WAKE_BOUND_MS 100
#define LONG_DEADLINE 5000

Test(core, release_hands_the_connection_to_a_parked_waiter, .timeout = 30)
{
	pgr_pool *p = fake_pool(1);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 0, &c), 0);
	struct acq q = {.p = p, .timeout_ms = LONG_DEADLINE};
	pthread_t t;
	pthread_create(&t, NULL, acquire_main, &q);
	cr_assert(TU_WAIT_UNTIL(a_waiter_sleeps(p), 2000), "the waiter never parked");
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pgr_release(c), 0);
	pthread_join(t, NULL);
	cr_assert_eq(q.rc, 0, "waiter: %s", pgr_strerror(q.rc));
	cr_assert_lt(q.done_ms - t0, WAKE_BOUND_MS, "waiter served %lld ms after the release",
	             (long long)(q.done_ms - t0));
	/* Handed off, or nudged awake to take it from the shard: the waiter has it, once. */
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.waits, 1);
	cr_assert_eq(s.in_use, 1);
	cr_assert_eq(s.idle, 0, "a connection a waiter got must not also sit in a shard");
	cr_assert_eq(pgr_release(q.c), 0);
	cr_assert_eq(tu_stats(p).idle, 1);
	pgr_pool_destroy(p);
}

Test(core, release_that_raced_a_waiter_rechecks_and_serves_it, .timeout = 30)
{
	struct rel r;
	pgr_pool *p = pool_for_a_paused_release(&r);

	/* The releaser reads nwaiters (0), then stops before setting its idle bit. */
	pthread_t rt;
	pthread_create(&rt, NULL, release_main, &r);
	cr_assert(TU_WAIT_UNTIL(atomic_load(&hook_state) == HOOK_PAUSED, 2000),
	          "the releaser did not stop before setting its idle bit (idle=%u)",
	          tu_stats(p).idle);
	cr_assert_eq(tu_stats(p).idle, 0);

	/* A waiter arrives now, finds no idle bit, queues and parks. */
	struct acq q = {.p = p, .timeout_ms = LONG_DEADLINE};
	pthread_t wt;
	pthread_create(&wt, NULL, acquire_main, &q);
	cr_assert(TU_WAIT_UNTIL(a_waiter_sleeps(p), 2000), "the waiter never parked");

	int64_t t0 = tu_now_ms();
	atomic_store(&hook_state, HOOK_GO);
	pthread_join(rt, NULL);
	pthread_join(wt, NULL);
	cr_assert_eq(r.rc, 0);
	cr_assert_eq(q.rc, 0, "the waiter was left asleep with the connection idle: %s",
	             pgr_strerror(q.rc));
	cr_assert_lt(q.done_ms - t0, WAKE_BOUND_MS, "waiter served %lld ms after the release",
	             (long long)(q.done_ms - t0));
	cr_assert_eq(tu_stats(p).waits, 1);
	cr_assert_eq(tu_stats(p).idle, 0);
	cr_assert_eq(pgr_release(q.c), 0);
	pgr_pool_destroy(p);
}

Test(core, waiters_time_out_at_their_deadline_not_before_and_not_long_after, .timeout = 10)
{
	pgr_pool *p = fake_pool(1);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 0, &c), 0);
	for (int i = 0; i < 5; i++) {
		pgr_conn *d;
		int64_t t0 = tu_now_ms();
		int rc = pgr_acquire(p, 50, &d);
		int64_t took = tu_now_ms() - t0;
		cr_assert_eq(rc, -ETIMEDOUT, "rc=%s", pgr_strerror(rc));
		/* The futex deadline is absolute CLOCK_MONOTONIC: never early. Late by the
		 * timer slack (50 us) plus the wake-up on a busy 2-CPU machine: a few 4 ms
		 * quanta; 30 ms covers that. */
		cr_assert_geq(took, 50, "timed out after %lld ms, before its 50 ms deadline",
		              (long long)took);
		cr_assert_lt(took, 50 + 30, "timed out %lld ms after a 50 ms deadline",
		             (long long)took);
	}
	cr_assert_eq(tu_stats(p).waiting, 0);
	cr_assert_eq(tu_stats(p).timeouts, 5);
	cr_assert_eq(pgr_release(c), 0);
	pgr_pool_destroy(p);
}

/* ---- the waiting policy: who gets a returned connection ---- */

struct waiter_thread {
	pgr_pool *p;
	int rc;
	pthread_t t;
};

/* Waits for a connection, then gives it straight back. */
static void *take_and_return_main(void *a)
{
	struct waiter_thread *w = a;
	pgr_conn *c;
	w->rc = pgr_acquire(w->p, LONG_DEADLINE, &c);
	if (w->rc == 0)
		w->rc = pgr_release(c);
	return NULL;
}

static uint32_t sleepers(pgr_pool *p)
{
	uint32_t n = 0;
	for (uint32_t i = 0; i < p->nwaiter_slots; i++)
		n += atomic_load(&p->waiters[i].state) == PGR__W_SLEEPING;
	return n;
}

/* Starts n callers that queue behind the connection the test holds, and waits until all sleep. */
static void park_waiters(pgr_pool *p, struct waiter_thread *w, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		w[i] = (struct waiter_thread){.p = p, .rc = -1};
		pthread_create(&w[i].t, NULL, take_and_return_main, &w[i]);
	}
	cr_assert(TU_WAIT_UNTIL(sleepers(p) == n, 5000), "%u of %u waiters parked", sleepers(p), n);
}

/*
 * Sets when the oldest waiter queued, as if it had waited ago_ns (negative: not yet), and, if
 * pos is not 0, its place in the queue when it queued.
 */
static void set_head(pgr_pool *p, int64_t ago_ns, uint32_t pos)
{
	pthread_mutex_lock(&p->wq_lock);
	uint32_t h = p->wq_head;
	if (h != PGR__NONE) {
		atomic_store(&p->waiters[h].since_ns, pgr__mono_ns() - ago_ns);
		if (pos)
			p->waiters[h].pos = pos;
	}
	pthread_mutex_unlock(&p->wq_lock);
	cr_assert_neq(h, PGR__NONE, "no waiter queued");
}

/* The pool's one connection held by the test, one caller parked behind it. */
static pgr_pool *held_with_a_waiter(pgr_conn **c, struct waiter_thread *w)
{
	pgr_pool *p = fake_pool(1);
	cr_assert_eq(pgr_acquire(p, 0, c), 0);
	park_waiters(p, w, 1);
	return p;
}

static void join_waiters(struct waiter_thread *w, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		pthread_join(w[i].t, NULL);
		cr_assert_eq(w[i].rc, 0, "waiter %u: %s", i, pgr_strerror(w[i].rc));
	}
}

/*
 * Throughput with more threads than connections: a connection returned while the oldest
 * waiter has not starved is left for whoever runs first (a strict FIFO would hand it to the
 * sleeper and leave it unused for the wake-up), and the sleeper is nudged to compete for it.
 */
Test(core, a_returned_connection_is_not_handed_to_a_waiter_that_has_not_starved, .timeout = 30)
{
	pgr_conn *c;
	struct waiter_thread w;
	pgr_pool *p = held_with_a_waiter(&c, &w);
	set_head(p, -1000000000, 0); /* far from starving, however slow this machine is */
	cr_assert_eq(pgr_release(c), 0);
	join_waiters(&w, 1);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.handoffs, 0, "the connection was handed to a waiter that had not starved");
	cr_assert_eq(s.waits, 1, "the nudged waiter did not take the connection itself");
	cr_assert_eq(s.idle, 1);
	pgr_pool_destroy(p);
}

/* Bounded waits: once the oldest waiter has starved, the next return is handed to it. */
Test(core, a_starved_waiter_is_handed_the_next_returned_connection, .timeout = 30)
{
	pgr_conn *c;
	struct waiter_thread w;
	pgr_pool *p = held_with_a_waiter(&c, &w);
	set_head(p, 2 * PGR__STARVE_NS, 0);
	cr_assert_eq(pgr_release(c), 0);
	/* Counted inside the release, before the waiter can run. */
	cr_assert_eq(tu_stats(p).handoffs, 1,
	             "a starved waiter was not handed the returned connection");
	join_waiters(&w, 1);
	cr_assert_eq(tu_stats(p).idle, 1);
	pgr_pool_destroy(p);
}

/*
 * The starvation threshold grows with the queue a caller joined (200 us for each caller
 * waiting then, itself included; at least 1 ms), so that starvation hand-offs, each a context
 * switch, stay bounded in number however many callers wait. A head that queued 60th has
 * starved after 12 ms, not 1.5 ms; after 13 ms it has.
 */
Test(core, the_starvation_threshold_grows_with_the_queue, .timeout = 30)
{
	enum {
		POS = 60
	};
	cr_assert_eq((int64_t)POS * PGR__STARVE_PER_WAITER_NS, 12 * PGR__STARVE_NS);
	pgr_conn *c;
	struct waiter_thread w;
	pgr_pool *p = held_with_a_waiter(&c, &w);
	set_head(p, PGR__STARVE_NS * 3 / 2, POS);
	cr_assert_eq(pgr_release(c), 0);
	cr_assert_eq(tu_stats(p).handoffs, 0,
	             "a head that queued behind %d callers was treated as starved after 1.5 ms",
	             POS - 1);
	join_waiters(&w, 1);

	cr_assert_eq(pgr_acquire(p, 0, &c), 0);
	park_waiters(p, &w, 1);
	set_head(p, 13 * PGR__STARVE_NS, POS);
	cr_assert_eq(pgr_release(c), 0);
	cr_assert_eq(tu_stats(p).handoffs, 1, "a head that waited past its threshold was skipped");
	join_waiters(&w, 1);
	cr_assert_eq(tu_stats(p).idle, 1);
	pgr_pool_destroy(p);
}

/*
 * A head nudged by an earlier return wakes while another return is under way: it scans the
 * shards before the returned connection is there, and would park again with that connection
 * idle, no nudge left to come. The return looks at the head again after putting the
 * connection in a shard, sees it awake and grants it. The releaser is stopped in its shard
 * put (under the queue's lock, after its first look at the head), and the head wakes then.
 */
Test(core, a_head_waking_during_a_return_is_not_left_asleep_with_the_connection_idle, .timeout = 30)
{
	struct rel r;
	pgr_pool *p = pool_for_a_paused_release(&r);
	uint32_t wi;
	cr_assert_eq(pgr__wq_enqueue(p, &wi, false), 0);
	struct pgr__waiter *w = &p->waiters[wi];
	/* Not starved, and nudged by a return whose connection someone else took. */
	atomic_store(&w->since_ns, pgr__mono_ns() + 1000000000);
	atomic_store(&w->state, PGR__W_NUDGED);

	pthread_t rt;
	pthread_create(&rt, NULL, release_main, &r);
	cr_assert(TU_WAIT_UNTIL(atomic_load(&hook_state) == HOOK_PAUSED, 2000),
	          "the releaser did not stop in its shard put");
	/* The head wakes and looks: nothing yet. */
	cr_assert(pgr__waiter_resume(w));
	cr_assert_null(pgr__fast_take(p));
	atomic_store(&hook_state, HOOK_GO);
	pthread_join(rt, NULL);
	cr_assert_eq(r.rc, 0);
	/* About to park again: it must find the connection granted, not sleep beside it. */
	cr_assert_eq(atomic_load(&w->state), PGR__W_GRANTED,
	             "the head woke during the return and was left to park with the connection "
	             "idle (state %u, idle %u)",
	             atomic_load(&w->state), tu_stats(p).idle);
	struct pgr_conn *granted;
	cr_assert_eq(pgr__wq_settle(p, wi, &granted), PGR__W_GRANTED);
	pgr__wq_free(p, wi);
	cr_assert_not_null(granted);
	pgr__publish(p, granted);
	cr_assert_eq(tu_stats(p).idle, 1);
	pgr_pool_destroy(p);
}

/*
 * Both connections of a two-connection pool held by the test. The head of the queue is the
 * test's own slot (*wi), asleep as far as releases can tell and far from starving, and a
 * caller (*q, on *t) sleeps behind it.
 */
static pgr_pool *both_held_behind_the_tests_head(pgr_conn **a, pgr_conn **b, uint32_t *wi,
                                                 struct acq *q, pthread_t *t)
{
	pgr_config cfg;
	pgr__fake_config(&cfg, 2);
	cfg.shards = 1;
	pgr_pool *p = NULL;
	cr_assert_eq(pgr__pool_create_fake(&cfg, &p), 0);
	cr_assert_eq(pgr_acquire(p, 0, a), 0);
	cr_assert_eq(pgr_acquire(p, 0, b), 0);
	cr_assert_eq(pgr__wq_enqueue(p, wi, false), 0);
	struct pgr__waiter *head = &p->waiters[*wi];
	atomic_store(&head->since_ns, pgr__mono_ns() + 1000000000);
	cr_assert(pgr__waiter_park(head));
	*q = (struct acq){.p = p, .timeout_ms = LONG_DEADLINE};
	pthread_create(t, NULL, acquire_main, q);
	cr_assert(TU_WAIT_UNTIL(sleepers(p) == 2, 2000), "the second waiter never parked");
	return p;
}

/*
 * Two returns before a nudged head runs: the second finds the head already nudged, and the
 * waiter behind it sleeps on beside an idle connection. The head, leaving the queue with one
 * connection, passes the turn to the next waiter, who must not wait for another return.
 */
Test(core, a_waiter_behind_a_nudged_head_is_served_from_a_connection_left_idle, .timeout = 30)
{
	pgr_conn *a, *b;
	uint32_t wi;
	struct acq q;
	pthread_t t;
	pgr_pool *p = both_held_behind_the_tests_head(&a, &b, &wi, &q, &t);
	struct pgr__waiter *head = &p->waiters[wi];

	cr_assert_eq(pgr_release(a), 0); /* to a shard, the head nudged */
	cr_assert_eq(atomic_load(&head->state), PGR__W_NUDGED);
	cr_assert_eq(pgr_release(b), 0); /* to a shard: the head is nudged already */
	/* The head runs at last, takes one and leaves the queue. */
	cr_assert(pgr__waiter_resume(head));
	struct pgr_conn *mine = pgr__fast_take(p);
	cr_assert_not_null(mine);
	struct pgr_conn *granted;
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pgr__wq_settle(p, wi, &granted), PGR__W_WAITING);
	pgr__wq_free(p, wi);
	pthread_join(t, NULL);
	cr_assert_eq(q.rc, 0, "the second waiter: %s", pgr_strerror(q.rc));
	cr_assert_lt(q.done_ms - t0, WAKE_BOUND_MS,
	             "the second waiter slept %lld ms beside an idle connection",
	             (long long)(q.done_ms - t0));
	pgr__publish(p, mine);
	cr_assert_eq(pgr_release(q.c), 0);
	cr_assert_eq(tu_stats(p).idle, 2);
	pgr_pool_destroy(p);
}

struct bg_release {
	pgr_conn *c;
	int rc;
	_Atomic bool done;
};

static void *bg_release_main(void *a)
{
	struct bg_release *r = a;
	r->rc = pgr_release(r->c);
	atomic_store(&r->done, true);
	return NULL;
}

/*
 * With more threads than connections nearly every return finds callers waiting. One that finds
 * the oldest asleep and not starved shards its connection and nudges it without the waiters'
 * lock: that lock's cache line moving between CPUs on every return cost more than the rest of
 * a return and an acquire together. The test holds the lock across such a return.
 */
Test(core, a_return_that_nudges_a_sleeping_head_does_not_wait_for_the_waiters_lock, .timeout = 30)
{
	pgr_conn *c;
	struct waiter_thread w;
	pgr_pool *p = held_with_a_waiter(&c, &w);
	set_head(p, -1000000000, 0);
	uint32_t head = p->wq_head;
	pthread_mutex_lock(&p->wq_lock);
	struct bg_release r = {.c = c, .rc = -1};
	pthread_t rt;
	pthread_create(&rt, NULL, bg_release_main, &r);
	bool done = TU_WAIT_UNTIL(atomic_load(&r.done), 2000);
	/* Nudged, not granted; it cannot leave the queue while the lock is held. */
	uint32_t s = atomic_load(&p->waiters[head].state);
	pthread_mutex_unlock(&p->wq_lock);
	pthread_join(rt, NULL);
	cr_assert(done, "the return waited for the waiters' lock");
	cr_assert_eq(r.rc, 0);
	cr_assert(s == PGR__W_NUDGED || s == PGR__W_WAITING,
	          "the sleeping head was not nudged (state %u)", s);
	join_waiters(&w, 1);
	pgr_stats st = tu_stats(p);
	cr_assert_eq(st.handoffs, 0);
	cr_assert_eq(st.waits, 1, "the nudged waiter did not take the connection");
	cr_assert_eq(st.idle, 1);
	pgr_pool_destroy(p);
}

/*
 * A return shards its connection and nudges the head; before the head runs it starves, and
 * the next return is handed to it. It leaves the queue with that one, and the first
 * connection is still idle: the waiter behind it, now the head, must be served from it, not
 * sleep on until another return or its deadline.
 */
Test(core, a_head_granted_before_it_ran_leaves_the_idle_connection_to_the_next_waiter,
     .timeout = 30)
{
	pgr_conn *a, *b;
	uint32_t wi;
	struct acq q;
	pthread_t t;
	pgr_pool *p = both_held_behind_the_tests_head(&a, &b, &wi, &q, &t);
	struct pgr__waiter *head = &p->waiters[wi];

	cr_assert_eq(pgr_release(a), 0);
	cr_assert_eq(atomic_load(&head->state), PGR__W_NUDGED);
	cr_assert_eq(tu_stats(p).idle, 1);
	atomic_store(&head->since_ns, pgr__mono_ns() - 2 * PGR__STARVE_NS);
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pgr_release(b), 0);
	cr_assert_eq(atomic_load(&head->state), PGR__W_GRANTED);
	pthread_join(t, NULL);
	cr_assert_eq(q.rc, 0, "the second waiter: %s", pgr_strerror(q.rc));
	cr_assert_lt(q.done_ms - t0, WAKE_BOUND_MS,
	             "the second waiter slept %lld ms beside an idle connection",
	             (long long)(q.done_ms - t0));
	struct pgr_conn *granted;
	cr_assert_eq(pgr__wq_settle(p, wi, &granted), PGR__W_GRANTED);
	pgr__wq_free(p, wi);
	cr_assert_not_null(granted);
	pgr__publish(p, granted);
	cr_assert_eq(pgr_release(q.c), 0);
	cr_assert_eq(tu_stats(p).idle, 2);
	cr_assert_geq(tu_stats(p).handoffs, 1);
	pgr_pool_destroy(p);
}

/* ---- a pgr_loop waiter on the same queue ---- */

struct loop_cb {
	bool called;
	int err;
	pgr_conn *c;
};

static void loop_acquired(pgr_loop *l, int err, pgr_conn *c, void *arg)
{
	(void)l;
	struct loop_cb *r = arg;
	r->called = true;
	r->err = err;
	r->c = c;
}

static void hand_cqes(struct io_uring *ring, pgr_loop *l)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0;
	io_uring_for_each_cqe (ring, head, cqe) {
		if (pgr_loop_owns(io_uring_cqe_get_data64(cqe)))
			pgr_loop_handle_cqe(l, cqe);
		n++;
	}
	io_uring_cq_advance(ring, n);
}

/*
 * A loop waiter is woken spuriously (a late FUTEX_WAKE meant for its slot's earlier waiter)
 * while its caller keeps the SQ full: the re-armed wait sits in the loop's backlog. A return
 * that comes meanwhile must reach it, and not make its later park fail as if the pool had shut
 * down: the acquire gets the connection, not -ETIMEDOUT long before its deadline.
 */
Test(core, a_loop_waiter_woken_spuriously_with_its_sq_full_still_gets_the_next_connection,
     .timeout = 30)
{
	pgr_pool *p = fake_pool(1);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 0, &c), 0);
	struct io_uring ring;
	cr_assert_eq(io_uring_queue_init(4, &ring, 0), 0);
	pgr_loop *l;
	cr_assert_eq(pgr_loop_create(p, &ring, 0, &l), 0);
	struct loop_cb r = {0};
	cr_assert_eq(pgr_loop_acquire(l, LONG_DEADLINE, loop_acquired, &r), 0);
	io_uring_submit(&ring);
	uint32_t wi = p->wq_head;
	cr_assert_neq(wi, PGR__NONE);
	struct pgr__waiter *w = &p->waiters[wi];
	cr_assert(TU_WAIT_UNTIL(atomic_load(&w->state) == PGR__W_SLEEPING, 2000));
	/* Far from starving: the return below nudges rather than grants, if it can. */
	atomic_store(&w->since_ns, pgr__mono_ns() + 1000000000);
	tu_sleep_ms(20); /* the futex wait is in the kernel by now */
	syscall(SYS_futex, &w->state, FUTEX_WAKE, 1, NULL, NULL, 0);
	struct io_uring_cqe *cqe;
	cr_assert_eq(io_uring_wait_cqe_nr(&ring, &cqe, 2), 0);
	/* A busy caller fills the SQ before it hands the CQEs over. */
	struct io_uring_sqe *sqe;
	int nops = 0;
	while ((sqe = io_uring_get_sqe(&ring)) != NULL) {
		io_uring_prep_nop(sqe);
		io_uring_sqe_set_data64(sqe, 0);
		nops++;
	}
	cr_assert_gt(nops, 0);
	hand_cqes(&ring, l);
	cr_assert_eq(pgr_release(c), 0);
	int64_t t0 = tu_now_ms();
	while (!r.called && tu_now_ms() - t0 < 2000) {
		io_uring_submit(&ring);
		tu_sleep_ms(1);
		hand_cqes(&ring, l);
		pgr_loop_flush(l);
	}
	cr_assert(r.called, "the loop acquire never completed");
	cr_assert_eq(r.err, 0, "the loop acquire failed (%s) %lld ms into a %d ms deadline",
	             pgr_strerror(r.err), (long long)(tu_now_ms() - t0), LONG_DEADLINE);
	cr_assert_not_null(r.c);
	cr_assert_eq(tu_stats(p).in_use, 1);
	cr_assert_eq(pgr_loop_release(l, r.c), 0);
	cr_assert_eq(tu_stats(p).idle, 1);
	int64_t t1 = tu_now_ms();
	while (pgr_loop_destroy(l) == -EBUSY && tu_now_ms() - t1 < 2000) {
		io_uring_submit(&ring);
		tu_sleep_ms(1);
		hand_cqes(&ring, l);
	}
	io_uring_queue_exit(&ring);
	pgr_pool_destroy(p);
}
