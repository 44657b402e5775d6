/* The loader: makes a resolved component resident.  It reserves the bytes in
 * the cache, creates one slab per file, streams every file into its slab with
 * the reader (O_DIRECT where the file system allows it), then checks that no
 * file changed during the read, seals the slabs and marks the entry
 * resident.
 *
 * A LoadJob runs asynchronously: its progress and done callbacks come from
 * the reader thread, and the owner calls load_job_finish() on its own thread
 * (the one that owns the cache) once done has fired. */
#pragma once

#include "format/catalog.h"
#include "io/reader.h"
#include "store/cache.h"

typedef enum DirectMode {
        DIRECT_AUTO, /* O_DIRECT where the file system accepts it */
        DIRECT_ON,   /* O_DIRECT or fail */
        DIRECT_OFF,  /* buffered reads */
        _DIRECT_MODE_MAX,
} DirectMode;

const char *direct_mode_to_string(DirectMode m);
int direct_mode_from_string(const char *s); /* -EINVAL when unknown */

typedef struct LoadOptions {
        DirectMode direct;
        SlabPages pages;
} LoadOptions;

#define LOAD_OPTIONS_DEFAULT ((LoadOptions){ .direct = DIRECT_AUTO, .pages = SLAB_PAGES_AUTO })

typedef struct LoadJob LoadJob;

/* Where the time of a load went, in µs, stage after stage. */
typedef struct LoadStages {
        uint64_t queue_usec; /* load_job_start() to the first read issued: slabs created, files opened
                              * for direct I/O, and other loads' reads ahead of this one */
        uint64_t read_usec;  /* the first read issued to the last one completed */
        uint64_t seal_usec;  /* the last read completed to the end given: files checked, slabs sealed */
} LoadStages;

typedef void (*load_progress_fn)(LoadJob *job, uint64_t done, uint64_t total, void *userdata);
typedef void (*load_done_fn)(LoadJob *job, void *userdata);

/* Start loading comp into a new cache entry.  root_fd is where the
 * component's paths are opened.  The job borrows comp, reader and cache: they
 * must outlive it.  Returns 0 (job running), or WD_E_BUDGET, WD_E_BUSY,
 * WD_E_CHANGED, -errno with err filled (nothing left behind). */
int load_job_start(LoadJob **ret, Reader *reader, Cache *cache, int root_fd, const Component *comp,
                   const LoadOptions *opts, load_progress_fn progress, load_done_fn done, void *userdata, WdError *err);

/* After done fired, on any thread: check that no file changed during the
 * read and seal the slabs.  It touches neither the cache nor anything the
 * owner's thread uses, so the owner may run it on a worker (dropping the
 * writable mapping of a large slab takes a while).  The outcome is kept for
 * load_job_finish(); calling it again does nothing. */
void load_job_seal(LoadJob *job);

/* After done fired (and load_job_seal(), which it runs if nobody did): make
 * the entry resident (returned in ret_entry), or remove it and report why.
 * Returns 0, WD_E_CHANGED, -ECANCELED, -errno with err filled.  Frees the
 * job either way. */
int load_job_finish(LoadJob *job, CacheEntry **ret_entry, WdError *err);

/* The same without the read: reserve, create the slabs and open the files;
 * the owner fills the slabs itself (its own reads with load_job_extent(),
 * bytes from elsewhere), then calls load_job_seal() and load_job_finish()
 * as above.  No callbacks; load_job_filled() is 0 and load_job_stages()
 * must not be called. */
int load_job_prepare(LoadJob **ret, Cache *cache, int root_fd, const Component *comp, const LoadOptions *opts,
                     WdError *err);
/* load_job_prepare() into an entry of another variant, reserving
 * reserve_bytes rather than the component's size: for a caller that fills
 * only part of the slabs (they are sparse: memory is taken where bytes are
 * written; opts should ask for small pages then).  The seal checks the
 * files are unchanged but not the header bytes, which such slabs may lack:
 * the caller checks what it filled (the cluster: a checksum per piece). */
int load_job_prepare_variant(LoadJob **ret, Cache *cache, int root_fd, const Component *comp, const LoadOptions *opts,
                             const char *variant, uint64_t reserve_bytes, WdError *err);
/* The reader extent for bytes [offset, offset + length) of file (in comp's
 * order) into its slab: direct where the file was opened so and offset is
 * aligned (then length is a multiple of READER_ALIGN or runs to the end of
 * the file). */
void load_job_extent(LoadJob *job, size_t file, uint64_t offset, uint64_t length, ReaderExtent *ret);
/* Give a prepared job's reservation back and free it (nothing may read
 * into its slabs any more). */
void load_job_discard(LoadJob *job);

void load_job_cancel(LoadJob *job);
CacheEntry *load_job_entry(LoadJob *job);
/* Bytes of file i (in comp's order) in its slab, contiguous from the start:
 * see reader_job_filled().  Any thread, until the job is freed. */
uint64_t load_job_filled(LoadJob *job, size_t file);
/* The slabs being filled (comp->n_files), writable until sealed; NULL once
 * load_job_finish() took them. */
Slab *const *load_job_slabs(LoadJob *job);
/* After done fired: the read's error (0, -ECANCELED, -errno). */
int load_job_error(LoadJob *job);
/* Whether at least one file was read with O_DIRECT. */
bool load_job_direct(LoadJob *job);
/* After done fired, on the owner's thread: split the time from
 * load_job_start() to end_usec (now_usec(), after done) into stages. */
void load_job_stages(LoadJob *job, uint64_t end_usec, LoadStages *ret);

/* Resolve-free convenience for tools and tests: start, wait, seal, finish.
 * A component that is already resident is returned as it is (its stages all
 * 0).  ret_stages may be NULL; its seal stage ends after the seal. */
int load_component(Reader *reader, Cache *cache, int root_fd, const Component *comp, const LoadOptions *opts,
                   load_progress_fn progress, void *userdata, CacheEntry **ret_entry, LoadStages *ret_stages,
                   WdError *err);
