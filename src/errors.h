/* SPDX-License-Identifier: PostgreSQL */
/*
 * Names of errors, close reasons and event types.
 *
 * Everything here returns pointers to static, read-only strings: safe from any thread, never
 * blocks, never allocates. The public half (pgr_strerror, pgr_close_reason_name,
 * pgr_event_log_stderr) is declared in pgring.h.
 */
#ifndef PGR_ERRORS_H
#define PGR_ERRORS_H

#include "pgring.h"

/* snake_case name of an event type ("conn_closed"), or "unknown" for a value out of range. */
const char *pgr__event_type_name(enum pgr_event_type type);

#endif
