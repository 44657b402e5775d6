/* wd-load: load a model's components into sealed host slabs with the storage
 * core, and report throughput and page-cache growth (and, with --json, where
 * the time went: resolve, queue, read and seal, summed over the components,
 * as the daemon logs them per load).
 *
 *   wd-load [--chunk-size SIZE] [--queue-depth N] [--direct auto|on|off]
 *           [--pages auto|hugetlb|small] [--component NAME]... [--verify]
 *           [--json] MODEL
 *
 * Without --component every component with weights is loaded.  --verify
 * compares every slab byte for byte with an independent pread() of the file
 * (after the timing).  Exit 0 on success, 1 on a refusal, 2 on usage. */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "format/catalog.h"
#include "store/loader.h"
#include "tools/tool-util.h"
#include "util/parse-util.h"
#include "util/time-util.h"

typedef struct Options {
        ReaderParams reader;
        LoadOptions load;
        char **components;
        size_t n_components;
        bool verify;
        bool json;
        const char *model;
} Options;

static double now_s(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
}

/* Page cache without shared memory (slabs are shmem), in bytes. */
static int64_t page_cache_bytes(void) {
        FILE *f = fopen("/proc/meminfo", "re");
        long long cached = 0, shmem = 0, v;
        char line[256], key[64];

        if (!f)
                return -1;
        while (fgets(line, sizeof(line), f))
                if (sscanf(line, "%63[^:]: %lld", key, &v) == 2) {
                        if (strcmp(key, "Cached") == 0)
                                cached = v;
                        else if (strcmp(key, "Shmem") == 0)
                                shmem = v;
                }
        fclose(f);
        return (int64_t) (cached - shmem) * 1024;
}

static int usage(void) {
        fprintf(stderr, "usage: wd-load [--chunk-size SIZE] [--queue-depth N] [--direct auto|on|off]\n"
                        "               [--pages auto|hugetlb|small] [--component NAME]... [--verify]\n"
                        "               [--json] MODEL\n");
        return 2;
}

static int parse_options(int argc, char **argv, Options *o) {
        static const struct option longopts[] = {
                { "chunk-size", required_argument, NULL, 'c' }, { "queue-depth", required_argument, NULL, 'q' },
                { "direct", required_argument, NULL, 'd' },     { "component", required_argument, NULL, 'C' },
                { "verify", no_argument, NULL, 'v' },           { "json", no_argument, NULL, 'j' },
                { "pages", required_argument, NULL, 'p' },
                {},
        };
        uint64_t v;
        int c;

        while ((c = getopt_long(argc, argv, "", longopts, NULL)) >= 0)
                switch (c) {
                case 'c':
                        if (parse_size(optarg, &o->reader.chunk_size) < 0)
                                return fprintf(stderr, "--chunk-size: not a size: %s\n", optarg), -EINVAL;
                        break;
                case 'q':
                        if (parse_u64(optarg, 1, 4096, &v) < 0)
                                return fprintf(stderr, "--queue-depth: not in 1..4096: %s\n", optarg), -EINVAL;
                        o->reader.queue_depth = (unsigned) v;
                        break;
                case 'd':
                        if (direct_mode_from_string(optarg) < 0)
                                return fprintf(stderr, "--direct: auto, on or off: %s\n", optarg), -EINVAL;
                        o->load.direct = (DirectMode) direct_mode_from_string(optarg);
                        break;
                case 'p':
                        if (slab_pages_from_string(optarg) < 0)
                                return fprintf(stderr, "--pages: auto, hugetlb or small: %s\n", optarg), -EINVAL;
                        o->load.pages = (SlabPages) slab_pages_from_string(optarg);
                        break;
                case 'C':
                        o->components = realloc(o->components, (o->n_components + 1) * sizeof(char *));
                        if (!o->components)
                                return -ENOMEM;
                        o->components[o->n_components] = strdup(optarg);
                        if (!o->components[o->n_components++])
                                return -ENOMEM;
                        break;
                case 'v':
                        o->verify = true;
                        break;
                case 'j':
                        o->json = true;
                        break;
                default:
                        return -EINVAL;
                }
        if (optind != argc - 1)
                return -EINVAL;
        o->model = argv[optind];
        return 0;
}

