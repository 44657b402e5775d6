/* Target names of the GPU tier: "cuda:N" and "cuda:GPU-<uuid>", and which
 * device one names.  Pure functions, in every build (with CUDA or without),
 * so that requests are checked the same way everywhere. */
#include <string.h>
#include <strings.h>

#include "gpu/gpu.h"
#include "util/parse-util.h"

int gpu_target_parse(const char *target, int *ret_ordinal, char *ret_uuid) {
        const char *p;
        uint64_t n;
        size_t len;

        if (!target || !*target || strcmp(target, "host") == 0)
                return 0;
        if (strncmp(target, "cuda:", 5) != 0)
                return WD_E_INVALID;
        p = target + 5;
        if (strncmp(p, "GPU-", 4) == 0) {
                len = strlen(p);
                if (len <= 4 || len >= GPU_UUID_MAX)
                        return WD_E_INVALID;
                for (size_t i = 4; i < len; i++)
                        if (!strchr("0123456789abcdefABCDEF-", p[i]))
                                return WD_E_INVALID;
                memcpy(ret_uuid, p, len + 1);
                *ret_ordinal = -1;
                return 1;
        }
        /* Digits only: parse_u64() would take "+1" or " 1" on some libcs. */
        if (!*p || strspn(p, "0123456789") != strlen(p) || (p[0] == '0' && p[1]))
                return WD_E_INVALID;
        if (parse_u64(p, 0, GPU_MAX_DEVICES - 1, &n) < 0)
                return WD_E_INVALID;
        ret_uuid[0] = '\0';
        *ret_ordinal = (int) n;
        return 1;
}

int gpu_target_lookup(const GpuDeviceInfo *devs, size_t n, const char *target, size_t *ret_index) {
        char uuid[GPU_UUID_MAX];
        int ordinal, r;

        r = gpu_target_parse(target, &ordinal, uuid);
        if (r <= 0)
                return WD_E_INVALID;
        for (size_t i = 0; i < n; i++)
                if (ordinal >= 0 ? devs[i].index == (unsigned) ordinal : strcasecmp(devs[i].uuid, uuid) == 0) {
                        *ret_index = i;
                        return 0;
                }
        return WD_E_NOT_FOUND;
}
