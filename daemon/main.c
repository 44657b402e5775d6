/* weightd: parses the command line, loads the configuration, raises the
 * descriptor limit, sets when malloc gives memory back and runs the server.
 * Everything else lives in the core library. */

#include <getopt.h>
#include <inttypes.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "server/config.h"
#include "server/server.h"
#include "util/fs-util.h"
#include "util/log.h"

static void help(void) {
        printf("Usage: weightd [--config FILE] [--check-config]\n"
               "\n"
               "Serve safetensors model weights from shared memory to local workers.\n"
               "\n"
               "  -c, --config FILE   read FILE and FILE.d/*.conf (default: built-in defaults)\n"
               "      --check-config  validate the configuration, print it and exit 0, or exit 1\n"
               "                      with the file, line and reason\n"
               "      --version       print the version and exit\n"
               "  -h, --help          print this help and exit\n");
}

int main(int argc, char **argv) {
        enum { ARG_CHECK_CONFIG = 0x100, ARG_VERSION };
        static const struct option options[] = {
                { "config", required_argument, NULL, 'c' },
                { "check-config", no_argument, NULL, ARG_CHECK_CONFIG },
                { "version", no_argument, NULL, ARG_VERSION },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        _cleanup_(server_freep) Server *server = NULL;
        Config *config = NULL;
        const char *config_path = NULL;
        bool check = false;
        WdError err = WD_ERROR_NULL;
        int c, r;

        while ((c = getopt_long(argc, argv, "c:h", options, NULL)) >= 0) {
                switch (c) {
                case 'c':
                        config_path = optarg;
                        break;
                case ARG_CHECK_CONFIG:
                        check = true;
                        break;
                case ARG_VERSION:
                        printf("weightd %s\n", WEIGHTD_VERSION);
                        return 0;
                case 'h':
                        help();
                        return 0;
                default:
                        return 2;
                }
        }
        if (optind < argc) {
                fprintf(stderr, "weightd: unexpected argument \"%s\"; see --help\n", argv[optind]);
                return 2;
        }

        r = config_load(config_path, &config, &err);
        if (r != 0) {
                fprintf(stderr, "weightd: %s\n", err.message);
                return 1;
        }
        if (check) {
                fprintf(stderr, "weightd: %s: configuration is valid\n", config_path ? config_path : "(built-in defaults)");
                (void) config_dump(config, stdout);
                config_free(config);
                return 0;
        }

        /* Peers that go away must not kill the daemon; sends use MSG_NOSIGNAL
         * too. */
        signal(SIGPIPE, SIG_IGN);
        /* SIGTERM, SIGINT and SIGHUP wait until the loop handles them
         * (server_run()): one that comes while the daemon starts (its socket
         * already answers) must stop it the way it stops later, giving back
         * what it took, not kill it.  Every thread started from here on
         * keeps them blocked, so they reach the loop's thread. */
        server_block_signals();

        /* A reply to a Load of a resident component allocates its tensor
         * table and its packed frame (a few MiB each for 100,000 tensors)
         * and frees them once sent.  With glibc's defaults the free gives
         * the top of the heap back to the kernel (brk), so every Load
         * faulted the same ~10 MiB in again: more than half of its CPU
         * time.  Blocks up to 32 MiB come from the heap, and up to 64 MiB
         * free at its top stay there for the next reply. */
        (void) mallopt(M_MMAP_THRESHOLD, 32 << 20);
        (void) mallopt(M_TRIM_THRESHOLD, 64 << 20);

        /* Before the server opens anything; logged once server_new() has set
         * the configured log level. */
        uint64_t nofile_old = 0, nofile_new = 0;
        int nofile = rlimit_nofile_bump(&nofile_old, &nofile_new);

        r = server_new(&server, config, config_path);
        if (r < 0)
                return 1;
        if (nofile < 0)
                log_warning_errno(nofile, "Cannot raise the soft limit on open files (RLIMIT_NOFILE): %m, ignoring.");
        else if (nofile_new != nofile_old)
                log_debug("Raised the soft limit on open files (RLIMIT_NOFILE) from %" PRIu64 " to %" PRIu64,
                          nofile_old, nofile_new);
        else
                log_debug("The soft limit on open files (RLIMIT_NOFILE) is %" PRIu64 ", the hard limit", nofile_new);
        r = server_run(server);
        return r < 0 ? 1 : 0;
}
