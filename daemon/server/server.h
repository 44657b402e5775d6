/* The daemon: a libuv loop serving the control API on a Unix socket over the
 * storage core.  main.c parses arguments and calls server_new() and
 * server_run(). */
#pragma once

#include "server/config.h"

typedef struct Server Server;

/* Takes ownership of config.  config_path is re-read on SIGHUP (NULL: the
 * built-in defaults, nothing to re-read).  Opens the listening socket (passed
 * by the service manager, or bound at config->socket) and the model roots.
 * Returns 0 or -errno, logged. */
int server_new(Server **ret, Config *config, const char *config_path);
Server *server_free(Server *s);
DEFINE_TRIVIAL_CLEANUP_FUNC(Server *, server_free);

/* Serve until SIGTERM or SIGINT, then drain.  Returns 0 or -errno. */
int server_run(Server *s);
