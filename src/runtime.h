/* SPDX-License-Identifier: PostgreSQL */
/*
 * The runtime: one io_uring ring, one eventfd and (optionally) one thread that run the manager
 * of every pool attached to it, and the clock the checkout path reads.
 *
 * Tickless. The runtime sleeps until the earliest thing any of its pools has due (a lifetime,
 * an idle timeout, a keepalive, a leak threshold, a backoff; connect and ping deadlines are
 * linked timeouts on the ring) or until a caller pokes it, and wakes for nothing else.
 *
 * The hot path's clock. A checkout needs "now" (lifetime, idle time, hold time); a
 * clock_gettime costs more than a whole checkout (25 ns; the coarse vDSO clock 3-4 ns). While
 * checkouts happen, the runtime publishes now_ms every PGR__TICK_MS and readers load it (one
 * relaxed load). Once no checkout has read it for PGR__CLOCK_QUIET ticks the runtime stops
 * ticking (live = 0); a reader that then finds the clock stopped reads CLOCK_MONOTONIC_COARSE
 * itself and leaves a request (wake_req) that the runtime's next round honours; no reader on
 * the checkout path makes a system call for it (a caller about to wait does kick the runtime,
 * and any due time or completion brings a round). Readers mark `used` only when it is clear, so the
 * line sees two writes per tick, not one per checkout.
 */
#ifndef PGR_RUNTIME_H
#define PGR_RUNTIME_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <liburing.h>

#include "pgring.h"

#define PGR__TICK_MS      10
#define PGR__CLOCK_QUIET  10 /* ticks without a reader before the clock stops */
#define PGR__MAX_POOLS    4096u
#define PGR__RT_POOL_NONE 0xffffu /* the pool index of the runtime's own SQEs */

struct pgr__clock {
	_Atomic int64_t now_ms;
	_Atomic uint32_t live;     /* 1 while the runtime ticks now_ms */
	_Atomic uint32_t used;     /* a reader since the last tick */
	_Atomic uint32_t wake_req; /* a reader found the clock stopped and asked for it */
	int efd;                   /* the runtime's wake-up eventfd */
} __attribute__((aligned(64)));

/* CLOCK_MONOTONIC_COARSE in ms: the one time base of the manager and the hot path. */
static inline int64_t pgr__coarse_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t pgr__clock_slow(struct pgr__clock *k);

static inline int64_t pgr__clock_now(struct pgr__clock *k)
{
	if (__builtin_expect(atomic_load_explicit(&k->live, memory_order_relaxed), 1)) {
		if (__builtin_expect(!atomic_load_explicit(&k->used, memory_order_relaxed), 0))
			atomic_store_explicit(&k->used, 1, memory_order_relaxed);
		return atomic_load_explicit(&k->now_ms, memory_order_relaxed);
	}
	return pgr__clock_slow(k);
}

struct pgr_runtime {
	struct pgr__clock clock; /* read on every checkout: first, on its own line */

	pthread_mutex_t lock; /* pools[] against attach/detach; held through a round */
	pgr_pool **pools;
	uint32_t npools; /* highest used index + 1 */
	_Atomic uint32_t nattached;

	struct io_uring ring;
	int efd;
	uint64_t efd_buf;
	bool efd_armed;
	int notify_fd; /* no thread: signalled when the ring has CQEs */
	bool threaded;
	bool owned; /* a pool's private runtime, freed with the pool */
	bool started;
	pthread_t thread;
	_Atomic int stop;
	uint32_t fork_epoch;

	int64_t armed_due_ms; /* the earliest timeout SQE in flight; INT64_MAX when none */
	uint32_t timeouts_out;
	struct __kernel_timespec tts;
	uint32_t quiet_ticks;
	int64_t last_tick_ms;
	_Atomic uint64_t wakeups; /* rounds run (a test and the idle bench count them) */
};

int pgr__runtime_new(bool threaded, bool owned, unsigned ring_entries, pgr_runtime **out);
void pgr__runtime_free(pgr_runtime *rt);
int pgr__runtime_attach(pgr_runtime *rt, pgr_pool *p);
/* One round: rounds of every attached pool's manager; wait blocks in the ring (the thread). */
void pgr__runtime_round(pgr_runtime *rt, bool wait);
void pgr__runtime_wake(pgr_runtime *rt);
void pgr__clock_kick(pgr_runtime *rt);

#endif
