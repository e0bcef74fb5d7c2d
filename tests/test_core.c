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
	cr_assert_eq(__rseq_size, 0,
	             "run with GLIBC_TUNABLES=glibc.pthread.rseq=0 (CTest sets it): the test "
	             "pauses the releaser in sched_getcpu(), which the core calls only without "
	             "rseq");
	pgr_pool *p = fake_pool(1);
	struct rel r = {.p = p};
	cr_assert_eq(pgr_acquire(p, 0, &r.c), 0);

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
