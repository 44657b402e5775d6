/* The file descriptor store: what the daemon hands the service manager
 * before it exits, and what it takes back at the next start.
 *
 * Names: the index is stored as "weightd-index", slab N as
 * "weightd-slab-N"; the meaning is in the index (store/persist.h).  Each
 * descriptor is sent in a message of its own, since FDNAME= names every
 * descriptor of a message.  The index goes first, then the slabs of the
 * most recently used entries: past FileDescriptorStoreMax= the service
 * manager refuses the rest, and the entries whose slabs were refused are
 * dropped at the next start (read again on demand).  Where the service
 * manager says its limit ($FDSTORE, systemd 254 and later) no more is sent.
 *
 * At start everything taken is removed from the store again (FDSTOREREMOVE)
 * once adopted or dropped: the store holds state only between one process
 * and the next, so a crash after start restarts with an empty cache, as it
 * did before. */
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "format/catalog.h"
#include "server/fdstore.h"
#include "server/notify.h"
#include "store/persist.h"
#include "util/log.h"
#include "util/parse-util.h"
#include "util/time-util.h"

static bool streq(const char *a, const char *b) {
        return strcmp(a, b) == 0;
}

static bool name_is_ours(const char *name) {
        return streq(name, PERSIST_INDEX_NAME) || persist_slab_id(name) >= 0;
}

static bool is_listening_unix_stream(int fd) {
        struct sockaddr_storage sa;
        socklen_t len = sizeof(sa);
        int type = 0, listening = 0;
        socklen_t l = sizeof(int);

        if (getsockname(fd, (struct sockaddr *) &sa, &len) < 0 || sa.ss_family != AF_UNIX)
                return false;
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l) < 0 || type != SOCK_STREAM)
                return false;
        l = sizeof(int);
        return getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &l) == 0 && listening;
}

void fdstore_done(FdStore *fs) {
        for (size_t i = 0; i < fs->n; i++) {
                safe_close(fs->fds[i]);
                free(fs->names[i]);
        }
        free(fs->fds);
        free(fs->names);
        *fs = FDSTORE_NULL;
}

int fdstore_take(FdStore *fs) {
        char **names = NULL;
        int n, listen_fd = 0, sockets = 0, r = 0;

        n = notify_listen_fds(&names);
        if (n < 0)
                return log_error_errno(n, "Cannot read the descriptors the service manager passed: %m");
        if (n == 0)
                return 0;
        fs->fds = calloc((size_t) n, sizeof(int));
        fs->names = calloc((size_t) n, sizeof(char *));
        if (!fs->fds || !fs->names) {
                for (int i = 0; i < n; i++)
                        safe_close(3 + i);
                notify_names_free(names);
                fdstore_done(fs);
                return log_error_errno(-ENOMEM, "Out of memory");
        }
        for (int i = 0; i < n; i++) {
                int fd = 3 + i;
                const char *name = names && names[i] ? names[i] : "unknown";

                if (name_is_ours(name)) {
                        fs->names[fs->n] = strdup(name);
                        if (!fs->names[fs->n]) {
                                safe_close(fd);
                                r = -ENOMEM;
                                continue;
                        }
                        fs->fds[fs->n++] = fd;
                        continue;
                }
                if (is_listening_unix_stream(fd)) {
                        sockets++;
                        if (listen_fd == 0) {
                                listen_fd = fd;
                                continue;
                        }
                } else {
                        /* Not the socket unit's and not ours: something
                         * in the store that is not ours to keep. */
                        log_warning("The service manager passed descriptor %d named \"%s\" that is neither a "
                                    "listening Unix stream socket nor weightd's; closing it, ignoring.",
                                    fd, name);
                        (void) notify_store_remove(name);
                }
                safe_close(fd);
        }
        notify_names_free(names);
        if (r < 0) {
                if (listen_fd > 0)
                        safe_close(listen_fd);
                return log_error_errno(r, "Out of memory");
        }
        if (sockets > 1) {
                safe_close(listen_fd);
                return log_error_errno(-EINVAL, "The service manager passed %d listening sockets; weightd takes one",
                                       sockets);
        }
        if (fs->n > 0)
                log_debug("The service manager passed %zu descriptors from its store", fs->n);
        return listen_fd;
}

/* ---- adopting ----------------------------------------------------------- */

/* Remove what was taken from the store: it is adopted or dropped now. */
static void store_remove_all(FdStore *fs) {
        for (size_t i = 0; i < fs->n; i++) {
                bool seen = false;

                for (size_t k = 0; k < i && !seen; k++)
                        seen = streq(fs->names[k], fs->names[i]);
                if (!seen)
                        (void) notify_store_remove(fs->names[i]);
        }
}

