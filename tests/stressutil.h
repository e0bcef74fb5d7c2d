/* SPDX-License-Identifier: PostgreSQL */
/*
 * What the stress programs share: a failure counter with a FAIL() that reports where, and a
 * monotonic clock in milliseconds. They are plain programs (Criterion's sandbox cannot start
 * under ThreadSanitizer), so this stands in for Criterion's assertions.
 */
#ifndef PGR_STRESSUTIL_H
#define PGR_STRESSUTIL_H

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static _Atomic int failures;
#define FAIL(...)                                                                                  \
	do {                                                                                       \
		fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                               \
		fprintf(stderr, __VA_ARGS__);                                                      \
		fprintf(stderr, "\n");                                                             \
		atomic_fetch_add(&failures, 1);                                                    \
	} while (0)

static inline int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

#endif
