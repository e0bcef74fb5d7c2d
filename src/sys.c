/* SPDX-License-Identifier: PostgreSQL */
/*
 * System services for the layers above: futex wait/wake on shared words and the fork guard.
 */
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sys.h"

int pgr__futex_wait_abs(_Atomic uint32_t *addr, uint32_t val, int64_t deadline_ns)
{
	struct timespec ts;
	pgr__ns_to_timespec(deadline_ns, &ts);
	/* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC time; MATCH_ANY pairs with WAKE. */
	long r = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_BITSET, val, &ts, NULL,
	                 FUTEX_BITSET_MATCH_ANY);
	return r == 0 ? 0 : -errno;
}

void pgr__futex_wake1(_Atomic uint32_t *addr)
{
	syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* See sys.h: process-wide by necessity, written only by the atfork child handler. */
_Atomic uint32_t pgr__fork_epoch_v;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
	atomic_fetch_add_explicit(&pgr__fork_epoch_v, 1, memory_order_relaxed);
}

static void fork_register(void)
{
	pthread_atfork(NULL, NULL, on_fork_child);
}

uint32_t pgr__fork_guard(void)
{
	pthread_once(&fork_once, fork_register);
	return atomic_load_explicit(&pgr__fork_epoch_v, memory_order_relaxed);
}
