/* wd-verify: load model components through the daemon and check every
 * served byte against the files on disk.
 *
 *   wd-verify [--socket PATH] MODEL [COMPONENT...]
 *
 * For each component (the plain model when none is named) it takes a lease,
 * then, for every tensor, reads the same byte range from the file with
 * pread() and compares it with the mapped slab.  An example of the client
 * library as much as a check: connect, load, walk the manifest, release. */

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <weightd/client.h>

static int compare_file_range(int fd, uint64_t offset, const uint8_t *data, uint64_t n) {
        static uint8_t buf[1 << 20];

        while (n > 0) {
                size_t want = n < sizeof(buf) ? (size_t) n : sizeof(buf);
                ssize_t k = pread(fd, buf, want, (off_t) offset);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0)
                        return -EIO;
                if (memcmp(buf, data, (size_t) k) != 0)
                        return 1;
                offset += (uint64_t) k;
                data += k;
                n -= (uint64_t) k;
        }
        return 0;
}

static int verify(wd_client *c, const char *model, const char *component) {
        const char *shown = component && *component ? component : model;
        wd_lease *lease = NULL;
        wd_error err;
        int *fds, bad = 0;

        if (wd_load(c, model, component, &lease, &err) != WD_OK) {
                fprintf(stderr, "wd-verify: %s: %s: %s\n", shown, wd_code_name(err.code), err.message);
                return 1;
        }
        const wd_manifest *m = wd_lease_manifest(lease);
        size_t n_files = wd_manifest_n_files(m);

        fds = calloc(n_files ? n_files : 1, sizeof(int));
        if (!fds)
                return 1;
        for (size_t i = 0; i < n_files; i++) {
                fds[i] = open(wd_manifest_file(m, i), O_RDONLY | O_CLOEXEC);
                if (fds[i] < 0) {
                        fprintf(stderr, "wd-verify: %s: %s\n", wd_manifest_file(m, i), strerror(errno));
                        bad = 1;
                }
        }
        for (size_t i = 0; i < wd_manifest_n_tensors(m) && !bad; i++) {
                const wd_tensor *t = wd_manifest_tensor(m, i);
                int r = compare_file_range(fds[t->file], t->offset, t->data, t->nbytes);
                if (r != 0) {
                        fprintf(stderr, "wd-verify: %s: tensor \"%s\": %s\n", shown, t->name,
                                r > 0 ? "served bytes differ from the file" : "cannot read the file");
                        bad = 1;
                }
        }
        if (!bad)
                printf("%s: %zu tensors, %.1f MiB in %zu file%s: every byte matches the files\n", shown,
                       wd_manifest_n_tensors(m), (double) wd_manifest_bytes(m) / (1 << 20), n_files,
                       n_files == 1 ? "" : "s");
        for (size_t i = 0; i < n_files; i++)
                if (fds[i] >= 0)
                        close(fds[i]);
        free(fds);
        (void) wd_release(lease, NULL);
        return bad;
}

int main(int argc, char **argv) {
        static const struct option options[] = {
                { "socket", required_argument, NULL, 's' },
                {},
        };
        const char *sock = NULL;
        wd_client *c = NULL;
        wd_error err;
        int opt, bad = 0;

        while ((opt = getopt_long(argc, argv, "s:", options, NULL)) >= 0) {
                if (opt != 's') {
                        fprintf(stderr, "usage: wd-verify [--socket PATH] MODEL [COMPONENT...]\n");
                        return 2;
                }
                sock = optarg;
        }
        if (optind >= argc) {
                fprintf(stderr, "usage: wd-verify [--socket PATH] MODEL [COMPONENT...]\n");
                return 2;
        }
        if (wd_connect(sock, &c, &err) != WD_OK) {
                fprintf(stderr, "wd-verify: %s: %s\n", wd_code_name(err.code), err.message);
                return 1;
        }
        if (optind + 1 == argc)
                bad |= verify(c, argv[optind], NULL);
        for (int i = optind + 1; i < argc; i++)
                bad |= verify(c, argv[optind], argv[i]);
        wd_disconnect(c);
        return bad;
}
