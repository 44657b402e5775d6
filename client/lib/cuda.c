/* The client's side of device slabs: the CUDA driver reached at run time.
 *
 * The library links no CUDA library: the first call dlopen()s libcuda.so.1
 * and takes every entry point from cuGetProcAddress (versioned, with
 * CU_GET_PROC_ADDRESS_DEFAULT), so a process without a driver only gets
 * WD_UNSUPPORTED for device loads.  A device slab's descriptor is imported
 * (cuMemImportFromShareableHandle), address space reserved and mapped, and
 * read/write access set for the local device whose UUID the daemon named;
 * local ordinals are this process's (CUDA_VISIBLE_DEVICES applies), found by
 * comparing cuDeviceGetUuid over the visible devices.  The mapping keeps
 * the memory alive even if the daemon goes away; cuda_unmap() undoes it.
 * CUDA does not survive fork(): a child of the process that loaded the
 * driver gets WD_UNSUPPORTED, and its cuda_unmap() leaves the parent's
 * mappings, which it never had, alone. */
#include <cuda.h>
#include <cudaTypedefs.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "client-internal.h"
#include "cuda-internal.h"

#define CUDA_ABI 12000

typedef struct Driver {
        bool loaded;
        pid_t pid;            /* the process that loaded it */
        int error;            /* WD_OK or WD_UNSUPPORTED */
        char reason[256];
        PFN_cuInit_v2000 Init;
        PFN_cuGetErrorName_v6000 GetErrorName;
        PFN_cuDeviceGetCount_v2000 DeviceGetCount;
        PFN_cuDeviceGet_v2000 DeviceGet;
        PFN_cuDeviceGetUuid_v11040 DeviceGetUuid;
        PFN_cuMemImportFromShareableHandle_v10020 MemImportFromShareableHandle;
        PFN_cuMemAddressReserve_v10020 MemAddressReserve;
        PFN_cuMemAddressFree_v10020 MemAddressFree;
        PFN_cuMemMap_v10020 MemMap;
        PFN_cuMemUnmap_v10020 MemUnmap;
        PFN_cuMemSetAccess_v10020 MemSetAccess;
        PFN_cuMemRelease_v10020 MemRelease;
} Driver;

static Driver driver;
static pthread_once_t driver_once = PTHREAD_ONCE_INIT;

static void driver_load(void) {
        static const struct {
                const char *name;
                size_t offset;
        } table[] = {
                { "cuInit", offsetof(Driver, Init) },
                { "cuGetErrorName", offsetof(Driver, GetErrorName) },
                { "cuDeviceGetCount", offsetof(Driver, DeviceGetCount) },
                { "cuDeviceGet", offsetof(Driver, DeviceGet) },
                { "cuDeviceGetUuid", offsetof(Driver, DeviceGetUuid) },
                { "cuMemImportFromShareableHandle", offsetof(Driver, MemImportFromShareableHandle) },
                { "cuMemAddressReserve", offsetof(Driver, MemAddressReserve) },
                { "cuMemAddressFree", offsetof(Driver, MemAddressFree) },
                { "cuMemMap", offsetof(Driver, MemMap) },
                { "cuMemUnmap", offsetof(Driver, MemUnmap) },
                { "cuMemSetAccess", offsetof(Driver, MemSetAccess) },
                { "cuMemRelease", offsetof(Driver, MemRelease) },
        };
        PFN_cuGetProcAddress_v12000 get_proc;
        void *lib;
        CUresult e;

        driver.error = WD_UNSUPPORTED;
        driver.pid = getpid();
        lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
                snprintf(driver.reason, sizeof(driver.reason), "no CUDA driver in this process: %s", dlerror());
                return;
        }
        /* Never dlclose()d: mappings made through it outlive any call. */
        get_proc = (PFN_cuGetProcAddress_v12000) dlsym(lib, "cuGetProcAddress_v2");
        if (!get_proc) {
                snprintf(driver.reason, sizeof(driver.reason), "the CUDA driver is older than 12.0 (no cuGetProcAddress_v2)");
                return;
        }
        for (size_t i = 0; i < ELEMENTSOF(table); i++) {
                CUdriverProcAddressQueryResult q = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
                void *fn = NULL;

                e = get_proc(table[i].name, &fn, CUDA_ABI, CU_GET_PROC_ADDRESS_DEFAULT, &q);
                if (e != CUDA_SUCCESS || q != CU_GET_PROC_ADDRESS_SUCCESS || !fn) {
                        snprintf(driver.reason, sizeof(driver.reason), "the CUDA driver lacks %s", table[i].name);
                        return;
                }
                memcpy((uint8_t *) &driver + table[i].offset, &fn, sizeof(fn));
        }
        e = driver.Init(0);
        if (e != CUDA_SUCCESS) {
                const char *name = NULL;

                (void) driver.GetErrorName(e, &name);
                snprintf(driver.reason, sizeof(driver.reason), "cuInit failed: %s", name ? name : "unknown error");
                return;
        }
        driver.error = WD_OK;
        driver.loaded = true;
}

