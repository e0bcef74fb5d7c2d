/* SPDX-License-Identifier: PostgreSQL */
/*
 * The system layer: clocks, saturating time arithmetic, futex wait/wake, the CPU id, the fork
 * guard and lazily backed memory. Knows nothing about pools.
 *
 * Time: every duration a user gives is an int64_t of milliseconds, and "effectively forever"
 * (INT64_MAX) must stay forever: conversions to nanoseconds and additions to a clock reading
 * saturate instead of wrapping (a wrapped deadline lies in the past and fires at once).
 */
#ifndef PGR_SYS_H
#define PGR_SYS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <linux/time_types.h>

#define PGR__NS_PER_MS 1000000LL
#define PGR__NS_PER_S  1000000000LL

static inline int64_t pgr__sat_add(int64_t a, int64_t b)
{
	int64_t r;
	if (__builtin_add_overflow(a, b, &r))
		return b > 0 ? INT64_MAX : INT64_MIN;
	return r;
}

static inline int64_t pgr__ms_to_ns(int64_t ms)
{
	int64_t r;
	if (__builtin_mul_overflow(ms, PGR__NS_PER_MS, &r))
		return ms > 0 ? INT64_MAX : INT64_MIN;
	return r;
}

static inline int64_t pgr__mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * PGR__NS_PER_S + ts.tv_nsec;
}

/* Absolute CLOCK_MONOTONIC deadline ms from now; INT64_MAX when it lies beyond the clock. */
static inline int64_t pgr__deadline_ns(int64_t ms)
{
	return pgr__sat_add(pgr__mono_ns(), pgr__ms_to_ns(ms < 0 ? 0 : ms));
}

static inline void pgr__ns_to_timespec(int64_t ns, struct timespec *ts)
{
	ts->tv_sec = (time_t)(ns / PGR__NS_PER_S);
	ts->tv_nsec = (long)(ns % PGR__NS_PER_S);
}

/* The kernel clamps absolute timeouts past its own range (KTIME_MAX) to "never". */
static inline void pgr__ns_to_kts(int64_t ns, struct __kernel_timespec *ts)
{
	ts->tv_sec = ns / PGR__NS_PER_S;
	ts->tv_nsec = ns % PGR__NS_PER_S;
}

/*
 * Waiter words are shared (not FUTEX_PRIVATE) futexes on purpose: on kernels 6.16+ (per-process
 * futex hash) an io_uring FUTEX_WAIT armed while the process had a single thread is never woken
 * by a private wake issued after the first pthread_create. With shared words one FUTEX_WAKE
 * reaches blocked threads and io_uring waits alike.
 */
int pgr__futex_wait_abs(_Atomic uint32_t *addr, uint32_t val, int64_t deadline_ns);
void pgr__futex_wake1(_Atomic uint32_t *addr);

/*
 * The fork guard: the one piece of process-wide mutable state in the library. A pool remembers
 * the epoch it was created in; a pthread_atfork child handler bumps the epoch, so every pool
 * call in a forked child sees the mismatch and refuses (-PGR_E_FORKED) instead of speaking on
 * sockets the parent still uses. Reading it costs one relaxed load on the checkout path.
 */
extern _Atomic uint32_t pgr__fork_epoch_v;
uint32_t pgr__fork_guard(void); /* registers the handler once; returns the current epoch */
static inline bool pgr__forked(uint32_t epoch)
{
	return atomic_load_explicit(&pgr__fork_epoch_v, memory_order_relaxed) != epoch;
}

/*
 * Zeroed memory whose pages become resident only when first written (an anonymous mapping, huge
 * pages off). For a pool's arrays that are sized for the worst case but mostly never used (the
 * waiter slots for max_waiters callers, a histogram set for every connection slot): an idle pool
 * pays for the pages it touched, not for its limits. NULL on failure or for size 0.
 */
void *pgr__lazy_zalloc(size_t size);
void pgr__lazy_free(void *mem, size_t size);
/* Make the pages under [mem, mem + size) resident and writable without writing to them, so
 * that a later write from a path that must not enter the kernel does not fault. Best effort
 * (MADV_POPULATE_WRITE, Linux 5.14): on older kernels the first write faults instead. */
void pgr__lazy_populate(void *mem, size_t size);

#endif
