/* Fuzz target: bytes from a peer through the daemon's framing, decoder and
 * dispatcher.  One real server (its loop, cache and reader) lives for the
 * whole run with a tiny model under its root; each input is written by the
 * peer end of a socketpair whose other end is served as a connection, then
 * the peer half-closes and the loop runs until the daemon is done with it.
 * Whatever the input, the daemon must neither crash nor leak: a decoded
 * frame gets a reply or the connection is dropped. */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "server/config.h"
#include "server/server.h"
#include "util/log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static Server *server;
static char run_dir[] = "/tmp/weightd-fuzz-XXXXXX";

/* The server stays up for the whole run (and reachable, so leak checkers
 * do not count it); only its socket and folder are removed at exit. */
static void remove_run_dir(void) {
        char path[sizeof(run_dir) + 32];

        snprintf(path, sizeof(path), "%s/weightd.sock", run_dir);
        (void) unlink(path);
        (void) rmdir(run_dir);
}

/* The model root the seed corpus names. */
#define FUZZ_ROOT "/tmp/weightd-fuzz-root"

/* A one-tensor model, FUZZ_ROOT/model.safetensors:
 * {"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}.  Written under a
 * temporary name and renamed, so parallel fuzzers never see half a file. */
static int write_model(void) {
        static const char header[] = "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
        char tmp[256];
        uint64_t n = sizeof(header) - 1;
        uint8_t zeros[8] = {};
        FILE *f;

        if (mkdir(FUZZ_ROOT, 0755) < 0 && errno != EEXIST)
                return -1;
        snprintf(tmp, sizeof(tmp), FUZZ_ROOT "/.model.%d", (int) getpid());
        f = fopen(tmp, "we");
        if (!f)
                return -1;
        fwrite(&n, 8, 1, f);
        fwrite(header, 1, n, f);
        fwrite(zeros, 1, sizeof(zeros), f);
        if (fclose(f) != 0)
                return -1;
        return rename(tmp, FUZZ_ROOT "/model.safetensors");
}

static void setup(void) {
        char text[1024];
        WdError err = WD_ERROR_NULL;
        Config *c = NULL;

        if (!mkdtemp(run_dir) || write_model() < 0)
                abort();
        atexit(remove_run_dir);
        snprintf(text, sizeof(text),
                 "[daemon]\nsocket = %s/weightd.sock\nmodel_roots = " FUZZ_ROOT "\nmax_pending_requests = 4\n"
                 "max_frame_size = 64K\nlog_level = err\n[memory]\nhost_budget = 1M\nhugetlb_reserve = off\n"
                 "[metrics]\nlisten =\n",
                 run_dir);
        if (config_load_string(text, strlen(text), "fuzz.conf", &c, &err) != 0) {
                fprintf(stderr, "%s\n", err.message);
                abort();
        }
        if (server_new(&server, c, NULL) < 0)
                abort();
        /* The device search runs in the CUDA runtime on the thread pool; the
         * fuzzer exits without freeing the server, which would tear the
         * runtime down under a search still running. */
        while (server_searching_devices(server)) {
                server_run_nowait(server);
                usleep(1000);
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct ucred cred = { .pid = getpid(), .uid = getuid(), .gid = getgid() };
        uint8_t sink[65536];
        int sv[2];
        size_t off = 0;

        if (!server)
                setup();
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
                abort();
        if (server_add_peer(server, sv[0], &cred) < 0)
                abort();

        /* Feed the input, letting the daemon read and answer in between. */
        for (unsigned spins = 0; off < size && spins < 10000; spins++) {
                ssize_t k = write(sv[1], data + off, size - off);
                if (k > 0)
                        off += (size_t) k;
                server_run_nowait(server);
                while (read(sv[1], sink, sizeof(sink)) > 0)
                        ;
        }
        shutdown(sv[1], SHUT_WR);
        /* Until the daemon closes its end (loads may take a few turns). */
        for (unsigned spins = 0; spins < 100000; spins++) {
                ssize_t k;

                server_run_nowait(server);
                k = read(sv[1], sink, sizeof(sink));
                if (k == 0)
                        break;
                if (k < 0)
                        usleep(10);
        }
        close(sv[1]);
        server_run_nowait(server);
        return 0;
}
