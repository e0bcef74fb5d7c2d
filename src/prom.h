/* SPDX-License-Identifier: PostgreSQL */
/*
 * Prometheus text exposition (format 0.0.4) of a pool's stats and histograms.
 *
 * Pure formatting over values the caller has already snapshotted: no pool state is read here,
 * so it is thread-safe, never blocks and never allocates.
 */
#ifndef PGR_PROM_H
#define PGR_PROM_H

#include <stddef.h>

#include "hist.h"
#include "pgring.h"

/*
 * Write the exposition of st and snaps (indexed by enum pgr_hist_kind) for the pool labelled
 * pool_name (NULL is taken as ""). snprintf semantics: writes at most len bytes including the
 * NUL, NUL-terminates whenever len > 0, and returns the length the whole text needs, excluding
 * the NUL; buf may be NULL when len is 0.
 */
size_t pgr__prom_format(char *buf, size_t len, const char *pool_name, const pgr_stats *st,
                        const pgr__hist_snap snaps[PGR_HIST_KINDS]);

#endif
