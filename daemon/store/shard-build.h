/* The shard build: a Job that makes a derived host entry holding only one
 * rank's slices of a component (store/shard.h plans them), cut out of the
 * whole component's resident host entry on the background worker.
 *
 * It starts from the resident whole entry (referenced while it copies), or
 * waits, as a waiter, on the host load that makes it resident.  Its derived
 * entry is reserved at the start, so identical requests find and join it.
 * Cancelled while it waits (nobody wants it any more), it stops waiting,
 * which cancels the host load when nothing else wants that; once copying it
 * finishes and the slab stays cached. */
#pragma once

#include "format/catalog.h"
#include "store/shard.h"
#include "store/store.h"

/* comp and spec are copied as needed, plan (comp's layout under spec) is
 * taken, even on failure, and handed to waiters in the outcome; variant is
 * the spec's key.  Exactly one of whole (resident) and whole_job (the host load
 * filling it) is set.  Returns 0 with *ret referenced for the caller, or
 * WD_E_BUDGET, -errno with err set. */
int shard_build_start(Store *st, const Component *comp, ShardPlan *plan, const ShardSpec *spec,
                      const char *variant, CacheEntry *whole, Job *whole_job, Job **ret, WdError *err);

/* The size of a derived slab: the plan's bytes, at least one. */
uint64_t shard_build_size(const ShardPlan *p);
