/* The host backend of the collectives table (see coll-host.h). */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "cluster/coll-host.h"
#include "util/log.h"
#include "macro.h"

#define COLL_HOST_MAGIC UINT64_C(0x77646c6c6f632d68) /* "h-coll" and "wd", little-endian */
/* Bytes of broadcasts that arrived before their turn, per communicator
 * (a root runs ahead of a slower rank by what its sends took): beyond it
 * they are dropped, the broadcast then stalls and the owner's deadline
 * aborts the communicator.  A rank that sends more cannot take more. */
#define COLL_HOST_EARLY_MAX (256ull << 20)

typedef enum ItemKind { ITEM_COPY, ITEM_BROADCAST, ITEM_SIGNAL } ItemKind;

typedef struct Item {
        ItemKind kind;
        void *dst;
        const void *src;
        size_t bytes;
        int root;
        uint64_t seq;  /* broadcasts */
        GpuCollOp *op; /* signals */
        unsigned sends_left;
        bool started, receiving, ended;
        struct Item *next;
} Item;

/* A broadcast's bytes that came before the broadcast reached the head. */
typedef struct Early {
        uint64_t seq;
        uint8_t *data;
        uint64_t length;
        bool landed;
        struct Early *next;
} Early;

typedef struct Tx {
        DataPlaneSend send;
        GpuCollComm *c;
        Item *item;
        struct Tx *prev, *next;
} Tx;

typedef struct Rx {
        GpuCollComm *c;
        Item *item;   /* straight into its recv */
        Early *early; /* or into a buffer */
} Rx;

struct CollHost {
        DataPlane *data;
        unsigned self;
        uint64_t generation;
        void (*kick)(void *userdata);
        void *userdata;
        GpuCollComm *comms;
};

struct GpuCollComm {
        CollHost *h;
        uint64_t token;
        int nranks, rank;
        unsigned *peers;
        Item *head, *tail;
        uint64_t seq_enqueued; /* broadcasts enqueued */
        uint64_t seq_done;     /* broadcasts that ended here */
        Early *early;
        uint64_t early_bytes;
        Tx *txs; /* in flight */
        unsigned n_tx, n_rx;
        unsigned busy; /* progress() running: an abort from a done frees c after it */
        bool failed, aborted;
        void (*gone)(void *userdata);
        void *gone_userdata;
        GpuCollComm *prev, *next;
};

static void run(GpuCollComm *c);

static int host_unique_id(void *backend, uint8_t ret[GPU_COLL_ID_BYTES], WdError *err) {
        /* Only its hash is used (the token that tells communicators
         * apart): random bytes from the kernel. */
        if (getentropy(ret, 64) < 0 || getentropy(ret + 64, GPU_COLL_ID_BYTES - 64) < 0)
                return wd_error_set(err, -EIO, "cannot get random bytes: %s", strerror(errno));
        return 0;
}

static int host_comm_init(void *backend, const uint8_t id[GPU_COLL_ID_BYTES], int nranks, int rank, int device,
                          const unsigned *peers, GpuCollComm **ret, WdError *err) {
        CollHost *h = backend;
        GpuCollComm *c;

        if (nranks < 1 || rank < 0 || rank >= nranks || (unsigned) peers[rank] != h->self)
                return wd_error_set(err, -EINVAL, "collectives: rank %d of %d ranks", rank, nranks);
        c = calloc(1, sizeof(GpuCollComm));
        if (!c || !(c->peers = calloc((size_t) nranks, sizeof(unsigned)))) {
                free(c);
                return wd_error_set(err, -ENOMEM, "out of memory");
        }
        memcpy(c->peers, peers, (size_t) nranks * sizeof(unsigned));
        c->h = h;
        c->token = XXH3_64bits(id, GPU_COLL_ID_BYTES);
        c->nranks = nranks;
        c->rank = rank;
        c->next = h->comms;
        if (h->comms)
                h->comms->prev = c;
        h->comms = c;
        *ret = c;
        return 0;
}

static int host_comm_poll(GpuCollComm *c, WdError *err) {
        if (c->failed)
                return wd_error_set(err, -EIO, "collectives over the host links: a rank went away or a send failed");
        return 0;
}

static int enqueue(GpuCollComm *c, const Item *tmpl, WdError *err) {
        Item *it;

        if (c->failed || c->aborted)
                return wd_error_set(err, -EIO, "collectives over the host links: the communicator failed");
        it = malloc(sizeof(Item));
        if (!it)
                return wd_error_set(err, -ENOMEM, "out of memory");
        *it = *tmpl;
        it->next = NULL;
        if (c->tail)
                c->tail->next = it;
        else
                c->head = it;
        c->tail = it;
        run(c);
        return 0;
}

static int host_copy(GpuCollComm *c, void *dst, const void *src, size_t bytes, WdError *err) {
        return enqueue(c, &(Item){ .kind = ITEM_COPY, .dst = dst, .src = src, .bytes = bytes }, err);
}