static int driver_get(wd_error *err) {
        pthread_once(&driver_once, driver_load);
        if (driver.loaded && driver.pid != getpid())
                return error_set(err, WD_UNSUPPORTED,
                                 "the CUDA driver was initialised by process %d, which forked this one: CUDA cannot be "
                                 "used after fork()",
                                 (int) driver.pid);
        if (driver.error != WD_OK)
                return error_set(err, driver.error, "%s", driver.reason);
        return WD_OK;
}

/* The one boundary for driver results in the client. */
static int cu_check(CUresult e, wd_error *err, const char *what) {
        const char *name = NULL;

        if (e == CUDA_SUCCESS)
                return WD_OK;
        if (driver.GetErrorName(e, &name) != CUDA_SUCCESS || !name)
                name = "CUDA_ERROR_UNKNOWN";
        return error_set(err, e == CUDA_ERROR_OUT_OF_MEMORY ? WD_RESOURCE_EXHAUSTED : WD_INTERNAL, "%s: %s", what,
                         name);
}

static void uuid_format(char *buf, size_t size, const unsigned char b[16]) {
        snprintf(buf, size, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
                 b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

/* How many CUDA devices this process sees, loading the driver first. */
static int device_count(int *ret, wd_error *err) {
        int r = driver_get(err);

        if (r != WD_OK)
                return r;
        return cu_check(driver.DeviceGetCount(ret), err, "cannot count the CUDA devices");
}

int cuda_device_uuid(int ordinal, char *buf, size_t size, wd_error *err) {
        CUdevice dev;
        CUuuid uuid;
        int count = 0, r;

        r = device_count(&count, err);
        if (r != WD_OK)
                return r;
        if (ordinal < 0 || ordinal >= count)
                return error_set(err, WD_INVALID_ARGUMENT, "cuda:%d: this process sees %d CUDA devices", ordinal,
                                 count);
        r = cu_check(driver.DeviceGet(&dev, ordinal), err, "cannot open the CUDA device");
        if (r == WD_OK)
                r = cu_check(driver.DeviceGetUuid(&uuid, dev), err, "cannot read the CUDA device's UUID");
        if (r != WD_OK)
                return r;
        uuid_format(buf, size, (const unsigned char *) uuid.bytes);
        return WD_OK;
}

int cuda_device_by_uuid(const char *uuid, int *ret_ordinal, wd_error *err) {
        int count = 0, r;

        r = device_count(&count, err);
        if (r != WD_OK)
                return r;
        for (int i = 0; i < count; i++) {
                char u[64];

                if (cuda_device_uuid(i, u, sizeof(u), err) == WD_OK && strcasecmp(u, uuid) == 0) {
                        *ret_ordinal = i;
                        return WD_OK;
                }
        }
        return error_set(err, WD_INVALID_ARGUMENT, "device %s is not visible to this process (CUDA_VISIBLE_DEVICES?)",
                         uuid);
}

int cuda_target(const char *device, char *buf, size_t size, wd_error *err) {
        char *end;
        long n;

        if (!device || !*device || strcmp(device, "host") == 0) {
                snprintf(buf, size, "%s", "");
                return WD_OK;
        }
        if (strncmp(device, "cuda:", 5) != 0)
                return error_set(err, WD_INVALID_ARGUMENT, "device \"%s\": not \"host\", \"cuda:N\" or \"cuda:GPU-<uuid>\"",
                                 device);
        if (strncmp(device + 5, "GPU-", 4) == 0) {
                snprintf(buf, size, "%s", device);
                return WD_OK;
        }
        errno = 0;
        n = strtol(device + 5, &end, 10);
        if (errno != 0 || end == device + 5 || *end || n < 0 || n > 1024)
                return error_set(err, WD_INVALID_ARGUMENT, "device \"%s\": not \"cuda:N\" or \"cuda:GPU-<uuid>\"", device);
        /* The daemon's ordinals are not ours: name the device by its UUID. */
        int r = cuda_device_uuid((int) n, buf + 5, size > 5 ? size - 5 : 0, err);
        if (r != WD_OK)
                return r;
        memcpy(buf, "cuda:", 5);
        return WD_OK;
}

int cuda_import(int fd, const char *uuid, uint64_t map_size, CudaMapping *ret, wd_error *err) {
        CudaMapping m = { .device = -1 };
        CUmemGenericAllocationHandle handle;
        CUdeviceptr ptr = 0;
        CUmemAccessDesc access;
        CUdevice dev;
        int r;

        r = driver_get(err);
        if (r != WD_OK)
                return r;
        r = cuda_device_by_uuid(uuid, &m.device, err);
        if (r != WD_OK)
                return r;
        r = cu_check(driver.DeviceGet(&dev, m.device), err, "cannot open the CUDA device");
        if (r != WD_OK)
                return r;
        r = cu_check(driver.MemImportFromShareableHandle(&handle, (void *) (uintptr_t) fd,
                                                         CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                     err, "cannot import the daemon's device slab");
        if (r != WD_OK)
                return r;
        r = cu_check(driver.MemAddressReserve(&ptr, map_size, 0, 0, 0), err, "cannot reserve device address space");
        if (r != WD_OK) {
                (void) driver.MemRelease(handle);
                return r;
        }
        r = cu_check(driver.MemMap(ptr, map_size, 0, handle, 0), err, "cannot map the device slab");
        if (r != WD_OK) {
                (void) driver.MemAddressFree(ptr, map_size);
                (void) driver.MemRelease(handle);
                return r;
        }
        /* Read-only, so that no worker can change what the others see (a
         * write faults, as it does on a host slab); read-write only where
         * the driver refuses read-only access to device memory. */
        memset(&access, 0, sizeof(access));
        access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        access.location.id = dev;
        access.flags = CU_MEM_ACCESS_FLAGS_PROT_READ;
        if (driver.MemSetAccess(ptr, map_size, &access, 1) == CUDA_SUCCESS)
                m.read_only = true;
        else {
                access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
                r = cu_check(driver.MemSetAccess(ptr, map_size, &access, 1), err,
                             "cannot set access to the device slab");
        }
        if (r != WD_OK) {
                (void) driver.MemUnmap(ptr, map_size);
                (void) driver.MemAddressFree(ptr, map_size);
                (void) driver.MemRelease(handle);
                return r;
        }
        /* The mapping holds the memory; the handle is not needed any more. */
        (void) driver.MemRelease(handle);
        m.ptr = ptr;
        m.size = map_size;
        *ret = m;
        return WD_OK;
}

void cuda_unmap(CudaMapping *m) {
        if (!m || m->size == 0 || !driver.loaded)
                return;
        if (driver.pid != getpid()) { /* a forked child: the mapping is the parent's */
                m->size = 0;
                m->ptr = 0;
                return;
        }
        (void) driver.MemUnmap(m->ptr, m->size);
        (void) driver.MemAddressFree(m->ptr, m->size);
        m->size = 0;
        m->ptr = 0;
}
