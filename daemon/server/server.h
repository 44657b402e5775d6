/* The daemon: a libuv loop serving the control API on a Unix socket over the
 * storage core.  main.c parses arguments and calls server_new() and
 * server_run(). */
#pragma once

#include <stdbool.h>

#include "server/config.h"

typedef struct Server Server;

/* Takes ownership of config.  config_path is re-read on SIGHUP (NULL: the
 * built-in defaults, nothing to re-read).  Opens the listening socket (passed
 * by the service manager, or bound at config->socket) and the model roots.
 * Returns 0 or -errno, logged. */
int server_new(Server **ret, Config *config, const char *config_path);
Server *server_free(Server *s);
DEFINE_TRIVIAL_CLEANUP_FUNC(Server *, server_free);

/* Serve an already-connected socket as a peer with these credentials (for
 * fuzzers and tests: a socketpair end stands in for an accepted client).
 * Takes fd.  Returns 0, or -errno (fd closed). */
struct ucred;
int server_add_peer(Server *s, int fd, const struct ucred *cred);
/* Run the loop once without blocking; returns whether handles are active. */
int server_run_nowait(Server *s);
/* Whether the daemon still looks for its GPUs (on the thread pool, inside
 * the CUDA runtime).  A program that embeds a server and may exit without
 * server_free() (a fuzzer) runs the loop until this is false first: a
 * process exit tears the runtime down under the search. */
bool server_searching_devices(const Server *s);

/* Serve until SIGTERM or SIGINT, then drain.  Returns 0 or -errno. */
int server_run(Server *s);
/* Block the signals server_run() handles, in the calling thread and every
 * thread it starts after; server_run() unblocks them in its own once its
 * handlers are in place. */
void server_block_signals(void);