static const char *entry_label(char *buf, size_t size, const PersistEntry *pe) {
        snprintf(buf, size, "%s%s%s%s%s%s", pe->model, pe->component[0] ? " component " : "", pe->component,
                 pe->variant[0] ? " (" : "", pe->variant, pe->variant[0] ? ")" : "");
        return buf;
}

/* Whether the component's files are still those the entry holds: resolved
 * again as a request would, and compared identity by identity.  Returns 0,
 * or WD_E_CHANGED and the like with err filled. */
static int entry_check_files(Roots *roots, const PersistEntry *pe, WdError *err) {
        _cleanup_free_ char *rel = NULL, *key = NULL;
        _cleanup_(component_freep) Component *comp = NULL;
        Root *root;
        int r;

        r = roots_resolve(roots, pe->model, &root, &rel, &key, err);
        if (r != 0)
                return r;
        if (!streq(key, pe->model))
                return wd_error_set(err, WD_E_CHANGED, "the model path now reads %s", key);
        r = catalog_resolve(root->catalog, rel, pe->component, &comp, err);
        if (r != 0)
                return r;
        if (comp->n_files != pe->n_files)
                return wd_error_set(err, WD_E_CHANGED, "it has %zu files now, %zu then", comp->n_files,
                                    pe->n_files);
        for (size_t i = 0; i < comp->n_files; i++)
                if (!file_id_equal(&comp->files[i].id, &pe->ids[i]))
                        return wd_error_set(err, WD_E_CHANGED, "%s changed", comp->files[i].display);
        return 0;
}

/* The slabs of pe, each taken from fds (by id) and checked.  Returns 0 and
 * the slabs, or an error with err filled (what was taken is closed). */
static int entry_take_slabs(const PersistEntry *pe, int *by_id, Slab ***ret, WdError *err) {
        Slab **slabs = calloc(pe->n_slabs, sizeof(Slab *));
        size_t missing = 0;
        int r = 0;

        if (!slabs)
                return wd_error_set(err, -ENOMEM, "out of memory");
        for (size_t i = 0; i < pe->n_slabs; i++)
                if (by_id[pe->slabs[i].id] < 0)
                        missing++;
        if (missing > 0)
                r = wd_error_set(err, WD_E_NOT_FOUND,
                                 "%zu of its %zu slabs are not in the store (FileDescriptorStoreMax= too low?)",
                                 missing, pe->n_slabs);
        for (size_t i = 0; i < pe->n_slabs; i++) {
                int fd = by_id[pe->slabs[i].id];

                by_id[pe->slabs[i].id] = -1;
                if (fd < 0 || r != 0) {
                        safe_close(fd);
                        continue;
                }
                r = persist_slab_adopt(fd, &pe->slabs[i], &slabs[i], err);
                if (r != 0)
                        wd_error_prefix(err, "slab %zu", i);
        }
        if (r != 0) {
                for (size_t i = 0; i < pe->n_slabs; i++)
                        slab_free(slabs[i]);
                free(slabs);
                return r;
        }
        *ret = slabs;
        return 0;
}

