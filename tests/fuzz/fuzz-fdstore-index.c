/* libFuzzer target: the index of the host tier that a restarted daemon
 * reads back from the service manager's store (store/persist.c).  The input
 * is parsed twice: as a whole index, and as the entries behind a header with
 * a matching checksum, so that the fuzzer reaches the entries' rules rather
 * than stopping at the checksum.  Whatever the bytes, the parser returns 0
 * with entries that keep every rule, or WD_E_FORMAT with a message, or
 * -ENOMEM; it never reads past the input (ASan) nor leaks. */
#include <stdlib.h>
#include <string.h>

#include "store/persist.h"
#include "util/siphash24.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(const PersistIndex *x) {
        uint8_t *seen = calloc(x->n_slab_ids ? x->n_slab_ids : 1, 1);

        if (!seen)
                abort();
        for (size_t i = 0; i < x->n_entries; i++) {
                const PersistEntry *e = &x->entries[i];

                if (e->model[0] != '/' || e->n_files == 0 || e->n_slabs == 0 || e->bytes == 0)
                        abort();
                for (size_t f = 0; f < e->n_files; f++)
                        if (e->ids[f].mtime.tv_nsec < 0 || e->ids[f].mtime.tv_nsec >= 1000000000 ||
                            e->ids[f].ctime.tv_nsec < 0 || e->ids[f].ctime.tv_nsec >= 1000000000)
                                abort();
                for (size_t k = 0; k < e->n_slabs; k++) {
                        const PersistSlab *s = &e->slabs[k];

                        if (s->id >= x->n_slab_ids || seen[s->id] || s->size > s->fd_size)
                                abort();
                        seen[s->id] = 1;
                }
        }
        free(seen);
}

static void parse(const uint8_t *data, size_t size) {
        PersistIndex *x = NULL;
        WdError err = WD_ERROR_NULL;
        int r = persist_index_parse(data, size, &x, &err);

        if (r == 0) {
                check(x);
                persist_index_free(x);
                return;
        }
        if ((r != WD_E_FORMAT && r != -ENOMEM) || x || err.message[0] == '\0')
                abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static const uint8_t key[SIPHASH_KEY_SIZE] = "weightd fdstore";
        uint8_t *buf;
        uint64_t sum;

        if (size > (1u << 20))
                return 0;
        parse(data, size);

        buf = malloc(32 + size);
        if (!buf)
                return 0;
        sum = siphash24(data, size, key);
        memcpy(buf, "WDFDIDX", 8);
        memset(buf + 8, 0, 24);
        buf[8] = 1;
        for (unsigned i = 0; i < 8; i++) {
                buf[16 + i] = (uint8_t) ((uint64_t) size >> (8 * i));
                buf[24 + i] = (uint8_t) (sum >> (8 * i));
        }
        if (size > 0)
                memcpy(buf + 32, data, size);
        parse(buf, 32 + size);
        free(buf);
        return 0;
}