/* Compare a slab with the file read independently with pread(). */
static int verify_slab(const CatalogFile *f, const Slab *s) {
        _cleanup_free_ uint8_t *buf = malloc(1 << 20);
        uint64_t off = 0;

        if (!buf)
                return -ENOMEM;
        if (s->size != f->id.size)
                return -EBADMSG;
        while (off < s->size) {
                ssize_t k = pread(f->fd, buf, MIN((uint64_t) 1 << 20, s->size - off), (off_t) off);

                if (k <= 0)
                        return k < 0 ? negative_errno() : -ENODATA;
                if (memcmp(buf, s->data + off, (size_t) k) != 0)
                        return -EBADMSG;
                off += (uint64_t) k;
        }
        return 0;
}

static bool progress_tty;

static void on_progress(LoadJob *job, uint64_t done, uint64_t total, void *userdata) {
        if (progress_tty)
                fprintf(stderr, "\r  %s: %5.1f%%", (const char *) userdata, total ? 100.0 * (double) done / (double) total : 100.0);
}

int main(int argc, char **argv) {
        Options o = { .reader = READER_PARAMS_DEFAULT, .load = LOAD_OPTIONS_DEFAULT };
        _cleanup_(catalog_freep) Catalog *catalog = NULL;
        _cleanup_(reader_freep) Reader *reader = NULL;
        _cleanup_(cache_freep) Cache *cache = NULL;
        _cleanup_free_ char *model = NULL;
        _cleanup_close_ int root = -1;
        Component **comps = NULL;
        CacheEntry **entries = NULL;
        size_t n_comps = 0;
        uint64_t bytes = 0, resolve_usec = 0;
        LoadStages stages = {};
        size_t n_slabs = 0, n_huge = 0;
        const char *pages;
        double t0, t1;
        int64_t pc0, pc1;
        int r, ret = 0;

        if (parse_options(argc, argv, &o) < 0)
                return usage();
        r = tool_open_root(o.model, &root, &model);
        if (r < 0) {
                fprintf(stderr, "NOT_FOUND: %s: %s\n", o.model, strerror(-r));
                return 1;
        }
        if (catalog_new(&catalog, root, "/") < 0 || cache_new(&cache, "host", UINT64_MAX) < 0)
                return 1;
        r = reader_new(&reader, &o.reader);
        if (r < 0) {
                fprintf(stderr, "cannot start the io_uring reader: %s\n", strerror(-r));
                return 1;
        }
        progress_tty = !o.json && isatty(STDERR_FILENO);

        if (o.n_components == 0) {
                _cleanup_(component_list_freep) ComponentList *l = NULL;
                WdError err = WD_ERROR_NULL;

                if (catalog_list(catalog, model, &l, &err) != 0) {
                        fprintf(stderr, "%s: %s\n", wd_error_code_name(err.code), err.message);
                        return 1;
                }
                for (size_t i = 0; i < l->n; i++)
                        if (l->items[i].kind == COMPONENT_WEIGHTS) {
                                o.components = realloc(o.components, (o.n_components + 1) * sizeof(char *));
                                if (!o.components)
                                        return 1;
                                o.components[o.n_components] = strdup(l->items[i].name);
                                if (!o.components[o.n_components++])
                                        return 1;
                        }
        }
        comps = calloc(o.n_components + 1, sizeof(Component *));
        entries = calloc(o.n_components + 1, sizeof(CacheEntry *));
        if (!comps || !entries)
                return 1;

        pc0 = page_cache_bytes();
        t0 = now_s();
        for (size_t i = 0; i < o.n_components; i++) {
                WdError err = WD_ERROR_NULL;
                LoadStages st = {};
                uint64_t t = now_usec();

                r = catalog_resolve(catalog, model, o.components[i], &comps[n_comps], &err);
                resolve_usec += now_usec() - t;
                if (r == 0) {
                        n_comps++;
                        r = load_component(reader, cache, root, comps[n_comps - 1], &o.load, on_progress,
                                           o.components[i], &entries[n_comps - 1], &st, &err);
                }
                if (progress_tty)
                        fputc('\n', stderr);
                if (r != 0) {
                        fprintf(stderr, "%s: %s\n", wd_error_code_name(err.code), err.message);
                        return 1;
                }
                bytes += entries[n_comps - 1]->bytes;
                stages.queue_usec += st.queue_usec;
                stages.read_usec += st.read_usec;
                stages.seal_usec += st.seal_usec;
        }
        t1 = now_s();
        pc1 = page_cache_bytes();

        for (size_t i = 0; o.verify && i < n_comps; i++)
                for (size_t k = 0; k < entries[i]->n_files; k++) {
                        r = verify_slab(&comps[i]->files[k], entries[i]->slabs[k]);
                        if (r < 0) {
                                fprintf(stderr, "%s: served bytes differ from the file: %s\n",
                                        comps[i]->files[k].display, strerror(-r));
                                ret = 1;
                        }
                }

        for (size_t i = 0; i < n_comps; i++)
                for (size_t k = 0; k < entries[i]->n_files; k++) {
                        if (entries[i]->slabs[k]->hugetlb)
                                n_huge++;
                        n_slabs++;
                }
        pages = n_huge == n_slabs ? "hugetlb" : n_huge == 0 ? "small" : "mixed";

        {
                double secs = t1 - t0, gbps = secs > 0 ? (double) bytes / secs / 1e9 : 0;
                int64_t growth = pc1 - pc0;

                if (o.json)
                        printf("{\"bytes\": %llu, \"seconds\": %.6f, \"gbps\": %.4f, \"resolve_seconds\": %.6f, "
                               "\"queue_seconds\": %.6f, \"read_seconds\": %.6f, \"seal_seconds\": %.6f, "
                               "\"components\": %zu, \"pagecache_growth_bytes\": %lld, \"chunk_size\": %llu, "
                               "\"queue_depth\": %u, \"direct\": \"%s\", \"pages\": \"%s\", \"verified\": %s}\n",
                               (unsigned long long) bytes, secs, gbps, (double) resolve_usec / 1e6,
                               (double) stages.queue_usec / 1e6, (double) stages.read_usec / 1e6,
                               (double) stages.seal_usec / 1e6, n_comps, (long long) growth,
                               (unsigned long long) o.reader.chunk_size, o.reader.queue_depth,
                               direct_mode_to_string(o.load.direct), pages, o.verify && ret == 0 ? "true" : "false");
                else {
                        printf("loaded %zu component%s, %.2f GiB in %.3f s: %.2f GB/s (direct I/O %s, %s pages, "
                               "chunk %llu KiB, queue depth %u)\n",
                               n_comps, n_comps == 1 ? "" : "s", (double) bytes / (1 << 30), secs, gbps,
                               direct_mode_to_string(o.load.direct), pages,
                               (unsigned long long) o.reader.chunk_size >> 10, o.reader.queue_depth);
                        printf("page cache grew by %.1f MiB (%.2f%% of the model)\n", (double) growth / (1 << 20),
                               bytes ? 100.0 * (double) growth / (double) bytes : 0.0);
                        if (o.verify)
                                printf("verify: %s\n", ret == 0 ? "every byte equals the files" : "MISMATCH");
                }
        }

        cache_free(TAKE_PTR(cache));
        for (size_t i = 0; i < n_comps; i++)
                component_free(comps[i]);
        free(comps);
        free(entries);
        for (size_t i = 0; i < o.n_components; i++)
                free(o.components[i]);
        free(o.components);
        return ret;
}