static int host_broadcast(GpuCollComm *c, const void *send, void *recv, size_t bytes, int root, WdError *err) {
        if (root < 0 || root >= c->nranks)
                return wd_error_set(err, -EINVAL, "collectives: root %d of %d ranks", root, c->nranks);
        return enqueue(c, &(Item){ .kind = ITEM_BROADCAST, .dst = recv, .src = send, .bytes = bytes, .root = root,
                                   .seq = c->seq_enqueued++ }, err);
}

static int host_signal(GpuCollComm *c, GpuCollOp *op, WdError *err) {
        return enqueue(c, &(Item){ .kind = ITEM_SIGNAL, .op = op }, err);
}

static void kick_later(GpuCollComm *c) {
        if (c->h->kick)
                c->h->kick(c->h->userdata);
}

static void fail(GpuCollComm *c, const char *why) {
        if (!c->failed)
                log_warning("collectives over the host links (token %016llx): %s", (unsigned long long) c->token, why);
        c->failed = true;
        kick_later(c);
}

static void pop(GpuCollComm *c) {
        Item *it = c->head;

        c->head = it->next;
        if (!c->head)
                c->tail = NULL;
        free(it);
}

static Early *early_find(GpuCollComm *c, uint64_t seq) {
        for (Early *e = c->early; e; e = e->next)
                if (e->seq == seq)
                        return e;
        return NULL;
}

static void early_drop(GpuCollComm *c, Early *e) {
        for (Early **p = &c->early; *p; p = &(*p)->next)
                if (*p == e) {
                        *p = e->next;
                        break;
                }
        c->early_bytes -= e->length;
        free(e->data);
        free(e);
}

static void maybe_gone(GpuCollComm *c);

static void tx_done(DataPlaneSend *s, int status) {
        Tx *tx = container_of(s, Tx, send);
        GpuCollComm *c = tx->c;

        c->n_tx--;
        if (tx->prev)
                tx->prev->next = tx->next;
        else
                c->txs = tx->next;
        if (tx->next)
                tx->next->prev = tx->prev;
        if (c->aborted) {
                free(tx);
                maybe_gone(c);
                return;
        }
        if (status < 0)
                fail(c, "a broadcast's send failed");
        else if (tx->item)
                tx->item->sends_left--;
        free(tx);
        run(c);
}

/* Start the broadcast at the head: the root sends to every other rank. */
static void broadcast_start(GpuCollComm *c, Item *it) {
        CollHostHeader hdr = { .magic = COLL_HOST_MAGIC, .token = c->token, .seq = it->seq,
                               .generation = c->h->generation, .sender = c->h->self };

        it->started = true;
        if (it->root != c->rank)
                return;
        for (int r = 0; r < c->nranks; r++) {
                Tx *tx;

                if (r == c->rank)
                        continue;
                tx = calloc(1, sizeof(Tx));
                if (!tx) {
                        fail(c, "out of memory");
                        return;
                }
                tx->c = c;
                tx->item = it;
                tx->send.done = tx_done;
                if (dataplane_send(c->h->data, c->peers[r], &hdr, sizeof(hdr), it->src, it->bytes, &tx->send) < 0) {
                        free(tx);
                        fail(c, "a rank is not connected");
                        return;
                }
                c->n_tx++;
                it->sends_left++;
                tx->next = c->txs;
                if (c->txs)
                        c->txs->prev = tx;
                c->txs = tx;
        }
        /* In place on the root, as ncclBroadcast allows; else a copy. */
        if (it->dst && it->dst != it->src)
                memcpy(it->dst, it->src, it->bytes);
}

/* Run the queue as far as it goes. */
static void run(GpuCollComm *c) {
        while (c->head && !c->failed && !c->aborted) {
                Item *it = c->head;

                switch (it->kind) {
                case ITEM_COPY:
                        memcpy(it->dst, it->src, it->bytes);
                        pop(c);
                        continue;
                case ITEM_SIGNAL:
                        /* Its done runs from progress(), never within a call. */
                        if (!it->ended) {
                                it->ended = true;
                                kick_later(c);
                        }
                        return;
                case ITEM_BROADCAST: {
                        Early *e;

                        if (!it->started)
                                broadcast_start(c, it);
                        if (c->failed)
                                return;
                        if (it->root == c->rank) {
                                if (it->sends_left > 0)
                                        return;
                                c->seq_done++;
                                pop(c);
                                continue;
                        }
                        if (it->receiving)
                                return;
                        e = early_find(c, it->seq);
                        if (!e || !e->landed)
                                return;
                        if (e->length != it->bytes) {
                                fail(c, "a broadcast's size differs between ranks");
                                return;
                        }
                        memcpy(it->dst, e->data, it->bytes);
                        early_drop(c, e);
                        c->seq_done++;
                        pop(c);
                        continue;
                }
                }
        }
}