uint64_t fdstore_adopt(FdStore *fs, Cache *cache, Roots *roots) {
        _cleanup_(persist_index_freep) PersistIndex *x = NULL;
        _cleanup_free_ int *by_id = NULL;
        WdError err = WD_ERROR_NULL;
        uint64_t start = now_usec(), bytes = 0, huge = 0;
        size_t n_adopted = 0, n_index = 0, n_stray = 0;
        int index_fd = -1, r;

        if (fs->n == 0)
                return 0;
        for (size_t i = 0; i < fs->n; i++)
                if (streq(fs->names[i], PERSIST_INDEX_NAME)) {
                        n_index++;
                        index_fd = fs->fds[i];
                }
        if (n_index != 1) {
                log_warning("The service manager's store holds %zu slabs and %zu indexes; adopting nothing, ignoring.",
                            fs->n - n_index, n_index);
                goto finish;
        }
        r = persist_index_read(index_fd, &x, &err);
        if (r != 0) {
                log_warning("Refusing the index in the service manager's store: %s; dropping its %zu slabs and "
                            "starting with an empty cache, ignoring.",
                            err.message, fs->n - 1);
                goto finish;
        }

        by_id = malloc(MAX(x->n_slab_ids, 1u) * sizeof(int));
        if (!by_id) {
                log_warning_errno(-ENOMEM, "Cannot adopt the stored host tier: %m, ignoring.");
                goto finish;
        }
        for (uint32_t i = 0; i < x->n_slab_ids; i++)
                by_id[i] = -1;
        for (size_t i = 0; i < fs->n; i++) {
                int64_t id = persist_slab_id(fs->names[i]);

                if (id < 0)
                        continue;
                if ((uint64_t) id >= x->n_slab_ids || by_id[id] >= 0) {
                        n_stray++;
                        continue; /* closed at the end */
                }
                by_id[id] = TAKE_FD(fs->fds[i]);
        }

        /* Least recently used first: each adoption goes to the front, so
         * the order of use comes back as it was. */
        for (size_t k = x->n_entries; k > 0; k--) {
                const PersistEntry *pe = &x->entries[k - 1];
                char label[WD_ERROR_MESSAGE_MAX];
                Slab **slabs = NULL;

                err = WD_ERROR_NULL;
                entry_label(label, sizeof(label), pe);
                r = entry_take_slabs(pe, by_id, &slabs, &err);
                if (r == 0) {
                        r = entry_check_files(roots, pe, &err);
                        if (r != 0) {
                                /* Stale: its pages go now (slab_free()
                                 * truncates), not only when every mapping
                                 * is gone. */
                                for (size_t i = 0; i < pe->n_slabs; i++)
                                        slab_free(slabs[i]);
                                free(slabs);
                        } else {
                                uint64_t h = 0;

                                for (size_t i = 0; i < pe->n_slabs; i++)
                                        if (slabs[i]->hugetlb)
                                                h += slabs[i]->capacity;
                                r = persist_entry_adopt(cache, pe, slabs, &err);
                                if (r == 0)
                                        huge += h;
                        }
                }
                if (r != 0) {
                        log_info("Not adopting %s from the service manager's store: %s", label, err.message);
                        continue;
                }
                n_adopted++;
                bytes += pe->bytes;
                log_debug("Adopted %s (%" PRIu64 " bytes, %zu slabs) from the service manager's store", label,
                          pe->bytes, pe->n_slabs);
        }
        for (uint32_t i = 0; i < x->n_slab_ids; i++)
                if (by_id[i] >= 0) {
                        n_stray++;
                        safe_close(by_id[i]);
                }
        if (n_stray > 0)
                log_warning("%zu descriptors in the service manager's store belong to no entry of its index, ignoring.",
                            n_stray);
        log_info("Adopted %zu of %zu host entries (%.2f GiB) from the service manager's store in %.1f ms",
                 n_adopted, x->n_entries, (double) bytes / (1u << 30), (double) (now_usec() - start) / 1000.0);
finish:
        store_remove_all(fs);
        fdstore_done(fs);
        return huge;
}

/* ---- saving ------------------------------------------------------------- */

void fdstore_save(Cache *cache) {
        _cleanup_free_ Slab **slabs = NULL;
        _cleanup_close_ int index_fd = -1;
        const char *e = getenv("FDSTORE");
        uint64_t max = UINT64_MAX, start = now_usec(), bytes = 0;
        size_t n_slabs = 0, n_entries = 0, sent = 0;
        char name[PERSIST_NAME_MAX];
        int r;

        if (!notify_available())
                return;
        /* systemd 254 and later say how many descriptors the store takes. */
        if (e && parse_u64(e, 0, UINT64_MAX, &max) < 0)
                max = UINT64_MAX;
        if (max == 0) {
                log_debug("The service manager keeps no descriptors for this service (FDSTORE=0)");
                return;
        }
        r = persist_index_save(cache, (size_t) MIN(max - 1, (uint64_t) SIZE_MAX), &index_fd, &slabs, &n_slabs,
                               &n_entries);
        if (r < 0) {
                log_warning_errno(r, "Cannot write the index of the host tier for the next start: %m, ignoring.");
                return;
        }
        if (n_entries == 0)
                return;
        r = notify_store_fd(index_fd, PERSIST_INDEX_NAME);
        if (r <= 0) {
                log_warning_errno(r < 0 ? r : -ENOTCONN, "Cannot hand the host tier to the service manager: %m, ignoring.");
                return;
        }
        for (size_t i = 0; i < n_slabs; i++) {
                r = notify_store_fd(slabs[i]->fd, persist_slab_name((uint32_t) i, name));
                if (r <= 0) {
                        log_warning_errno(r < 0 ? r : -ENOTCONN,
                                          "Cannot hand slab %zu of %zu to the service manager: %m; the rest is read "
                                          "again after the restart, ignoring.",
                                          i, n_slabs);
                        break;
                }
                bytes += slabs[i]->size;
                /* The store holds it now: freeing the cache must not take
                 * its pages. */
                persist_slab_release(slabs[i]);
                sent++;
        }
        log_info("Handed %zu host entr%s (%zu slabs, %.2f GiB) to the service manager's store in %.1f ms", n_entries,
                 n_entries == 1 ? "y" : "ies", sent, (double) bytes / (1u << 30),
                 (double) (now_usec() - start) / 1000.0);
}
