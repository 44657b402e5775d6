/* libFuzzer target: the safetensors header parser on arbitrary bytes taken
 * as a whole file.  Whatever the input, the parser must return 0 or
 * WD_E_FORMAT, and an accepted header must satisfy the format's rules. */
#include <stdlib.h>
#include <string.h>

#include "format/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_accepted(const StHeader *h, size_t size) {
        uint64_t expected = 0;

        if (h->file_size != size || h->data_offset != 8 + h->header_len || h->data_offset > size)
                abort();
        for (size_t i = 0; i < h->n_tensors; i++) {
                const StTensor *t = &h->tensors[i];
                unsigned __int128 bits = (unsigned __int128) t->n_elements * dtype_bits(t->dtype);

                if (t->begin != expected || t->end < t->begin || bits % 8 || t->end - t->begin != bits / 8)
                        abort();
                expected = t->end;
        }
        if (expected != size - h->data_offset)
                abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        StHeader *h = NULL;
        WdError err = WD_ERROR_NULL;
        int r;

        r = st_header_parse_buffer(data, size, "fuzz.safetensors", &h, &err);
        if (r == 0) {
                check_accepted(h, size);
                st_header_unref(h);
        } else if (r != WD_E_FORMAT || h || strncmp(err.message, "fuzz.safetensors: ", 18) != 0)
                abort();
        return 0;
}
