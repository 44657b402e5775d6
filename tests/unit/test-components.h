/* Components for the unit tests, built in memory: safetensors files
 * written here with a pseudo-random data section, parsed with
 * st_header_parse_buffer(), no file descriptors (nothing is read). */
#pragma once

#include "format/catalog.h"
#include "test-util.h"

typedef struct TSpec {
        const char *name;
        Dtype dtype;
        unsigned ndim;
        uint64_t shape[4];
} TSpec;

typedef struct TFile {
        uint8_t *buf;
        size_t size;
} TFile;

static inline uint64_t elems(const TSpec *t) {
        uint64_t n = 1;

        for (unsigned i = 0; i < t->ndim; i++)
                n *= t->shape[i];
        return n;
}

/* A safetensors file holding tensors in the given order, filled with a
 * pseudo-random pattern from seed. */
static inline TFile make_file(const TSpec *ts, size_t n, uint32_t seed) {
        char *json = NULL;
        size_t jlen = 0, data = 0, hlen;
        FILE *f = open_memstream(&json, &jlen);
        TFile out;

        assert_non_null(f);
        fputs("{\"__metadata__\":{\"format\":\"pt\"}", f);
        for (size_t i = 0; i < n; i++) {
                size_t bytes = (size_t) (elems(&ts[i]) * dtype_bits(ts[i].dtype) / 8);

                fprintf(f, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", ts[i].name, dtype_to_string(ts[i].dtype));
                for (unsigned d = 0; d < ts[i].ndim; d++)
                        fprintf(f, "%s%llu", d ? "," : "", (unsigned long long) ts[i].shape[d]);
                fprintf(f, "],\"data_offsets\":[%zu,%zu]}", data, data + bytes);
                data += bytes;
        }
        fputs("}", f);
        assert_int_equal(fclose(f), 0);
        hlen = (jlen + 7) & ~(size_t) 7;
        out.size = 8 + hlen + data;
        out.buf = malloc(out.size);
        assert_non_null(out.buf);
        for (int i = 0; i < 8; i++)
                out.buf[i] = (uint8_t) ((uint64_t) hlen >> (8 * i));
        memset(out.buf + 8, ' ', hlen);
        memcpy(out.buf + 8, json, jlen);
        free(json);
        uint32_t x = seed * 2654435761u + 7;
        for (size_t i = 8 + hlen; i < out.size; i++) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                out.buf[i] = (uint8_t) x;
        }
        return out;
}

/* A component of the given files (fds -1: nothing is read). */
static inline Component *make_component(TFile *files, size_t n) {
        Component *c = calloc(1, sizeof(Component));
        WdError err = WD_ERROR_NULL;

        assert_non_null(c);
        c->model = strdup("/models/m");
        c->name = strdup("");
        c->files = calloc(n, sizeof(CatalogFile));
        assert_non_null(c->files);
        for (size_t i = 0; i < n; i++) {
                CatalogFile *f = &c->files[i];
                char name[64];

                snprintf(name, sizeof(name), "/models/m/part-%zu.safetensors", i);
                *f = (CatalogFile){ .fd = -1 };
                f->path = strdup(name + 10);
                f->display = strdup(name);
                if (st_header_parse_buffer(files[i].buf, files[i].size, name, &f->header, &err) != 0)
                        fail_msg("%s", err.message);
                c->n_files++;
                c->n_tensors += f->header->n_tensors;
                c->total_bytes += files[i].size;
        }
        return c;
}
