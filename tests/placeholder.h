/* SPDX-License-Identifier: PostgreSQL */
/*
 * Placeholder connections for the checkout core's stress tests and pgr_core_bench: slots with
 * no server behind them, so shards, stealing and the waiter FIFO run where no PostgreSQL does.
 * Not part of the library.
 */
#ifndef PGR_PLACEHOLDER_H
#define PGR_PLACEHOLDER_H

#include "pgring.h"

/* A config for placeholder connections: no server, no socket to check, nothing expires. */
void pgr__fake_config(pgr_config *cfg, uint32_t conns);
/* A pool of cfg->max_size placeholders and no manager (no io_uring needed). */
int pgr__pool_create_fake(const pgr_config *cfg, pgr_pool **out);

#endif