static void host_progress(GpuCollComm *c) {
        c->busy++;
        while (c->head && c->head->kind == ITEM_SIGNAL && c->head->ended && !c->failed && !c->aborted) {
                GpuCollOp *op = c->head->op;

                pop(c);
                op->done(op, 0);
                run(c);
        }
        c->busy--;
        maybe_gone(c);
}

static void maybe_gone(GpuCollComm *c) {
        CollHost *h = c->h;

        if (!c->aborted || c->busy > 0 || c->n_tx > 0 || c->n_rx > 0)
                return;
        while (c->early)
                early_drop(c, c->early);
        while (c->head)
                pop(c);
        if (c->prev)
                c->prev->next = c->next;
        else
                h->comms = c->next;
        if (c->next)
                c->next->prev = c->prev;
        if (c->gone)
                c->gone(c->gone_userdata);
        free(c->peers);
        free(c);
}

static void host_abort(GpuCollComm *c, void (*gone)(void *userdata), void *userdata) {
        c->aborted = true;
        c->gone = gone;
        c->gone_userdata = userdata;
        /* Sends end with -ECANCELED from the loop, and receives land or
         * fail: tx_done() and coll_host_received() free c once the data
         * plane let go of the memory. */
        for (Tx *tx = c->txs; tx; tx = tx->next)
                dataplane_send_cancel(c->h->data, &tx->send);
        maybe_gone(c);
}

void *coll_host_incoming(CollHost *h, const CollHostHeader *hdr, uint64_t length, void **ret_token) {
        GpuCollComm *c;
        Item *it;
        Rx *rx;

        if (hdr->magic != COLL_HOST_MAGIC)
                return NULL;
        for (c = h->comms; c; c = c->next)
                if (c->token == hdr->token)
                        break;
        if (!c || c->failed || c->aborted)
                return NULL;
        /* Only the broadcast's root sends it: find the rank it claims. */
        it = c->head;
        rx = calloc(1, sizeof(Rx));
        if (!rx)
                return NULL;
        rx->c = c;
        if (it && it->kind == ITEM_BROADCAST && it->seq == hdr->seq && it->root != c->rank && !it->receiving &&
            !early_find(c, hdr->seq) && c->peers[it->root] == hdr->sender) {
                if (length != it->bytes) {
                        free(rx);
                        fail(c, "a broadcast's size differs between ranks");
                        return NULL;
                }
                it->receiving = true;
                rx->item = it;
                c->n_rx++;
                *ret_token = rx;
                return it->dst;
        }
        if (hdr->seq < c->seq_done) {
                free(rx); /* one that ended already */
                return NULL;
        }
        if (early_find(c, hdr->seq) || length > COLL_HOST_EARLY_MAX - c->early_bytes) {
                free(rx);
                return NULL;
        }
        rx->early = calloc(1, sizeof(Early));
        if (!rx->early || !(rx->early->data = malloc(length ? length : 1))) {
                if (rx->early)
                        free(rx->early);
                free(rx);
                return NULL;
        }
        rx->early->seq = hdr->seq;
        rx->early->length = length;
        rx->early->next = c->early;
        c->early = rx->early;
        c->early_bytes += length;
        c->n_rx++;
        *ret_token = rx;
        return rx->early->data;
}

void coll_host_received(void *token, int status) {
        Rx *rx = token;
        GpuCollComm *c = rx->c;

        c->n_rx--;
        if (c->aborted) {
                free(rx);
                maybe_gone(c);
                return;
        }
        if (status < 0) {
                fail(c, "a broadcast's bytes did not arrive");
        } else if (rx->item) {
                rx->item->receiving = false;
                c->seq_done++;
                pop(c); /* it was at the head, and stays there while receiving */
        } else {
                rx->early->landed = true;
        }
        free(rx);
        run(c);
        kick_later(c);
}

void coll_host_node_down(CollHost *h, unsigned node) {
        for (GpuCollComm *c = h->comms; c; c = c->next)
                for (int r = 0; r < c->nranks; r++)
                        if (c->peers[r] == node && r != c->rank)
                                fail(c, "a rank went down");
}

static const GpuCollOps host_ops = {
        .name = "host",
        .unique_id = host_unique_id,
        .comm_init = host_comm_init,
        .comm_poll = host_comm_poll,
        .copy = host_copy,
        .broadcast = host_broadcast,
        .signal = host_signal,
        .progress = host_progress,
        .abort = host_abort,
};

int coll_host_new(CollHost **ret, DataPlane *d, unsigned self, uint64_t generation, void (*kick)(void *userdata),
                  void *userdata, GpuColl *ret_table) {
        CollHost *h = calloc(1, sizeof(CollHost));

        if (!h)
                return -ENOMEM;
        *h = (CollHost){ .data = d, .self = self, .generation = generation, .kick = kick, .userdata = userdata };
        *ret = h;
        *ret_table = (GpuColl){ .ops = &host_ops, .backend = h };
        return 0;
}

void coll_host_set_self(CollHost *h, unsigned self) {
        h->self = self;
}

CollHost *coll_host_free(CollHost *h) {
        free(h);
        return NULL;
}
